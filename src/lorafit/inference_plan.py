"""Will the served model fit? ``lorafit.planner``'s method (shapes from the model config on the meta
device, no weights read) applied to inference: what an endpoint holds while it answers.

- weights: the base as it loads for serving: its dtype, or int8 / nf4 with the rest (embeddings,
  norms, head) in that dtype (no k-bit training preparation at inference), counted with the
  planner's own rule; adapter mode adds the adapter in fp32 (peft upcasts it on 16-bit bases).
- kv_cache: 2 (keys, values) x layers x KV heads x head size x the context (prompt + new tokens)
  x concurrency (sequences generated at once), in the compute dtype: the KV cache at its largest.
- workspace: the prefill's live tensors of one layer for every token of the context x concurrency
  (attention scores too where the architecture materialises them), the last positions' fp32
  logits, and one dequantized weight for int8 / nf4.
- overhead: on a GPU the CUDA context and the allocator's slack (the planner's constants); on a
  CPU (CPU instances, serverless) the worker process's runtime: Python, torch, transformers, the
  toolkit, measured on this machine (benchmarks/serving_modes.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lorafit.config import LorafitConfig
from lorafit.planner import (
    ALLOCATOR_SLACK,
    CUDA_CONTEXT_BYTES,
    GIB,
    MIB,
    DeviceSpec,
    Part,
    _text_config,
    _weights,
    model_shape,
    resolve_for,
)

# Live elements per token of one layer during the prefill (no autograd: nothing is kept across
# layers): residual, normed input, q/k/v, attention output, and the MLP's hidden tensors.
C_HIDDEN_INFERENCE = 6.0
C_INTER_INFERENCE_GATED = 3.0  # gate, up and their product
C_INTER_INFERENCE_PLAIN = 2.0  # the hidden activation and its GELU
CPU_RUNTIME_BYTES = 900 * MIB  # a worker's resident memory before the model: Python + torch + transformers


@dataclass
class ServingPlan:
    """Memory of one served model on one device (a GPU of the instance, or a CPU host)."""

    device: str
    device_kind: str
    memory_bytes: int
    peak_bytes: int
    fits: bool
    parts: list[Part]
    settings: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        """``1.23 GiB predicted (weights 0.50, kv_cache 0.40, ...), A10G 24GB has 22.5 GiB``."""
        parts = ", ".join(f"{p.name} {p.bytes / GIB:.2f}" for p in self.parts)
        return (f"{self.peak_bytes / GIB:.2f} GiB predicted ({parts}), {self.device} has "
                f"{self.memory_bytes / GIB:.1f} GiB")


def default_context(model_config: Any, cap: int = 4096) -> int:
    """The context an endpoint is sized for unless told: the model's positions, at most ``cap``;
    2048 for position-free architectures (ALiBi: BLOOM)."""
    positions = int(getattr(_text_config(model_config), "max_position_embeddings", 0) or 0)
    return min(positions, cap) if positions else 2048


def estimate_serving(config: LorafitConfig, device: DeviceSpec, *, context: int, concurrency: int = 1,
                     adapter: bool = True) -> ServingPlan:
    """The serving memory of ``config``'s model (its ``model.quantization`` and ``model.dtype`` as
    the endpoint loads it) on ``device``. ``adapter``: the adapter is loaded on the base (else merged)."""
    run = resolve_for(config, device)
    shape = model_shape(run)
    text = _text_config(run.model_config)
    quant = config.model.quantization
    weight_bytes = run.precision.weight_bytes
    a = weight_bytes  # inference computes in the weights' dtype (the compute dtype for k-bit layers)
    if quant != "none":
        a = run.precision.activation_bytes if run.precision.autocast else weight_bytes
    weights, detail = _weights(shape, quant, weight_bytes, keep_rest=True)
    lora = 4 * shape.trainable_params if adapter else 0
    heads = shape.heads
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text, "head_dim", None) or shape.hidden // heads)
    tokens = context * concurrency
    kv = 2 * shape.layers * kv_heads * head_dim * tokens * a
    c_inter = C_INTER_INFERENCE_GATED if shape.gated_mlp else C_INTER_INFERENCE_PLAIN
    prefill = int(tokens * (C_HIDDEN_INFERENCE * shape.hidden + c_inter * shape.intermediate) * a)
    if shape.eager_attention or shape.shared_bias:
        prefill += concurrency * heads * context * context * (4 + a)
    logits = 2 * concurrency * shape.vocab * 4
    dequant = shape.largest_linear * a if quant != "none" else 0
    workspace = prefill + logits + dequant
    parts = [
        Part("weights", weights, weights, f"base ({quant}, {run.precision.weights}): {detail}"),
        Part("adapter", lora, lora, f"{shape.trainable_params:,d} adapter params in fp32" if adapter else "merged"),
        Part("kv_cache", kv, kv, f"{shape.layers} layers x {kv_heads} KV heads x {head_dim} x {context:,d} "
                                 f"tokens x {concurrency} sequence(s)"),
        Part("workspace", workspace, workspace, "one layer's prefill tensors, last logits, dequantized weight"),
    ]
    allocated = weights + lora + kv + workspace
    if device.kind == "cuda":
        overhead = CUDA_CONTEXT_BYTES + int(ALLOCATOR_SLACK * allocated)
        what = "CUDA context + allocator slack"
    else:
        overhead = CPU_RUNTIME_BYTES
        what = "the worker's Python, torch and transformers (measured on the CPU)"
    parts.append(Part("overhead", overhead, overhead, what))
    peak = allocated + overhead
    return ServingPlan(device=device.name, device_kind=device.kind, memory_bytes=device.memory_bytes,
                       peak_bytes=peak, fits=peak <= device.memory_bytes, parts=parts,
                       settings={"quantization": quant, "dtype": run.precision.weights, "context": context,
                                 "concurrency": concurrency, "adapter": adapter})
