"""``prepare_data``: from ``config.data`` to training rows, batches and a one-line report.

Stages: read rows (sources) -> decide the format (``data.format``, or ``auto`` from the columns:
detect) -> render and tokenize each (formats, encode; bad rows counted) ->
stop with a one-line ``DataError`` if all or too many rows are bad (before any model loads) ->
hold out eval rows by seed -> build rows per the resolved packing mode -> statistics. The result
is cached by data, tokenizer and settings. The held-out rows keep their identity (file, line,
content hash) so ``lorafit eval`` scores exactly the rows training held out.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from lorafit.data import batching, cache, packing, report
from lorafit.data.chat import generation_prompt_note
from lorafit.data.collate import collate
from lorafit.data.detect import Detection, mismatch
from lorafit.data.encode import (
    IGNORE_INDEX,
    Encoded,
    EncodeOptions,
    encode_many,
    encode_options,
    tokenizer_fingerprint,
)
from lorafit.data.formats import FORMATS, BadRow, get_format, segments
from lorafit.data.preference import choose_run_format, collate_pairs, prepare_pairs
from lorafit.data.sources import RawRow, all_local, as_list, fingerprint, load_rows
from lorafit.data.template import template_record
from lorafit.errors import ConfigError, DataError

if TYPE_CHECKING:
    from lorafit.resolved import ResolvedRun


@dataclass
class PreparedData:
    """Training and eval rows plus how to batch and collate them."""

    train: list[dict[str, list[int]]]
    eval: list[dict[str, list[int]]] | None
    packing: str
    pad_token_id: int
    summary: str
    stats: dict[str, Any]
    flatten: bool = False  # flash-attention: packed rows go as one [1, N] row (see packing.py)
    problems: list[str] = field(default_factory=list)
    held_out: list[dict[str, Any]] | None = None  # the eval rows as training drew them (see held_out_record)
    detection: dict[str, Any] = field(default_factory=dict)  # the format and how it was chosen (run.json)
    template: dict[str, Any] = field(default_factory=dict)  # what rows render with (lorafit_template.json)
    pairs: bool = False  # preference pairs: a row holds a chosen and a rejected sequence (data.preference)
    pad_to_multiple_of: int = 1  # rows padded to a multiple of this many tokens (the resolved run's)
    seq_len: int = 0  # ... but not past the run's seq_len

    @property
    def format(self) -> str:
        return self.detection.get("format", "")

    @property
    def format_line(self) -> str:
        """'data format: chat (auto, from column messages; 120 of 120 rows)', printed at start."""
        return Detection(**self.detection).line() if self.detection else ""

    def collate(self, rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        """Right-padded LongTensors [B, T]: ``input_ids``, ``labels`` and ``attention_mask``
        (none/chunk) or ``position_ids`` (packed); pairs give [2B, T], chosen first."""
        if self.pairs:
            return collate_pairs(rows, self.pad_token_id, multiple=self.pad_to_multiple_of, limit=self.seq_len)
        return collate(rows, self.pad_token_id, packed=self.packing == "packed", flatten=self.flatten,
                       multiple=self.pad_to_multiple_of, limit=self.seq_len)

    def epoch_batches(self, epoch: int, global_batch_size: int, seed: int) -> list[list[int]]:
        """Row indices per batch for ``epoch``: shuffled by (seed, epoch); length-grouped for
        ``none``; every batch full (topped up from the epoch's start, see batching.py)."""
        lengths = [len(r["input_ids"]) if not self.pairs else max(len(r["input_ids"]), len(r["rejected_input_ids"]))
                   for r in self.train]
        return batching.epoch_batches(lengths, epoch, global_batch_size, seed,
                                      group_by_length=self.packing == "none")


def held_out_record(sample: Any) -> dict[str, Any]:
    """A held-out row's identity (file, line, content hash) and content, as the run folder keeps it."""
    source, where = sample.origin or ("", "")
    return {"source": source, "where": where, "sha256": row_hash(sample.record), "row": sample.record}


def row_hash(row: Any) -> str:
    """A content hash of one data row (canonical JSON)."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()


def prepare_data(run: ResolvedRun, tokenizer: Any) -> PreparedData:
    """Read, validate, tokenize, split and pack ``run.config.data``; raise ``DataError`` on bad data.

    The packing mode is the resolved run's (``run.packing``): decided from the architecture
    before anything is tokenized, so the rows never change after the model loads.
    """
    config = run.config
    data = config.data
    if config.train.objective != "sft":
        return prepare_pairs(run, tokenizer)
    seq_len = config.train.seq_len
    mode, flatten = run.packing, run.flatten_packed
    note = next((n for n in run.notes if n.startswith("data.packing")), None)
    pad_id = _pad_id(tokenizer)
    key = None
    if data.cache and all_local(as_list(data.path)) and all_local(as_list(data.eval_path), "data.eval_path"):
        key = cache.cache_key({
            "data": fingerprint(as_list(data.path), data.split, subset=data.subset),
            "eval": fingerprint(as_list(data.eval_path), data.split, "data.eval_path", data.subset),
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "settings": data.model_dump(mode="json", exclude={"cache", "pad_to_multiple_of"}),  # collate-time
            "seq_len": seq_len, "seed": config.train.seed, "packing": mode,
            "batch_size": config.train.batch_size,
        })
        hit = cache.load(key)
        if hit is not None:
            train, eval_rows, meta = hit
            stats = {**meta["stats"], "cached": True}
            summary = report.summary_line(stats, mode, seq_len, _notes(note, meta["notes"]), meta["problems"],
                                          data.overlong, meta["dropped"])
            return PreparedData(train, eval_rows, mode, pad_id, summary, stats, flatten, meta["problems"],
                                meta.get("held_out"), meta["detection"], meta["template"],
                                pad_to_multiple_of=run.pad_to_multiple_of, seq_len=seq_len)

    raw = load_rows(as_list(data.path), data.split, subset=data.subset)
    raw_eval = load_rows(as_list(data.eval_path), data.split, "data.eval_path", data.subset) if data.eval_path else []
    if not raw:
        raise DataError(f"data.path: no rows in {', '.join(as_list(data.path))}")
    detection = choose_run_format(raw + raw_eval, data, config.train.objective, _source_label(data.path))
    rendering = data.model_copy(update={"format": detection.format})  # every row is read as this format
    _check_options_apply(rendering)
    options = encode_options(rendering, tokenizer)
    samples, problems, dropped, truncated, notes = _encode_rows(raw, rendering, seq_len, tokenizer, options)
    eval_samples, eval_problems, eval_dropped, eval_truncated, eval_notes = _encode_rows(
        raw_eval, rendering, seq_len, tokenizer, options)
    problems += eval_problems
    dropped += eval_dropped
    _check_bad(len(raw) + len(raw_eval), problems, dropped, samples, data.max_bad_fraction, seq_len, data.overlong)
    data_notes = _data_notes(notes + eval_notes, rendering, tokenizer)

    if data.eval_path:
        eval_list: list[Encoded] | None = eval_samples[: data.max_eval_rows] or None
    else:
        samples, eval_list = _hold_out(samples, data.eval_fraction, data.max_eval_rows, config.train.seed)
    train_rows = build_rows(samples, mode, seq_len)
    eval_rows = build_rows(eval_list, mode, seq_len) if eval_list else None

    lengths = [len(s.input_ids) for s in samples + (eval_list or [])]
    row_lengths = [len(r["input_ids"]) for r in train_rows]
    first_epoch = batching.epoch_batches(row_lengths, 0, config.train.batch_size, config.train.seed,
                                         group_by_length=mode == "none")
    stats = {
        "rows": len(raw) + len(raw_eval),
        "skipped": len(problems),
        "train_samples": len(samples),
        "eval_samples": len(eval_list or []),
        "train_rows": len(train_rows),
        "eval_rows": len(eval_rows or []),
        "total_tokens": sum(len(s.input_ids) for s in samples),
        "trained_tokens": sum(sum(t != IGNORE_INDEX for t in s.labels) for s in samples),
        "p50_tokens": report.percentile(lengths, 50),
        "p95_tokens": report.percentile(lengths, 95),
        "max_tokens": max(lengths),
        "packing_efficiency": round(batching.padding_efficiency(row_lengths, first_epoch), 4),
        "truncated": len(truncated) + len(eval_truncated),
        "truncated_rows": (truncated + eval_truncated)[: report.SHOWN_PROBLEMS],
        "dropped_overlong": len(dropped),
        "format": detection.format,
        "format_counts": detection.counts,
        "cached": False,
    }
    summary = report.summary_line(stats, mode, seq_len, _notes(note, data_notes), problems, data.overlong, dropped)
    held_out = [held_out_record(s) for s in eval_list] if eval_list else None
    template = template_record(rendering, tokenizer, detection)
    if key is not None:
        cache.save(key, train_rows, eval_rows, {"stats": stats, "problems": problems, "dropped": dropped,
                                                "held_out": held_out, "notes": data_notes,
                                                "detection": detection.to_json(), "template": template})
    return PreparedData(train_rows, eval_rows, mode, pad_id, summary, stats, flatten, problems, held_out,
                        detection.to_json(), template, pad_to_multiple_of=run.pad_to_multiple_of, seq_len=seq_len)


def _source_label(paths: str | list[str]) -> str:
    from pathlib import Path

    return ", ".join(Path(p).name or p for p in as_list(paths))


def _check_options_apply(data: Any) -> None:
    """A setting the run's format does not use is refused, not silently ignored."""
    fmt = get_format(data.format)
    if data.template is not None and fmt.prompt_templates is None:
        users = ", ".join(name for name, f in FORMATS.items() if f.prompt_templates is not None)
        hint = "; it renders through the tokenizer's chat template" if fmt.chat else ""
        raise ConfigError(f"data.template: the {fmt.name} format does not use a prompt template "
                          f"(only {users} do){hint}")


def _notes(*parts: str | list[str] | None) -> str | None:
    flat = [p for part in parts for p in ([part] if isinstance(part, str) else (part or [])) if p]
    return "; ".join(flat) or None


def _data_notes(notes: list[str], data: Any, tokenizer: Any) -> list[str]:
    """Counted, not fatal: how rows rendered, one clause each in the data line."""
    out = []
    rewritten = notes.count("rewritten")
    if rewritten:
        out.append(f"{rewritten} rows have assistant turns the chat template renders without part of their "
                   "content (e.g. Qwen3 drops earlier <think> blocks); trained as rendered")
    straddles = [n.split(":", 1)[1].strip() for n in notes if n.startswith("straddle:")]
    if straddles:
        out.append(f"{len(straddles)} rows have a token spanning the end of the prompt and the start of the "
                   f"response ({straddles[0]}); it is trained (does the prompt template end with a space?)")
    if get_format(data.format).chat:
        note = generation_prompt_note(tokenizer)
        if note:
            out.append(note)
    return out


def build_rows(samples: list[Encoded], mode: str, seq_len: int) -> list[dict[str, list[int]]]:
    if mode == "packed":
        return packing.pack_rows(samples, seq_len)
    if mode == "chunk":
        return packing.chunk_rows(samples, seq_len)
    return packing.single_rows(samples)


def _pad_id(tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def _encode_rows(raw: list[RawRow], data: Any, seq_len: int, tokenizer: Any, options: EncodeOptions
                 ) -> tuple[list[Encoded], list[str], list[str], list[str], list[str]]:
    """Encoded samples, bad-row messages, dropped-over-long messages, truncated rows and notes
    ("rewritten", "straddle: ...") for the data report."""
    samples: list[Encoded] = []
    problems: list[str] = []
    dropped: list[str] = []
    truncated: list[str] = []
    notes: list[str] = []
    rendered: list[tuple[RawRow, list]] = []
    chat = get_format(data.format).chat
    for row in raw:
        if row.error is not None:
            problems.append(f"{row.label} {row.error}")
            continue
        other = mismatch(row.data, data.format, data)
        if other is not None:
            problems.append(f"{row.label} {other}")
            continue
        try:
            rendered.append((row, segments(row.data, data, tokenizer)))
        except BadRow as exc:
            problems.append(f"{row.label} {exc}")
    encoded = encode_many([parts for _, parts in rendered], tokenizer, options)
    for (row, parts), sample in zip(rendered, encoded, strict=True):
        if sample.straddles is not None:
            if chat:  # the mask could not match the template's tokens
                problems.append(f"{row.label} a token ({sample.straddles!r}) spans the edge of a trained assistant "
                                "turn, so no mask matches the template's tokens (whitespace at the turn's edge?)")
                continue
            notes.append(f"straddle: {row.label} {sample.straddles!r}")
        if any(not p.exact for p in parts):
            notes.append("rewritten")
        if data.packing != "chunk" and len(sample.input_ids) > seq_len:
            if data.overlong == "drop":
                dropped.append(f"{row.label} has {len(sample.input_ids)} tokens")
                continue
            sample = Encoded(sample.input_ids[:seq_len], sample.labels[:seq_len])
            if all(t == IGNORE_INDEX for t in sample.labels[1:]):
                dropped.append(f"{row.label} has no response within {seq_len} tokens")
                continue
            truncated.append(row.label)
        sample.record = row.data
        sample.origin = (row.source, row.where)
        samples.append(sample)
    return samples, problems, dropped, truncated, notes


def _check_bad(total: int, problems: list[str], dropped: list[str], samples: list[Encoded],
               max_bad: float, seq_len: int, overlong: str) -> None:
    """Stop (exit code 2 in the CLI) when every row, or more than ``max_bad`` of them, is bad."""
    if problems and len(problems) == total:
        raise DataError(f"data.path: all {total} rows are bad: {report.problem_list(problems)}")
    if total and len(problems) / total > max_bad:
        raise DataError(
            f"data.path: {len(problems)} of {total} rows are bad ({len(problems) / total:.0%} > "
            f"data.max_bad_fraction {max_bad:g}): {report.problem_list(problems)}"
        )
    if not samples and overlong == "drop":
        raise DataError(
            f"data.path: no usable rows: all {len(dropped)} remaining rows are longer than train.seq_len {seq_len} "
            f"with data.overlong=drop ({report.problem_list(dropped)})"
        )
    if not samples:  # truncating kept no response: the prompts alone fill seq_len
        raise DataError(
            f"data.path: no usable rows: in all {len(dropped)} remaining rows the prompt fills train.seq_len {seq_len} "
            f"(truncated, no response is left to train on: {report.problem_list(dropped)}); raise train.seq_len"
        )


def _hold_out(samples: list[Encoded], fraction: float, cap: int, seed: int
              ) -> tuple[list[Encoded], list[Encoded] | None]:
    """Deterministic held-out split by seed; at least one row each side when there is a split."""
    n_eval = min(cap, round(len(samples) * fraction))
    if fraction > 0 and n_eval == 0 and len(samples) >= 2:
        n_eval = 1
    if n_eval == 0:
        return samples, None
    n_eval = min(n_eval, len(samples) - 1)
    held = set(random.Random(f"lorafit-split:{seed}").sample(range(len(samples)), n_eval))
    train = [s for i, s in enumerate(samples) if i not in held]
    return train, [s for i, s in enumerate(samples) if i in held] or None
