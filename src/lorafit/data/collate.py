"""Rows of token ids -> padded tensors: the one collate for training, eval loss and generation.

- Training and eval loss pad on the right: ``input_ids``, ``labels`` (-100 on padding) and
  ``attention_mask``, to a multiple of ``data.pad_to_multiple_of`` tokens (a CPU keeps compiled
  matmul kernels per shape: few row lengths, flat memory); packed rows carry ``position_ids``
  instead (restarting per sample, padding its own segment), so the model builds a block-diagonal
  mask and nothing attends across samples.
  With flash attention, packed rows go as one flattened ``[1, N]`` row (see ``packing.py``).
- Generation pads on the left, so every prompt's last token sits at the same position.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lorafit.data.encode import IGNORE_INDEX


def collate(rows: Sequence[dict[str, Any]], pad_id: int, *, packed: bool = False, flatten: bool = False,
            left: bool = False, multiple: int = 1, limit: int = 0) -> dict[str, torch.Tensor]:
    """Pad ``rows`` (dicts with ``input_ids`` and optionally ``labels`` / ``position_ids``) to the
    longest, rounded up to a ``multiple`` of tokens but not past ``limit`` (the run's seq_len);
    LongTensors [B, T]."""
    if not rows:
        raise ValueError("collate needs at least one row")
    with_labels = "labels" in rows[0]
    if packed and flatten:
        keys = ("input_ids", "labels", "position_ids") if with_labels else ("input_ids", "position_ids")
        return {k: torch.tensor([[t for r in rows for t in r[k]]], dtype=torch.long) for k in keys}
    width = padded_width(max(len(r["input_ids"]) for r in rows), multiple, limit)
    ids, labels, extra = [], [], []
    for row in rows:
        n = len(row["input_ids"])
        pad = width - n
        ids.append(_pad(row["input_ids"], pad_id, pad, left))
        if with_labels:
            labels.append(_pad(row["labels"], IGNORE_INDEX, pad, left))
        if packed:
            extra.append(row["position_ids"] + list(range(pad)))  # padding is its own segment
        else:
            extra.append(_pad([1] * n, 0, pad, left))
    batch = {"input_ids": torch.tensor(ids, dtype=torch.long)}
    if with_labels:
        batch["labels"] = torch.tensor(labels, dtype=torch.long)
    batch["position_ids" if packed else "attention_mask"] = torch.tensor(extra, dtype=torch.long)
    return batch


def padded_width(longest: int, multiple: int, limit: int = 0) -> int:
    """``longest`` rounded up to a multiple of ``multiple``, capped at ``limit`` (never below ``longest``):
    a model's positions end at seq_len, and a row that long gains nothing from more padding."""
    if multiple <= 1:
        return longest
    rounded = -(-longest // multiple) * multiple
    return max(longest, min(rounded, limit)) if limit else rounded


def _pad(values: list[int], fill: int, count: int, left: bool) -> list[int]:
    return [fill] * count + list(values) if left else list(values) + [fill] * count
