"""Chat rows through a chat template, with a loss mask that matches what the template renders.

The rule, for every template (with or without ``{% generation %}`` markers or a generation prompt):

- The training text of a conversation is the template's rendering of the whole conversation, so
  its tokens are exactly the ids ``tokenizer.apply_chat_template(messages)`` gives.
- A trained assistant turn i starts where the template's generation prompt for it ends: the
  rendering of ``messages[:i]`` with ``add_generation_prompt`` must be a prefix of the whole
  rendering, so the model trains on exactly the context it is given at inference. A template
  without a generation prompt therefore trains the turn's header too (the model must write it).
- The turn ends with its last special token (end-of-turn / EOS, e.g. ``<|im_end|>``,
  ``<|eot_id|>``, ``</s>``); whitespace a template puts between turns is not trained. The last
  turn trains through the template's ending (Phi-3 adds EOS after it).
- Where a template rewrites the conversation so that a turn's prompt is not a prefix of the whole
  (Mistral moves the system message into the last user turn), or a row cannot be rendered, the row
  is a bad row (``BadRow``), never a silent mask. A template that renders an assistant turn without
  part of its content (Qwen3 drops the ``<think>`` block of turns before the last user turn) is
  trained as rendered; the segment says so (``exact=False``) and the data report counts it.

Turn ends are found by rendering the conversation with the turn's content replaced by a marker
(once as the last message, once followed by the rest): their common continuation is the turn end.
Messages come as ``{role, content}`` (OpenAI) or ``{from, value}`` (ShareGPT); ``train`` (bool) or
``weight`` (0/1) on an assistant message marks it trained or context only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lorafit.data.rows import BadRow, Segment

ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}
KNOWN_ROLES = "system, user, assistant (ShareGPT: human, gpt)"
_MARK = "LORAFITTURNMARKER7F3A"  # stands in for a turn's content while finding where the turn ends

# The chat template lorafit uses when the tokenizer has none (the run records it like any other).
FALLBACK_CHAT_TEMPLATE = (  # newlines as jinja strings: transformers renders with trim_blocks
    "{% for m in messages %}{% if not loop.first %}{{ '\\n\\n' }}{% endif %}"
    "{{ '### ' + m['role'] | capitalize + ':\\n' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{% if messages %}{{ '\\n\\n' }}{% endif %}{{ '### Assistant:\\n' }}{% endif %}"
)


@dataclass
class Conversation:
    """Normalized messages (``role`` and ``content`` set, other keys kept for the template) and,
    per message, whether it is trained."""

    messages: list[dict[str, Any]]
    trained: list[bool]


def conversation(value: Any, column: str, *, context_only: bool = False, completion: bool = False,
                 check_ending: bool = True) -> Conversation:
    """Validate and normalize one column of messages; raise ``BadRow`` naming the message.

    ``context_only``: assistant turns here are context (a prompt), never trained. ``completion``:
    every message must be an assistant turn. ``check_ending``: the conversation must end with an
    assistant turn and train at least one (off for a prompt that a completion follows).
    """
    if not isinstance(value, list) or not value:
        shown = "empty" if value == [] else _type_name(value)
        raise BadRow(f"'{column}' is {shown}, expected a list of messages")
    messages: list[dict[str, Any]] = []
    trained: list[bool] = []
    for i, item in enumerate(value):
        where = f"'{column}'[{i}]"
        if not isinstance(item, dict):
            raise BadRow(f"{where} is {_type_name(item)}, expected a {{role, content}} or {{from, value}} message")
        role = _first(item, "role", "from")  # parquet / arrow rows carry every key, absent ones as None
        content = _first(item, "content", "value")
        if not isinstance(role, str):
            raise BadRow(f"{where} has no role ('role' or 'from')")
        if role not in ROLES:
            raise BadRow(f"{where} has an unknown role '{role}' (known: {KNOWN_ROLES})")
        role = ROLES[role]
        if not isinstance(content, str):
            raise BadRow(f"{where} has no text content ('content' or 'value' is {_type_name(content)})")
        flag = _train_flag(item, where)
        if role == "assistant":
            if not content.strip():
                raise BadRow(f"{where} is an empty assistant turn")
            if context_only and flag:
                raise BadRow(f"{where} is in the prompt and marked to train; put it in the completion")
            train = not context_only and flag is not False
        else:
            if flag:
                raise BadRow(f"{where} is a {role} turn marked to train; only assistant turns are trained")
            if completion:
                raise BadRow(f"{where} is a {role} turn; a completion holds assistant turns")
            train = False
        message = {k: v for k, v in item.items() if k not in ("from", "value", "train", "weight")}
        message.update(role=role, content=content)
        messages.append(message)
        trained.append(bool(train))
    if check_ending:
        if not any(m["role"] == "assistant" for m in messages):
            raise BadRow(f"'{column}' has no assistant turn")
        if not any(trained):
            raise BadRow(f"'{column}' has no assistant turn to train (all are marked not to train)")
        if messages[-1]["role"] != "assistant":
            raise BadRow(f"'{column}' ends with a {messages[-1]['role']} turn after the last assistant turn "
                         "(nothing learns from it)")
    return Conversation(messages, trained)


def _first(item: dict[str, Any], *keys: str) -> Any:
    return next((item[k] for k in keys if item.get(k) is not None), None)


def _train_flag(item: dict[str, Any], where: str) -> bool | None:
    """``train: true|false`` or ``weight: 0|1`` (Mistral's and axolotl's), None when absent."""
    if "train" in item and item["train"] is not None:
        if not isinstance(item["train"], bool):
            raise BadRow(f"{where} 'train' is {_type_name(item['train'])}, expected true or false")
        return item["train"]
    if "weight" in item and item["weight"] is not None:
        weight = item["weight"]
        if isinstance(weight, bool) or weight not in (0, 1):
            raise BadRow(f"{where} 'weight' is {weight!r}; only 0 (context) or 1 (trained)")
        return weight == 1
    return None


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", bool: "a boolean", int: "a number", float: "a number",
            str: "text", type(None): "missing"}.get(type(value), type(value).__name__)


# ---------------------------------------------------------------------------------- rendering
def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_template_text(tokenizer: Any) -> str:
    """The template rows are rendered with: the tokenizer's own, else lorafit's fallback."""
    own = getattr(tokenizer, "chat_template", None)
    return own if isinstance(own, str) and own else FALLBACK_CHAT_TEMPLATE


def render_chat(tokenizer: Any, messages: list[dict[str, Any]], generation_prompt: bool) -> str:
    """The template's text for ``messages``; a template error becomes a ``BadRow``."""
    if not messages:
        raise BadRow("an assistant turn has nothing before it")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                             chat_template=chat_template_text(tokenizer))
    except Exception as exc:  # noqa: BLE001 - jinja raises its own errors for e.g. wrong role order
        first = (str(exc).splitlines() or [exc.__class__.__name__])[0]
        raise BadRow(f"rejected by the chat template ({first})") from exc


