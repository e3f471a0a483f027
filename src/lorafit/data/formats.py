"""The data formats: ONE registry of the row shapes lorafit reads, and how each becomes text.

Each ``Format`` names its columns (lorafit's names; ``data.columns`` maps them to the data's),
how to recognise a row of its shape (``data.format: auto``, see ``lorafit.data.detect``), how a
row becomes ordered text segments (prompt parts masked, response parts trained), and how TEXT
from ``lorafit generate --prompt`` becomes a row. Another format is one ``register_format`` call.

- ``summarization`` (samsum: ``dialogue``, ``summary``): the seed recipe's template,
  ``Summarize the chat dialogue:\\n{dialogue}\\n---\\nSummary:\\n`` then ``{summary}{eos_token}``.
- ``instruction`` (alpaca: ``instruction``, optional ``input``, ``output``): the Alpaca prompt.
- ``chat`` (OpenAI ``messages``: [{role, content}]), ``sharegpt`` (``conversations``: [{from,
  value}]), ``prompt_completion_chat`` (``prompt`` and ``completion`` as message lists): the
  tokenizer's chat template (lorafit's ``### Role:`` fallback without one); which tokens are
  trained is ``lorafit.data.chat``'s rule.
- ``prompt_completion`` (``prompt``, ``completion`` as text): the prompt as is, the completion trained.
- ``text`` (``text``): plain language modelling, everything trained.
- ``preference`` (``prompt``, ``chosen``, ``rejected`` as text, or HH transcripts) and
  ``preference_chat`` (``chosen`` / ``rejected`` message lists): pairs for ``train.objective`` dpo /
  orpo (``lorafit.data.pairs``); rendered alone, a pair is its prompt and chosen answer.

``data.template`` replaces the prompt template of summarization and instruction (``{placeholders}``
name lorafit's columns). EOS is appended after the final response by the encoder for the formats
without a chat template (chat templates end their turns themselves), not here, so ``render``
stays usable as a generation prompt.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lorafit.data import pairs
from lorafit.data.chat import (
    Conversation,
    chat_prompt,
    chat_segments,
    conversation,
    has_chat_template,
)
from lorafit.data.rows import BadRow, Rendered, Segment
from lorafit.errors import ConfigError

__all__ = ["BadRow", "FORMATS", "Format", "Rendered", "Segment", "register_format", "render", "segments"]

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
PLACEHOLDER = "."  # stands in for the response when a row is built only to render its prompt
PREFERENCE_FORMATS = (pairs.TEXT_FORMAT, pairs.CHAT_FORMAT)  # what train.objective dpo / orpo reads


@dataclass(frozen=True)
class Format:
    """One row shape: its columns, how to recognise it, and how it renders."""

    name: str
    required: tuple[str, ...]  # lorafit's column names, each mapped through data.columns
    segments: Callable[[dict[str, Any], Any, Any], list[Segment]]  # (row, data config, tokenizer)
    text_row: Callable[[str, Any], dict[str, Any]]  # --prompt TEXT as a row (response: a placeholder)
    example: dict[str, Any]  # one row of the shape: docs/data.md shows it (a test keeps them equal)
    optional: tuple[str, ...] = ()
    detect: Callable[[dict[str, Any], Any], bool] | None = None  # beyond the columns: the values' shape
    chat: bool = False  # rendered through a chat template, which ends each turn itself (no EOS appended)
    fallback: bool = False  # auto picks it only when no other format fits (plain text)
    prompt_templates: Callable[[Any], dict[str, str]] | None = None  # the prompt templates a run renders with
    render: Callable[[dict[str, Any], Any, Any], Rendered] | None = None  # default: segments before the last trained
    complete: Callable[[dict[str, Any], Any], dict[str, Any]] | None = None  # a row without its response -> full
    conversation: Callable[[dict[str, Any], Any], Any] | None = None  # chat formats: the row's checked messages

    def column(self, name: str, data_config: Any) -> str:
        return data_config.columns.get(name, name)

    def matches(self, row: dict[str, Any], data_config: Any) -> bool:
        """The row has this format's columns (and passes its detector)."""
        if any(row.get(self.column(c, data_config)) is None for c in self.required):
            return False
        return self.detect is None or self.detect(row, data_config)

    def columns_text(self, data_config: Any) -> str:
        names = [self.column(c, data_config) for c in self.required]
        names += [f"[{self.column(c, data_config)}]" for c in self.optional]
        return ", ".join(names)


FORMATS: dict[str, Format] = {}


