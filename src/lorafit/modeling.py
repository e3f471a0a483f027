"""Load the base model (bf16, int8 or nf4), prepare it for training, and attach the adapter.

Everything here is transformers + bitsandbytes + peft; lorafit only picks the settings and turns
their failures into one-line errors. Weights load through safetensors unless the user allows
pickle files; ``trust_remote_code`` stays off unless the config turns it on.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from lorafit.builtin import resolve_model
from lorafit.config import LorafitConfig
from lorafit.errors import ConfigError, LorafitError, first_line
from lorafit.fused import apply_fused_ops

# Per-architecture LoRA targets when the config names none. Attention projections everywhere:
# the recipe's choice for BLOOM, and the common one for Llama-family models.
_ATTENTION_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
DEFAULT_TARGETS: dict[str, list[str]] = {
    "bloom": ["query_key_value"],
    "llama": _ATTENTION_TARGETS,
    "mistral": _ATTENTION_TARGETS,
    "mixtral": _ATTENTION_TARGETS,
    "qwen2": _ATTENTION_TARGETS,
    "qwen3": _ATTENTION_TARGETS,
    "gemma": _ATTENTION_TARGETS,
    "gemma2": _ATTENTION_TARGETS,
    "phi3": ["qkv_proj", "o_proj"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "falcon": ["query_key_value"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj"],
}


def default_target_modules(model_type: str) -> list[str]:
    """LoRA targets for an architecture: ours, else peft's table, else a clear error."""
    if model_type in DEFAULT_TARGETS:
        return list(DEFAULT_TARGETS[model_type])
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS,
    )

    if model_type in PEFT_TARGETS:
        return list(PEFT_TARGETS[model_type])
    raise ConfigError(
        f"lora.target_modules: no default for model type '{model_type}'; list module names or use 'all-linear'"
    )


def lora_config_for(config: LorafitConfig, model_config: Any) -> Any:
    """The peft ``LoraConfig`` for this run (also used by the planner on the meta device)."""
    from peft import LoraConfig

    settings = config.lora
    targets = settings.target_modules or default_target_modules(model_config.model_type)
    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        bias=settings.bias,
        use_dora=settings.variant == "dora",
        use_rslora=settings.variant == "rslora",
        task_type="CAUSAL_LM",
    )


def resolve_dtype(config: LorafitConfig, device: torch.device | None = None) -> torch.dtype:
    """The dtype for unquantized weights: explicit, else bf16 on GPUs that support it, else fp32."""
    explicit = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if config.model.dtype in explicit:
        return explicit[config.model.dtype]
    device = device or default_device()
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def default_device() -> torch.device:
    """This process's device: its local GPU under a distributed launcher, else cuda:0, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def model_path(config: LorafitConfig) -> str:
    """The model location to load from: builtin names resolved, local paths checked for existence."""
    name = config.model.name_or_path
    resolved = resolve_model(name)
    local = Path(resolved).expanduser()
    if local.is_file():
        raise ConfigError(f"model.name_or_path: '{name}' is a file; expected a model folder or a hub id")
    if local.exists():
        return str(local)
    if resolved.startswith(("/", ".", "~")) or resolved.count("/") > 1 or os.sep != "/" and os.sep in resolved:
        raise ConfigError(f"model.name_or_path: '{name}' does not exist")
    return resolved  # a hub id: transformers resolves it (and fails clearly when offline)


def _common_kwargs(config: LorafitConfig) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"trust_remote_code": config.model.trust_remote_code}
    if config.model.revision:
        kwargs["revision"] = config.model.revision
    if config.model.gguf_file:
        kwargs["gguf_file"] = config.model.gguf_file
    return kwargs


def load_tokenizer(config: LorafitConfig) -> Any:
    """The tokenizer, with a pad token (EOS when the model has none) and right padding for training."""
    from transformers import AutoTokenizer

    path = model_path(config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **_common_kwargs(config))
    except (OSError, ValueError) as exc:
        raise LorafitError(f"model.name_or_path: cannot load a tokenizer from '{path}' ({_reason(exc)})") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def quantization_config(config: LorafitConfig, compute_dtype: torch.dtype) -> Any | None:
    """bitsandbytes settings: LLM.int8() as in the recipe, or QLoRA's NF4 with double quantization."""
    from transformers import BitsAndBytesConfig

    if config.model.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if config.model.quantization == "nf4":
        # FSDP shards floating-point tensors: with train.fsdp the packed 4-bit weights are stored in
        # the compute dtype (same bits, another view), so the blocks can be sharded like the rest
        storage = {"bnb_4bit_quant_storage": compute_dtype} if config.train.fsdp else {}
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
            **storage,
        )
    return None


