"""Turn a row into text: prompt parts (masked by default) and response parts (trained), per format.

- ``summarization`` (samsum: ``dialogue``, ``summary``): the seed recipe's template,
  ``Summarize the chat dialogue:\\n{dialogue}\\n---\\nSummary:\\n`` then ``{summary}{eos_token}``.
- ``instruction`` (alpaca: ``instruction``, optional ``input``, ``output``): the Alpaca prompt.
- ``chat`` (``messages``: [{role, content}]): the tokenizer's chat template, every assistant turn
  trained. Without a chat template the fallback renders each message as ``### Role:\\n{content}\\n\\n``
  and the assistant's text is followed by the EOS token.
- ``text`` (``text``): plain language modelling, everything trained.

``data.template`` replaces the prompt template (``{placeholders}`` name lorafit's columns).
EOS is appended after the final response by the encoder, not here, so ``render`` stays usable as
a generation prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SUMMARIZATION_TEMPLATE = "Summarize the chat dialogue:\n{dialogue}\n---\nSummary:\n"
ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
FALLBACK_CHAT_TURN = "### {role}:\n{content}\n\n"
FALLBACK_CHAT_PROMPT = "### Assistant:\n"

# lorafit's column names per format: (required, optional)
COLUMNS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "summarization": (("dialogue", "summary"), ()),
    "instruction": (("instruction", "output"), ("input",)),
    "chat": (("messages",), ()),
    "text": (("text",), ()),
    "preference": (("chosen", "rejected"), ("prompt",)),  # lorafit.data.preference
}


class BadRow(ValueError):
    """A row that cannot be rendered; the message reads after 'line N', e.g. "missing 'summary'"."""


@dataclass
class Rendered:
    """prompt = everything before the trained part; response = the target text, without EOS."""

    prompt: str
    response: str


@dataclass
class Segment:
    text: str
    trained: bool


def _column(row: dict[str, Any], name: str, data_config: Any, *, required: bool = True) -> Any:
    actual = data_config.columns.get(name, name)
    if actual not in row or row[actual] is None:
        if required:
            raise BadRow(f"missing '{actual}'")
        return None
    return row[actual]


def _text(row: dict[str, Any], name: str, data_config: Any, *, required: bool = True, nonempty: bool = False) -> str:
    value = _column(row, name, data_config, required=required)
    actual = data_config.columns.get(name, name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadRow(f"'{actual}' is {_type_name(value)}, expected text")
    if nonempty and not value.strip():
        raise BadRow(f"empty '{actual}'")
    return value


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", bool: "a boolean", int: "a number", float: "a number"}.get(
        type(value), type(value).__name__
    )


def _fill(template: str, values: dict[str, str], row: dict[str, Any], response: str) -> str:
    """Fill the prompt template: lorafit's column names, plus any other column of the row except
    the response (so a template can never show the model its answer)."""
    extra = {k: v for k, v in row.items() if isinstance(k, str) and k != response and k.isidentifier()}
    try:
        return template.format(**{**extra, **values})
    except KeyError as exc:
        raise BadRow(f"missing '{exc.args[0]}' (a placeholder of data.template)") from exc
    except (IndexError, ValueError) as exc:
        from lorafit.errors import ConfigError

        raise ConfigError(f"data.template: not a valid template ({exc}); use {{column}} placeholders") from exc


def segments(row: dict[str, Any], data_config: Any, tokenizer: Any) -> list[Segment]:
    """The row as ordered text segments, each marked trained or not (before ``train_on_prompt``)."""
    fmt = data_config.format
    if fmt == "summarization":
        dialogue = _text(row, "dialogue", data_config, nonempty=True)
        summary = _text(row, "summary", data_config, nonempty=True)
        prompt = _fill(data_config.template or SUMMARIZATION_TEMPLATE, {"dialogue": dialogue}, row,
                       data_config.columns.get("summary", "summary"))
        return [Segment(prompt, False), Segment(summary, True)]
    if fmt == "instruction":
        instruction = _text(row, "instruction", data_config, nonempty=True)
        extra = _text(row, "input", data_config, required=False)
        output = _text(row, "output", data_config, nonempty=True)
        default = ALPACA_TEMPLATE if extra.strip() else ALPACA_NO_INPUT_TEMPLATE
        prompt = _fill(data_config.template or default, {"instruction": instruction, "input": extra}, row,
                       data_config.columns.get("output", "output"))
        return [Segment(prompt, False), Segment(output, True)]
    if fmt == "text":
        return [Segment(_text(row, "text", data_config, nonempty=True), True)]
    if fmt == "chat":
        return _chat_segments(_messages(row, data_config), tokenizer)
    if fmt == "preference":  # as one sample: the prompt and the chosen answer
        from lorafit.data.preference import chosen_segments

        return chosen_segments(row, data_config, tokenizer)
    raise BadRow(f"unknown format '{fmt}'")


def _messages(row: dict[str, Any], data_config: Any) -> list[dict[str, str]]:
    actual = data_config.columns.get("messages", "messages")
    value = _column(row, "messages", data_config)
    if not isinstance(value, list) or not value:
        raise BadRow(f"'{actual}' is {_type_name(value) if value != [] else 'empty'}, expected a list of messages")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise BadRow(f"'{actual}'[{i}] is not a {{role, content}} message with text content")
        messages.append({"role": message["role"], "content": message["content"]})
    assistants = [m for m in messages if m["role"] == "assistant"]
    if not assistants:
        raise BadRow(f"'{actual}' has no assistant message")
    if not assistants[-1]["content"].strip():
        raise BadRow(f"empty assistant message in '{actual}'")
    return messages


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def uses_chat_template(data_config: Any, tokenizer: Any) -> bool:
    """Chat rows go through the tokenizer's template, which writes the special tokens itself, so
    tokenization then adds none (training, eval loss and generation alike)."""
    return data_config.format == "chat" and has_chat_template(tokenizer)


def _apply_template(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    if not has_chat_template(tokenizer):
        text = "".join(FALLBACK_CHAT_TURN.format(role=m["role"].capitalize(), content=m["content"]) for m in messages)
        return text + (FALLBACK_CHAT_PROMPT if generation_prompt else "")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as exc:  # noqa: BLE001 - jinja raises its own errors for e.g. wrong role order
        first = (str(exc).splitlines() or [exc.__class__.__name__])[0]
        raise BadRow(f"rejected by the chat template ({first})") from exc


def _chat_segments(messages: list[dict[str, str]], tokenizer: Any) -> list[Segment]:
    """Render turn by turn: the text each assistant turn adds is trained, all else is prompt.

    With the fallback template the trained part is the assistant's content (EOS follows it);
    with a real template it is whatever the template adds for the turn (content + end-of-turn).
    """
    result: list[Segment] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _apply_template(tokenizer, messages[:i], generation_prompt=True)
        if not has_chat_template(tokenizer):
            turn = message["content"] + (tokenizer.eos_token or "") + "\n\n"
            result.append(Segment(before[len(done):], False))
            result.append(Segment(turn, True))
            done = before + turn
            continue
        after = _apply_template(tokenizer, messages[: i + 1], generation_prompt=False)
        if not before.startswith(done) or not after.startswith(before):
            # A template that rewrites earlier turns (e.g. drops past reasoning): train on the whole turn text.
            before = done
        result.append(Segment(before[len(done):], False))
        result.append(Segment(after[len(before):], True))
        done = after
    return [s for s in result if s.text]


def render(row: dict[str, Any], data_config: Any, tokenizer: Any) -> Rendered:
    """Prompt (all text before the last trained part) and response (the target, no EOS) of a row.

    Used for generation and ROUGE: feed ``prompt`` to the model, compare its output to ``response``.
    For chat rows the prompt ends with the assistant generation prompt of the last assistant turn.
    """
    if data_config.format == "preference":
        from lorafit.data.preference import render_pair

        return render_pair(row, data_config, tokenizer)
    if data_config.format == "chat":
        messages = _messages(row, data_config)
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompt = _apply_template(tokenizer, messages[:last], generation_prompt=True)
        return Rendered(prompt, messages[last]["content"])
    parts = segments(row, data_config, tokenizer)
    if data_config.format == "text":
        return Rendered("", parts[0].text)
    return Rendered("".join(p.text for p in parts[:-1]), parts[-1].text)
