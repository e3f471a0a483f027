"""Causal-LM loss for training (placeholder: the plain path; the chunked path lands with issue 4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def compute_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], *, mode: str = "full",
                 chunk_tokens: int = 1024) -> tuple[torch.Tensor, int]:
    """Return (sum of token losses, number of label tokens) for one micro-batch.

    Summed, not averaged, so gradient accumulation can divide by the tokens of the whole step.
    """
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