def _check_weights_format(path: str, allow_pickle: bool) -> None:
    """Refuse pickle-only local checkpoints unless allowed: unpickling can run arbitrary code."""
    folder = Path(path)
    if not folder.is_dir() or allow_pickle:
        return
    if any(folder.glob("*.safetensors")) or any(folder.glob("*.gguf")):
        return
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.pth")):
        raise LorafitError(
            f"model.name_or_path: '{path}' holds only pickle weights (.bin/.pt), which can run code when "
            "loaded; convert to safetensors, or set model.allow_pickle: true (CLI: --allow-pickle) if you trust it"
        )


def load_base_model(
    config: LorafitConfig,
    device: torch.device | None = None,
    *,
    quantization: str | None = None,
    dtype: torch.dtype | None = None,
) -> Any:
    """The frozen base model on ``device``, quantized per config (or per ``quantization``)."""
    from transformers import AutoModelForCausalLM

    device = device or default_device()
    path = model_path(config)
    _check_weights_format(path, config.model.allow_pickle)
    if config.model.trust_remote_code:
        print("lorafit: trust_remote_code is ON: the model repository's Python code will run", flush=True)
    dtype = dtype or resolve_dtype(config, device)
    quant = quantization if quantization is not None else config.model.quantization
    kwargs = _common_kwargs(config)
    kwargs["dtype"] = dtype
    if not config.model.allow_pickle and not config.model.gguf_file:
        kwargs["use_safetensors"] = True
    if config.model.attn_implementation:
        kwargs["attn_implementation"] = config.model.attn_implementation
    if quant != "none":
        settings = config.model_copy(update={"model": config.model.model_copy(update={"quantization": quant})})
        kwargs["quantization_config"] = quantization_config(settings, dtype)
    if quant != "none" or device.type == "meta":  # meta: the model's shapes only, no weights read
        kwargs["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, ImportError) as exc:  # ImportError: a backend package is missing
        raise LorafitError(f"model.name_or_path: cannot load '{path}' ({_reason(exc)})") from exc
    if quant == "none":
        model.to(device)
    model.config.use_cache = False
    return model


def attach_adapter(model: Any, config: LorafitConfig) -> Any:
    """Prepare the frozen base for training and wrap it with a fresh LoRA adapter (seeded)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    checkpointing = config.train.gradient_checkpointing
    ckpt_kwargs = {"use_reentrant": False}
    # k-bit preparation upcasts the unquantized rest (embeddings, norms, head) to fp32; with an nf4
    # base under FSDP that rest is whole on every GPU, so it stays in the compute dtype there
    sharded_nf4 = config.train.fsdp and config.model.quantization == "nf4"
    if config.model.quantization != "none" and not sharded_nf4:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if checkpointing:
        _enable_checkpointing(model, ckpt_kwargs, config.train.checkpoint_every)
        # Frozen embeddings give outputs that don't require grad; checkpointed blocks then see no
        # grad path ("element 0 of tensors does not require grad"). Make the inputs require it.
        model.enable_input_require_grads()
    for module in model.modules():
        # bitsandbytes repacks 4-bit weights into a CPU inference layout the first time a layer runs
        # in eval mode (on AVX512-BF16 CPUs) and never back; that layout's matmul has no backward,
        # so training after an evaluation would get wrong gradients. Keep the training layout.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    fused = apply_fused_ops(model) if config.train.fused_ops else []
    torch.manual_seed(config.train.seed)
    try:
        peft_model = get_peft_model(model, lora_config_for(config, model.config))
    except ValueError as exc:
        raise ConfigError(f"lora.target_modules: {first_line(exc)}") from exc
    peft_model.fused_ops = fused  # what apply_fused_ops changed, for the run's log
    return peft_model


def _enable_checkpointing(model: Any, kwargs: dict[str, Any], every: int) -> None:
    """Checkpoint every ``every``-th decoder layer (transformers' own switch where it has one)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(kwargs, every_n_layers=every)
        return
    if every != 1:  # older transformers: all layers or none
        raise ConfigError("train.checkpoint_every: needs transformers >= 5 (activation_checkpointing_enable); "
                          "set it to 1 or upgrade transformers")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def load_model(config: LorafitConfig, device: torch.device | None = None) -> Any:
    """Base model + fresh adapter, ready to train."""
    return attach_adapter(load_base_model(config, device), config)


def trainable_line(model: Any) -> tuple[str, int, int]:
    """peft's trainable-parameter line (``trainable params: N || all params: M || trainable%: P``)."""
    trainable, total = model.get_nb_trainable_parameters()
    line = f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
    return line, trainable, total


def _reason(exc: BaseException) -> str:
    """Why transformers could not load: its first line, or what to do when the repo ships code."""
    if "contains custom code" in str(exc):
        return ("it ships its own Python code, which runs only with model.trust_remote_code: true "
                "(CLI: --trust-remote-code); turn that on only if you trust the code")
    return first_line(exc)

