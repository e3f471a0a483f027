"""Preference pairs as rows: a prompt, a chosen and a rejected answer, in the shapes people have.

Two formats of the registry (``lorafit.data.formats``) read them, told apart by the answers' values:

- ``preference`` (text answers): ``prompt`` / ``chosen`` / ``rejected`` strings, the prompt through
  ``data.template`` (``{prompt}`` and any other column) when one is set, else used as it is, as TRL
  does; or full transcripts ``chosen`` / ``rejected`` with no ``prompt`` (Anthropic HH), the
  prompt being what both share up to and including the last ``Assistant:`` turn marker (else their
  common prefix), which must be shared. EOS is appended after the answer, as for supervised rows.
- ``preference_chat`` (message-list answers, the hub's binarized sets): the prompt is ``prompt``
  when it is a message list, else the messages both answers begin with, else a string ``prompt``
  as one user message. Each side is the conversation prompt + answer rendered by the chat template
  (lorafit's fallback without one), its assistant turns trained by ``lorafit.data.chat``'s rule,
  exactly as a chat row of supervised training.

``data.format: preference`` (or ``auto``) under a preference objective takes whichever of the two
the rows are. A pair's chosen side alone is a supervised sample (``segments``), so ``lorafit data
inspect`` and perplexity read pairs as any other row; tokenizing both sides, collating and the
reference log-probabilities live in ``lorafit.data.preference``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from lorafit.data.chat import Conversation, _type_name, chat_segments, conversation, render_chat
from lorafit.data.rows import BadRow, Rendered, Segment
from lorafit.errors import ConfigError

PROMPT, CHOSEN, REJECTED = "prompt", "chosen", "rejected"
TEXT_FORMAT, CHAT_FORMAT = "preference", "preference_chat"
_ASSISTANT_TURN = re.compile(r"(?:^|\n)\s*Assistant:")


def is_preference(columns: Iterable[str], column_map: Mapping[str, str] | None = None) -> bool:
    """Whether rows with these columns are preference pairs: they carry a chosen and a rejected answer
    (``column_map`` is ``data.columns``)."""
    names = set(columns)
    mapping = column_map or {}
    return mapping.get(CHOSEN, CHOSEN) in names and mapping.get(REJECTED, REJECTED) in names


@dataclass
class Pair:
    """One row's prompt and answers: all strings, or all message lists."""

    prompt: str | list[dict[str, Any]]
    chosen: str | list[dict[str, Any]]
    rejected: str | list[dict[str, Any]]

    @property
    def is_chat(self) -> bool:
        return isinstance(self.chosen, list)


def _name(data_config: Any, column: str) -> str:
    return data_config.columns.get(column, column)


def answers_are(kind: type) -> Any:
    """A format detector: both answers are ``kind`` (str: the text shapes; list: message lists)."""
    def detect(row: Mapping[str, Any], data_config: Any) -> bool:
        return all(isinstance(row.get(_name(data_config, c)), kind) for c in (CHOSEN, REJECTED))

    return detect


def _messages(value: list[Any], column: str) -> list[dict[str, Any]]:
    return conversation(value, column, check_ending=False).messages


def _answer(row: Mapping[str, Any], data_config: Any, column: str) -> str | list[dict[str, Any]]:
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


