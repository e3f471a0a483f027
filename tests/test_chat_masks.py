"""Chat masks proven against the published chat templates of the common families, token for token.

For every family (tests/chat_templates.py: Llama 3 / 3.2, Qwen2.5 / Qwen3, SmolLM2, Mistral v0.1 /
Nemo, Gemma 2 / 3, Phi-3.5) and several conversations (system, multi-turn, an assistant turn
marked not to train, ShareGPT and prompt/completion forms):
- the sample's ids are exactly ``tokenizer.apply_chat_template(messages)``'s, and tokenizing the
  segments one by one gives the same ids (no token crosses a prompt/response boundary);
- the trained tokens are exactly the trained assistant turns, each through its end-of-turn token,
  as the family's template writes them; nothing else is trained;
- each trained turn's generation prompt (``add_generation_prompt``) is a prefix of the sample, so
  training sees exactly the context generation gives.
Then what lorafit does where the rule cannot hold: a bad row naming the message, never a silent mask.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from chat_templates import FAMILIES, MISTRAL_NEMO, MISTRAL_V01, QWEN3, QWEN25_MARKED, Family
from helpers_data import data_config, load_tokenizer, write_jsonl

from lorafit.config import DataConfig
from lorafit.data import prepare_data
from lorafit.data.chat import render_chat
from lorafit.data.encode import IGNORE_INDEX, encode, encode_options
from lorafit.data.formats import render, segments
from lorafit.data.rows import BadRow
from lorafit.errors import DataError
from lorafit.generation import stop_token_ids
from lorafit.resolved import resolve

SYSTEM = {"role": "system", "content": "Be brief."}
TURNS = [
    {"role": "user", "content": "Hi Anna, are you free tonight?"},
    {"role": "assistant", "content": "Hello Tom! Yes, after six."},
    {"role": "user", "content": "Cinema at 7 pm?"},
    {"role": "assistant", "content": "Sure, see you at the cinema."},
    {"role": "user", "content": "Shall I bring Mia?"},
    {"role": "assistant", "content": "Yes, she will like it."},
]


def _conversations(family: Family) -> dict[str, dict[str, Any]]:
    """Rows of every chat shape, each with the (content, is last message) of its trained turns."""
    system = [SYSTEM] if family.system else []
    context = {**TURNS[1], "train": False}
    return {
        "single turn": {"row": {"messages": system + TURNS[:2]}, "trained": [(TURNS[1]["content"], True)]},
        "three turns": {"row": {"messages": system + TURNS},
                        "trained": [(TURNS[1]["content"], False), (TURNS[3]["content"], False),
                                    (TURNS[5]["content"], True)]},
        "turn not trained": {"row": {"messages": system + [TURNS[0], context] + TURNS[2:4]},
                             "trained": [(TURNS[3]["content"], True)]},
        "sharegpt": {"row": {"conversations": [{"from": "human", "value": TURNS[0]["content"]},
                                               {"from": "gpt", "value": TURNS[1]["content"], "weight": 0},
                                               {"from": "human", "value": TURNS[2]["content"]},
                                               {"from": "gpt", "value": TURNS[3]["content"], "weight": 1}]},
                     "format": "sharegpt", "trained": [(TURNS[3]["content"], True)]},
        "prompt/completion": {"row": {"prompt": system + TURNS[:3], "completion": [TURNS[3]]},
                              "format": "prompt_completion_chat", "trained": [(TURNS[3]["content"], True)]},
    }


def _messages(row: dict[str, Any]) -> list[dict[str, str]]:
    """The conversation as plain {role, content} messages, for apply_chat_template."""
    if "conversations" in row:
        roles = {"human": "user", "gpt": "assistant"}
        return [{"role": roles[m["from"]], "content": m["value"]} for m in row["conversations"]]
    messages = row["messages"] if "messages" in row else row["prompt"] + row["completion"]
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _trained_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for i, (token, label) in enumerate(zip(ids, labels, strict=True)):
        if label == IGNORE_INDEX:
            continue
        assert label == token
        if runs and labels[i - 1] != IGNORE_INDEX:
            runs[-1].append(token)
        else:
            runs.append([token])
    return runs


@pytest.mark.parametrize("family", FAMILIES, ids=[f.name for f in FAMILIES])
def test_masks_match_the_template_token_for_token(family: Family, tiny_llama: Path) -> None:
    tokenizer = family.tokenizer(tiny_llama)
    end_of_turn = tokenizer.convert_tokens_to_ids(family.turn("", False))  # generation stops there too
    assert stop_token_ids(DataConfig(format="chat"), tokenizer) == list(dict.fromkeys([tokenizer.eos_token_id,
                                                                                       end_of_turn]))
    for name, case in _conversations(family).items():
        config = DataConfig(format=case.get("format", "chat"))
        parts = segments(case["row"], config, tokenizer)
        sample = encode(parts, tokenizer, encode_options(config, tokenizer))
        messages = _messages(case["row"])
        whole = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
        assert sample.input_ids == whole, name
        by_segment = [t for p in parts for t in tokenizer(p.text, add_special_tokens=False)["input_ids"]]
        assert by_segment == whole, name
        assert sample.straddles is None
        expected = [tokenizer(family.turn(content, last), add_special_tokens=False)["input_ids"]
                    for content, last in case["trained"]]
        assert _trained_runs(sample.input_ids, sample.labels) == expected, name
        for i, message in enumerate(messages):  # training sees exactly what generation is given
            trained = message["role"] == "assistant" and any(c == message["content"] for c, _ in case["trained"])
            if not trained:
                continue
            prompt = tokenizer(render_chat(tokenizer, messages[:i], True), add_special_tokens=False)["input_ids"]
            assert sample.input_ids[: len(prompt)] == prompt, name
            assert sample.labels[len(prompt) - 1] == IGNORE_INDEX and sample.labels[len(prompt)] != IGNORE_INDEX
        rendered = render(case["row"], config, tokenizer)  # what `lorafit generate` feeds for the last turn
        assert rendered.response == case["trained"][-1][0]
        assert tokenizer.decode(sample.input_ids).startswith(rendered.prompt)


def test_generation_markers_agree_with_transformers_assistant_mask(tiny_llama: Path) -> None:
    """A template with {% generation %} markers renders the same; lorafit's rule trains exactly the
    tokens transformers' own assistant mask marks (content + <|im_end|>, not the newline after)."""
    family = next(f for f in FAMILIES if f.name == "qwen2.5")
    tokenizer = family.tokenizer(tiny_llama)
    tokenizer.chat_template = QWEN25_MARKED
    messages = [SYSTEM, *TURNS]
    config = DataConfig(format="chat")
    sample = encode(segments({"messages": messages}, config, tokenizer), tokenizer, encode_options(config, tokenizer))
    reference = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                              return_assistant_tokens_mask=True)
    assert sample.input_ids == reference["input_ids"]
    assert [int(label != IGNORE_INDEX) for label in sample.labels] == reference["assistant_masks"]
    assert sum(reference["assistant_masks"]) > 0


