"""Turn samples into training rows: one per sample, the recipe's chunks, or packed rows.

``packed`` puts several samples in one row of at most ``seq_len`` tokens (best-fit decreasing)
with ``position_ids`` restarting at 0 for each sample and the first label of each sample masked,
so no token predicts across a boundary. No attention crosses a boundary either: transformers 5
finds the sample boundaries from ``position_ids`` when ``attention_mask`` is None
(``masking_utils.find_packed_sequence_indices``) and builds a block-diagonal causal mask for the
eager, sdpa and flex backends; flash-attention (2/3) instead takes packed sequences from
``position_ids`` only for a batch of one row, so ``collate`` flattens the batch for it.

Which models honour this is found out by running a small copy of the architecture
(``lorafit.probe``) before anything is tokenized: Llama, Mistral, Mixtral, Qwen2/3, Gemma, Phi-3,
GPT-2, GPT-NeoX, Falcon do; BLOOM (ALiBi, no position ids) and OPT (its mask ignores position ids)
do not, and for them, and any model where it cannot be verified, ``packed`` becomes ``none``
with a note. Two traps: the detection is skipped when a KV cache exists, so training must run
with ``use_cache=False`` (lorafit's model loader sets it), and a 2D ``attention_mask`` disables it.
"""

from __future__ import annotations

import bisect

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