def special_texts(tokenizer: Any) -> tuple[str, ...]:
    """The strings of the tokenizer's special tokens (end-of-turn markers are among them)."""
    found = {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if getattr(t, "special", False)}
    found.update(getattr(tokenizer, "all_special_tokens", []) or [])
    return tuple(t for t in found if t)


def _through_last_special(text: str, specials: tuple[str, ...]) -> str:
    """``text`` up to the end of its last special token (all of it when it has none)."""
    ends = [text.rfind(s) + len(s) for s in specials if s in text]
    return text[: max(ends)] if ends else text


def _common_prefix(a: str, b: str) -> str:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return a[:n]


def chat_segments(chat: Conversation, tokenizer: Any, column: str) -> list[Segment]:
    """The whole conversation as the template renders it, trained turns marked (see the module rule)."""
    messages = chat.messages
    full = render_chat(tokenizer, messages, generation_prompt=False)
    if _MARK in full:
        raise BadRow(f"'{column}' contains lorafit's turn marker text")
    specials = special_texts(tokenizer)
    result: list[Segment] = []
    done = 0
    for i, message in enumerate(messages):
        if not chat.trained[i]:
            continue
        where = f"'{column}'[{i}]"
        if i == 0:
            raise BadRow(f"{where} is an assistant turn with nothing before it; mark it \"train\": false "
                         "to keep it as context")
        prompt = render_chat(tokenizer, messages[:i], generation_prompt=True)
        if not full.startswith(prompt):
            raise BadRow(f"{where}: the chat template renders this turn's prompt (add_generation_prompt) "
                         "differently from the whole conversation (it rewrites earlier turns, e.g. moves the "
                         "system message), so no mask would match inference")
        rest = _after_turn(messages, i, tokenizer, specials, where)
        if not full.endswith(rest):
            raise BadRow(f"{where}: the chat template renders what follows this turn differently depending on "
                         "the turn's content, so its end cannot be told")
        start, stop = len(prompt), len(full) - len(rest)
        if stop < start or start < done:
            raise BadRow(f"{where}: the chat template's text for this turn overlaps another turn")
        turn = full[start:stop]
        result.append(Segment(full[done:start], False))
        result.append(Segment(turn, True, exact=message["content"].strip() in turn))
        done = stop
    result.append(Segment(full[done:], False))
    return [s for s in result if s.text]


