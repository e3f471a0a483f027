"""``prepare_data``: from ``config.data`` to training rows, batches and a one-line report.

Stages: read rows (sources) -> render and tokenize each (formats, encode; bad rows counted) ->
stop with a one-line ``DataError`` if all or too many rows are bad (before any model loads) ->
hold out eval rows by seed -> build rows per ``data.packing`` -> statistics. The result is cached
by data, tokenizer and settings.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lorafit.config import LorafitConfig
from lorafit.data import batching, cache, packing, report
from lorafit.data.encode import IGNORE_INDEX, Encoded, encode_many, tokenizer_fingerprint
from lorafit.data.formats import BadRow, segments
from lorafit.data.sources import RawRow, all_local, as_list, fingerprint, load_rows
from lorafit.errors import DataError


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
    eval_records: list[dict[str, Any]] | None = None  # held-out source rows, for render() + generation

    def collate(self, rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        """Pad to the longest row: ``input_ids``, ``labels`` (-100 on padding) and
        ``attention_mask`` (none/chunk) or ``position_ids`` (packed), all LongTensor [B, T]."""
        if not rows:
            raise ValueError("collate needs at least one row")
        packed = self.packing == "packed"
        if packed and self.flatten:
            return {k: torch.tensor([[t for r in rows for t in r[k]]], dtype=torch.long)
                    for k in ("input_ids", "labels", "position_ids")}
        width = max(len(r["input_ids"]) for r in rows)
        ids, labels, extra = [], [], []
        for row in rows:
            pad = width - len(row["input_ids"])
            ids.append(row["input_ids"] + [self.pad_token_id] * pad)
            labels.append(row["labels"] + [IGNORE_INDEX] * pad)
            if packed:  # padding is its own segment: nothing real attends to it
                extra.append(row["position_ids"] + list(range(pad)))
            else:
                extra.append([1] * len(row["input_ids"]) + [0] * pad)
        batch = {"input_ids": torch.tensor(ids, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long)}
        batch["position_ids" if packed else "attention_mask"] = torch.tensor(extra, dtype=torch.long)
        return batch

    def adapt_to_model(self, model: Any) -> str | None:
        """Check packed rows against the loaded model; fall back to padding if they would leak.

        Call once after loading the model (a tiny forward pass). Returns a note when something
        changed: packed rows split back into one sample per row (``none``), or flattening turned
        on for a flash-attention backend. None when nothing changed.
        """
        if self.packing != "packed":
            return None
        backend = str(getattr(getattr(model, "config", None), "_attn_implementation", "") or "")
        if backend.startswith("flash_attention") and not self.flatten:
            self.flatten = True
            return f"packed rows are flattened into one row per batch for {backend}"
        if self.flatten:
            return None
        problem = packing.check_packed_attention(model)
        if problem is None:
            return None
        self.train = unpack_rows(self.train)
        self.eval = unpack_rows(self.eval) if self.eval is not None else None
        self.packing = "none"
        note = f"packing packed not supported by this model ({problem}): using none"
        self.summary += f"; {note}"
        return note

    def epoch_batches(self, epoch: int, global_batch_size: int, seed: int) -> list[list[int]]:
        """Row indices per batch for ``epoch``: shuffled by (seed, epoch); length-grouped for
        ``none``; every batch full (topped up from the epoch's start, see batching.py)."""
        lengths = [len(r["input_ids"]) for r in self.train]
        return batching.epoch_batches(lengths, epoch, global_batch_size, seed,
                                      group_by_length=self.packing == "none")


def prepare_data(config: LorafitConfig, tokenizer: Any) -> PreparedData:
    """Read, validate, tokenize, split and pack ``config.data``; raise ``DataError`` on bad data."""
    data = config.data
    seq_len = config.train.seq_len
    mode, note = effective_packing(config)
    pad_id = _pad_id(tokenizer)
    flatten = mode == "packed" and (config.model.attn_implementation or "").startswith("flash_attention")
    key = None
    if data.cache and all_local(as_list(data.path)) and all_local(as_list(data.eval_path), "data.eval_path"):
        key = cache.cache_key({
            "data": fingerprint(as_list(data.path), data.split),
            "eval": fingerprint(as_list(data.eval_path), data.split, "data.eval_path"),
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "settings": data.model_dump(mode="json", exclude={"cache", "num_proc"}),
            "seq_len": seq_len, "seed": config.train.seed, "packing": mode,
            "batch_size": config.train.batch_size,
        })
        hit = cache.load(key)
        if hit is not None:
            train, eval_rows, meta = hit
            stats = {**meta["stats"], "cached": True}
            summary = report.summary_line(stats, mode, seq_len, note, meta["problems"], data.overlong, meta["dropped"])
            return PreparedData(train, eval_rows, mode, pad_id, summary, stats, flatten, meta["problems"],
                                meta.get("eval_records"))

    raw = load_rows(as_list(data.path), data.split)
    raw_eval = load_rows(as_list(data.eval_path), data.split, "data.eval_path") if data.eval_path else []
    if not raw:
        raise DataError(f"data.path: no rows in {', '.join(as_list(data.path))}")
    samples, problems, dropped, truncated = _encode_rows(raw, config, tokenizer)
    eval_samples, eval_problems, eval_dropped, eval_truncated = _encode_rows(raw_eval, config, tokenizer)
    problems += eval_problems
    dropped += eval_dropped
    _check_bad(len(raw) + len(raw_eval), problems, dropped, samples, data.max_bad_fraction, seq_len)

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
        "cached": False,
    }
    summary = report.summary_line(stats, mode, seq_len, note, problems, data.overlong, dropped)
    eval_records = [s.record for s in eval_list] if eval_list else None
    if key is not None:
        cache.save(key, train_rows, eval_rows, {"stats": stats, "problems": problems, "dropped": dropped,
                                                "eval_records": eval_records})
    return PreparedData(train_rows, eval_rows, mode, pad_id, summary, stats, flatten, problems, eval_records)