def test_qwen3_earlier_think_blocks_are_trained_as_rendered_and_reported(tiny_llama: Path, tmp_path: Path) -> None:
    """Qwen3 drops the <think> block of assistant turns before the last user turn: lorafit trains
    the whole conversation as the template renders it (the last turn keeps its reasoning) and says so."""
    family = next(f for f in FAMILIES if f.name == "qwen3")
    tokenizer = family.tokenizer(tiny_llama)
    assert tokenizer.chat_template == QWEN3
    messages = [TURNS[0], {"role": "assistant", "content": "<think>\nTonight is free.\n</think>\n\nYes, after six."},
                TURNS[2], {"role": "assistant", "content": "<think>\nSeven works.\n</think>\n\nSure."}]
    config = DataConfig(format="chat")
    parts = segments({"messages": messages}, config, tokenizer)
    trained = [p.text for p in parts if p.trained]
    assert trained == ["Yes, after six.<|im_end|>", "<think>\nSeven works.\n</think>\n\nSure.<|im_end|>"]
    assert [p.exact for p in parts if p.trained] == [False, True]
    path = write_jsonl(tmp_path / "qwen3.jsonl", [{"messages": messages}] * 3)
    prepared = prepare_data(resolve(data_config(tiny_llama, path, packing="none", eval_fraction=0.0)), tokenizer)
    assert "3 rows have assistant turns the chat template renders without part of their content" in prepared.summary


