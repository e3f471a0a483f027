"""Preference pairs (``data.format: preference``): a prompt, a chosen and a rejected answer per row.

Three shapes people have, told apart per row:

- strings: ``prompt`` / ``chosen`` / ``rejected`` text. The prompt goes through ``data.template``
  (``{prompt}`` and any other column) when one is set, else is used as it is, as TRL does.
- messages: ``chosen`` / ``rejected`` chat message lists (the hub's binarized sets). The prompt is
  ``prompt`` when it is a message list, else the messages both lists begin with, else a string
  ``prompt`` as one user message. Rendered with the tokenizer's chat template (lorafit's plain
  ``### Role:`` fallback without one), the answer being what the template adds after the prompt.
- transcripts: ``chosen`` / ``rejected`` full conversations with no ``prompt`` (Anthropic HH): the
  prompt is what both share, up to and including the last ``Assistant:`` turn marker (else their
  common prefix), and it must be shared.

Each side becomes one token sequence, prompt masked (unless ``data.train_on_prompt``) and EOS
appended after the answer, through the same encoder as supervised rows. A pair is one training
row; collating a batch of B pairs gives 2B sequences, chosen first (TRL's order). Pairs are never
packed. Over-long sides are truncated from the end (``data.overlong``), and a pair with nothing
left to score on either side is dropped. Bad rows are counted and reported by line, as elsewhere.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from lorafit.data import cache, report
from lorafit.data.collate import collate
from lorafit.data.encode import IGNORE_INDEX, Encoded, encode_many, tokenizer_fingerprint
from lorafit.data.formats import (
    BadRow,
    Rendered,
    Segment,
    _apply_template,
    _type_name,
    has_chat_template,
)
from lorafit.data.sources import RawRow, all_local, as_list, fingerprint, load_rows
from lorafit.errors import ConfigError, DataError

if TYPE_CHECKING:
    from lorafit.data.prepare import PreparedData
    from lorafit.resolved import ResolvedRun

PROMPT, CHOSEN, REJECTED = "prompt", "chosen", "rejected"
REJECTED_KEYS = ("rejected_input_ids", "rejected_labels")  # a pair row's second sequence
REFERENCE_KEY = "reference_logps"  # [chosen, rejected], when the reference was computed ahead
_ASSISTANT_TURN = re.compile(r"(?:^|\n)\s*Assistant:")


def is_preference(columns: Iterable[str], column_map: Mapping[str, str] | None = None) -> bool:
    """Whether rows with these columns are preference pairs: they carry a chosen and a rejected answer.

    The detector that format auto-detection registers; ``column_map`` is ``data.columns``."""
    names = set(columns)
    mapping = column_map or {}
    return mapping.get(CHOSEN, CHOSEN) in names and mapping.get(REJECTED, REJECTED) in names


@dataclass
class Pair:
    """One row's prompt and answers: all strings, or all message lists."""

    prompt: str | list[dict[str, str]]
    chosen: str | list[dict[str, str]]
    rejected: str | list[dict[str, str]]

    @property
    def is_chat(self) -> bool:
        return isinstance(self.chosen, list)


def _name(data_config: Any, column: str) -> str:
    return data_config.columns.get(column, column)


def _messages(value: list[Any], column: str) -> list[dict[str, str]]:
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise BadRow(f"'{column}'[{i}] is not a {{role, content}} message with text content")
        out.append({"role": message["role"], "content": message["content"]})
    return out


def _answer(row: Mapping[str, Any], data_config: Any, column: str) -> str | list[dict[str, str]]:
    actual = _name(data_config, column)
    value = row.get(actual)
    if value is None:
        raise BadRow(f"missing '{actual}'")
    if isinstance(value, list):
        if not value:
            raise BadRow(f"empty '{actual}'")
        return _messages(value, actual)
    if not isinstance(value, str):
        raise BadRow(f"'{actual}' is {_type_name(value)}, expected text or a list of messages")
    if not value.strip():
        raise BadRow(f"empty '{actual}'")
    return value


