"""The one-line data report printed at start, the bad-row messages, and length statistics."""

from __future__ import annotations

import math

SHOWN_PROBLEMS = 3


def percentile(values: list[int], q: float) -> int:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def problem_list(problems: list[str], shown: int = SHOWN_PROBLEMS) -> str:
    """'a.jsonl line 17 missing 'summary', a.jsonl line 40 invalid JSON, ... (+5 more)'."""
    text = ", ".join(problems[:shown])
    if len(problems) > shown:
        text += f", ... (+{len(problems) - shown} more)"
    return text


def skipped_line(problems: list[str], total: int) -> str:
    return f"skipped {len(problems)} of {total} rows: {problem_list(problems)}"


def summary_line(stats: dict, packing: str, seq_len: int, note: str | None, problems: list[str],
                 overlong: str, dropped: list[str]) -> str:
    """Everything the user should know about their data, on one line."""
    parts = [
        f"data: {stats['rows']} rows -> {stats['train_samples']} train / {stats['eval_samples']} eval samples, "
        f"{stats['total_tokens']:,} tokens (p50 {stats['p50_tokens']}, p95 {stats['p95_tokens']}, "
        f"max {stats['max_tokens']})",
        f"packing {packing}: {stats['train_rows']} rows of <= {seq_len} tokens, "
        f"efficiency {stats['packing_efficiency']:.1%}",
    ]
    if note:
        parts.append(note)
    if stats["truncated"]:
        shown = ", ".join(stats.get("truncated_rows", []))
        hidden = stats["truncated"] - len(stats.get("truncated_rows", []))
        shown += f", ... (+{hidden} more)" if hidden > 0 else ""
        parts.append(f"truncated {stats['truncated']} rows over seq_len {seq_len} ({shown})")
    if dropped:
        parts.append(f"dropped {len(dropped)} rows over seq_len {seq_len} ({problem_list(dropped)})")
    if problems:
        parts.append(skipped_line(problems, stats["rows"]))
    if stats.get("cached"):
        parts.append("tokenized data from cache")
    return "; ".join(parts)
