"""Causal-LM loss for training: the plain path and a memory-lean chunked path.

The plain path (``mode="full"``) asks the model for logits and takes cross-entropy over them:
for BLOOM's 250,880-token vocabulary that is tokens x vocab floats several times over (logits,
their fp32 copy, log-softmax saved for backward, its gradient).

The chunked path (``mode="chunked"``) runs only the backbone, keeps the final hidden states of
the positions that carry a label, and applies the LM head to ``chunk_tokens`` of them at a time.
For a plain ``nn.Linear`` head a fused autograd function computes each slice's loss *and* its
gradient in the forward pass, so only a (tokens x hidden) gradient is kept for backward and the
head's matmul is not recomputed. Any other head (a LoRA-wrapped or quantized one) runs per slice
under activation checkpointing. Masked and padded positions never reach the head at all.
Whether a model's logits are exactly ``lm_head(hidden states)`` (no soft-capping or scaling) is
decided once per run by ``lorafit.probe`` (``ResolvedRun.loss``); such models get ``mode="full"``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lorafit.data.encode import IGNORE_INDEX
from lorafit.probe import backbone_and_head
from lorafit.storage import fp32_scratch_copy

SLICE_BYTES = 64 * 2**20  # cap on one slice's logits counted in fp32 (half that under bf16)
BLOCK_BYTES = 4 * 2**20  # rows of a slice upcast to fp32 at a time for the softmax
HEAD_BLOCK_BYTES = 32 * 2**20  # rows of a 16-bit-stored head upcast to fp32 at a time
SLICE_ROW_MULTIPLE = 16  # the last slice's rows padded to this (one AMX tile's rows; <= 15 wasted per step)

def compute_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], *, mode: str = "chunked",
                 chunk_tokens: int = 1024) -> tuple[torch.Tensor, int]:
    """Return (sum of token losses, number of label tokens) for one micro-batch.

    Summed, not averaged, so gradient accumulation can divide by the tokens of the whole step.
    Labels are the batch's ``labels`` (same shape as ``input_ids``, -100 = no loss); position t
    predicts label t+1, as in transformers.
    """
    if mode == "chunked":
        parts = backbone_and_head(model)
        if parts is not None:
            return _chunked_loss(parts[0], parts[1], batch, chunk_tokens)
    elif mode != "full":
        raise ValueError(f"train.loss: unknown mode '{mode}' (expected chunked or full)")
    return _full_loss(model, batch)


def _full_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """The plain path: full logits from the model, fp32 cross-entropy over all positions."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    n_tokens = int((shift_labels != IGNORE_INDEX).sum())
    loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss, n_tokens