def normalize(row: Mapping[str, Any], data_config: Any) -> Pair:
    """The row as a ``Pair`` in one of the three shapes (see the module docstring); ``BadRow`` if not."""
    chosen = _answer(row, data_config, CHOSEN)
    rejected = _answer(row, data_config, REJECTED)
    names = _name(data_config, CHOSEN), _name(data_config, REJECTED)
    if isinstance(chosen, list) != isinstance(rejected, list):
        kinds = ["a list of messages" if isinstance(v, list) else "text" for v in (chosen, rejected)]
        raise BadRow(f"'{names[0]}' is {kinds[0]} but '{names[1]}' is {kinds[1]}")
    if chosen == rejected:
        raise BadRow(f"'{names[0]}' and '{names[1]}' are identical")
    prompt_name = _name(data_config, PROMPT)
    prompt = row.get(prompt_name)
    if prompt is not None and not isinstance(prompt, (str, list)):
        raise BadRow(f"'{prompt_name}' is {_type_name(prompt)}, expected text or a list of messages")
    if isinstance(chosen, list):
        return _message_pair(prompt, chosen, rejected, prompt_name, names)
    if isinstance(prompt, list):
        raise BadRow(f"'{prompt_name}' is a list of messages but the answers are text")
    if prompt is None:
        return _transcript_pair(chosen, rejected, names)
    if not prompt.strip():
        raise BadRow(f"empty '{prompt_name}'")
    return Pair(prompt, chosen, rejected)


def _message_pair(prompt: Any, chosen: list[dict[str, str]], rejected: list[dict[str, str]], prompt_name: str,
                  names: tuple[str, str]) -> Pair:
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if isinstance(prompt, list):
        head = _messages(prompt, prompt_name)
        if shared and chosen[:shared] == head[-shared:]:  # answers that repeat the prompt's messages
            head = head[:-shared]
        prompt_messages = head + chosen[:shared]
    elif shared:
        prompt_messages = chosen[:shared]
    elif isinstance(prompt, str) and prompt.strip():
        prompt_messages = [{"role": "user", "content": prompt}]
    else:
        raise BadRow(f"'{names[0]}' and '{names[1]}' share no prompt messages and there is no '{prompt_name}'")
    answers = chosen[shared:], rejected[shared:]
    for name, answer in zip(names, answers, strict=True):
        if not answer or answer[-1]["role"] != "assistant" or not answer[-1]["content"].strip():
            raise BadRow(f"'{name}' has no assistant answer after the prompt")
    if not prompt_messages:
        raise BadRow(f"'{names[0]}' and '{names[1]}' have no prompt")
    return Pair(prompt_messages, answers[0], answers[1])


def _transcript_pair(chosen: str, rejected: str, names: tuple[str, str]) -> Pair:
    """Anthropic HH: the prompt is the shared conversation up to the last assistant turn marker."""
    turns = list(_ASSISTANT_TURN.finditer(chosen))
    if turns:
        cut = turns[-1].end()
        if not rejected.startswith(chosen[:cut]):
            raise BadRow(f"'{names[0]}' and '{names[1]}' do not share the conversation before the last "
                         "'Assistant:' turn (a transcript pair needs the same prompt)")
    else:  # TRL's rule: the common prefix, ending before a space
        cut = 0
        while cut < min(len(chosen), len(rejected)) and chosen[cut] == rejected[cut]:
            cut += 1
        if cut > 0 and chosen[cut - 1] == " ":
            cut -= 1
    prompt, first, second = chosen[:cut], chosen[cut:], rejected[cut:]
    if not prompt.strip():
        raise BadRow(f"'{names[0]}' and '{names[1]}' share no prompt (a transcript pair without 'prompt' "
                     "must begin with the same conversation)")
    for name, answer in zip(names, (first, second), strict=True):
        if not answer.strip():
            raise BadRow(f"'{name}' has no answer after the shared prompt")
    return Pair(prompt, first, second)


def _fill(template: str, prompt: str, row: Mapping[str, Any], data_config: Any) -> str:
    answers = {_name(data_config, CHOSEN), _name(data_config, REJECTED)}
    extra = {k: v for k, v in row.items() if isinstance(k, str) and k not in answers and k.isidentifier()}
    try:
        return template.format(**{**extra, PROMPT: prompt})
    except KeyError as exc:
        raise BadRow(f"missing '{exc.args[0]}' (a placeholder of data.template)") from exc
    except (IndexError, ValueError) as exc:
        raise ConfigError(f"data.template: not a valid template ({exc}); use {{prompt}} or {{column}} "
                          "placeholders") from exc


def prompt_text(pair: Pair, row: Mapping[str, Any], data_config: Any, tokenizer: Any) -> str:
    """The prompt as the model reads it, ending where the answer starts (the generation prompt)."""
    if pair.is_chat:
        return _apply_template(tokenizer, pair.prompt, generation_prompt=True)
    if data_config.template:
        return _fill(data_config.template, pair.prompt, row, data_config)
    return pair.prompt