def _message_pair(prompt: Any, chosen: list[dict[str, Any]], rejected: list[dict[str, Any]], prompt_name: str,
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


# ---------------------------------------------------------------------------------- rendering
def prompt_templates(data_config: Any) -> dict[str, str]:
    """The text shapes' prompt template (recorded with the run): ``data.template``, else the prompt as is."""
    return {"prompt": data_config.template or "{prompt}"}


def _fill(prompt: str, row: Mapping[str, Any], data_config: Any) -> str:
    if not data_config.template:
        return prompt
    answers = {_name(data_config, CHOSEN), _name(data_config, REJECTED)}
    extra = {k: v for k, v in row.items() if isinstance(k, str) and k not in answers and k.isidentifier()}
    try:
        return data_config.template.format(**{**extra, PROMPT: prompt})
    except KeyError as exc:
        raise BadRow(f"missing '{exc.args[0]}' (a placeholder of data.template)") from exc
    except (IndexError, ValueError) as exc:
        raise ConfigError(f"data.template: not a valid template ({exc}); use {{prompt}} or {{column}} "
                          "placeholders") from exc


def _prompt_text(pair: Pair, row: Mapping[str, Any], data_config: Any, tokenizer: Any) -> str:
    """The prompt as the model reads it, ending where the answer starts (the generation prompt)."""
    if pair.is_chat:
        return render_chat(tokenizer, pair.prompt, generation_prompt=True)  # type: ignore[arg-type]
    return _fill(pair.prompt, row, data_config)  # type: ignore[arg-type]


def _side(pair: Pair, answer: Any, prompt: str, tokenizer: Any, column: str) -> list[Segment]:
    if not pair.is_chat:
        return [Segment(prompt, False), Segment(answer, True)]
    messages = [*pair.prompt, *answer]
    trained = [False] * len(pair.prompt) + [m["role"] == "assistant" for m in answer]
    return chat_segments(Conversation(messages, trained), tokenizer, column)


def pair_segments(row: Mapping[str, Any], data_config: Any, tokenizer: Any) -> tuple[list[Segment], list[Segment]]:
    """(chosen segments, rejected segments) of one row."""
    pair = normalize(row, data_config)
    prompt = "" if pair.is_chat else _prompt_text(pair, row, data_config, tokenizer)
    return (_side(pair, pair.chosen, prompt, tokenizer, _name(data_config, CHOSEN)),
            _side(pair, pair.rejected, prompt, tokenizer, _name(data_config, REJECTED)))


def chosen_segments(row: Mapping[str, Any], data_config: Any, tokenizer: Any) -> list[Segment]:
    """The prompt and chosen answer as one supervised sample (perplexity, ``lorafit data inspect``)."""
    return pair_segments(row, data_config, tokenizer)[0]


def render_pair(row: Mapping[str, Any], data_config: Any, tokenizer: Any) -> Rendered:
    """Prompt and chosen answer as text: what generation is prompted with and ROUGE compares to. A
    row with a prompt and no answers (``--prompt TEXT``, a request) renders its prompt alone."""
    prompt_name, chosen_name = _name(data_config, PROMPT), _name(data_config, CHOSEN)
    if row.get(chosen_name) is None and row.get(_name(data_config, REJECTED)) is None \
            and row.get(prompt_name) is not None:
        prompt = row[prompt_name]
        if isinstance(prompt, list):
            return Rendered(render_chat(tokenizer, _messages(prompt, prompt_name), generation_prompt=True), "")
        if not isinstance(prompt, str) or not prompt.strip():
            raise BadRow(f"'{prompt_name}' is {_type_name(prompt) if prompt else 'empty'}, expected text")
        return Rendered(_fill(prompt, row, data_config), "")
    pair = normalize(row, data_config)
    chosen = pair.chosen[-1]["content"] if pair.is_chat else pair.chosen
    return Rendered(_prompt_text(pair, row, data_config, tokenizer), chosen)  # type: ignore[arg-type]


def text_row(chat: bool) -> Any:
    """``--prompt TEXT`` as a row of the format: TEXT is the prompt (a user turn for chat pairs)."""
    def row(text: str, data_config: Any) -> dict[str, Any]:
        return {_name(data_config, PROMPT): [{"role": "user", "content": text}] if chat else text}

    return row


EXAMPLES = {
    TEXT_FORMAT: {"prompt": "Anna: Cinema at 6?\nTom: Sure, see you there.", "chosen": "Anna and Tom go to the "
                  "cinema at 6.", "rejected": "Tom goes to the cinema."},
    CHAT_FORMAT: {"prompt": [{"role": "user", "content": "Cinema at 6?"}],
                  "chosen": [{"role": "assistant", "content": "Sure, see you there."}],
                  "rejected": [{"role": "assistant", "content": "No."}]},
}