def register_format(fmt: Format) -> Format:
    """Add a format to the registry (config validation, auto-detection, rendering, docs read it)."""
    if fmt.name in FORMATS or fmt.name == "auto":
        raise ValueError(f"data format '{fmt.name}' is already registered")
    FORMATS[fmt.name] = fmt
    return fmt


def format_names() -> list[str]:
    return list(FORMATS)


def get_format(name: str) -> Format:
    if name not in FORMATS:
        raise ConfigError(f"data.format: unknown format '{name}' (known: auto, {', '.join(FORMATS)})")
    return FORMATS[name]


# ------------------------------------------------------------------------------- column values
def _value(row: dict[str, Any], name: str, data_config: Any, *, required: bool = True) -> Any:
    actual = data_config.columns.get(name, name)
    if actual not in row or row[actual] is None:
        if required:
            raise BadRow(f"missing '{actual}'")
        return None
    return row[actual]


def _text(row: dict[str, Any], name: str, data_config: Any, *, required: bool = True, nonempty: bool = False) -> str:
    value = _value(row, name, data_config, required=required)
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
        raise ConfigError(f"data.template: not a valid template ({exc}); use {{column}} placeholders") from exc


# --------------------------------------------------------------------------- prompt templates
def _summarization_templates(data_config: Any) -> dict[str, str]:
    return {"prompt": data_config.template or SUMMARIZATION_TEMPLATE}


def _summarization(row: dict[str, Any], data_config: Any, tokenizer: Any) -> list[Segment]:
    dialogue = _text(row, "dialogue", data_config, nonempty=True)
    summary = _text(row, "summary", data_config, nonempty=True)
    prompt = _fill(_summarization_templates(data_config)["prompt"], {"dialogue": dialogue}, row,
                   data_config.columns.get("summary", "summary"))
    return [Segment(prompt, False), Segment(summary, True)]


def _instruction_templates(data_config: Any) -> dict[str, str]:
    return {"prompt": data_config.template or ALPACA_TEMPLATE,
            "prompt_no_input": data_config.template or ALPACA_NO_INPUT_TEMPLATE}


def _instruction(row: dict[str, Any], data_config: Any, tokenizer: Any) -> list[Segment]:
    instruction = _text(row, "instruction", data_config, nonempty=True)
    extra = _text(row, "input", data_config, required=False)
    output = _text(row, "output", data_config, nonempty=True)
    templates = _instruction_templates(data_config)
    prompt = _fill(templates["prompt" if extra.strip() else "prompt_no_input"],
                   {"instruction": instruction, "input": extra}, row, data_config.columns.get("output", "output"))
    return [Segment(prompt, False), Segment(output, True)]


def _prompt_completion(row: dict[str, Any], data_config: Any, tokenizer: Any) -> list[Segment]:
    prompt = _text(row, "prompt", data_config, nonempty=True)
    completion = _text(row, "completion", data_config, nonempty=True)
    return [Segment(prompt, False), Segment(completion, True)]


def _text_segments(row: dict[str, Any], data_config: Any, tokenizer: Any) -> list[Segment]:
    return [Segment(_text(row, "text", data_config, nonempty=True), True)]


# ------------------------------------------------------------------------------- chat formats
def _messages_of(name: str) -> Callable[[dict[str, Any], Any], Any]:
    def read(row: dict[str, Any], data_config: Any) -> Any:
        column = data_config.columns.get(name, name)
        chat = conversation(_value(row, name, data_config), column)
        system = row.get(data_config.columns.get("system", "system")) if name == "conversations" else None
        if isinstance(system, str) and system.strip() and chat.messages[0]["role"] != "system":
            return Conversation([{"role": "system", "content": system}, *chat.messages], [False, *chat.trained])
        return chat

    return read


def _prompt_completion_messages(row: dict[str, Any], data_config: Any) -> Any:
    prompt_col = data_config.columns.get("prompt", "prompt")
    completion_col = data_config.columns.get("completion", "completion")
    prompt = conversation(_value(row, "prompt", data_config), prompt_col, context_only=True, check_ending=False)
    completion = conversation(_value(row, "completion", data_config), completion_col, completion=True)
    return Conversation(prompt.messages + completion.messages, prompt.trained + completion.trained)


