"""Text generation with the training template: prompts built exactly as in training, batched.

Why it matters: a model fine-tuned on ``Summarize the chat dialogue:\\n{dialogue}\\n---\\nSummary:\\n``
only behaves when it sees that same prompt, so ``--prompt TEXT`` is put through the run's format
(``lorafit.data.formats.render``) with TEXT as the dialogue / instruction / user message / prompt.
``prompt_from_text`` and ``prompt_from_row`` are the one entry point for "the prompt the run trained
with" (serving and export build prompts through them); chat formats stop at the template's
end-of-turn token as well as EOS (``stop_token_ids``). Rows are left-padded and generated in
batches (sorted by length, so little compute goes to padding); a single prompt can stream its
tokens as they are produced (transformers ``TextStreamer``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lorafit.data.chat import end_of_turn_tokens
from lorafit.data.collate import collate
from lorafit.data.detect import row_formats
from lorafit.data.formats import BadRow, concrete, render
from lorafit.errors import DataError


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

    def request_parameters(self) -> dict[str, Any]:
        """The ``parameters`` of an endpoint request (the recipe's keys) that decode as these
        settings do locally: sampling keys only when sampling, the seed only when set."""
        parameters: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample,
                                      "repetition_penalty": self.repetition_penalty}
        if self.do_sample:
            parameters.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        if self.seed is not None:
            parameters["seed"] = self.seed
        return parameters


def prompting_config(data_config: Any, row: dict[str, Any] | None = None) -> Any:
    """``data_config`` with a concrete format. ``auto`` here means no run template was applied: a
    row whose columns fit one format is read as that format, anything else as summarization
    (lorafit's default task, what an unset format always meant for prompts)."""
    if data_config.format != "auto":
        return data_config

    fits = row_formats(row, data_config) if row is not None else []
    return data_config.model_copy(update={"format": fits[0] if len(fits) == 1 else "summarization"})


def prompt_from_text(text: str, data_config: Any, tokenizer: Any) -> str:
    """``--prompt TEXT`` in the training template: TEXT is the dialogue, instruction, user message
    or prompt of the run's format. ``data_config`` and ``tokenizer`` are the run's, with its
    recorded template applied (``AdapterSession`` does that; see ``lorafit.data.template``)."""
    data_config = prompting_config(data_config)
    fmt = concrete(data_config)
    if fmt.name == "text":
        return text
    try:
        return render(fmt.text_row(text, data_config), data_config, tokenizer).prompt
    except BadRow as exc:
        raise DataError(f"--prompt: {exc}") from exc


def prompt_from_row(row: dict[str, Any], data_config: Any, tokenizer: Any) -> str:
    """A data row's prompt (its response may be absent); a row with only ``prompt`` (text) is used
    verbatim when the run's format has no ``prompt`` column."""
    data_config = prompting_config(data_config, row)
    fmt = concrete(data_config)
    col = data_config.columns
    if isinstance(row.get("prompt"), str) and not any(col.get(c, c) in row for c in fmt.required) \
            and "prompt" not in fmt.optional:
        return row["prompt"]
    if fmt.name == "text":
        return str(row.get(col.get("text", "text"), ""))
    if fmt.complete is not None:
        row = fmt.complete(dict(row), data_config)
    return render(row, data_config, tokenizer).prompt


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """The batches ``generate`` forms: indices sorted by prompt length (stable), ``batch_size`` at a
    time. A client of an endpoint forms the same batches from the lengths, so served batches pad
    exactly as local ones do."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def stop_token_ids(data_config: Any, tokenizer: Any) -> list[int]:
    """What generation stops at: EOS, and for chat formats the template's end-of-turn token, the
    last token training taught the model to write."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if concrete(prompting_config(data_config)).chat:
        for token in end_of_turn_tokens(tokenizer):
            token_id = tokenizer.convert_tokens_to_ids(token)
            if isinstance(token_id, int) and token_id not in ids:
                ids.append(token_id)
    return ids


@torch.no_grad()
def generate(model: Any, tokenizer: Any, prompts: Sequence[str], settings: GenerationSettings | None = None, *,
             batch_size: int = 8, add_special_tokens: bool = True, streamer: Any = None,
             stop_ids: list[int] | None = None) -> list[str]:
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
    if stop_ids:  # the run's end-of-turn token(s) besides EOS (see stop_token_ids)
        kwargs["eos_token_id"] = list(stop_ids)
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
