"""Text generation with the training template: prompts built exactly as in training, batched.

Why it matters: a model fine-tuned on ``Summarize the chat dialogue:\\n{dialogue}\\n---\\nSummary:\\n``
only behaves when it sees that same prompt, so ``--prompt TEXT`` is put through the run's format
(``lorafit.data.formats.render``) with TEXT as the dialogue / instruction / user message. Rows are
left-padded and generated in batches (sorted by length, so little compute goes to padding);
a single prompt can stream its tokens as they are produced (transformers ``TextStreamer``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lorafit.data.collate import collate
from lorafit.data.formats import COLUMNS, BadRow, render
from lorafit.errors import DataError

_PLACEHOLDER = "."  # stands in for the response when rendering a prompt (render wants a full row)


@dataclass
class GenerationSettings:
    """Decoding options; greedy unless ``do_sample``."""

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    repetition_penalty: float = 1.0
    seed: int | None = None

    def generate_kwargs(self, tokenizer: Any) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": self.do_sample,
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "repetition_penalty": self.repetition_penalty,
        }
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        else:  # silence "temperature is set but do_sample=False" from a model's generation_config
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs


def prompt_from_text(text: str, data_config: Any, tokenizer: Any) -> str:
    """``--prompt TEXT`` in the training template: TEXT is the dialogue, instruction or user message."""
    fmt = data_config.format
    if fmt == "text":
        return text
    col = data_config.columns
    if fmt == "summarization":
        row: dict[str, Any] = {col.get("dialogue", "dialogue"): text, col.get("summary", "summary"): _PLACEHOLDER}
    elif fmt == "instruction":
        row = {col.get("instruction", "instruction"): text, col.get("output", "output"): _PLACEHOLDER}
    else:
        row = {col.get("messages", "messages"): [{"role": "user", "content": text},
                                                 {"role": "assistant", "content": _PLACEHOLDER}]}
    try:
        return render(row, data_config, tokenizer).prompt
    except BadRow as exc:
        raise DataError(f"--prompt: {exc}") from exc


def prompt_from_row(row: dict[str, Any], data_config: Any, tokenizer: Any) -> str:
    """A data row's prompt (its response may be absent); a row with only ``prompt`` is used verbatim."""
    fmt = data_config.format
    col = data_config.columns
    if isinstance(row.get("prompt"), str) and not any(col.get(c, c) in row for c in COLUMNS[fmt][0]):
        return row["prompt"]
    if fmt == "text":
        return str(row.get(col.get("text", "text"), ""))
    row = dict(row)
    if fmt == "chat":
        key = col.get("messages", "messages")
        messages = list(row.get(key) or [])
        if not messages or not isinstance(messages[-1], dict) or messages[-1].get("role") != "assistant":
            messages.append({"role": "assistant", "content": _PLACEHOLDER})
        row[key] = messages
    else:
        response = col.get("summary" if fmt == "summarization" else "output",
                           "summary" if fmt == "summarization" else "output")
        if not row.get(response):
            row[response] = _PLACEHOLDER
    return render(row, data_config, tokenizer).prompt


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """The batches ``generate`` forms: indices sorted by prompt length (stable), ``batch_size`` at a
    time. A client of an endpoint forms the same batches from the lengths, so served batches pad
    exactly as local ones do."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


@torch.no_grad()
def generate(model: Any, tokenizer: Any, prompts: Sequence[str], settings: GenerationSettings | None = None, *,
             batch_size: int = 8, add_special_tokens: bool = True, streamer: Any = None) -> list[str]:
    """Continue each prompt; returns only the new text (special tokens dropped, whitespace trimmed).

    Rows are left-padded so every row's last prompt token sits at the same position; batches are
    formed from prompts sorted by length and the results put back in input order.
    """
    settings = settings or GenerationSettings()
    if settings.seed is not None:
        torch.manual_seed(settings.seed)
    if streamer is not None and len(prompts) != 1:
        raise ValueError("streaming needs exactly one prompt")
    device = next(model.parameters()).device
    encoded = [tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] for p in prompts]
    outputs: list[str] = [""] * len(prompts)
    kwargs = settings.generate_kwargs(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for chunk in length_batches([len(ids) for ids in encoded], batch_size):
        batch = collate([{"input_ids": encoded[i]} for i in chunk], pad_id, left=True)
        width = batch["input_ids"].shape[1]
        out = model.generate(**{k: v.to(device) for k, v in batch.items()}, streamer=streamer, **kwargs)
        for row, index in enumerate(chunk):
            outputs[index] = tokenizer.decode(out[row, width:], skip_special_tokens=True).strip()
    return outputs


def text_streamer(tokenizer: Any) -> Any:
    """Prints new tokens to stdout as they are generated (not the prompt)."""
    from transformers import TextStreamer

    return TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
