"""``lorafit data inspect [CONFIG]``: see what the model will be trained on, before training.

Prints the data format (detected by ``data.format: auto``, with the columns it read and how many
rows have each shape), the one-line data summary, length statistics, and a few rendered samples
with masked (prompt, no loss) and trained tokens told apart: dim on a terminal, ``[[double
brackets]]`` around masked text otherwise. Loads only the tokenizer, never the model weights.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from lorafit.cli import add_config_arguments
from lorafit.config import load_config
from lorafit.data.encode import IGNORE_INDEX
from lorafit.data.packing import split_packed
from lorafit.resolved import resolve

DIM, RESET = "\x1b[2m", "\x1b[0m"


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("data", help="inspect the training data as the model will see it")
    actions = parser.add_subparsers(dest="data_command", metavar="ACTION")
    inspect = actions.add_parser("inspect", help="rendered samples (masked vs trained tokens) and length statistics")
    add_config_arguments(inspect)
    inspect.add_argument("-n", "--examples", type=int, default=3, help="samples to show (default 3)")
    inspect.add_argument("--color", choices=["auto", "always", "never"], default="auto",
                         help="dim masked text (auto: only on a terminal); otherwise [[brackets]]")
    inspect.set_defaults(func=run_inspect)
    parser.set_defaults(func=lambda args: parser.print_help() or 2)


def run_inspect(args: argparse.Namespace) -> int:
    from lorafit.data import prepare_data
    from lorafit.modeling import load_tokenizer

    run = resolve(load_config(args.config, args.overrides))
    tokenizer = load_tokenizer(run)
    prepared = prepare_data(run, tokenizer)
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty() and not os.environ.get("NO_COLOR"))
    out = sys.stdout
    out.write(prepared.format_line + "\n")
    counts = prepared.stats.get("format_counts") or {}
    if counts:
        out.write("rows per shape: " + ", ".join(f"{name} {n:,}" for name, n in counts.items()) + "\n")
    template = prepared.template or {}
    if template.get("chat_template_source"):
        ends = ", ".join(template.get("stop_tokens") or []) or "plain text"
        out.write(f"chat template: {template['chat_template_source']} (assistant turns end with {ends})\n")
    out.write(prepared.summary + "\n\n")
    stats = prepared.stats
    out.write("length statistics (tokens per sample)\n")
    for name, key in (("rows", "rows"), ("skipped", "skipped"), ("train samples", "train_samples"),
                      ("eval samples", "eval_samples"), ("total tokens", "total_tokens"),
                      ("trained tokens", "trained_tokens"), ("p50", "p50_tokens"), ("p95", "p95_tokens"),
                      ("max", "max_tokens")):
        out.write(f"  {name:<16}{stats.get(key, 0):>12,}\n")
    out.write(f"  {'packing':<16}{prepared.packing:>12}\n")
    out.write(f"  {'efficiency':<16}{stats['packing_efficiency']:>12.1%}\n\n")
    legend = "masked (no loss) text is dim" if color else "masked (no loss) text is in [[double brackets]]"
    out.write(f"examples ({legend}; trained text is plain)\n")
    for number, (ids, labels) in enumerate(_samples(prepared, args.examples), start=1):
        trained = sum(label != IGNORE_INDEX for label in labels)
        out.write(f"--- example {number}: {len(ids)} tokens, {trained} trained\n")
        out.write(render_masked(tokenizer, ids, labels, color) + "\n")
    return 0


def _samples(prepared: Any, limit: int) -> list[tuple[list[int], list[int]]]:
    """The first ``limit`` samples (packed rows are split back into their samples)."""
    found: list[tuple[list[int], list[int]]] = []
    if prepared.pairs:  # a preference pair: its chosen, then its rejected sequence
        from lorafit.data.preference import sides

        return [(side["input_ids"], side["labels"]) for row in prepared.train for side in sides(row)][:limit]
    for row in prepared.train:
        for start, end in split_packed(row):
            found.append((row["input_ids"][start:end], row["labels"][start:end]))
            if len(found) >= limit:
                return found
    return found


def render_masked(tokenizer: Any, ids: list[int], labels: list[int], color: bool) -> str:
    """Decode runs of masked and trained tokens separately and mark the masked runs."""
    runs: list[tuple[bool, list[int]]] = []
    for token, label in zip(ids, labels, strict=True):
        masked = label == IGNORE_INDEX
        if runs and runs[-1][0] == masked:
            runs[-1][1].append(token)
        else:
            runs.append((masked, [token]))
    pieces = []
    for masked, tokens in runs:
        text = tokenizer.decode(tokens, skip_special_tokens=False)
        if masked:
            pieces.append(f"{DIM}{text}{RESET}" if color else f"[[{text}]]")
        else:
            pieces.append(text)
    return "".join(pieces)