def test_a_template_that_rewrites_earlier_turns_makes_a_bad_row(tiny_llama: Path, tmp_path: Path) -> None:
    """Mistral Nemo puts the system message into the last user turn only: the prompt of a turn is
    not a prefix of the whole conversation, so no mask can match inference: a bad row, by line."""
    family = next(f for f in FAMILIES if f.name == "mistral-nemo")
    tokenizer = family.tokenizer(tiny_llama)
    assert tokenizer.chat_template == MISTRAL_NEMO
    rows = [{"messages": TURNS[:2]}] * 9 + [{"messages": [SYSTEM, *TURNS[:2]]}]
    path = write_jsonl(tmp_path / "nemo.jsonl", rows)
    prepared = prepare_data(resolve(data_config(tiny_llama, path, packing="none", eval_fraction=0.0,
                                                max_bad_fraction=0.2)), tokenizer)
    assert ("skipped 1 of 10 rows: nemo.jsonl line 10 'messages'[2]: the chat template renders this turn's prompt "
            "(add_generation_prompt) differently from the whole conversation") in prepared.summary
    assert len(prepared.train) == 9


def test_template_without_generation_prompt_trains_from_the_previous_message(tiny_llama: Path, tmp_path: Path) -> None:
    family = next(f for f in FAMILIES if f.name == "mistral-v0.1")
    tokenizer = family.tokenizer(tiny_llama)
    assert tokenizer.chat_template == MISTRAL_V01
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": TURNS}] * 2)
    prepared = prepare_data(resolve(data_config(tiny_llama, path, packing="none", eval_fraction=0.0)), tokenizer)
    assert "the chat template adds no generation prompt" in prepared.summary
    assert prepared.template["stop_tokens"] == ["</s>"]


def _bad(row: dict[str, Any], tokenizer: Any, fmt: str = "chat") -> str:
    with pytest.raises(BadRow) as caught:
        segments(row, DataConfig(format=fmt), tokenizer)
    return str(caught.value)


