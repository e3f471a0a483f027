"""Turn samples into training rows: one per sample, the recipe's chunks, or packed rows.

``packed`` puts several samples in one row of at most ``seq_len`` tokens (best-fit decreasing)
with ``position_ids`` restarting at 0 for each sample and the first label of each sample masked,
so no token predicts across a boundary. No attention crosses a boundary either: transformers 5
finds the sample boundaries from ``position_ids`` when ``attention_mask`` is None
(``masking_utils.find_packed_sequence_indices``) and builds a block-diagonal causal mask for the
eager, sdpa and flex backends; flash-attention (2/3) instead takes packed sequences from
``position_ids`` only for a batch of one row, so ``collate`` flattens the batch for it.

Which models honour this: those whose modeling code builds its mask with ``create_causal_mask``
(or the sliding-window variant) and takes ``position_ids`` — Llama, Mistral, Mixtral, Qwen2/3,
Gemma, Phi-3, GPT-2, GPT-NeoX, Falcon, OPT, ... BLOOM does not (ALiBi, no position ids): for it,
and any model where this cannot be verified, ``packed`` falls back to ``none`` with a note in the
summary. Two traps: the detection is skipped when a KV cache exists, so training must run with
``use_cache=False`` (lorafit's model loader sets it), and a 2D ``attention_mask`` disables it.
"""

from __future__ import annotations

import bisect
import inspect
from typing import Any

from lorafit.data.encode import IGNORE_INDEX, Encoded

Row = dict[str, list[int]]


def single_rows(samples: list[Encoded]) -> list[Row]:
    """``none``: one sample per row (padded per batch later)."""
    return [{"input_ids": s.input_ids, "labels": s.labels} for s in samples]


def chunk_rows(samples: list[Encoded], seq_len: int) -> list[Row]:
    """``chunk``: the recipe's concatenate-and-split into ``seq_len`` blocks (attention crosses samples).

    The remainder becomes a last, shorter block instead of being dropped.
    """
    ids = [t for s in samples for t in s.input_ids]
    labels = [t for s in samples for t in s.labels]
    return [{"input_ids": ids[i : i + seq_len], "labels": labels[i : i + seq_len]} for i in range(0, len(ids), seq_len)]


def pack_rows(samples: list[Encoded], seq_len: int) -> list[Row]:
    """``packed``: best-fit decreasing into rows of at most ``seq_len`` tokens (deterministic)."""
    order = sorted(range(len(samples)), key=lambda i: (-len(samples[i].input_ids), i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, bin index), sorted
    for index in order:
        size = len(samples[index].input_ids)
        at = bisect.bisect_left(free, (size, -1))
        if at < len(free):
            space, chosen = free.pop(at)
            bins[chosen].append(index)
            bisect.insort(free, (space - size, chosen))
        else:
            bins.append([index])
            bisect.insort(free, (seq_len - size, len(bins) - 1))
    return [_join([samples[i] for i in members]) for members in bins]


def _join(members: list[Encoded]) -> Row:
    row: Row = {"input_ids": [], "labels": [], "position_ids": []}
    for sample in members:
        row["input_ids"].extend(sample.input_ids)
        row["labels"].extend([IGNORE_INDEX] + sample.labels[1:])
        row["position_ids"].extend(range(len(sample.input_ids)))
    return row


def split_packed(row: Row) -> list[tuple[int, int]]:
    """(start, end) of each sample in a row: a new sample starts where position_ids restart."""
    positions = row.get("position_ids")
    if not positions:
        return [(0, len(row["input_ids"]))]
    starts = [i for i, p in enumerate(positions) if p == 0] or [0]
    return list(zip(starts, starts[1:] + [len(positions)], strict=True))


def packed_attention_support(model_type: str | None, attn_implementation: str | None) -> str | None:
    """None when the model keeps packed samples apart; else why it cannot (one short phrase)."""
    if model_type is None:
        return None  # unknown (e.g. a hub model offline): trust the common case, the probe checks later
    if attn_implementation and attn_implementation not in ("eager", "sdpa", "flex_attention") \
            and not attn_implementation.startswith("flash_attention"):
        return f"attention backend '{attn_implementation}' is not known to honour packed position ids"
    try:
        from transformers.models.auto.configuration_auto import model_type_to_module_name
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        class_name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
        module_name = model_type_to_module_name(model_type)
        module = __import__(f"transformers.models.{module_name}.modeling_{module_name}", fromlist=[class_name])
        cls = getattr(module, class_name)
        source = inspect.getsource(module)
    except (KeyError, ImportError, AttributeError, OSError, TypeError):
        return f"model type '{model_type}' could not be checked for packed attention"
    uses_mask_utils = "create_causal_mask" in source or "create_sliding_window_causal_mask" in source
    takes_positions = "position_ids" in inspect.signature(cls.forward).parameters
    if not (uses_mask_utils and takes_positions):
        return f"{model_type} attention does not separate packed samples (no position-id masking)"
    return None


def check_packed_attention(model: Any, vocab_size: int | None = None) -> str | None:
    """Probe a loaded model: do two packed samples give the logits they give alone? None = yes.

    Three tiny forward passes (at most 18 tokens): the second sample alone, packed after the
    first with restarting ``position_ids``, and the same concatenation without them (what a leak
    looks like). Packing is fine when its error is tiny, or far below the leak's, which keeps the
    check independent of the precision and kernels (bf16, int8, TF32) the model runs in.
    """
    import torch

    vocab = vocab_size or model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    a = torch.randint(3, max(4, vocab), (1, 11), generator=generator)
    b = torch.randint(3, max(4, vocab), (1, 7), generator=generator)
    device = next(model.parameters()).device
    both = torch.cat([a, b], 1).to(device)
    positions = torch.cat([torch.arange(11), torch.arange(7)])[None].to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            alone = model(input_ids=b.to(device), use_cache=False).logits.float()
            packed = model(input_ids=both, position_ids=positions, use_cache=False).logits.float()[:, 11:]
            leaky = model(input_ids=both, use_cache=False).logits.float()[:, 11:]
    finally:
        model.train(was_training)
    scale = alone.abs().max().clamp(min=1.0)
    error = ((packed - alone).abs().max() / scale).item()
    leak = ((leaky - alone).abs().max() / scale).item()
    if error <= 1e-5 or error <= 0.02 * leak:
        return None
    return f"packed samples change each other's logits (relative error {error:.1e}, unpacked {leak:.1e})"