def build_rows(samples: list[Encoded], mode: str, seq_len: int) -> list[dict[str, list[int]]]:
    if mode == "packed":
        return packing.pack_rows(samples, seq_len)
    if mode == "chunk":
        return packing.chunk_rows(samples, seq_len)
    return packing.single_rows(samples)


def unpack_rows(rows: list[dict[str, list[int]]]) -> list[dict[str, list[int]]]:
    """Packed rows back to one sample per row (the masked first label changes no loss)."""
    return [{"input_ids": row["input_ids"][s:e], "labels": row["labels"][s:e]}
            for row in rows for s, e in packing.split_packed(row)]


def _pad_id(tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def _encode_rows(raw: list[RawRow], config: LorafitConfig, tokenizer: Any
                 ) -> tuple[list[Encoded], list[str], list[str], list[str]]:
    """Encoded samples, bad-row messages, dropped-over-long messages and truncated rows."""
    data, seq_len = config.data, config.train.seq_len
    chat_template = data.format == "chat" and bool(getattr(tokenizer, "chat_template", None))
    samples: list[Encoded] = []
    problems: list[str] = []
    dropped: list[str] = []
    truncated: list[str] = []
    rendered: list[tuple[RawRow, list]] = []
    for row in raw:
        if row.error is not None:
            problems.append(f"{row.label} {row.error}")
            continue
        try:
            rendered.append((row, segments(row.data, data, tokenizer)))
        except BadRow as exc:
            problems.append(f"{row.label} {exc}")
    encoded = encode_many([parts for _, parts in rendered], tokenizer, train_on_prompt=data.train_on_prompt,
                          add_special_tokens=not chat_template)
    for (row, _), sample in zip(rendered, encoded, strict=True):
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
        samples.append(sample)
    return samples, problems, dropped, truncated


def _check_bad(total: int, problems: list[str], dropped: list[str], samples: list[Encoded],
               max_bad: float, seq_len: int) -> None:
    """Stop (exit code 2 in the CLI) when every row, or more than ``max_bad`` of them, is bad."""
    if problems and len(problems) == total:
        raise DataError(f"data.path: all {total} rows are bad: {report.problem_list(problems)}")
    if total and len(problems) / total > max_bad:
        raise DataError(
            f"data.path: {len(problems)} of {total} rows are bad ({len(problems) / total:.0%} > "
            f"data.max_bad_fraction {max_bad:g}): {report.problem_list(problems)}"
        )
    if not samples:
        raise DataError(
            f"data.path: no usable rows: all {len(dropped)} remaining rows are longer than train.seq_len {seq_len} "
            f"with data.overlong=drop ({report.problem_list(dropped)})"
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


def effective_packing(config: LorafitConfig) -> tuple[str, str | None]:
    """``data.packing``, or ``none`` plus a note when the model's attention cannot keep packed
    samples apart (see packing.py for which models can)."""
    wanted = config.data.packing
    if wanted != "packed":
        return wanted, None
    problem = packing.packed_attention_support(_model_type(config), config.model.attn_implementation)
    if problem is None:
        return wanted, None
    return "none", f"packing packed not supported ({problem}): using none (padding, length-grouped)"


def _model_type(config: LorafitConfig) -> str | None:
    """The model's ``model_type`` from its config file only (no weights); None if unreadable."""
    try:
        from transformers import AutoConfig

        from lorafit.modeling import model_path

        kwargs: dict[str, Any] = {"trust_remote_code": config.model.trust_remote_code}
        if config.model.revision:
            kwargs["revision"] = config.model.revision
        if config.model.gguf_file:
            kwargs["gguf_file"] = config.model.gguf_file
        return AutoConfig.from_pretrained(model_path(config), **kwargs).model_type
    except Exception:  # noqa: BLE001 - offline hub id, odd config: packing stays as asked
        return None


def sample_spans(row: dict[str, list[int]]) -> Sequence[tuple[int, int]]:
    """Where each sample sits in a row (one span unless packed)."""
    return packing.split_packed(row)
