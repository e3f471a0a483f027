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
from safetensors import SafetensorError

from lorafit.config import LorafitConfig
from lorafit.errors import ConfigError, LorafitError, first_line, load_reason
from lorafit.fused import apply_adapter_fused_ops, apply_fused_ops
from lorafit.resolved import ResolvedRun, pretrained_kwargs

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


def lora_targets(config: LorafitConfig, model_type: str) -> list[str] | str:
    """The adapter's target modules: the config's, else the architecture's default."""
    return config.lora.target_modules or default_target_modules(model_type)


def lora_config_for(config: LorafitConfig, targets: list[str] | str) -> Any:
    """The peft ``LoraConfig`` for this run (also used by the planner on the meta device)."""
    from peft import LoraConfig

    settings = config.lora
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


def default_device() -> torch.device:
    """This process's device: its local GPU under a distributed launcher, else cuda:0, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def load_tokenizer(run: ResolvedRun) -> Any:
    """The tokenizer, with a pad token (EOS when the model has none) and right padding for training."""
    from transformers import AutoTokenizer

    location = run.source.location
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **pretrained_kwargs(run.config))
    except (OSError, ValueError) as exc:
        raise LorafitError(f"model.name_or_path: cannot load a tokenizer from '{location}' ({load_reason(exc)})") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def quantization_config(quantization: str, compute_dtype: torch.dtype, *, sharded: bool = False) -> Any | None:
    """bitsandbytes settings: LLM.int8() as in the recipe, or QLoRA's NF4 with double quantization."""
    from transformers import BitsAndBytesConfig

    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quantization == "nf4":
        # FSDP shards floating-point tensors: with train.fsdp the packed 4-bit weights are stored in
        # the compute dtype (same bits, another view), so the blocks can be sharded like the rest
        storage = {"bnb_4bit_quant_storage": compute_dtype} if sharded else {}
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


def check_weight_files(path: str) -> None:
    """Every safetensors file of a local model folder has a whole header and all the bytes it
    announces (safetensors checks both when it opens a file, reading only the header): an
    interrupted download or an error page saved under the weights' name fails here, naming the file,
    before minutes of loading."""
    from safetensors import SafetensorError, safe_open

    folder = Path(path)
    if not folder.is_dir():
        return
    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (SafetensorError, OSError) as exc:
            raise LorafitError(f"model.name_or_path: {file} is damaged: {first_line(exc)} (truncated or not a "
                               "safetensors file: an interrupted download?); download it again") from exc


def load_error_field(exc: BaseException, run: ResolvedRun) -> str:
    """The config field a model-loading failure is about: the attention backend or the GGUF file
    when the library's message names them, else the model itself."""
    text = str(exc)
    if run.attn_implementation and "attn_implementation" in text:
        return "model.attn_implementation"
    if run.config.model.gguf_file and run.config.model.gguf_file in text:
        return "model.gguf_file"
    return "model.name_or_path"