def _chat_format(name: str, column: str | None, read: Callable[[dict[str, Any], Any], Any], **fields: Any) -> Format:
    """A format rendered by the chat template; ``column`` names the messages for error messages."""

    def label(data_config: Any) -> str:
        return data_config.columns.get(column, column) if column else "messages"

    def segments_of(row: dict[str, Any], data_config: Any, tokenizer: Any) -> list[Segment]:
        return chat_segments(read(row, data_config), tokenizer, label(data_config))

    def render_of(row: dict[str, Any], data_config: Any, tokenizer: Any) -> Rendered:
        return Rendered(*chat_prompt(read(row, data_config), tokenizer, label(data_config)))

    return Format(name=name, segments=segments_of, render=render_of, chat=True, conversation=read, **fields)


def _is_list(name: str) -> Callable[[dict[str, Any], Any], bool]:
    return lambda row, data_config: isinstance(row.get(data_config.columns.get(name, name)), list)


def _is_text(name: str) -> Callable[[dict[str, Any], Any], bool]:
    return lambda row, data_config: isinstance(row.get(data_config.columns.get(name, name)), str)


def _with_reply(column: str, role_key: str, content_key: str, assistant: str) -> Callable[[dict, Any], dict]:
    """Complete a conversation for rendering its prompt: add a placeholder assistant turn when the
    conversation does not end with one."""

    def complete(row: dict[str, Any], data_config: Any) -> dict[str, Any]:
        key = data_config.columns.get(column, column)
        messages = list(row.get(key) or [])
        last = messages[-1] if messages and isinstance(messages[-1], dict) else {}
        if (last.get("role") or last.get("from")) not in ("assistant", "gpt"):
            messages.append({role_key: assistant, content_key: PLACEHOLDER})
        return {**row, key: messages}

    return complete


def _with_response(name: str, value: Any) -> Callable[[dict, Any], dict]:
    def complete(row: dict[str, Any], data_config: Any) -> dict[str, Any]:
        key = data_config.columns.get(name, name)
        return row if row.get(key) else {**row, key: value}

    return complete


register_format(Format(
    name="summarization", required=("dialogue", "summary"), segments=_summarization,
    text_row=lambda text, c: {c.columns.get("dialogue", "dialogue"): text, c.columns.get("summary", "summary"): PLACEHOLDER},
    complete=_with_response("summary", PLACEHOLDER), prompt_templates=_summarization_templates,
    example={"dialogue": "Anna: Cinema at 6?\nTom: Sure, see you there.", "summary": "Anna and Tom go to the cinema at 6."},
))
register_format(Format(
    name="instruction", required=("instruction", "output"), optional=("input",), segments=_instruction,
    text_row=lambda text, c: {c.columns.get("instruction", "instruction"): text, c.columns.get("output", "output"): PLACEHOLDER},
    complete=_with_response("output", PLACEHOLDER), prompt_templates=_instruction_templates,
    example={"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
))
register_format(_chat_format(
    "chat", "messages", _messages_of("messages"), required=("messages",), detect=_is_list("messages"),
    text_row=lambda text, c: {c.columns.get("messages", "messages"): [{"role": "user", "content": text},
                                                                      {"role": "assistant", "content": PLACEHOLDER}]},
    complete=_with_reply("messages", "role", "content", "assistant"),
    example={"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
                          {"role": "assistant", "content": "Hello.", "train": False},
                          {"role": "user", "content": "Cinema at 6?"}, {"role": "assistant", "content": "Sure."}]},
))
register_format(_chat_format(
    "sharegpt", "conversations", _messages_of("conversations"), required=("conversations",), optional=("system",),
    detect=_is_list("conversations"),
    text_row=lambda text, c: {c.columns.get("conversations", "conversations"): [{"from": "human", "value": text},
                                                                                {"from": "gpt", "value": PLACEHOLDER}]},
    complete=_with_reply("conversations", "from", "value", "gpt"),
    example={"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Cinema at 6?"},
                               {"from": "gpt", "value": "Sure."}]},
))
register_format(Format(
    name="prompt_completion", required=("prompt", "completion"), segments=_prompt_completion,
    detect=lambda row, c: _is_text("prompt")(row, c) and _is_text("completion")(row, c),
    text_row=lambda text, c: {c.columns.get("prompt", "prompt"): text, c.columns.get("completion", "completion"): PLACEHOLDER},
    complete=_with_response("completion", PLACEHOLDER),
    example={"prompt": "The capital of France is", "completion": " Paris."},
))
register_format(_chat_format(
    "prompt_completion_chat", None, _prompt_completion_messages, required=("prompt", "completion"),
    detect=lambda row, c: _is_list("prompt")(row, c) and _is_list("completion")(row, c),
    text_row=lambda text, c: {c.columns.get("prompt", "prompt"): [{"role": "user", "content": text}],
                              c.columns.get("completion", "completion"): [{"role": "assistant", "content": PLACEHOLDER}]},
    complete=_with_response("completion", [{"role": "assistant", "content": PLACEHOLDER}]),
    example={"prompt": [{"role": "user", "content": "Cinema at 6?"}],
             "completion": [{"role": "assistant", "content": "Sure."}]},
))
register_format(Format(
    name="text", required=("text",), segments=_text_segments, detect=_is_text("text"), fallback=True,
    text_row=lambda text, c: {c.columns.get("text", "text"): text},
    example={"text": "Anna and Tom go to the cinema at 6."},
))
register_format(Format(
    name=pairs.TEXT_FORMAT, required=(pairs.CHOSEN, pairs.REJECTED), optional=(pairs.PROMPT,),
    segments=pairs.chosen_segments, render=pairs.render_pair, detect=pairs.answers_are(str),
    text_row=pairs.text_row(chat=False), prompt_templates=pairs.prompt_templates,
    example=pairs.EXAMPLES[pairs.TEXT_FORMAT],
))
register_format(Format(
    name=pairs.CHAT_FORMAT, required=(pairs.CHOSEN, pairs.REJECTED), optional=(pairs.PROMPT,),
    segments=pairs.chosen_segments, render=pairs.render_pair, detect=pairs.answers_are(list), chat=True,
    text_row=pairs.text_row(chat=True), example=pairs.EXAMPLES[pairs.CHAT_FORMAT],
    conversation=pairs.normalize,  # checks a pair without a tokenizer (check_row)
))


