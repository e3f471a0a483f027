"""Frozen weights stored in 16 bits, computed in fp32 (``model.dtype`` 16-bit, ``train.precision: fp32``).

Most checkpoints on the Hub are bf16: keeping their big matrices in bf16 is lossless and halves
the base's memory. Computing in bf16 is fast on GPUs and on CPUs with bf16 units (AMX), but many
CPUs have none and run a bf16 matmul 10-100x slower than fp32. This mode keeps each frozen
``nn.Linear`` / ``nn.Embedding`` weight in its 16-bit dtype and upcasts it for the one matmul or
lookup that needs it (a few percent of that matmul's time), with everything else (norms, biases,
the adapter, the activations) in fp32. The LM head's fused loss upcasts the head a vocabulary
block at a time (``lorafit.loss``), so no full fp32 copy of a large vocabulary ever exists.

Without this, a 16-bit model with ``precision: fp32`` would compute in 16 bits while the run's log
said fp32.
"""

from __future__ import annotations

import threading
import types
from typing import Any

import torch
import torch.nn.functional as F

SIXTEEN_BIT = (torch.bfloat16, torch.float16)
COMPUTE = torch.float32


SCRATCH_MAX_BYTES = 256 * 2**20  # larger matrices (a whole vocabulary head) are cast afresh, not kept
_local = threading.local()  # per thread: two threads never share an upcast buffer


def fp32_scratch_copy(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` in fp32, in a scratch buffer that the next call for the same shape overwrites.

    The rule: use the result at once, in one operation that keeps no reference to it, and only
    where autograd records nothing (inside an autograd Function's forward or backward): autograd
    would save the buffer for backward, and the next layer of that shape would overwrite it.
    On the CPU the buffer is reused per shape and thread (``fp32_scratch_copy(a) is
    fp32_scratch_copy(b)`` for same-shaped ``a``, ``b``): a fresh fp32 tensor per matmul costs
    page faults and heap fragmentation. Buffers over ``SCRATCH_MAX_BYTES`` are not kept. CUDA's
    caching allocator already reuses blocks, so there it is a plain cast.
    """
    assert not torch.is_grad_enabled(), "fp32_scratch_copy: call it where autograd records nothing"
    if weight.device.type != "cpu" or weight.numel() * 4 > SCRATCH_MAX_BYTES:
        return weight.to(COMPUTE)
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    key = tuple(weight.shape)
    buffer = buffers.get(key)
    if buffer is None:
        with torch.inference_mode(False):  # made under inference mode it could not be written after it
            buffer = buffers[key] = torch.empty(weight.shape, dtype=COMPUTE, device=weight.device)
    return buffer.copy_(weight)


class _UpcastLinear(torch.autograd.Function):
    """``x @ W.T + b`` with a frozen 16-bit ``W`` upcast for the matmul only (``b`` fp32, may train).

    Autograd would keep the fp32 copy alive until backward (one per layer: a full fp32 model by the
    end of the forward without checkpointing); this saves the 16-bit ``W`` and upcasts it again.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return F.linear(x, fp32_scratch_copy(weight), bias)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None, torch.Tensor | None]:
        (weight,) = ctx.saved_tensors
        grad_out = grad_out.to(COMPUTE)
        grad_x = grad_out @ fp32_scratch_copy(weight) if ctx.needs_input_grad[0] else None
        grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, None, grad_b


def _linear_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return _UpcastLinear.apply(x.to(COMPUTE), self.weight, self.bias)


def _embedding_forward(self: torch.nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    rows = F.embedding(ids, self.weight, self.padding_idx, self.max_norm, self.norm_type,
                       self.scale_grad_by_freq, self.sparse)
    return rows.to(COMPUTE)


def stores_16bit(module: torch.nn.Module) -> bool:
    """Whether ``module`` is one of the matrices this mode keeps in 16 bits."""
    return type(module) in (torch.nn.Linear, torch.nn.Embedding) and module.weight.dtype in SIXTEEN_BIT


def keep_16bit_compute_fp32(model: torch.nn.Module) -> None:
    """Keep ``model``'s Linear / Embedding weights in 16 bits, upcast per use; everything else to fp32.

    Call on the base before peft wraps it (peft's LoRA layers call the base layer, so they get the
    upcasting forward).
    """
    kept: set[int] = set()  # ids of the 16-bit weights (a tied head shares its embedding's)
    for module in model.modules():
        if not stores_16bit(module):
            continue
        forward = _linear_forward if isinstance(module, torch.nn.Linear) else _embedding_forward
        module.forward = types.MethodType(forward, module)
        kept.add(id(module.weight))
    widened: dict[str, torch.dtype] = {}
    for name, param in model.named_parameters():
        if param.dtype in SIXTEEN_BIT and id(param) not in kept:
            widened[name] = param.dtype
            param.data = param.data.to(COMPUTE)
    model._lorafit_widened = widened  # what ``narrow_back`` restores before a merged model is saved
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.dtype in SIXTEEN_BIT:
                setattr(module, name, buffer.to(COMPUTE))


def narrow_back(model: torch.nn.Module) -> None:
    """Give the parameters ``keep_16bit_compute_fp32`` widened their checkpoint dtype again (a merged
    model is saved as loaded; modules a model keeps in fp32 on purpose were never widened)."""
    widened = getattr(model, "_lorafit_widened", None) or {}
    for name, param in model.named_parameters():
        if name in widened:
            param.data = param.data.to(widened[name])
