"""Tokenize rendered segments and build labels: trained tokens keep their id, the rest get -100.

The whole text is tokenized at once (so token boundaries are the ones the model will see at
inference), and each token is assigned to a segment through the fast tokenizer's character
offsets. A token that spans a prompt/response boundary is counted (``Encoded.straddles``): for
chat rows that makes the row bad (the mask could not match the template's tokens), for prompt
templates it is trained and reported. Slow tokenizers (no offsets) fall back to tokenizing
segment by segment. EOS is appended as a token id (trained with the response) for the formats
whose template does not end turns itself (``EncodeOptions.append_eos``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lorafit.data.formats import is_chat, uses_chat_template
from lorafit.data.rows import Segment

IGNORE_INDEX = -100


@dataclass(frozen=True)
class EncodeOptions:
    """How a run turns segments into tokens (``encode_options`` decides it, for every caller)."""

    train_on_prompt: bool
    add_special_tokens: bool  # False for chat templates, which write their special tokens themselves
    append_eos: bool  # True where the template does not end the response itself


def encode_options(data_config: Any, tokenizer: Any) -> EncodeOptions:
    """The one place that decides special tokens and EOS for a data config (a concrete format)."""
    return EncodeOptions(train_on_prompt=data_config.train_on_prompt,
                         add_special_tokens=not uses_chat_template(data_config, tokenizer),
                         append_eos=not is_chat(data_config))


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    record: dict[str, Any] | None = None  # the source row, kept for held-out rows (generation, ROUGE)
    origin: tuple[str, str] | None = None  # (file, "line N"): where the row came from
    straddles: str | None = None  # the first token spanning a prompt/response boundary, as text


def encode(parts: list[Segment], tokenizer: Any, options: EncodeOptions) -> Encoded:
    """Token ids and labels for one sample."""
    return encode_many([parts], tokenizer, options)[0]


def encode_many(samples: list[list[Segment]], tokenizer: Any, options: EncodeOptions, batch: int = 1024
                ) -> list[Encoded]:
    """``encode`` for many samples; fast tokenizers get them in batches (tokenized in parallel)."""
    out: list[Encoded] = []
    for start in range(0, len(samples), batch):
        group = samples[start : start + batch]
        if getattr(tokenizer, "is_fast", False):
            triples = _encode_with_offsets(group, tokenizer, options.add_special_tokens)
        else:
            triples = [(*_encode_by_segment(parts, tokenizer, options.add_special_tokens), None) for parts in group]
        out.extend(_finish(parts, ids, trained, straddle, tokenizer, options)
                   for parts, (ids, trained, straddle) in zip(group, triples, strict=True))
    return out


def _finish(parts: list[Segment], ids: list[int], trained: list[bool], straddle: str | None, tokenizer: Any,
            options: EncodeOptions) -> Encoded:
    eos = tokenizer.eos_token_id
    if options.append_eos and eos is not None and parts and parts[-1].trained:
        if ids and ids[-1] == eos:
            trained[-1] = True
        else:
            ids.append(eos)
            trained.append(True)
    labels = [t if (options.train_on_prompt or keep) else IGNORE_INDEX for t, keep in zip(ids, trained, strict=True)]
    return Encoded(ids, labels, straddles=None if options.train_on_prompt else straddle)


def _encode_with_offsets(group: list[list[Segment]], tokenizer: Any, add_special: bool
                         ) -> list[tuple[list[int], list[bool], str | None]]:
    texts = ["".join(p.text for p in parts) for parts in group]
    out = tokenizer(texts, add_special_tokens=add_special, return_offsets_mapping=True)
    results = []
    for parts, text, ids, offsets in zip(group, texts, out["input_ids"], out["offset_mapping"], strict=True):
        spans, start = [], 0
        for part in parts:
            if part.trained:
                spans.append((start, start + len(part.text)))
            start += len(part.text)
        trained = [end > begin and any(begin < s_end and end > s_begin for s_begin, s_end in spans)
                   for begin, end in offsets]
        straddle = next((text[begin:end] for begin, end in offsets
                         if any(begin < edge < end for span in spans for edge in span)), None)
        results.append((list(ids), trained, straddle))
    return results


def _encode_by_segment(parts: list[Segment], tokenizer: Any, add_special: bool) -> tuple[list[int], list[bool]]:
    ids: list[int] = []
    trained: list[bool] = []
    for i, part in enumerate(parts):
        piece = tokenizer(part.text, add_special_tokens=add_special and i == 0)["input_ids"]
        ids.extend(piece)
        trained.extend([part.trained] * len(piece))
    return ids, trained


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """What about a tokenizer changes its output: vocabulary/merges, special tokens, chat template."""
    import hashlib

    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(repr(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(repr(tokenizer.special_tokens_map).encode())
    digest.update(str(getattr(tokenizer, "chat_template", None)).encode())
    digest.update(type(tokenizer).__name__.encode())
    return digest.hexdigest()
