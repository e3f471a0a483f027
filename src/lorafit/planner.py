"""Will this run fit the GPU? A memory plan from the model's config alone, before any weight loads.

The model is built on the meta device (shapes, no storage) and the run's LoRA adapter attached
with peft there, so the parameter counts are exact. Memory is then modelled part by part:

- weights: the frozen base as stored: fp32 / bf16, int8 (LLM.int8(): one byte per weight plus an
  fp32 scale per row) or nf4 (half a byte per weight, an 8-bit absmax per 64-weight block, an fp32
  absmax per 256 of those: double quantization). Quantized runs keep the unquantized rest
  (embeddings, norms, the LM head) in fp32: peft's ``prepare_model_for_kbit_training`` upcasts them.
- lora / gradients / optimizer: the adapter in fp32, its gradients, and the optimizer's states
  (AdamW: two fp32 copies; adamw_8bit: two bytes; Adafactor: factored row + column statistics).
- activations: what autograd keeps per layer, a function of layers, hidden, heads, intermediate,
  seq_len and batch. Without checkpointing every layer's saved tensors; with it, each layer's input
  plus one layer's full activations while it is recomputed. Coefficients were fitted to measured
  peaks (benchmarks/plan_accuracy.py, recorded in benchmarks/RESULTS.md).
- logits_loss: ``train.loss: full`` holds tokens x vocab logits (model dtype) and fp32 copies for
  the cross-entropy and its gradient; ``chunked`` only ``loss_chunk_tokens`` x vocab at a time.
- workspace: transient buffers (a dequantized weight; a layer's gradients in backward).
- overhead: on a GPU the CUDA context and the caching allocator's slack; none on the CPU.
- reference (``train.objective: dpo``): a preference run holds two sequences (chosen, rejected) per
  row, so every token count above doubles; DPO also runs the reference forward without grad each
  step (one layer's activations and the loss buffers at a time, none kept), its own moment, and a
  run from ``model.adapter`` keeps the starting adapter's weights aside (plus a copy while they are
  swapped in). With ``train.precompute_reference`` none of that happens in a step.

Parts that are not alive at the same moment are not added: the peak is the larger of the
end-of-forward moment (activations + loss buffers) and the backward moment (a recomputed layer +
its gradients). ``Part.at_peak_bytes`` says what each part holds at the peak.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from lorafit.config import LorafitConfig
from lorafit.errors import ConfigError, LorafitError, first_line
from lorafit.fused import GAPS_MAX_P
from lorafit.loss import HEAD_BLOCK_BYTES, block_rows, slice_tokens
from lorafit.modeling import lora_config_for
from lorafit.resolved import Environment, ResolvedRun, cpu_bf16_units, prepares_kbit, resolve

GIB = 2**30
MIB = 2**20

# --------------------------------------------------------------------------------- devices
# Memory as the driver reports it (nvidia-smi's MiB), not the marketing number.
KNOWN_GPUS: dict[str, tuple[str, int, bool]] = {
    "t4": ("T4 16GB", 15360 * MIB, False),
    "a10g": ("A10G 24GB", 23028 * MIB, True),
    "a10": ("A10 24GB", 23028 * MIB, True),
    "l4": ("L4 24GB", 23034 * MIB, True),
    "rtx3090": ("RTX 3090 24GB", 24576 * MIB, True),
    "rtx4090": ("RTX 4090 24GB", 24564 * MIB, True),
    "a100": ("A100 40GB", 40960 * MIB, True),
    "a100-40gb": ("A100 40GB", 40960 * MIB, True),
    "a100-80gb": ("A100 80GB", 81920 * MIB, True),
    "h100": ("H100 80GB", 81559 * MIB, True),
    "h200": ("H200 141GB", 143771 * MIB, True),
}
_ALIASES = {"3090": "rtx3090", "4090": "rtx4090", "rtx309024gb": "rtx3090", "rtx409024gb": "rtx4090",
            "a10040": "a100-40gb", "a10080": "a100-80gb", "a10040gb": "a100-40gb", "a10080gb": "a100-80gb",
            "h10080gb": "h100", "h200141gb": "h200", "t416gb": "t4", "a10g24gb": "a10g", "a1024gb": "a10",
            "l424gb": "l4"}
DEFAULT_GPU = "a10g"  # the seed's target: one 24 GB GPU
CUDA_CONTEXT_BYTES = 512 * MIB  # CUDA context + cuBLAS workspace, outside torch's allocator
ALLOCATOR_SLACK = 0.05  # the caching allocator's fragmentation, as a share of allocated memory


@dataclass(frozen=True)
class DeviceSpec:
    """Where the run happens: its memory, kind (cuda/cpu) and whether it computes in bf16."""

    name: str
    memory_bytes: int
    kind: str = "cuda"
    bf16: bool = True


def resolve_device(spec: Any = None) -> DeviceSpec:
    """A GPU name (``a10g``, ``T4``, ``rtx-4090``, ``a100-80gb``), a size (``24GB``, ``80GiB``),
    ``cpu``, ``local`` (this machine's GPU, else the CPU) or a ``torch.device``; None = the local
    GPU, else an A10G (the seed's 24 GB target)."""
    if spec is not None and not isinstance(spec, str):  # a torch.device
        kind = getattr(spec, "type", str(spec))
        return _local_gpu(getattr(spec, "index", None) or 0) if kind == "cuda" else _cpu()
    if spec is None:
        return _local_gpu(0) if _cuda_available() else resolve_device(DEFAULT_GPU)
    text = spec.strip().lower()
    if text == "cpu":
        return _cpu()
    if text == "local":
        return _local_gpu(0) if _cuda_available() else _cpu()
    size = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(gb|gib|g)", text)
    if size:
        number = float(size.group(1))
        scale = GIB if size.group(2) == "gib" else 10**9
        if number <= 0:
            raise ConfigError(f"--gpu: size must be positive (got {spec!r})")
        unit = "GiB" if scale == GIB else "GB"
        return DeviceSpec(f"{size.group(1)}{unit} GPU", int(number * scale))
    key = re.sub(r"^(nvidia|geforce)[\s_-]*", "", text)
    key = key if key in KNOWN_GPUS else _ALIASES.get(re.sub(r"[\s_-]", "", key), re.sub(r"[\s_-]", "", key))
    if key not in KNOWN_GPUS:
        known = ", ".join(sorted({v[0] for v in KNOWN_GPUS.values()}))
        raise ConfigError(f"--gpu: unknown GPU {spec!r}; use one of {known}, or a size like 24GB")
    name, memory, bf16 = KNOWN_GPUS[key]
    return DeviceSpec(name, memory, "cuda", bf16)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _local_gpu(index: int) -> DeviceSpec:
    import torch

    props = torch.cuda.get_device_properties(index)
    return DeviceSpec(props.name, int(props.total_memory), "cuda", bool(torch.cuda.is_bf16_supported()))


def _cpu() -> DeviceSpec:
    memory = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = int(line.split()[1]) * 1024
    except OSError:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    return DeviceSpec("CPU", memory, "cpu", False)


# ---------------------------------------------------------------------------- model shapes
@dataclass(frozen=True)
class ModelShape:
    """What the memory model needs from the architecture, read from the meta-device model."""

    model_type: str
    layers: int
    hidden: int
    heads: int
    intermediate: int
    vocab: int
    trainable_params: int
    total_params: int
    base_params: int  # frozen base, tied weights once
    quantizable_params: int  # nn.Linear weights bitsandbytes would quantize
    quantizable_rows: int  # their output features (one int8 scale each)
    largest_linear: int  # elements of the biggest quantizable weight (its dequantized copy)
    head_params: int  # the LM head's weight (a compute-dtype copy when it is kept in fp32)
    lora_shapes: tuple[tuple[int, ...], ...]  # trainable tensors, for the optimizer states
    lora_inputs_per_layer: int  # sum of in_features of LoRA-wrapped modules in one layer
    eager_attention: bool  # attention scores materialised (b x heads x s x s)
    shared_bias: bool  # one additive attention bias (b x heads x s x s) shared by all layers
    gated_mlp: bool  # SwiGLU-style MLP (gate and up projections)
    positions: int = 0  # max_position_embeddings (0: none, e.g. ALiBi)


def resolve_for(config: LorafitConfig, device: DeviceSpec, processes: int = 1) -> ResolvedRun:
    """The run as it would be resolved on ``device`` x ``processes`` (a config.json path is accepted
    as the model): the same decisions training makes there, from the config alone."""
    env = Environment(device.kind, device.bf16 or device.kind == "cpu", processes, device.name,
                      cpu_bf16_units() if device.kind == "cpu" else "")
    return resolve(config, env, config_file_ok=True)


def _text_config(model_config: Any) -> Any:
    getter = getattr(model_config, "get_text_config", None)
    return getter() if callable(getter) else model_config


def _attr(cfg: Any, *names: str, default: int | None = None) -> int:
    for name in names:
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    if default is None:
        raise LorafitError(f"model config: none of {', '.join(names)} found for '{cfg.model_type}'")
    return default


def build_meta_model(config: LorafitConfig, model_config: Any, targets: list[str] | str) -> Any:
    """The peft model on the meta device: every parameter's shape, no memory."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_config,
                                                     trust_remote_code=config.model.trust_remote_code)
    except (ValueError, KeyError) as exc:
        raise LorafitError(f"model.name_or_path: cannot build '{model_config.model_type}' as a causal LM "
                           f"({first_line(exc)})") from exc
    try:
        with torch.device("meta"):  # the adapter too: counted, never allocated (lora.r can be anything)
            return get_peft_model(model, lora_config_for(config, targets))
    except ValueError as exc:
        raise ConfigError(f"lora.target_modules: {first_line(exc)}") from exc


def model_shape(run: ResolvedRun) -> ModelShape:
    """Parameter counts and the dimensions that drive memory, from a meta-device model."""
    import torch

    config, model_config = run.config, run.model_config
    peft_model = build_meta_model(config, model_config, run.lora_targets)
    trainable, total = peft_model.get_nb_trainable_parameters()
    base = peft_model.get_base_model()
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    head_weight = getattr(head, "weight", None)
    quantizable = rows = largest = 0
    seen: set[int] = set()
    lora_in: dict[str, int] = {}
    gated = False
    for name, module in base.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not head and "lora_" not in name:
            weight = module.weight
            if id(weight) in seen or (head_weight is not None and weight is head_weight):
                continue
            seen.add(id(weight))
            quantizable += weight.numel()
            rows += weight.shape[0]
            largest = max(largest, weight.numel())
            gated = gated or "gate" in name.rsplit(".", 1)[-1] or name.endswith(("w1", "w3"))
        if hasattr(module, "lora_A") and hasattr(module, "base_layer"):
            layer = re.search(r"\.(\d+)\.", name)
            key = layer.group(1) if layer else "?"
            lora_in[key] = lora_in.get(key, 0) + int(getattr(module, "in_features", 0) or 0)
    base_params = sum(p.numel() for n, p in base.named_parameters() if "lora_" not in n)
    lora_shapes = tuple(tuple(p.shape) for p in peft_model.parameters() if p.requires_grad)
    text = _text_config(model_config)
    hidden = _attr(text, "hidden_size", "n_embd", "d_model")
    heads = _attr(text, "num_attention_heads", "n_head", "num_heads")
    attn = run.attn_implementation or "sdpa"
    # BLOOM runs through lorafit.fused's SDPA attention with fused_ops: no per-layer scores, one
    # shared ALiBi + mask bias (batch x heads x seq^2) for the whole forward and backward
    fused_bloom = "bloom_sdpa_attention" in run.fused
    eager = not fused_bloom and (model_config.model_type in _EAGER_ATTENTION or attn == "eager")
    return ModelShape(
        model_type=model_config.model_type,
        layers=_attr(text, "num_hidden_layers", "n_layer", "num_layers"),
        hidden=hidden,
        heads=heads,
        intermediate=_attr(text, "intermediate_size", "ffn_dim", "n_inner", default=4 * hidden),
        vocab=_attr(text, "vocab_size"),
        trainable_params=int(trainable),
        total_params=int(total),
        base_params=int(base_params),
        quantizable_params=int(quantizable),
        quantizable_rows=int(rows),
        largest_linear=int(largest),
        head_params=int(head_weight.numel()) if head_weight is not None else 0,
        lora_shapes=lora_shapes,
        lora_inputs_per_layer=max(lora_in.values()) if lora_in else 0,
        eager_attention=eager,
        shared_bias=fused_bloom,
        gated_mlp=gated,
        positions=int(getattr(text, "max_position_embeddings", 0) or 0),
    )


# Architectures whose attention always materialises the scores (no sdpa path in transformers).
_EAGER_ATTENTION = {"bloom", "gpt_neox_japanese", "mpt", "codegen", "gptj"}


def count_parameters(config: LorafitConfig) -> tuple[int, int]:
    """(trainable, total) parameters of the run's peft model, counted on the meta device: the same
    numbers as peft's ``get_nb_trainable_parameters``."""
    shape = model_shape(resolve_for(config, resolve_device(None)))
    return shape.trainable_params, shape.total_params


# ------------------------------------------------------------------------------ the memory
# Activation coefficients: elements per token per layer, counted with saved-tensor hooks on real
# Llama and BLOOM layers (frozen base, LoRA on attention) and checked against measured peaks
# (benchmarks/plan_accuracy.py). Frozen linears keep no input: autograd saves only what the
# gradients that are needed use.
C_HIDDEN_GATED = 7.1  # Llama family: residual, RMSNorm, q/k/v after RoPE, attention output, copies
C_INTER_GATED = 3.0  # gate output (SiLU input), SiLU output, up output
C_HIDDEN_PLAIN = 5.8  # BLOOM-like: LayerNorm, fused qkv, q/k/v copies, attention output
C_INTER_PLAIN = 1.0  # GELU input
C_LORA_INPUT = 1.75  # per LoRA in-feature (dropout > 0): the dropped input copy and its mask
C_BACKWARD = 1.4  # a layer's backward working set, as a multiple of what the layer saved
C_INT8_KEPT_CPU = 2.0  # see _int8_kept
C_OUTSIDE = 1.2  # embeddings output, final norm (x hidden per token)
LOSS_FULL_BYTES = 12  # per token x vocab: fp32 logits/log-softmax, its gradient, the input copy


@dataclass
class Part:
    """One memory consumer: its own peak size and what it holds at the run's peak."""

    name: str
    bytes: int
    at_peak_bytes: int
    detail: str


@dataclass
class Suggestion:
    """A change to the config, cumulative with the ones before it, and the peak it leads to."""

    change: str
    overrides: list[str]
    peak_bytes: int
    fits: bool
    changes: dict[str, Any] = field(default_factory=dict, repr=False)  # cumulative, for _with
    max_seq_len: int | None = None  # longest seq_len that fits at batch 1 with this change
    max_batch_size: int | None = None  # largest batch_size that fits at its seq_len


@dataclass
class Plan:
    """The memory plan of one run on one device."""

    device: str
    device_kind: str
    memory_bytes: int
    model_type: str
    trainable_params: int
    total_params: int
    peak_bytes: int
    fits: bool
    parts: list[Part]
    suggestions: list[Suggestion] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    max_seq_len: int | None = None  # longest seq_len that fits at batch 1 (0: not even 1 token)
    max_batch_size: int | None = None  # largest batch_size that fits at the run's seq_len (0: none)
    # when the run fits: the memory-saving changes (cheapest first, cumulative) and what each allows
    capacity_options: list[Suggestion] = field(default_factory=list)

    def part_bytes(self, name: str) -> int:
        """What part ``name`` holds at the peak."""
        return sum(p.at_peak_bytes for p in self.parts if p.name == name)

    @property
    def trainable_line(self) -> str:
        pct = 100 * self.trainable_params / max(self.total_params, 1)
        return (f"trainable params: {self.trainable_params:,d} || all params: {self.total_params:,d} "
                f"|| trainable%: {pct:.4f}")

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for option in data["suggestions"] + data["capacity_options"]:
            option.pop("changes", None)
        data["trainable_line"] = self.trainable_line
        # what torch.cuda.max_memory_allocated would show: without the CUDA context and slack
        data["allocated_peak_bytes"] = self.peak_bytes - self.part_bytes("overhead")
        return data


def _weights(shape: ModelShape, quant: str, weight_bytes: int, keep_rest: bool = False) -> tuple[int, str]:
    rest = shape.base_params - shape.quantizable_params
    if quant == "none":
        return shape.base_params * weight_bytes, f"{shape.base_params:,d} params x {weight_bytes} B"
    # prepare_model_for_kbit_training upcasts the unquantized rest to fp32; ``keep_rest``: an nf4
    # base under train.fsdp, whose rest lorafit.modeling keeps in the compute dtype
    rest_each = weight_bytes if keep_rest else 4
    rest_bytes = rest * rest_each
    rest_text = f"{rest:,d} unquantized in {'fp32' if rest_each == 4 else 'the compute dtype'}"
    if quant == "int8":
        q = shape.quantizable_params + 4 * shape.quantizable_rows
        return q + rest_bytes, f"{shape.quantizable_params:,d} int8 + fp32 row scales; {rest_text}"
    q = _nf4_packed_bytes(shape) + _nf4_statistics_bytes(shape)
    return q + rest_bytes, (f"{shape.quantizable_params:,d} nf4 + 8-bit absmax/64 + fp32 absmax/256 "
                            f"(double quant); {rest_text}")


def _nf4_packed_bytes(shape: ModelShape) -> int:
    return math.ceil(shape.quantizable_params / 2)


def _nf4_statistics_bytes(shape: ModelShape) -> int:
    blocks = math.ceil(shape.quantizable_params / 64)
    return blocks + math.ceil(blocks / 256) * 4


def _optimizer_bytes(shape: ModelShape, optimizer: str) -> tuple[int, str]:
    if optimizer == "adafactor":
        total = 0
        for dims in shape.lora_shapes:
            total += 4 * (sum(dims) if len(dims) >= 2 else math.prod(dims))
        return total, "Adafactor: factored row + column second moments (fp32)"
    if optimizer == "adamw_8bit":
        total = 0
        for dims in shape.lora_shapes:
            n = math.prod(dims)
            total += 2 * n + 8 * math.ceil(n / 256) if n >= 4096 else 8 * n
        return total, "8-bit AdamW: two 1-byte states + block scales"
    return 8 * shape.trainable_params, "AdamW: two fp32 states per trainable param"


def _lora_input_bytes(dropout: float, a: int, cpu_dropout: bool) -> float:
    """Bytes a LoRA adapter saves per input element when its dropout is on: the dropped copy
    and, to zero the same elements in backward, a mask (torch's dropout), or, where the run
    swaps in lorafit's CPU dropout at its usual rates, the dropped elements' int64 indices."""
    if cpu_dropout and dropout <= GAPS_MAX_P:
        return a + 8 * dropout
    return a * C_LORA_INPUT


def _layer_activations(shape: ModelShape, tokens: int, batch: int, seq: int, a: int,
                       lora_dropout: float, cpu_dropout: bool) -> tuple[int, int]:
    """(bytes one layer saves for backward without checkpointing, attention score elements)."""
    c_h, c_i = (C_HIDDEN_GATED, C_INTER_GATED) if shape.gated_mlp else (C_HIDDEN_PLAIN, C_INTER_PLAIN)
    per_token = a * (c_h * shape.hidden + c_i * shape.intermediate)
    if lora_dropout > 0:
        per_token += _lora_input_bytes(lora_dropout, a, cpu_dropout) * shape.lora_inputs_per_layer
    scores = batch * shape.heads * seq * seq if shape.eager_attention else 0
    # eager attention: the softmax output in fp32 (+ its copy in the compute dtype)
    return int(per_token * tokens) + scores * (4 + (a if a != 4 else 0)), scores


def _int8_kept(shape: ModelShape, tokens: int, a: int, device: DeviceSpec) -> int:
    """What LLM.int8() layers keep beyond an unquantized layer, checkpointing or not.

    bitsandbytes' int8 matmul stores its input on the autograd node as a plain attribute, not
    through save_for_backward, so (non-reentrant) checkpointing cannot drop it, and frozen linears
    that would keep no input keep one: attention input, attention output, MLP input, MLP hidden.
    CPU (MatMul8bitFp): measured about twice that. GPU (MatMul8bitLt, read from its source, not
    measured here): once, with the attention and MLP inputs in fp32 (the norms were upcast).
    """
    h, i = shape.hidden, shape.intermediate
    if device.kind == "cpu":
        per_token = C_INT8_KEPT_CPU * (3 * h + i) * a
    else:
        per_token = 2 * h * 4 + (h + i) * a
    return int(per_token * tokens * shape.layers)


def estimate(config: LorafitConfig, device: Any = None, shape: ModelShape | None = None,
             suggest: bool = True, processes: int = 1, run: ResolvedRun | None = None,
             capacity: bool = True) -> Plan:
    """The memory plan for ``config`` on ``device`` (see ``resolve_device``), per process.

    With ``train.fsdp`` and ``processes`` > 1 each rank keeps 1/N of the block weights and of the
    adapter's state (see ``_shard``); the suggestions then include FSDP's CPU offload.
    With ``capacity``, also the longest context (``max_seq_len``, at batch 1) and the largest
    ``max_batch_size`` (at the run's seq_len) that fit, for the run and for each suggestion.
    """
    device = device if isinstance(device, DeviceSpec) else resolve_device(device)
    run = run or resolve_for(config, device, processes)
    shape = shape or model_shape(run)
    plan = _plan(config, device, shape, processes, run)
    if suggest and not plan.fits:
        plan.suggestions = _suggestions(config, device, shape, run, processes)
        if not (plan.suggestions and plan.suggestions[-1].fits):
            plan.settings["fsdp_fits"] = _fsdp_fits(config, device, shape, processes, run)
    if capacity:
        plan.max_seq_len, plan.max_batch_size = _capacity(config, device, shape, processes, run)
        if suggest and plan.fits:
            plan.capacity_options = _ladder(config, device, shape, processes, run)
        for option in plan.suggestions + plan.capacity_options:
            changed = _with(config, **option.changes)
            option.max_seq_len, option.max_batch_size = _capacity(changed, device, shape, processes, run)
    return plan


def _fsdp_fits(config: LorafitConfig, device: DeviceSpec, shape: ModelShape, processes: int,
               run: ResolvedRun) -> dict | None:
    """The fewest GPUs (up to 64) over which FSDP makes the run as configured fit, without and
    then with CPU offload; None if even that does not."""
    if config.model.quantization == "int8":
        return None
    for offload in (False, True):
        changed = _with(config, fsdp=True, fsdp_cpu_offload=offload)
        for n in (2, 4, 8, 16, 32, 64):
            if n <= processes:
                continue
            plan = _plan(changed, device, shape, n, run)
            if plan.fits:
                return {"processes": n, "cpu_offload": offload, "peak_bytes": plan.peak_bytes}
    return None


def _plan(config: LorafitConfig, device: DeviceSpec, shape: ModelShape, processes: int, run: ResolvedRun) -> Plan:
    plan = _estimate(config, device, shape, run, sharded=_sharded(config, processes))
    if _sharded(config, processes):
        _shard(plan, config, shape, processes)
    return plan


def _sharded(config: LorafitConfig, processes: int) -> bool:
    """FSDP shards bf16/fp32 and nf4 bases; an int8 base is refused (lorafit.preflight)."""
    return config.train.fsdp and processes > 1 and config.model.quantization != "int8"


SEQ_LEN_LIMIT = 2**24  # search bound for max_seq_len (16.8M tokens)
BATCH_LIMIT = 2**16


def _largest(fits: Any, limit: int) -> int:
    """The largest n in [1, limit] with fits(n), for fits monotone (True then False); 0 if none."""
    if not fits(1):
        return 0
    low, high = 1, 2
    while high <= limit and fits(high):
        low, high = high, high * 2
    high = min(high, limit + 1)
    while high - low > 1:  # fits(low), not fits(high) (or high past the limit)
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def _capacity(config: LorafitConfig, device: DeviceSpec, shape: ModelShape, processes: int,
              run: ResolvedRun) -> tuple[int, int]:
    """(longest seq_len at batch 1, largest batch_size at the run's seq_len) that fit ``device``.

    The peak grows with tokens (activations, loss slices, attention scores), so both are found
    by doubling, then bisecting, over the same plan ``estimate`` makes."""
    def seq_fits(n: int) -> bool:
        return _plan(_with(config, seq_len=n, batch_size=1), device, shape, processes, run).fits

    def batch_fits(n: int) -> bool:
        return _plan(_with(config, batch_size=n), device, shape, processes, run).fits

    return _largest(seq_fits, SEQ_LEN_LIMIT), _largest(batch_fits, BATCH_LIMIT)


def _estimate(config: LorafitConfig, device: DeviceSpec, shape: ModelShape, run: ResolvedRun,
              sharded: bool = False) -> Plan:
    """``config`` is ``run.config`` or a variant of it (a suggestion): its own settings count, the
    run's resolved precision and architecture facts stay. ``sharded``: FSDP over > 1 processes."""
    train, quant = config.train, config.model.quantization
    weight_bytes, a = run.precision.weight_bytes, run.precision.activation_bytes
    loss_mode = "chunked" if train.loss == "chunked" and run.head_is_plain else "full"
    sequences = 2 if train.objective != "sft" else 1  # preference pairs: chosen and rejected
    batch, seq = train.batch_size * sequences, train.seq_len
    tokens = batch * seq
    h, v = shape.hidden, shape.vocab
    ckpt = train.gradient_checkpointing

    sharded_nf4 = quant != "none" and not prepares_kbit(quant, sharded)  # the rest is not upcast to fp32
    weights, weights_detail = _weights(shape, quant, weight_bytes, keep_rest=sharded_nf4)
    lora = 4 * shape.trainable_params
    grads = 4 * shape.trainable_params
    optim, optim_detail = _optimizer_bytes(shape, train.optimizer)

    # compiled layers save lorafit's keep mask (a byte per element), not the drops' indices
    layer, scores = _layer_activations(shape, tokens, batch, seq, a, config.lora.dropout,
                                       "lora_dropout_int_mask" in run.fused and not run.compiled)
    outside = int(C_OUTSIDE * tokens * h * a)
    if shape.shared_bias:  # lorafit.fused's ALiBi + mask bias, made once per forward
        outside += batch * shape.heads * seq * seq * a
    int8_kept = _int8_kept(shape, tokens, a, device) if quant == "int8" else 0
    if ckpt:
        every = train.checkpoint_every
        checkpointed = -(-shape.layers // every)  # layers 0, every, 2*every, ... (transformers' rule)
        kept = checkpointed * tokens * h * a + (shape.layers - checkpointed) * layer + int8_kept + outside
        activations_detail = (f"checkpointing: {checkpointed} layer inputs kept"
                              + (f", {shape.layers - checkpointed} layers' activations kept" if every > 1 else "")
                              + (" (+ int8 matmul inputs)" if int8_kept else "")
                              + f"; one layer recomputed in backward ({layer / GIB:.2f} GiB)")
    else:
        kept = shape.layers * layer + int8_kept + outside
        activations_detail = f"{shape.layers} layers x {layer / GIB:.2f} GiB saved for backward"

    # the fp32 head of a k-bit-prepared base, cast for a bf16 matmul (nf4 under fsdp: stays bf16)
    head_cast = shape.head_params * a if quant != "none" and a != 4 and not sharded_nf4 else 0
    stored16 = replace(run.precision, quantization=quant).upcasts_storage  # run.stores_16bit, this variant
    if stored16 and loss_mode == "full":
        head_cast += shape.head_params * 4  # the whole 16-bit head upcast for the logits matmul
    if loss_mode == "full":
        loss = LOSS_FULL_BYTES * tokens * v + head_cast
        loss_detail = f"full: {tokens:,d} tokens x {v:,d} vocab logits (+ fp32 copies for the loss)"
    else:
        chunk = min(slice_tokens(train.loss_chunk_tokens, v), tokens)
        # one slice of logits in the compute dtype (+ a few rows upcast to fp32 for the softmax)
        upcast = min(block_rows(v), chunk) * v * 4 if a != 4 else 0
        loss = chunk * v * a + upcast + 2 * tokens * h * a + head_cast
        loss_detail = f"chunked: {chunk:,d} tokens x {v:,d} vocab at a time"
        if stored16:  # a 16-bit head: one fp32 block of it, online sums per token
            loss += HEAD_BLOCK_BYTES + tokens * h * 4

    # one matrix at a time in the compute dtype: dequantized, or upcast from 16-bit storage
    dequant = shape.largest_linear * a if quant != "none" or stored16 else 0
    # A layer's backward: gradients of its saved tensors in flight, and the scores' gradients.
    # Score gradients: bf16/fp32 grad of the probabilities, fp32 softmax grads (fitted: 18 B in fp32).
    score_bytes = scores * (4 + (a if a != 4 else 0))
    backward_ws = int(C_BACKWARD * (layer - score_bytes) + scores * (2 * a + 10))
    # The two moments: end of forward (all kept activations + loss buffers) and a layer's backward.
    forward_moment = kept + loss + dequant
    backward_moment = kept + (layer if ckpt else 0) + backward_ws + dequant
    # DPO's reference forward, before the policy's: one layer's activations at a time, no grad
    live_reference = train.objective == "dpo" and not train.precompute_reference
    reference_forward = layer + outside + loss if live_reference else 0
    swap = 2 * 4 * shape.trainable_params if live_reference and run.start_adapter else 0
    reference_moment = reference_forward + dequant
    at_reference = reference_moment > max(forward_moment, backward_moment)
    at_forward = not at_reference and forward_moment >= backward_moment

    persistent = weights + lora + optim + swap
    allocated = persistent + grads + max(forward_moment, backward_moment, reference_moment)
    overhead = CUDA_CONTEXT_BYTES + int(ALLOCATOR_SLACK * allocated) if device.kind == "cuda" else 0
    activations_peak = 0 if at_reference else kept + (0 if at_forward or not ckpt else layer)
    at_backward = not (at_forward or at_reference)
    parts = [
        Part("weights", weights, weights, f"frozen base ({quant}): {weights_detail}"),
        Part("lora", lora, lora, f"{shape.trainable_params:,d} adapter params in fp32"),
        Part("gradients", grads, grads, "adapter gradients (fp32)"),
        Part("optimizer", optim, optim, optim_detail),
        Part("activations", kept + (layer if ckpt else 0), activations_peak, activations_detail),
        Part("logits_loss", loss, loss if at_forward else 0, loss_detail),
        Part("workspace", dequant + backward_ws, dequant + (backward_ws if at_backward else 0),
             "dequantized weight copy + a layer's gradients in backward"),
        Part("overhead", overhead, overhead,
             "CUDA context + allocator slack" if device.kind == "cuda" else "none counted on the CPU"),
    ]
    if train.objective == "dpo":
        parts.insert(-1, Part("reference", reference_forward + swap, swap + (reference_forward if at_reference else 0),
                              _reference_detail(train.precompute_reference, bool(run.start_adapter), reference_forward)))
    peak = sum(p.at_peak_bytes for p in parts)
    settings = {"quantization": quant, "gradient_checkpointing": ckpt,
                "checkpoint_every": train.checkpoint_every if ckpt else None, "seq_len": seq, "batch_size": train.batch_size,
                "grad_accum": train.grad_accum, "loss": loss_mode, "optimizer": train.optimizer,
                "objective": train.objective, "sequences_per_row": sequences,
                "weight_bytes": weight_bytes, "activation_bytes": a, "layers": shape.layers, "hidden": h,
                "heads": shape.heads, "intermediate": shape.intermediate, "vocab": v, "positions": shape.positions,
                "peak_moment": "end of forward (loss)" if at_forward else
                "reference forward (no grad)" if at_reference else "backward of a layer"}
    return Plan(device=device.name, device_kind=device.kind, memory_bytes=device.memory_bytes,
                model_type=shape.model_type, trainable_params=shape.trainable_params,
                total_params=shape.total_params, peak_bytes=peak, fits=peak <= device.memory_bytes,
                parts=parts, settings=settings)


def _reference_detail(precomputed: bool, starting: bool, transient: int) -> str:
    if precomputed:
        return "DPO reference log-probabilities precomputed before training: no reference forward in a step"
    what = "the starting adapter swapped in (its weights kept aside, + a copy while swapped)" if starting \
        else "the base with the adapter disabled"
    return f"DPO reference forward without grad ({what}): {transient / GIB:.2f} GiB while it runs, nothing kept"


# Blocks whole on a rank at FSDP's peak: the one computing and the next, gathered ahead (FSDP2
# prefetches one). Measured on the CPU (gloo, no overlap): one gathered block at any hook, plus
# the all-gather's output buffer while it is copied out: two blocks' worth (benchmarks/RESULTS.md).
GATHERED_BLOCKS = 2


def _shard(plan: Plan, config: LorafitConfig, shape: ModelShape, processes: int) -> None:
    """Rescale a plan for FSDP over ``processes`` (``lorafit.distributed.shard_model``).

    Each rank keeps 1/N of the block weights (nf4: the packed 4-bit data; its statistics are no
    parameters and stay whole) and of the adapter, its gradients and optimizer states; the blocks
    in flight are whole; embeddings, norms and the head are whole on every rank (the backbone
    root is gathered for the whole step, the head is outside FSDP). With
    ``train.fsdp_cpu_offload`` the shards and the adapter's state live in host memory instead.
    """
    train = config.train
    quant = config.model.quantization
    weight_bytes = plan.settings["weight_bytes"]
    blocks = _nf4_packed_bytes(shape) if quant == "nf4" else shape.quantizable_params * weight_bytes
    gathered = GATHERED_BLOCKS * (blocks // max(shape.layers, 1))
    offload = train.fsdp_cpu_offload
    host = blocks // processes
    where = "host memory (CPU offload)" if offload else "device memory"
    for part in plan.parts:
        if part.name == "weights":
            part.bytes = part.bytes - blocks + (0 if offload else blocks // processes) + gathered
            part.at_peak_bytes = part.bytes
            part.detail += (f"; FSDP: 1/{processes} of the blocks kept in {where} "
                            f"(+ {GATHERED_BLOCKS} gathered blocks)")
        elif part.name in ("lora", "gradients", "optimizer"):
            share = int(part.bytes / processes)
            host += share
            part.bytes = part.at_peak_bytes = 0 if offload else share
            part.detail += f" (1/{processes}{', in host memory' if offload else ''})"
    overhead = next(p for p in plan.parts if p.name == "overhead")
    if plan.device_kind == "cuda":  # the allocator's slack follows what is allocated
        allocated = sum(p.at_peak_bytes for p in plan.parts if p is not overhead)
        overhead.bytes = overhead.at_peak_bytes = CUDA_CONTEXT_BYTES + int(ALLOCATOR_SLACK * allocated)
    plan.peak_bytes = sum(p.at_peak_bytes for p in plan.parts)
    plan.fits = plan.peak_bytes <= plan.memory_bytes
    plan.settings.update(fsdp_processes=processes, fsdp_cpu_offload=offload,
                         host_bytes_per_rank=host if offload else 0)


def _with(config: LorafitConfig, **changes: Any) -> LorafitConfig:
    model = config.model.model_copy(update={k: v for k, v in changes.items() if k in ("quantization",)})
    train = config.train.model_copy(update={k: v for k, v in changes.items() if k != "quantization"})
    return config.model_copy(update={"model": model, "train": train})


def _suggestions(config: LorafitConfig, device: DeviceSpec, shape: ModelShape, run: ResolvedRun,
                 processes: int = 1) -> list[Suggestion]:
    """Changes in order of cost to the user, each applied on top of the previous ones."""
    out: list[Suggestion] = []
    current, applied = config, {}

    def add(change: str, overrides: list[str], **changes: Any) -> bool:
        nonlocal current
        current = _with(current, **changes)
        applied.update(changes)
        plan = _plan(current, device, shape, processes, run)
        out.append(Suggestion(change, overrides, plan.peak_bytes, plan.fits, dict(applied)))
        return plan.fits

    if config.train.loss == "full" and run.head_is_plain and add("chunked loss (same loss, no full logits)",
                                           ["train.loss=chunked"], loss="chunked"):
        return out
    if config.train.gradient_checkpointing and config.train.checkpoint_every > 1 and add(
            "checkpoint every layer", ["train.checkpoint_every=1"], checkpoint_every=1):
        return out
    if not config.train.gradient_checkpointing and add(
            "turn on gradient checkpointing (~30% slower)", ["train.gradient_checkpointing=true"],
            gradient_checkpointing=True):
        return out
    quant = config.model.quantization
    if processes > 1 and not config.train.fsdp and quant != "int8" and add(
            f"shard the base's blocks over the {processes} processes (FSDP)", ["train.fsdp=true"], fsdp=True):
        return out
    sharding = current.train.fsdp and processes > 1
    if quant == "none":
        target = "nf4" if sharding else "int8"  # FSDP cannot shard int8
        if add(f"quantize the frozen base to {target}", [f"model.quantization={target}"], quantization=target):
            return out
        quant = target
    if quant == "int8" and add("int8 -> nf4 (QLoRA)", ["model.quantization=nf4"], quantization="nf4"):
        return out
    if sharding and not current.train.fsdp_cpu_offload and add(
            "keep the FSDP shards in host memory (CPU offload; slower)", ["train.fsdp_cpu_offload=true"],
            fsdp_cpu_offload=True):
        return out
    seq = current.train.seq_len
    while seq > 256:
        seq //= 2
        plan = _plan(_with(current, seq_len=seq), device, shape, processes, run)
        if plan.fits or seq <= 256:
            break
    if seq < current.train.seq_len and add(f"shorter sequences: seq_len {seq}", [f"train.seq_len={seq}"],
                                           seq_len=seq):
        return out
    if current.train.batch_size > 1:
        accum = current.train.grad_accum * current.train.batch_size
        add(f"batch 1 with grad_accum {accum} (same effective batch)",
            ["train.batch_size=1", f"train.grad_accum={accum}"], batch_size=1, grad_accum=accum)
    return out


def _ladder(config: LorafitConfig, device: DeviceSpec, shape: ModelShape, processes: int,
            run: ResolvedRun) -> list[Suggestion]:
    """The memory-saving changes the suggestions would make, cheapest first, each on top of the
    ones before, all of them: what each buys in context length and batch size for a run that fits."""
    steps: list[tuple[str, list[str], dict[str, Any]]] = []
    if config.train.loss == "full" and run.head_is_plain:
        steps.append(("chunked loss", ["train.loss=chunked"], {"loss": "chunked"}))
    if config.train.gradient_checkpointing and config.train.checkpoint_every > 1:
        steps.append(("checkpoint every layer", ["train.checkpoint_every=1"], {"checkpoint_every": 1}))
    if not config.train.gradient_checkpointing:
        steps.append(("gradient checkpointing", ["train.gradient_checkpointing=true"],
                      {"gradient_checkpointing": True}))
    if config.model.quantization == "none":
        steps.append(("int8 base", ["model.quantization=int8"], {"quantization": "int8"}))
    if config.model.quantization in ("none", "int8"):
        steps.append(("nf4 base (QLoRA)", ["model.quantization=nf4"], {"quantization": "nf4"}))
    out, applied = [], {}
    for change, overrides, changes in steps:
        applied.update(changes)
        plan = _plan(_with(config, **applied), device, shape, processes, run)
        out.append(Suggestion(change, overrides, plan.peak_bytes, plan.fits, dict(applied)))
    return out


# ------------------------------------------------------------------------- for train / CLI
def warn_if_not_fit(run: ResolvedRun, device: Any = None) -> str | None:
    """A one-line warning when the run is predicted not to fit ``device``'s memory, else None.

    Never raises: a plan that cannot be made (an architecture the meta device can't build) is skipped.
    """
    try:
        plan = estimate(run.config, device, run=run, processes=run.environment.world_size, capacity=False)
    except Exception:  # noqa: BLE001 - the plan is advice; training decides
        return None
    if plan.fits:
        return None
    first = plan.suggestions[0].change if plan.suggestions else "see `lorafit plan`"
    return (f"warning: predicted peak memory {plan.peak_bytes / GIB:.1f} GiB exceeds {plan.device}'s "
            f"{plan.memory_bytes / GIB:.1f} GiB; this run will probably run out of memory "
            f"(try: {first}; details: lorafit plan)")


def render(plan: Plan) -> str:
    """The human report: one row per part, the peak, the trainable line and the verdict."""
    s = plan.settings
    lines = [
        f"model: {plan.model_type}, {s['layers']} layers, hidden {s['hidden']}, {s['heads']} heads, "
        f"intermediate {s['intermediate']}, vocab {s['vocab']:,d}",
        f"run: quantization {s['quantization']}, checkpointing {'on' if s['gradient_checkpointing'] else 'off'}, "
        f"seq_len {s['seq_len']}, batch {s['batch_size']} (x{s['grad_accum']} accumulation), "
        f"loss {s['loss']}, optimizer {s['optimizer']}"
        + (f", objective {s['objective']}: {s['sequences_per_row']} sequences per row (chosen, rejected)"
           if s.get("sequences_per_row", 1) > 1 else ""),
        plan.trainable_line,
        "",
        f"{'part':<12} {'size GiB':>9} {'at peak':>9}  detail",
    ]
    if s.get("fsdp_processes"):
        host = (f"; each rank's shards in host memory: {s['host_bytes_per_rank'] / GIB:.2f} GiB"
                if s.get("fsdp_cpu_offload") else "")
        lines.insert(2, f"fsdp: blocks sharded over {s['fsdp_processes']} processes; figures are per GPU{host}")
    for part in plan.parts:
        lines.append(f"{part.name:<12} {part.bytes / GIB:>9.2f} {part.at_peak_bytes / GIB:>9.2f}  {part.detail}")
    lines.append(f"{'peak':<12} {'':>9} {plan.peak_bytes / GIB:>9.2f}  at the {s['peak_moment']}")
    verdict = "fits" if plan.fits else "does NOT fit"
    free = plan.memory_bytes - plan.peak_bytes
    lines.append("")
    lines.append(f"verdict: {verdict} on {plan.device} ({plan.memory_bytes / GIB:.1f} GiB): "
                 f"{plan.peak_bytes / GIB:.2f} GiB predicted, "
                 + (f"{free / GIB:.2f} GiB to spare" if free >= 0 else f"{-free / GIB:.2f} GiB over"))
    if plan.max_seq_len is not None:
        lines.append(f"fits on {plan.device}: {_capacity_text(plan.max_seq_len, plan.max_batch_size, s['seq_len'])}"
                     + _position_note(plan.max_seq_len, s.get("positions", 0)))
    if plan.suggestions:
        lines.append("to make it fit, in order of cost (each on top of the ones before):")
        for i, sug in enumerate(plan.suggestions, 1):
            mark = "fits" if sug.fits else "still over"
            lines.append(f"  {i}. {sug.change}: peak {sug.peak_bytes / GIB:.2f} GiB ({mark})  "
                         f"[{' '.join('--set ' + o for o in sug.overrides)}]")
            if sug.max_seq_len is not None:
                seq = sug.changes.get("seq_len", s["seq_len"])
                lines.append(f"     then: {_capacity_text(sug.max_seq_len, sug.max_batch_size, seq)}")
        if not plan.suggestions[-1].fits:
            lines.append("  even with all of these it does not fit: choose a bigger GPU or a smaller model")
    more = s.get("fsdp_fits")
    if more:
        extra = " --set train.fsdp_cpu_offload=true" if more["cpu_offload"] else ""
        lines.append(f"or shard it: with train.fsdp over {more['processes']} x {plan.device}"
                     f"{' and CPU offload' if more['cpu_offload'] else ''}: {more['peak_bytes'] / GIB:.2f} GiB "
                     f"per GPU (fits)  [lorafit train --nproc {more['processes']} --set train.fsdp=true{extra}]")
    if plan.capacity_options:
        lines.append("longer context or bigger batches, each change on top of the ones before:")
        for option in plan.capacity_options:
            lines.append(f"  {option.change}: {_capacity_text(option.max_seq_len, option.max_batch_size, s['seq_len'])}"
                         f"  [{' '.join('--set ' + o for o in option.overrides)}]")
    return "\n".join(lines)


def _capacity_text(max_seq_len: int | None, max_batch_size: int | None, seq_len: int) -> str:
    context = (f"seq_len up to {max_seq_len:,d}" + (" or more" if max_seq_len >= SEQ_LEN_LIMIT else "")
               if max_seq_len else "not even seq_len 1")
    batch = f"batch_size up to {max_batch_size:,d}" if max_batch_size else "no batch_size"
    return f"{context} at batch 1; {batch} at seq_len {seq_len:,d}"


def _position_note(max_seq_len: int, positions: int) -> str:
    if positions and max_seq_len > positions:
        return f" (the model was trained on positions up to {positions:,d})"
    return ""