def _side(pair: Pair, answer: Any, prompt: str, tokenizer: Any) -> list[Segment]:
    if not pair.is_chat:
        return [Segment(prompt, False), Segment(answer, True)]
    full = _apply_template(tokenizer, pair.prompt + answer, generation_prompt=False)
    if not full.startswith(prompt):  # a template that renders the prompt differently when answered
        shared = 0
        while shared < min(len(full), len(prompt)) and full[shared] == prompt[shared]:
            shared += 1
        prompt = full[:shared]
    return [s for s in (Segment(prompt, False), Segment(full[len(prompt):], True)) if s.text]


def pair_segments(row: Mapping[str, Any], data_config: Any, tokenizer: Any
                  ) -> tuple[list[Segment], list[Segment], bool]:
    """(chosen segments, rejected segments, rendered by a chat template) of one row."""
    pair = normalize(row, data_config)
    prompt = prompt_text(pair, row, data_config, tokenizer)
    chat = pair.is_chat and has_chat_template(tokenizer)
    return _side(pair, pair.chosen, prompt, tokenizer), _side(pair, pair.rejected, prompt, tokenizer), chat


def chosen_segments(row: Mapping[str, Any], data_config: Any, tokenizer: Any) -> list[Segment]:
    """The prompt and chosen answer as one supervised sample (perplexity, ``lorafit data inspect``)."""
    return pair_segments(row, data_config, tokenizer)[0]


def render_pair(row: Mapping[str, Any], data_config: Any, tokenizer: Any) -> Rendered:
    """Prompt and chosen answer as text: what generation is prompted with and ROUGE compares to."""
    pair = normalize(row, data_config)
    chosen = pair.chosen[-1]["content"] if pair.is_chat else pair.chosen
    return Rendered(prompt_text(pair, row, data_config, tokenizer), chosen)


def prompt_from_text(text: str, data_config: Any, tokenizer: Any) -> str:
    """``--prompt TEXT`` as a preference run renders its prompts (a chat run: TEXT as the user turn)."""
    row = {_name(data_config, PROMPT): text}
    pair = Pair(text, "", "")
    if has_chat_template(tokenizer) and not data_config.template:
        pair = Pair([{"role": "user", "content": text}], [], [])
    return prompt_text(pair, row, data_config, tokenizer)


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
    """Encoded pairs, bad-row messages, dropped-over-long messages and truncated rows."""
    problems: list[str] = []
    rendered: list[tuple[RawRow, list[Segment], list[Segment], bool]] = []
    for row in raw:
        if row.error is not None:
            problems.append(f"{row.label} {row.error}")
            continue
        try:
            rendered.append((row, *pair_segments(row.data, data_config, tokenizer)))
        except BadRow as exc:
            problems.append(f"{row.label} {exc}")
    encoded: dict[int, tuple[Encoded, Encoded]] = {}
    for chat in (False, True):  # a chat template writes its special tokens itself
        group = [i for i, item in enumerate(rendered) if item[3] == chat]
        sides = encode_many([rendered[i][j] for i in group for j in (1, 2)], tokenizer,
                            train_on_prompt=data_config.train_on_prompt, add_special_tokens=not chat)
        for n, i in enumerate(group):
            encoded[i] = (sides[2 * n], sides[2 * n + 1])
    samples: list[PairSample] = []
    dropped: list[str] = []
    truncated: list[str] = []
    for i, (row, *_rest) in enumerate(rendered):
        chosen, rejected = encoded[i]
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