def test_rows_the_rule_cannot_hold_for_are_bad_rows_naming_the_message(tiny_llama: Path) -> None:
    gemma = next(f for f in FAMILIES if f.name == "gemma2").tokenizer(tiny_llama)
    llama = next(f for f in FAMILIES if f.name == "llama3").tokenizer(tiny_llama)
    user, answer = TURNS[0], TURNS[1]
    assert _bad({"messages": [SYSTEM, user, answer]}, gemma) == "rejected by the chat template (System role not supported)"
    twice = {"messages": [user, answer, {"role": "assistant", "content": "And more."}]}
    assert _bad(twice, gemma).startswith("rejected by the chat template (Conversation roles must alternate")
    assert [p.text for p in segments(twice, DataConfig(format="chat"), llama) if p.trained] == \
        ["Hello Tom! Yes, after six.<|eot_id|>", "And more.<|eot_id|>"]  # a template that allows it trains both
    assert _bad({"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "yo"}]}, llama,
                "sharegpt") == "'conversations'[1] has an unknown role 'bot' (known: system, user, assistant " \
                               "(ShareGPT: human, gpt))"
    assert _bad({"messages": [SYSTEM, user]}, llama) == "'messages' has no assistant turn"
    assert _bad({"messages": [user, {"role": "assistant", "content": " "}, TURNS[2], TURNS[3]]}, llama) == \
        "'messages'[1] is an empty assistant turn"
    assert _bad({"messages": [user, answer, TURNS[2]]}, llama) == \
        "'messages' ends with a user turn after the last assistant turn (nothing learns from it)"
    assert _bad({"messages": [answer, user, TURNS[3]]}, llama) == \
        "'messages'[0] is an assistant turn with nothing before it; mark it \"train\": false to keep it as context"
    greeting = {"messages": [{**answer, "train": False}, user, TURNS[3]]}  # as context it is fine
    assert [p.text for p in segments(greeting, DataConfig(format="chat"), llama) if p.trained] == \
        ["Sure, see you at the cinema.<|eot_id|>"]
    assert _bad({"messages": [user, {**answer, "weight": 0.5}]}, llama) == \
        "'messages'[1] 'weight' is 0.5; only 0 (context) or 1 (trained)"
    assert _bad({"messages": [{**user, "train": True}, answer]}, llama) == \
        "'messages'[0] is a user turn marked to train; only assistant turns are trained"
    assert _bad({"messages": [user, {**answer, "train": False}]}, llama) == \
        "'messages' has no assistant turn to train (all are marked not to train)"
    assert _bad({"prompt": [user], "completion": [TURNS[2]]}, llama, "prompt_completion_chat") == \
        "'completion'[0] is a user turn; a completion holds assistant turns"


def test_a_token_across_a_turn_edge_is_a_bad_row(tiny_llama: Path, tmp_path: Path) -> None:
    """A generation prompt ending in a space ('assistant: '): byte-level BPE joins that space with the
    answer's first word into one token, so no mask can split prompt from answer (and generation
    would start from a different token): the row is bad, by line; the others train."""
    spaced = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}{% if m['role'] == 'assistant' %}"
              "{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    tokenizer = load_tokenizer(tiny_llama, spaced)
    rows = [{"messages": [TURNS[0], {"role": "assistant", "content": "\tHello"}]}] * 9 + [{"messages": TURNS[:2]}]
    path = write_jsonl(tmp_path / "edge.jsonl", rows)
    prepared = prepare_data(resolve(data_config(tiny_llama, path, packing="none", eval_fraction=0.0,
                                                max_bad_fraction=0.2)), tokenizer)
    assert re.search(r"skipped 1 of 10 rows: edge.jsonl line 10 a token \(' H\w*'\) spans the edge of a trained "
                     r"assistant turn", prepared.summary)
    assert len(prepared.train) == 9


def test_all_chat_rows_bad_stops_before_the_model(tiny_llama: Path, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": [TURNS[0]]}] * 2)
    with pytest.raises(DataError, match=r"all 2 rows are bad: c.jsonl line 1 'messages' has no assistant turn"):
        prepare_data(resolve(data_config(tiny_llama, path)), load_tokenizer(tiny_llama))


@pytest.mark.heavy  # converts the builtin SmolLM2 GGUF once (tens of seconds on 2 cores)
def test_masks_on_the_builtin_smollm2_tokenizer_and_its_own_template() -> None:
    """The same proof on a real tokenizer (SmolLM2's 49k BPE) with the template it ships."""
    from lorafit.config import validate_config
    from lorafit.modeling import load_tokenizer as model_tokenizer

    tokenizer = model_tokenizer(resolve(validate_config({})))
    assert "SmolLM" in tokenizer.chat_template
    contents = ["Hello Tom! Yes, after six.", "Sure:\n- cinema\n- dinner ", "Of course. 🎬", "Yes.\n\nSee you!",
                "  Sure"]
    config = DataConfig(format="chat")
    for content in contents:
        messages = [SYSTEM, TURNS[0], {"role": "assistant", "content": content}, TURNS[2], TURNS[3]]
        parts = segments({"messages": messages}, config, tokenizer)
        sample = encode(parts, tokenizer, encode_options(config, tokenizer))
        assert sample.input_ids == tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
        if content.startswith(" "):  # the header's newline and the leading spaces are one token: a bad row
            assert sample.straddles == "\n "
            continue
        assert sample.straddles is None
        assert [t for p in parts for t in tokenizer(p.text, add_special_tokens=False)["input_ids"]] == sample.input_ids
        assert _trained_runs(sample.input_ids, sample.labels) == [
            tokenizer(text + "<|im_end|>", add_special_tokens=False)["input_ids"] for text in (content, TURNS[3]["content"])]