def _chunked_loss(backbone: torch.nn.Module, head: torch.nn.Module, batch: dict[str, torch.Tensor],
                  chunk_tokens: int) -> tuple[torch.Tensor, int]:
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    out = backbone(**inputs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    shift_labels = labels[:, 1:]
    keep = shift_labels != IGNORE_INDEX
    targets = shift_labels[keep]
    n_tokens = int(targets.numel())
    if n_tokens == 0:  # nothing to learn from: a zero that still connects to the graph
        return hidden.sum() * 0.0, 0
    selected = hidden[:, :-1][keep]  # (n_tokens, hidden): the only positions that need logits
    vocab = getattr(head, "out_features", None) or getattr(getattr(head, "weight", None), "shape", [1])[0]
    chunk = slice_tokens(chunk_tokens, int(vocab))
    if type(head) is torch.nn.Linear:
        if _narrow_frozen_head(head, selected):  # blocks of the head, not token slices
            return _NarrowHeadCrossEntropy.apply(selected, head.weight, head.bias, targets), n_tokens
        return _LinearCrossEntropy.apply(selected, head.weight, head.bias, targets, chunk), n_tokens
    loss = selected.new_zeros((), dtype=torch.float32)
    for start in range(0, n_tokens, chunk):
        piece = selected[start : start + chunk]
        loss = loss + checkpoint(_slice_loss, head, piece, targets[start : start + chunk], use_reentrant=False)
    return loss, n_tokens


def _narrow_frozen_head(head: torch.nn.Linear, hidden: torch.Tensor) -> bool:
    """A frozen head stored narrower than the fp32 hidden states it multiplies, outside autocast
    (``lorafit.storage``): the head is upcast a vocabulary block at a time, never whole."""
    trains = head.weight.requires_grad or (head.bias is not None and head.bias.requires_grad)
    return (not trains and hidden.dtype == torch.float32 and head.weight.dtype != torch.float32
            and not torch.is_autocast_enabled(hidden.device.type))


def slice_tokens(chunk_tokens: int, vocab: int) -> int:
    """Tokens per slice: ``chunk_tokens``, but at most ``SLICE_BYTES`` of fp32 logits per slice.

    BLOOM's 250,880-token vocabulary makes 1,024 tokens of fp32 logits 1 GB; the cap keeps a
    slice at 64 MiB counted in fp32 (32 MiB of bf16 logits) whatever the vocabulary: 64 tokens
    for BLOOM (a multiple of ``SLICE_ROW_MULTIPLE``), still a GEMM-sized matmul (sizes chosen by
    measurement: benchmarks/RESULTS.md).
    """
    tokens = max(1, min(int(chunk_tokens), SLICE_BYTES // (4 * max(vocab, 1))))
    # whole tiles of rows: the last slice is padded to a multiple of this, the others must not need it
    return tokens - tokens % SLICE_ROW_MULTIPLE if tokens >= SLICE_ROW_MULTIPLE else tokens


def _slice_loss(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def block_rows(vocab: int) -> int:
    """Rows of a slice upcast to fp32 at a time for the softmax (``BLOCK_BYTES`` of them)."""
    return max(1, BLOCK_BYTES // (4 * max(vocab, 1)))


def _softmax_xent_grad_(logits: torch.Tensor, targets: torch.Tensor, *, grads: bool) -> torch.Tensor:
    """Sum of cross-entropies of ``logits`` rows; with ``grads``, overwrite ``logits`` with
    softmax - onehot (their gradient). fp32 math on ``BLOCK_BYTES`` of rows at a time: no
    full-slice fp32 copy (that would be 6 bytes per logit at bf16), and blocks small enough to stay in
    cache for the five passes over each row."""
    rows = block_rows(logits.size(-1))
    total = torch.zeros((), dtype=torch.float32, device=logits.device)
    for start in range(0, logits.size(0), rows):
        part = logits[start : start + rows]
        t = targets[start : start + rows]
        block = part.float()  # a copy in bf16/fp16; the rows themselves (in place) in fp32
        target_logit = block.gather(1, t[:, None]).squeeze(1)
        top = block.amax(dim=-1, keepdim=True)
        probs = block.sub_(top).exp_()
        norm = probs.sum(dim=-1, keepdim=True)
        total += (norm.log() + top).squeeze(1).sub_(target_logit).sum()
        if grads:
            probs.div_(norm)
            probs[torch.arange(t.numel(), device=t.device), t] -= 1.0
            if block is not part:  # bf16/fp16 slice: write the fp32 block back
                part.copy_(probs)
    return total


def _rows_padded(h: torch.Tensor, chunk: int) -> torch.Tensor:
    """``h`` with zero rows appended up to a multiple of ``SLICE_ROW_MULTIPLE``, never past ``chunk``.

    The last slice's row count is the step's label count modulo the slice size, new on most steps;
    the CPU's matmul library compiles and keeps kernels per shape (~1 MB each), so a long run would
    keep one per label count. Padded, a run meets at most chunk/``SLICE_ROW_MULTIPLE`` shapes; full
    slices are already a multiple (``slice_tokens``) and gain no rows."""
    extra = min(-h.size(0) % SLICE_ROW_MULTIPLE, chunk - h.size(0))  # a slice has at most chunk rows
    return torch.cat([h, h.new_zeros(extra, h.size(1))]) if extra else h


class _LinearCrossEntropy(torch.autograd.Function):
    """sum CE(hidden @ W.T + b, targets), computed slice by slice with gradients made in forward.

    Per slice: logits in the compute dtype, then, a few rows at a time in fp32, log-sum-exp and
    softmax - onehot (the logits' gradient) written back over them, turned at once into the
    hidden states' (and, if trainable, W's) gradient. Backward only scales them. Costs the same
    two head matmuls as the plain path (one more if W trains) and holds one slice of logits at a
    time, in bf16 under bf16 autocast: the same values as casting the whole slice to fp32 (the
    plain path's bf16 logits, upcast), at a third of the bytes.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, chunk: int) -> torch.Tensor:
        device_type = hidden.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        with torch.autocast(device_type, enabled=False):
            w = weight.to(dtype)
            b = bias.to(dtype) if bias is not None else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_h = torch.empty_like(hidden) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
            grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
            for start in range(0, hidden.size(0), chunk):
                real = min(chunk, hidden.size(0) - start)
                h = _rows_padded(hidden[start : start + chunk].to(dtype), chunk)
                t = targets[start : start + chunk]
                logits = F.linear(h, w, b)  # the slice's logits in the compute dtype
                total += _softmax_xent_grad_(logits[:real], t, grads=need_h or need_w or need_b)
                if not (need_h or need_w or need_b):
                    continue
                logits[real:].zero_()  # padding rows: no gradient
                grad_logits = logits  # now holds softmax - onehot, in the compute dtype
                if need_h:
                    grad_h[start : start + chunk] = (grad_logits @ w)[:real]
                if need_w:
                    grad_w.addmm_(grad_logits.t().float(), h.float())
                if need_b:
                    grad_b += grad_logits.float().sum(0)
                del logits, grad_logits
        ctx.save_for_backward(*(g for g in (grad_h, grad_w, grad_b) if g is not None))
        ctx.has = (grad_h is not None, grad_w is not None, grad_b is not None)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        saved = iter(ctx.saved_tensors)
        grads: list[torch.Tensor | None] = []
        for has, dtype in zip(ctx.has, ctx.dtypes, strict=True):
            grads.append((next(saved) * grad_out).to(dtype) if has else None)
        return grads[0], grads[1], grads[2], None, None


class _NarrowHeadCrossEntropy(torch.autograd.Function):
    """sum CE(hidden @ W.T + b, targets) in fp32 for a frozen 16-bit ``W``, one vocabulary block
    of ``W`` upcast at a time.

    The softmax normaliser is only known after the last block, so the hidden states' gradient,
    softmax(logits) @ W - W[targets], is accumulated online as flash attention does: a running
    max and sum of exp per token, and the exp-weighted rows of W, rescaled when the max grows.
    Each block is upcast once, and the matmuls are the same two as the plain path's (logits and
    gradient); the logits held at once stay under ``SLICE_BYTES``.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor) -> torch.Tensor:
        n, width = hidden.shape
        vocab = weight.shape[0]
        rows = max(1, HEAD_BLOCK_BYTES // (4 * width))
        tokens = max(1, SLICE_BYTES // (4 * min(rows, vocab)))
        h = hidden.detach().float()
        grads = ctx.needs_input_grad[0]
        running_max = torch.full((n,), float("-inf"), device=h.device)
        running_sum = torch.zeros(n, device=h.device)
        weighted = torch.zeros(n if grads else 0, width, device=h.device)  # sum of exp(logit - max) * W row
        target_logit = torch.zeros(n, device=h.device)
        for v0 in range(0, vocab, rows):
            w = fp32_scratch_copy(weight[v0 : v0 + rows])
            b = bias[v0 : v0 + rows].float() if bias is not None else None
            for t0 in range(0, n, tokens):
                span = slice(t0, t0 + tokens)
                logits = F.linear(h[span], w, b)
                t = targets[span] - v0
                inside = (t >= 0) & (t < w.size(0))
                if bool(inside.any()):
                    idx = inside.nonzero().squeeze(1)
                    target_logit[t0 + idx] = logits[idx, t[idx]]
                new_max = torch.maximum(running_max[span], logits.amax(dim=1))
                # -inf so far (a masked block): shift by 0 instead, or exp(-inf - -inf) is NaN
                shift = torch.where(torch.isneginf(new_max), 0.0, new_max)
                rescale = (running_max[span] - shift).exp_()
                probs = logits.sub_(shift[:, None]).exp_()
                running_sum[span] = running_sum[span] * rescale + probs.sum(dim=1)
                if grads:
                    weighted[span] = torch.addmm(weighted[span] * rescale[:, None], probs, w)
                running_max[span] = new_max
                del logits, probs
        loss = (running_max + running_sum.log() - target_logit).sum()
        if grads:
            grad_h = weighted.div_(running_sum[:, None]).sub_(weight[targets].float()).to(hidden.dtype)
            ctx.save_for_backward(grad_h)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_h = ctx.saved_tensors[0] * grad_out if ctx.needs_input_grad[0] else None
        return grad_h, None, None, None