# ------------------------------------------------------------------------------------ public
def concrete(data_config: Any) -> Any:
    """``data_config`` must name a format by now (``auto`` is resolved from the rows by
    ``lorafit.data.detect`` or from a run's recorded template)."""
    if data_config.format == "auto":
        raise ConfigError("data.format: auto is resolved from the data when training; name the format "
                          f"({', '.join(FORMATS)}) or use a run folder, which records it")
    return get_format(data_config.format)


def row_format(row: dict[str, Any], data_config: Any) -> Format:
    """The format a row renders as: ``data.format``, or with ``auto`` the one its columns fit."""
    if data_config.format != "auto":
        return get_format(data_config.format)
    from lorafit.data.detect import row_formats

    fits = row_formats(row, data_config)
    if len(fits) != 1:
        found = ", ".join(str(k) for k in row) or "none"
        raise BadRow(f"has columns {found}: {'fits ' + ' and '.join(fits) if fits else 'no known format'}; "
                     "set data.format")
    return FORMATS[fits[0]]


def segments(row: dict[str, Any], data_config: Any, tokenizer: Any) -> list[Segment]:
    """The row as ordered text segments, each marked trained or not (before ``train_on_prompt``)."""
    return row_format(row, data_config).segments(row, data_config, tokenizer)


def render(row: dict[str, Any], data_config: Any, tokenizer: Any) -> Rendered:
    """Prompt (all text before the last trained part) and response (the target, no EOS) of a row.

    Used for generation and ROUGE: feed ``prompt`` to the model, compare its output to ``response``.
    For chat rows the prompt ends with the generation prompt of the last trained assistant turn.
    """
    fmt = row_format(row, data_config)
    if fmt.render is not None:
        return fmt.render(row, data_config, tokenizer)
    parts = fmt.segments(row, data_config, tokenizer)
    last = max(i for i, p in enumerate(parts) if p.trained)
    return Rendered("".join(p.text for p in parts[:last]), parts[last].text)


def check_row(row: dict[str, Any], data_config: Any) -> None:
    """Raise ``BadRow`` for a row of the wrong shape, without a tokenizer (chat rows: the messages
    are checked, the template is not run)."""
    fmt = concrete(data_config)
    if fmt.conversation is not None:
        fmt.conversation(row, data_config)
    else:
        fmt.segments(row, data_config, None)


def uses_chat_template(data_config: Any, tokenizer: Any) -> bool:
    """Chat rows go through the tokenizer's template, which writes the special tokens itself, so
    tokenization then adds none (training, eval loss and generation alike). lorafit's fallback
    template writes none, so the tokenizer adds them as for the other formats."""
    return concrete(data_config).chat and has_chat_template(tokenizer)


def is_chat(data_config: Any) -> bool:
    return concrete(data_config).chat