def load_base_model(run: ResolvedRun, device: torch.device | None = None) -> Any:
    """The frozen base model on ``device``, in the run's dtype and quantization."""
    from transformers import AutoModelForCausalLM

    device = device or default_device()
    model_settings = run.config.model
    location = run.source.location
    _check_weights_format(location, model_settings.allow_pickle)
    check_weight_files(location)
    if model_settings.trust_remote_code:
        print("lorafit: trust_remote_code is ON: the model repository's Python code will run", flush=True)
    precision = run.precision
    kwargs = pretrained_kwargs(run.config)
    kwargs["dtype"] = precision.weights_dtype
    if not model_settings.allow_pickle and not model_settings.gguf_file:
        kwargs["use_safetensors"] = True
    if run.attn_implementation:
        kwargs["attn_implementation"] = run.attn_implementation
    if run.quantization != "none":
        compute = precision.compute_dtype  # float32 unless autocast: what the run says it computes in
        kwargs["quantization_config"] = quantization_config(run.quantization, compute,
                                                            sharded=run.fsdp)
    if run.quantization != "none" or device.type == "meta":  # meta: the model's shapes only, no weights read
        kwargs["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    except (OSError, ValueError, ImportError, SafetensorError) as exc:  # ImportError: a backend package is missing
        raise LorafitError(f"{load_error_field(exc, run)}: cannot load '{location}' ({load_reason(exc)})") from exc
    if run.quantization == "none":
        model.to(device)
    apply_storage(model, run)
    model.config.use_cache = False
    return model


def apply_storage(model: Any, run: ResolvedRun) -> None:
    """Keep a 16-bit base's matrices 16-bit when the run computes in fp32 (``lorafit.storage``);
    any freshly built base gets this before its adapter, as one loaded from files does."""
    if run.stores_16bit:
        from lorafit.storage import keep_16bit_compute_fp32

        keep_16bit_compute_fp32(model)


def attach_adapter(model: Any, run: ResolvedRun) -> tuple[Any, list[str]]:
    """Prepare the frozen base for training and wrap it with a fresh LoRA adapter (seeded).

    Returns the peft model and what ``lorafit.fused`` swapped, for the run's log.
    """
    from peft import get_peft_model, prepare_model_for_kbit_training

    config = run.config
    # k-bit preparation upcasts the unquantized rest (embeddings, norms, head) to fp32; with an nf4
    # base under FSDP that rest is whole on every GPU, so it stays in the compute dtype there
    sharded_nf4 = run.fsdp and run.quantization == "nf4"
    if run.quantization != "none" and not sharded_nf4:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if run.gradient_checkpointing:
        _enable_checkpointing(model, {"use_reentrant": False}, run.checkpoint_every)
        # Frozen embeddings give outputs that don't require grad; checkpointed blocks then see no
        # grad path ("element 0 of tensors does not require grad"). Make the inputs require it.
        model.enable_input_require_grads()
    if run.quantization == "nf4" and run.device_kind == "cpu":
        keep_4bit_training_layout(model)
    if run.quantization == "int8" and run.device_kind == "cpu" and run.precision.autocast:
        int8_outside_autocast(model)
    fused = apply_fused_ops(model, run.fused)
    torch.manual_seed(config.train.seed)
    try:
        peft_model = get_peft_model(model, lora_config_for(config, run.lora_targets))
    except ValueError as exc:
        raise ConfigError(f"lora.target_modules: {first_line(exc)}") from exc
    return peft_model, fused + apply_adapter_fused_ops(peft_model, run.fused)


def int8_outside_autocast(model: Any) -> None:
    """bitsandbytes' CPU int8 matmul (LLM.int8(), used in eval mode) multiplies the int8 values as
    floats through ``torch.matmul``, which fp16 autocast turns into an fp16 matmul whose int32-sized
    sums overflow: wrong eval losses, silently. Its layers run with autocast off (they cast their
    inputs themselves). Only with the bitsandbytes versions where this was checked, CPU only: CUDA
    runs a real int8 kernel."""
    from lorafit.compat import allowed

    if not allowed("bnb_int8_cpu_autocast")[0]:
        return
    for module in model.modules():
        if type(module).__module__.startswith("bitsandbytes.") and type(module).__name__ == "Linear8bitLt" \
                and "forward" not in module.__dict__:
            module.forward = _without_autocast(module.forward)


def _without_autocast(forward: Any) -> Any:
    def run(*args: Any, **kwargs: Any) -> Any:
        with torch.autocast("cpu", enabled=False):
            return forward(*args, **kwargs)

    return run


def keep_4bit_training_layout(model: Any) -> None:
    """bitsandbytes repacks 4-bit weights into a CPU inference layout the first time a layer runs
    in eval mode (on AVX512-BF16 CPUs) and never back; that layout's matmul has no backward, so
    training after an evaluation would get wrong gradients. Keep the training layout (only with
    the bitsandbytes versions whose flag was checked; ``lorafit.compat``)."""
    from lorafit.compat import allowed

    if not allowed("bnb_cpu_training_layout")[0]:
        return
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _enable_checkpointing(model: Any, kwargs: dict[str, Any], every: int) -> None:
    """Checkpoint every ``every``-th decoder layer (transformers' own switch)."""
    model.activation_checkpointing_enable(kwargs, every_n_layers=every)


def load_model(run: ResolvedRun, device: torch.device | None = None) -> tuple[Any, list[str]]:
    """Base model + fresh adapter, ready to train; and what ``lorafit.fused`` swapped."""
    return attach_adapter(load_base_model(run, device), run)


def trainable_line(model: Any) -> tuple[str, int, int]:
    """peft's trainable-parameter line (``trainable params: N || all params: M || trainable%: P``)."""
    trainable, total = model.get_nb_trainable_parameters()
    line = f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
    return line, trainable, total
