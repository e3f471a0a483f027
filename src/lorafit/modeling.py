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

from lorafit.compat import int8_outside_autocast, keep_4bit_training_layout
from lorafit.config import LorafitConfig
from lorafit.errors import ConfigError, LorafitError, first_line, load_reason
from lorafit.fused import apply_adapter_fused_ops, apply_fused_ops
from lorafit.resolved import ResolvedRun, pretrained_kwargs
from lorafit.start_adapter import load_start_weights
from lorafit.storage import keep_16bit_compute_fp32


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


# transformers >= 5.25 swaps layers for Hub kernels by default (downloaded when the model loads,
# whenever the `kernels` package is installed): off, so the model lorafit trains, merges and
# serves is the one its modeling code defines, and nothing is fetched at run time
NO_HUB_KERNELS = {"use_kernels": False}


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
    kwargs.update(NO_HUB_KERNELS)
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
        keep_16bit_compute_fp32(model)


def attach_adapter(model: Any, run: ResolvedRun) -> tuple[Any, list[str]]:
    """Prepare the frozen base for training and wrap it with a fresh LoRA adapter (seeded), or
    with the starting adapter's weights (``model.adapter``).

    Returns the peft model and what ``lorafit.fused`` swapped, for the run's log.
    """
    from peft import get_peft_model, prepare_model_for_kbit_training

    config = run.config
    if run.prepares_kbit:  # upcasts the unquantized rest (embeddings, norms, head) to fp32
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if run.gradient_checkpointing:
        _enable_checkpointing(model, {"use_reentrant": False}, run.checkpoint_every)
        # Frozen embeddings give outputs that don't require grad; checkpointed blocks then see no
        # grad path ("element 0 of tensors does not require grad"). Make the inputs require it.
        model.enable_input_require_grads()
    if "bnb_cpu_training_layout" in run.workarounds:
        keep_4bit_training_layout(model)
    if "bnb_int8_cpu_autocast" in run.workarounds:
        int8_outside_autocast(model)
    fused = apply_fused_ops(model, run.fused)
    if run.start_adapter:  # an adapter made for another base fails here, naming the tensor
        from lorafit.adapters import adapter_tensor_shapes, check_adapter_fits

        check_adapter_fits(model, Path(run.start_adapter), adapter_tensor_shapes(Path(run.start_adapter)),
                           run.source.name)
    torch.manual_seed(config.train.seed)
    try:
        peft_model = get_peft_model(model, lora_config_for(config, run.lora_targets))
    except ValueError as exc:
        raise ConfigError(f"lora.target_modules: {first_line(exc)}") from exc
    if run.start_adapter and next(peft_model.parameters()).device.type != "meta":  # meta: rank 0 sends them
        load_start_weights(peft_model, Path(run.start_adapter))
    fused += apply_adapter_fused_ops(peft_model, run.fused)
    if run.compiled:
        from lorafit.compiling import compile_layers

        fused.append(compile_layers(peft_model))
    return peft_model, fused


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
