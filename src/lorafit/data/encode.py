"""Tokenize rendered segments and build labels: trained tokens keep their id, the rest get -100.

The whole text is tokenized at once (so token boundaries are the ones the model will see at
inference), and each token is assigned to a segment through the fast tokenizer's character
offsets: a token is trained when it overlaps a trained segment. Slow tokenizers (no offsets) fall
back to tokenizing segment by segment. EOS is appended as a token id (trained with the response).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lorafit.data.formats import Segment

IGNORE_INDEX = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    record: dict[str, Any] | None = None  # the source row, kept for held-out rows (generation, ROUGE)
    origin: tuple[str, str] | None = None  # (file, "line N"): where the row came from


def encode(parts: list[Segment], tokenizer: Any, *, train_on_prompt: bool, add_special_tokens: bool) -> Encoded:
    """Token ids and labels for one sample; EOS appended (trained) when the last segment is trained."""
    return encode_many([parts], tokenizer, train_on_prompt=train_on_prompt, add_special_tokens=add_special_tokens)[0]


def encode_many(samples: list[list[Segment]], tokenizer: Any, *, train_on_prompt: bool, add_special_tokens: bool,
                batch: int = 1024) -> list[Encoded]:
    """``encode`` for many samples; fast tokenizers get them in batches (tokenized in parallel)."""
    out: list[Encoded] = []
    for start in range(0, len(samples), batch):
        group = samples[start : start + batch]
        if getattr(tokenizer, "is_fast", False):
            pairs = _encode_with_offsets(group, tokenizer, add_special_tokens)
        else:
            pairs = [_encode_by_segment(parts, tokenizer, add_special_tokens) for parts in group]
        out.extend(_finish(parts, ids, trained, tokenizer, train_on_prompt)
                   for parts, (ids, trained) in zip(group, pairs, strict=True))
    return out


def _finish(parts: list[Segment], ids: list[int], trained: list[bool], tokenizer: Any,
            train_on_prompt: bool) -> Encoded:
    eos = tokenizer.eos_token_id
    if eos is not None and parts and parts[-1].trained:
        if ids and ids[-1] == eos:
            trained[-1] = True
        else:
            ids.append(eos)
            trained.append(True)
    labels = [t if (train_on_prompt or keep) else IGNORE_INDEX for t, keep in zip(ids, trained, strict=True)]
    return Encoded(ids, labels)


def _encode_with_offsets(group: list[list[Segment]], tokenizer: Any, add_special: bool
                         ) -> list[tuple[list[int], list[bool]]]:
    texts = ["".join(p.text for p in parts) for parts in group]
    out = tokenizer(texts, add_special_tokens=add_special, return_offsets_mapping=True)
    results = []
    for parts, ids, offsets in zip(group, out["input_ids"], out["offset_mapping"], strict=True):
        spans, start = [], 0
        for part in parts:
            if part.trained:
                spans.append((start, start + len(part.text)))
            start += len(part.text)
        trained = [end > begin and any(begin < s_end and end > s_begin for s_begin, s_end in spans)
                   for begin, end in offsets]
        results.append((list(ids), trained))
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
