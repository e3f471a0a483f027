"""Preference pairs (``train.objective`` dpo / orpo): both sides tokenized, collated and prepared.

How a row becomes a pair, in each shape, is ``lorafit.data.pairs`` (formats ``preference`` and
``preference_chat`` of the registry). Each side becomes one token sequence through the same encoder
as supervised rows (prompt masked unless ``data.train_on_prompt``; EOS appended for the text
shapes, the chat template ending the turn for message lists). A pair is one training row;
collating a batch of B pairs gives 2B sequences, chosen first (TRL's order). Pairs are never
packed. Over-long sides are truncated from the end (``data.overlong``), and a pair with nothing left
to score on either side is dropped. Bad rows are counted and reported by line, as elsewhere; rows of
another shape are bad rows naming it. The run's format and template are recorded as for any run.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from lorafit.data import batching, cache, report
from lorafit.data.collate import collate
from lorafit.data.detect import Detection, choose_format, mismatch
from lorafit.data.encode import (
    IGNORE_INDEX,
    Encoded,
    EncodeOptions,
    encode_many,
    encode_options,
    tokenizer_fingerprint,
)
from lorafit.data.formats import FORMATS, PREFERENCE_FORMATS, get_format
from lorafit.data.pairs import CHOSEN, PROMPT, REJECTED, TEXT_FORMAT, is_preference, pair_segments
from lorafit.data.rows import BadRow, Segment
from lorafit.data.sources import RawRow, all_local, as_list, fingerprint, load_rows
from lorafit.data.template import template_record
from lorafit.errors import DataError

if TYPE_CHECKING:
    from lorafit.data.prepare import PreparedData
    from lorafit.resolved import ResolvedRun

REJECTED_KEYS = ("rejected_input_ids", "rejected_labels")  # a pair row's second sequence
REFERENCE_KEY = "reference_logps"  # [chosen, rejected], when the reference was computed ahead


# ------------------------------------------------------------------------------ encoding
@dataclass
class PairSample:
    """One encoded pair, and where its row came from (kept for held-out rows)."""

    chosen: Encoded
    rejected: Encoded
    record: dict[str, Any] | None = None
    origin: tuple[str, str] | None = None

    @property
    def longest(self) -> int:
        return max(len(self.chosen.input_ids), len(self.rejected.input_ids))


def _fits(sample: Encoded, seq_len: int) -> Encoded | None:
    """``sample`` cut to ``seq_len`` tokens; None when no scored token is left."""
    if len(sample.input_ids) <= seq_len:
        return sample
    cut = Encoded(sample.input_ids[:seq_len], sample.labels[:seq_len])
    return cut if any(t != IGNORE_INDEX for t in cut.labels[1:]) else None


def encode_pairs(raw: list[RawRow], data_config: Any, seq_len: int, tokenizer: Any
                 ) -> tuple[list[PairSample], list[str], list[str], list[str]]:
    """Encoded pairs, bad-row messages, dropped-over-long messages and truncated rows
    (``data_config`` names the run's preference format)."""
    options: EncodeOptions = encode_options(data_config, tokenizer)
    chat = get_format(data_config.format).chat
    problems: list[str] = []
    rendered: list[tuple[RawRow, list[Segment], list[Segment]]] = []
    for row in raw:
        if row.error is not None:
            problems.append(f"{row.label} {row.error}")
            continue
        other = mismatch(row.data, data_config.format, data_config)
        if other is not None:
            problems.append(f"{row.label} {other}")
            continue
        try:
            rendered.append((row, *pair_segments(row.data, data_config, tokenizer)))
        except BadRow as exc:
            problems.append(f"{row.label} {exc}")
    encoded = encode_many([parts for item in rendered for parts in item[1:]], tokenizer, options)
    samples: list[PairSample] = []
    dropped: list[str] = []
    truncated: list[str] = []
    for i, (row, *_sides) in enumerate(rendered):
        chosen, rejected = encoded[2 * i], encoded[2 * i + 1]
        straddle = chosen.straddles or rejected.straddles
        if chat and straddle is not None:  # the mask could not match the template's tokens
            problems.append(f"{row.label} a token ({straddle!r}) spans the edge of a trained assistant turn, so no "
                            "mask matches the template's tokens (whitespace at the turn's edge?)")
            continue
        longest = max(len(chosen.input_ids), len(rejected.input_ids))
        if longest > seq_len:
            if data_config.overlong == "drop":
                dropped.append(f"{row.label} has {longest} tokens")
                continue
            chosen, rejected = _fits(chosen, seq_len), _fits(rejected, seq_len)
            if chosen is None or rejected is None:
                dropped.append(f"{row.label} has no answer within {seq_len} tokens")
                continue
            truncated.append(row.label)
        samples.append(PairSample(chosen, rejected, row.data, (row.source, row.where)))
    return samples, problems, dropped, truncated


def encode_rows(rows: list[dict[str, Any]], data_config: Any, seq_len: int, tokenizer: Any
                ) -> list[dict[str, list[int]]]:
    """Pair rows (as training builds them) for data rows that render; bad rows are left out."""
    raw = [RawRow("", f"row {i}", row) for i, row in enumerate(rows, start=1)]
    return [pair_row(s) for s in encode_pairs(raw, data_config, seq_len, tokenizer)[0]]


def pair_row(sample: PairSample) -> dict[str, list[int]]:
    """A training row: the chosen sequence as ``input_ids`` / ``labels``, the rejected beside it."""
    return {"input_ids": sample.chosen.input_ids, "labels": sample.chosen.labels,
            "rejected_input_ids": sample.rejected.input_ids, "rejected_labels": sample.rejected.labels}


def sides(row: Mapping[str, Any]) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """A pair row's chosen and rejected sequences as plain rows."""
    return ({"input_ids": row["input_ids"], "labels": row["labels"]},
            {"input_ids": row["rejected_input_ids"], "labels": row["rejected_labels"]})


def collate_pairs(rows: list[Mapping[str, Any]], pad_id: int, *, multiple: int = 1,
                  limit: int = 0) -> dict[str, torch.Tensor]:
    """B pairs -> 2B right-padded sequences, chosen then rejected (``input_ids``, ``labels``,
    ``attention_mask``; padded as ``collate`` pads), plus ``reference_logps`` [2B] when the rows
    carry precomputed ones."""
    chosen, rejected = zip(*(sides(r) for r in rows), strict=True)
    batch = collate(list(chosen) + list(rejected), pad_id, multiple=multiple, limit=limit)
    if rows and REFERENCE_KEY in rows[0]:
        values = [r[REFERENCE_KEY][0] for r in rows] + [r[REFERENCE_KEY][1] for r in rows]
        batch[REFERENCE_KEY] = torch.tensor(values, dtype=torch.float32)
    return batch


def pair_length(row: Mapping[str, Any]) -> int:
    """What a pair costs in a padded batch: its longer side."""
    return max(len(row["input_ids"]), len(row["rejected_input_ids"]))


# ------------------------------------------------------------------------------ preparation
def choose_pair_format(raw: list[RawRow], data_config: Any, objective: str) -> Detection:
    """The run's preference format: ``preference_chat`` when named; under ``preference`` or ``auto``
    whichever of the two (text or message-list answers) more rows are. Rows none of which is a pair
    are one line naming the first row."""
    rows = [r for r in raw if r.data is not None]
    if rows and not any(is_preference(r.data, data_config.columns) for r in rows):
        names = ", ".join(sorted(str(k) for k in rows[0].data)) or "no columns"
        name = data_config.columns.get
        raise DataError(f"data.path: train.objective {objective} needs preference rows ('{name(CHOSEN, CHOSEN)}' "
                        f"and '{name(REJECTED, REJECTED)}' answers, optionally a '{name(PROMPT, PROMPT)}'); "
                        f"{rows[0].label} has {names}")
    chosen = data_config.format
    if chosen not in PREFERENCE_FORMATS or chosen == TEXT_FORMAT:
        fits = {fmt: sum(FORMATS[fmt].matches(r.data, data_config) for r in rows) for fmt in PREFERENCE_FORMATS}
        chosen = max(PREFERENCE_FORMATS, key=lambda fmt: fits[fmt])  # a tie (none fit: bad rows) is text
    detection = choose_format([r.data for r in raw], data_config.model_copy(update={"format": chosen}))
    detection.detected = data_config.format == "auto"
    return detection


def choose_run_format(raw: list[RawRow], data_config: Any, objective: str, source: str = "data.path") -> Detection:
    """The format a run reads its rows as, for its objective: a preference format for dpo / orpo
    (``choose_pair_format``); for sft ``data.format`` or auto's pick, which must not be pairs."""
    if objective != "sft":
        return choose_pair_format(raw, data_config, objective)
    detection = choose_format([r.data for r in raw], data_config, source)
    if detection.format in PREFERENCE_FORMATS:  # a named one is refused by the config already
        raise DataError(f"train.objective: preference pairs (data.format auto found {detection.format} in "
                        f"{source}) train with train.objective dpo or orpo, not sft")
    return detection


def prepare_pairs(run: ResolvedRun, tokenizer: Any) -> PreparedData:
    """``prepare_data`` for preference pairs: read, choose the shape, render, encode, check, hold
    out, record the template, cache."""
    from lorafit.data.prepare import (
        PreparedData,
        _check_bad,
        _check_options_apply,
        _hold_out,
        _pad_id,
        held_out_record,
    )

    config = run.config
    data, seq_len = config.data, config.train.seq_len
    pad_id = _pad_id(tokenizer)
    key = None
    if data.cache and all_local(as_list(data.path)) and all_local(as_list(data.eval_path), "data.eval_path"):
        key = cache.cache_key({
            "data": fingerprint(as_list(data.path), data.split, subset=data.subset),
            "eval": fingerprint(as_list(data.eval_path), data.split, "data.eval_path", data.subset),
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "settings": data.model_dump(mode="json", exclude={"cache", "pad_to_multiple_of"}),
            "seq_len": seq_len, "seed": config.train.seed, "pairs": True,
        })
        hit = cache.load(key)
        if hit is not None:
            train, eval_rows, meta = hit
            stats = {**meta["stats"], "cached": True}
            summary = _summary(stats, seq_len, meta["problems"], data.overlong, meta["dropped"])
            return PreparedData(train, eval_rows, "none", pad_id, summary, stats, False, meta["problems"],
                                meta.get("held_out"), meta["detection"], meta["template"], pairs=True,
                                pad_to_multiple_of=run.pad_to_multiple_of, seq_len=seq_len)

    raw = load_rows(as_list(data.path), data.split, subset=data.subset)
    raw_eval = load_rows(as_list(data.eval_path), data.split, "data.eval_path", data.subset) if data.eval_path else []
    if not raw:
        raise DataError(f"data.path: no rows in {', '.join(as_list(data.path))}")
    detection = choose_pair_format(raw + raw_eval, data, config.train.objective)
    rendering = data.model_copy(update={"format": detection.format})
    _check_options_apply(rendering)
    samples, problems, dropped, truncated = encode_pairs(raw, rendering, seq_len, tokenizer)
    eval_samples, eval_problems, eval_dropped, eval_truncated = encode_pairs(raw_eval, rendering, seq_len, tokenizer)
    problems += eval_problems
    dropped += eval_dropped
    _check_bad(len(raw) + len(raw_eval), problems, dropped, samples, data.max_bad_fraction, seq_len, data.overlong)
    if data.eval_path:
        eval_list: list[PairSample] | None = eval_samples[: data.max_eval_rows] or None
    else:
        samples, eval_list = _hold_out(samples, data.eval_fraction, data.max_eval_rows, config.train.seed)
    train_rows = [pair_row(s) for s in samples]
    eval_rows = [pair_row(s) for s in eval_list] if eval_list else None
    every = samples + (eval_list or [])
    lengths = [len(e.input_ids) for s in every for e in (s.chosen, s.rejected)]
    stats = {
        "rows": len(raw) + len(raw_eval),
        "skipped": len(problems),
        "train_samples": len(samples),
        "eval_samples": len(eval_list or []),
        "train_rows": len(train_rows),
        "eval_rows": len(eval_rows or []),
        "total_tokens": sum(len(e.input_ids) for s in samples for e in (s.chosen, s.rejected)),
        "trained_tokens": sum(sum(t != IGNORE_INDEX for t in e.labels) for s in samples for e in (s.chosen, s.rejected)),
        "p50_tokens": report.percentile(lengths, 50),
        "p95_tokens": report.percentile(lengths, 95),
        "max_tokens": max(lengths),
        "packing_efficiency": round(_pair_efficiency(train_rows, config.train.batch_size, config.train.seed), 4),
        "truncated": len(truncated) + len(eval_truncated),
        "truncated_rows": (truncated + eval_truncated)[: report.SHOWN_PROBLEMS],
        "dropped_overlong": len(dropped),
        "format": detection.format,
        "format_counts": detection.counts,
        "cached": False,
    }
    summary = _summary(stats, seq_len, problems, data.overlong, dropped)
    held_out = [held_out_record(s) for s in eval_list] if eval_list else None
    template = template_record(rendering, tokenizer, detection)
    if key is not None:
        cache.save(key, train_rows, eval_rows, {"stats": stats, "problems": problems, "dropped": dropped,
                                                "held_out": held_out, "detection": detection.to_json(),
                                                "template": template})
    return PreparedData(train_rows, eval_rows, "none", pad_id, summary, stats, False, problems, held_out,
                        detection.to_json(), template, pairs=True, pad_to_multiple_of=run.pad_to_multiple_of,
                        seq_len=seq_len)


def _pair_efficiency(rows: list[dict[str, list[int]]], batch_size: int, seed: int) -> float:
    """Real tokens / padded slots over the first epoch's batches (both sides pad to the batch's longest)."""
    lengths = [pair_length(r) for r in rows]
    batches = batching.epoch_batches(lengths, 0, batch_size, seed, group_by_length=True)
    real = sum(len(rows[i]["input_ids"]) + len(rows[i]["rejected_input_ids"]) for b in batches for i in b)
    slots = sum(2 * len(b) * max(lengths[i] for i in b) for b in batches)
    return real / slots if slots else 0.0


def _summary(stats: dict[str, Any], seq_len: int, problems: list[str], overlong: str, dropped: list[str]) -> str:
    line = report.summary_line(stats, "none", seq_len, None, problems, overlong, dropped)
    return line.replace(" eval samples, ", " eval pairs, tokens of both sides: ", 1).replace(
        "packing none: ", "pairs are not packed: ", 1)
