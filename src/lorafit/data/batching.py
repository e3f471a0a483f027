"""Which rows go in which batch, per epoch: shuffled by (seed, epoch), length-grouped when padding.

Every batch has exactly ``global_batch_size`` rows, so data-parallel ranks always get equal
slices: the epoch's order is topped up with rows from its own start (as torch's
``DistributedSampler`` does) instead of dropping or shortening the last batch. No row is ever
skipped; a few are seen twice in an epoch whose size is not a multiple of the batch.
"""

from __future__ import annotations

import random

GROUP_BATCHES = 64  # length grouping sorts within windows of this many batches, keeping randomness


def epoch_batches(lengths: list[int], epoch: int, global_batch_size: int, seed: int,
                  group_by_length: bool) -> list[list[int]]:
    """Deterministic batches of row indices for ``epoch``."""
    n = len(lengths)
    if n == 0 or global_batch_size <= 0:
        return []
    rng = random.Random(f"lorafit-batches:{seed}:{epoch}")
    order = list(range(n))
    rng.shuffle(order)
    size = global_batch_size
    while len(order) % size:
        order.extend(order[: size - len(order) % size])
    if not group_by_length:
        return [order[i : i + size] for i in range(0, len(order), size)]
    window = size * GROUP_BATCHES
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        part = sorted(order[start : start + window], key=lambda i: -lengths[i])
        batches.extend(part[i : i + size] for i in range(0, len(part), size))
    rng.shuffle(batches)
    longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
    batches.insert(0, batches.pop(longest))  # the biggest batch first: out-of-memory shows at once
    return batches


def padding_efficiency(lengths: list[int], batches: list[list[int]]) -> float:
    """Real tokens / slots when each batch is padded to its longest row."""
    real = sum(lengths[i] for batch in batches for i in batch)
    slots = sum(len(batch) * max(lengths[i] for i in batch) for batch in batches)
    return real / slots if slots else 0.0