def _after_turn(messages: list[dict[str, Any]], i: int, tokenizer: Any, specials: tuple[str, ...],
                where: str) -> str:
    """The text of the whole conversation after turn ``i``'s end (its last special token)."""
    marked = [dict(m) for m in messages]
    marked[i]["content"] = _MARK
    whole = render_chat(tokenizer, marked, generation_prompt=False)
    if whole.count(_MARK) != 1:
        raise BadRow(f"{where}: the chat template does not render this assistant turn's content once")
    after = whole[whole.index(_MARK) + len(_MARK):]
    if i == len(messages) - 1:
        end = after  # the conversation's ending: the last turn trains through it
    else:
        alone = render_chat(tokenizer, marked[: i + 1], generation_prompt=False)
        end = _common_prefix(alone[alone.find(_MARK) + len(_MARK):], after)
    return after[len(_through_last_special(end, specials)):]


def chat_prompt(chat: Conversation, tokenizer: Any, column: str) -> tuple[str, str]:
    """(generation prompt, response) for the last trained assistant turn: what generation feeds the
    model, and the text it should answer with."""
    last = max(i for i, t in enumerate(chat.trained) if t)
    if last == 0:
        raise BadRow(f"'{column}'[0] is an assistant turn with nothing before it")
    return render_chat(tokenizer, chat.messages[:last], generation_prompt=True), chat.messages[last]["content"]


def end_of_turn_tokens(tokenizer: Any) -> list[str]:
    """The special token(s) that end an assistant turn in the tokenizer's chat template (what
    generation stops at, besides EOS); empty when the template ends turns with plain text."""
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _MARK}]
    try:
        text = render_chat(tokenizer, messages, generation_prompt=False)
    except BadRow:
        return []
    after = text[text.find(_MARK) + len(_MARK):] if _MARK in text else ""
    specials = special_texts(tokenizer)
    found = sorted((after.find(s), s) for s in specials if s in after)
    return [found[0][1]] if found else []


def generation_prompt_note(tokenizer: Any) -> str | None:
    """A note when the template ignores ``add_generation_prompt`` (its header is then trained)."""
    messages = [{"role": "user", "content": "hi"}]
    try:
        with_prompt = render_chat(tokenizer, messages, generation_prompt=True)
        without = render_chat(tokenizer, messages, generation_prompt=False)
    except BadRow:
        return None
    if with_prompt == without:
        return ("the chat template adds no generation prompt: each assistant turn is trained from the end of "
                "the message before it (whatever the template writes there, the model learns to write)")
    return None