def collate_pairs(rows: list[Mapping[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """B pairs -> 2B right-padded sequences, chosen then rejected (``input_ids``, ``labels``,
    ``attention_mask``), plus ``reference_logps`` [2B] when the rows carry precomputed ones."""
    chosen, rejected = zip(*(sides(r) for r in rows), strict=True)
    batch = collate(list(chosen) + list(rejected), pad_id)
    if rows and REFERENCE_KEY in rows[0]:
        values = [r[REFERENCE_KEY][0] for r in rows] + [r[REFERENCE_KEY][1] for r in rows]
        batch[REFERENCE_KEY] = torch.tensor(values, dtype=torch.float32)
    return batch


def pair_length(row: Mapping[str, Any]) -> int:
    """What a pair costs in a padded batch: its longer side."""
    return max(len(row["input_ids"]), len(row["rejected_input_ids"]))


# ------------------------------------------------------------------------------ preparation
def first_columns(raw: list[RawRow]) -> list[str] | None:
    """The columns of the first readable row (for the 'not preference data' message)."""
    first = next((r for r in raw if r.data is not None), None)
    return sorted(first.data) if first is not None else None


def check_is_preference(raw: list[RawRow], data_config: Any, objective: str) -> None:
    """A preference objective over rows that are not pairs is one line naming the first row."""
    first = next((r for r in raw if r.data is not None), None)
    if first is None or is_preference(first.data, data_config.columns):
        return
    names = ", ".join(sorted(first.data)) or "no columns"
    raise DataError(f"data.path: train.objective {objective} needs preference rows ('{_name(data_config, CHOSEN)}' "
                    f"and '{_name(data_config, REJECTED)}' answers, optionally a '{_name(data_config, PROMPT)}'); "
                    f"{first.label} has {names}")


def prepare_pairs(run: ResolvedRun, tokenizer: Any) -> PreparedData:
    """``prepare_data`` for preference pairs: read, render, encode, check, hold out, cache."""
    from lorafit.data.prepare import PreparedData, _check_bad, _hold_out, _pad_id, held_out_record

    config = run.config
    data, seq_len = config.data, config.train.seq_len
    pad_id = _pad_id(tokenizer)
    key = None
    if data.cache and all_local(as_list(data.path)) and all_local(as_list(data.eval_path), "data.eval_path"):
        key = cache.cache_key({
            "data": fingerprint(as_list(data.path), data.split),
            "eval": fingerprint(as_list(data.eval_path), data.split, "data.eval_path"),
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "settings": data.model_dump(mode="json", exclude={"cache"}),
            "seq_len": seq_len, "seed": config.train.seed, "pairs": True,
        })
        hit = cache.load(key)
        if hit is not None:
            train, eval_rows, meta = hit
            stats = {**meta["stats"], "cached": True}
            summary = _summary(stats, seq_len, meta["problems"], data.overlong, meta["dropped"])
            return PreparedData(train, eval_rows, "none", pad_id, summary, stats, False, meta["problems"],
                                meta.get("held_out"), pairs=True)

    raw = load_rows(as_list(data.path), data.split)
    raw_eval = load_rows(as_list(data.eval_path), data.split, "data.eval_path") if data.eval_path else []
    if not raw:
        raise DataError(f"data.path: no rows in {', '.join(as_list(data.path))}")
    check_is_preference(raw, data, config.train.objective)
    check_is_preference(raw_eval, data, config.train.objective)
    samples, problems, dropped, truncated = encode_pairs(raw, data, seq_len, tokenizer)
    eval_samples, eval_problems, eval_dropped, eval_truncated = encode_pairs(raw_eval, data, seq_len, tokenizer)
    problems += eval_problems
    dropped += eval_dropped
    _check_bad(len(raw) + len(raw_eval), problems, dropped, samples, data.max_bad_fraction, seq_len)
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
        "cached": False,
    }
    summary = _summary(stats, seq_len, problems, data.overlong, dropped)
    held_out = [held_out_record(s) for s in eval_list] if eval_list else None
    if key is not None:
        cache.save(key, train_rows, eval_rows, {"stats": stats, "problems": problems, "dropped": dropped,
                                                "held_out": held_out})
    return PreparedData(train_rows, eval_rows, "none", pad_id, summary, stats, False, problems, held_out, pairs=True)


def _pair_efficiency(rows: list[dict[str, list[int]]], batch_size: int, seed: int) -> float:
    """Real tokens / padded slots over the first epoch's batches (both sides pad to the batch's longest)."""
    from lorafit.data import batching

    lengths = [pair_length(r) for r in rows]
    batches = batching.epoch_batches(lengths, 0, batch_size, seed, group_by_length=True)
    real = sum(len(rows[i]["input_ids"]) + len(rows[i]["rejected_input_ids"]) for b in batches for i in b)
    slots = sum(2 * len(b) * max(lengths[i] for i in b) for b in batches)
    return real / slots if slots else 0.0


def _summary(stats: dict[str, Any], seq_len: int, problems: list[str], overlong: str, dropped: list[str]) -> str:
    line = report.summary_line(stats, "none", seq_len, None, problems, overlong, dropped)
    return line.replace(" eval samples, ", " eval pairs, tokens of both sides: ", 1).replace(
        "packing none: ", "pairs are not packed: ", 1)
