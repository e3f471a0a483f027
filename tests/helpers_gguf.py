"""llama.cpp (through llama-cpp-python) beside transformers, for the GGUF export tests."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

# The fixed string set whose token ids llama.cpp and transformers must agree on: whitespace runs,
# tabs and newlines, accents, CJK, emoji (with a zero-width joiner), digits, contractions, and the
# special-token text the templates use.
STRINGS = [
    "Hello world",
    "  two leading spaces, two trailing  ",
    "tabs\tand\nnew\n\nlines\n",
    "unicode: héllo wörld — naïve café ✓ 你好 🚀🦙 😶\u200d🌫️",
    "digits 3 33 333 3333 3.14 1,000,000",
    "I've 'RE you sure? He'll, they'd",
    "Anna: Are we still on?\nBen: Yes!\n---\nSummary:\n",
]


def need_llama_cpp() -> Any:
    """llama-cpp-python, or a skip; in CI (which installs lorafit[gguf]) its absence fails."""
    try:
        import llama_cpp
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("llama-cpp-python is missing: CI builds lorafit[gguf] before this step (.ci/run: install.sh --gguf)")
        pytest.skip("llama-cpp-python not installed (pip install 'lorafit[gguf]')")
    from lorafit.llamacpp import tools

    try:
        tools.converter_dir(fetch=False)
    except tools.ToolError as exc:
        if os.environ.get("CI"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    return llama_cpp


def load_llama(path: Path, *, lora: Path | None = None, logits_all: bool = False, n_ctx: int = 512) -> Any:
    from llama_cpp import Llama

    return Llama(model_path=str(path), lora_path=str(lora) if lora else None, n_ctx=n_ctx, n_threads=2,
                 n_batch=n_ctx, logits_all=logits_all, verbose=False, seed=0)


def llama_ids(llm: Any, text: str) -> list[int]:
    """llama.cpp's tokens for ``text`` as a prompt: BOS by the GGUF's flag, special tokens parsed."""
    return llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)


def llama_greedy(llm: Any, prompt_ids: list[int], max_new: int) -> list[int]:
    """Greedy continuation in llama.cpp; stops after an end-of-generation token, as servers do."""
    llm.reset()
    out: list[int] = []
    for token in llm.generate(prompt_ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0,
                              reset=True):
        out.append(int(token))
        if is_eog(llm, token) or len(out) == max_new:
            break
    return out


def is_eog(llm: Any, token: int) -> bool:
    """llama.cpp's own end-of-generation test (what its completion loop stops on)."""
    import llama_cpp

    return bool(llama_cpp.llama_vocab_is_eog(llm._model.vocab, token))


@torch.no_grad()
def hf_greedy(model: Any, tokenizer: Any, prompt_ids: list[int], max_new: int) -> list[int]:
    ids = torch.tensor([prompt_ids])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                         do_sample=False, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                         temperature=None, top_p=None, top_k=None)
    return out[0, len(prompt_ids):].tolist()


@torch.no_grad()
def top2_gaps(model: Any, prompt_ids: list[int], continuation: list[int]) -> list[float]:
    """transformers' gap between its two best logits at each step of ``continuation``."""
    ids = prompt_ids + continuation
    logits = model(input_ids=torch.tensor([ids])).logits[0, len(prompt_ids) - 1 : len(ids) - 1]
    top2 = logits.topk(2, dim=-1).values
    return (top2[:, 0] - top2[:, 1]).tolist()


def first_difference(ours: list[int], theirs: list[int]) -> int | None:
    """Index of the first differing token (or of the shorter one's end); None when equal."""
    for i, (a, b) in enumerate(zip(ours, theirs, strict=False)):
        if a != b:
            return i
    return None if len(ours) == len(theirs) else min(len(ours), len(theirs))


@torch.no_grad()
def agreement(llm: Any, model: Any, sequences: list[list[int]], prompt_lengths: list[int]) -> float:
    """Share of continuation positions where llama.cpp's next-token argmax equals transformers',
    both fed the same tokens (teacher forcing: one early difference does not decide the rest)."""
    import numpy as np

    same = total = 0
    for ids, start in zip(sequences, prompt_lengths, strict=True):
        llm.reset()
        llm.eval(ids)
        ours = np.asarray(llm.scores[: len(ids)]).argmax(-1)
        theirs = model(input_ids=torch.tensor([ids])).logits[0].argmax(-1).numpy()
        span = slice(start - 1, len(ids) - 1)
        same += int((ours[span] == theirs[span]).sum())
        total += len(ids) - start
    return same / max(total, 1)
