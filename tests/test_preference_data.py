"""Preference pairs: the three shapes, prompt masking, lengths, the cache, and bad input by line."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers_data import CHAT_TEMPLATE, load_tokenizer, write_config_yaml
from helpers_preference import TEMPLATE, pairs, write_jsonl

from lorafit.cli import main
from lorafit.config import LorafitConfig, validate_config
from lorafit.data.encode import IGNORE_INDEX
from lorafit.data.pairs import is_preference, normalize, pair_segments
from lorafit.data.preference import sides
from lorafit.errors import ConfigError, DataError
from lorafit.resolved import resolve


def _config(model_dir: Path, path: Path | str, **data: object) -> object:
    settings = {"path": str(path), "cache": False, "eval_fraction": 0.0, **data}
    return validate_config({"model": {"name_or_path": str(model_dir)}, "data": settings,
                            "train": {"seq_len": 256, "batch_size": 2, "objective": "dpo"}})


def _prepare(config: object, tokenizer: object = None) -> object:
    from lorafit.data import prepare_data
    from lorafit.modeling import load_tokenizer

    run = resolve(config)
    return prepare_data(run, tokenizer or load_tokenizer(run))


def _trained_text(tokenizer: object, row: dict) -> str:
    return tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"], strict=True)
                             if label != IGNORE_INDEX], skip_special_tokens=False)


def test_detector_says_which_columns_are_pairs() -> None:
    assert is_preference(["prompt", "chosen", "rejected"])
    assert is_preference(["chosen", "rejected"])
    assert not is_preference(["dialogue", "summary"])
    assert not is_preference(["prompt", "chosen"])
    assert is_preference(["q", "good", "bad"], {"prompt": "q", "chosen": "good", "rejected": "bad"})


def test_strings_through_the_template_prompt_masked_eos_trained(tiny_llama: Path, tmp_path: Path) -> None:
    rows = pairs(4)
    data = _prepare(_config(tiny_llama, write_jsonl(tmp_path / "p.jsonl", rows), template=TEMPLATE))
    tokenizer = load_tokenizer(tiny_llama)
    assert data.pairs and data.packing == "none" and len(data.train) == 4
    assert data.format == "preference" and data.template["prompt_templates"] == {"prompt": TEMPLATE}
    for row, source in zip(data.train, rows, strict=True):
        chosen, rejected = sides(row)
        prompt = TEMPLATE.format(prompt=source["prompt"])
        assert tokenizer.decode(chosen["input_ids"]) == prompt + source["chosen"] + tokenizer.eos_token
        assert tokenizer.decode(rejected["input_ids"]) == prompt + source["rejected"] + tokenizer.eos_token
        assert _trained_text(tokenizer, chosen) == source["chosen"] + tokenizer.eos_token
        assert _trained_text(tokenizer, rejected) == source["rejected"] + tokenizer.eos_token
    batch = data.collate(data.train[:2])
    assert batch["input_ids"].shape[0] == 4  # chosen, chosen, rejected, rejected
    assert batch["input_ids"][2, : len(data.train[0]["rejected_input_ids"])].tolist() == \
        data.train[0]["rejected_input_ids"]
    from lorafit.data.template import apply_template
    from lorafit.generation import prompt_from_row, prompt_from_text

    recorded = apply_template(data.template, LorafitConfig().data, tokenizer, "record")  # as generate reads it
    assert prompt_from_text("Hi", recorded, tokenizer) == TEMPLATE.format(prompt="Hi")
    assert prompt_from_row({"prompt": "Hi"}, recorded, tokenizer) == TEMPLATE.format(prompt="Hi")
    assert prompt_from_row(rows[0], recorded, tokenizer) == TEMPLATE.format(prompt=rows[0]["prompt"])


@pytest.mark.parametrize("shape", ["binarized", "conversational"])
def test_message_lists_render_with_the_chat_template(shape: str, tiny_llama: Path, tmp_path: Path) -> None:
    """The hub's binarized shape (a string prompt, chosen/rejected conversations that repeat it) and
    TRL's conversational shape (prompt messages, answer messages) render the same pair."""
    user = {"role": "user", "content": "Who is coming on Friday?"}
    good, bad = ({"role": "assistant", "content": text} for text in ("Anna and Tom.", "Nobody."))
    if shape == "binarized":
        row = {"prompt": user["content"], "chosen": [user, good], "rejected": [user, bad]}
    else:
        row = {"prompt": [user], "chosen": [good], "rejected": [bad]}
    tokenizer = load_tokenizer(tiny_llama, CHAT_TEMPLATE)
    data = _prepare(_config(tiny_llama, write_jsonl(tmp_path / "p.jsonl", [row, row])), tokenizer)
    assert data.format == "preference_chat" and data.template["chat_template"] == CHAT_TEMPLATE
    assert data.template["stop_tokens"] == ["<|pad|>"] and not data.template["append_eos"]
    chosen, rejected = sides(data.train[0])
    full = tokenizer.apply_chat_template([user, good], tokenize=False)
    prompt = tokenizer.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(chosen["input_ids"]) == full  # the template ends the turn: no EOS added, as for chat
    assert _trained_text(tokenizer, chosen) == "Anna and Tom.<|pad|>"  # through its end-of-turn token
    assert _trained_text(tokenizer, rejected) == "Nobody.<|pad|>"
    from lorafit.data.template import apply_template
    from lorafit.generation import prompt_from_text

    recorded = apply_template(data.template, LorafitConfig().data, load_tokenizer(tiny_llama), "record")
    assert prompt_from_text(user["content"], recorded, tokenizer) == prompt


def test_transcripts_share_the_conversation_up_to_the_last_assistant_turn(tiny_llama: Path) -> None:
    data = _config(tiny_llama, "unused.jsonl").data
    human = "\n\nHuman: Can you lend me your bike?\n\nAssistant: Sure.\n\nHuman: When?\n\nAssistant:"
    pair = normalize({"chosen": human + " On Monday.", "rejected": human + " On Monday or never."}, data)
    assert (pair.prompt, pair.chosen, pair.rejected) == (human, " On Monday.", " On Monday or never.")
    pair = normalize({"chosen": "Q: 2+2? A: 4", "rejected": "Q: 2+2? A: 5"}, data)  # no turn markers: TRL's rule
    assert (pair.prompt, pair.chosen, pair.rejected) == ("Q: 2+2? A:", " 4", " 5")
    chosen, rejected = pair_segments({"chosen": human + " Yes.", "rejected": human + " No."}, data,
                                     load_tokenizer(tiny_llama))
    assert [s.trained for s in chosen] == [False, True] and chosen[1].text == " Yes."


BAD = {
    "missing rejected": ({"prompt": "p", "chosen": "a"}, "missing 'rejected'"),
    "identical": ({"prompt": "p", "chosen": "same", "rejected": "same"}, "'chosen' and 'rejected' are identical"),
    "no shared prefix": ({"chosen": "Human: hi\n\nAssistant: yes", "rejected": "Human: bye\n\nAssistant: no"},
                         "'chosen' and 'rejected' do not share the conversation before the last 'Assistant:' turn"),
    "nothing shared": ({"chosen": "yes", "rejected": "no"}, "'chosen' and 'rejected' share no prompt"),
    "mixed kinds": ({"prompt": "p", "chosen": "a", "rejected": [{"role": "assistant", "content": "b"}]},
                    "'chosen' is text but 'rejected' is a list of messages"),
    "a number": ({"prompt": "p", "chosen": 3, "rejected": "b"}, "'chosen' is a number, expected text"),
    "the other shape": ({"chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant",
                                                                                          "content": "b"}]},
                        "looks like a preference_chat row (chosen, rejected, [prompt]), but the data is preference"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_pairs_are_named_by_line_and_stop_with_exit_2(case: str, tiny_llama: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    row, message = BAD[case]
    good = pairs(19)
    data = write_jsonl(tmp_path / "p.jsonl", good[:7] + [row] + good[7:])
    prepared = _prepare(_config(tiny_llama, data, max_bad_fraction=0.1))  # 1 of 20: skipped and reported
    assert prepared.stats["skipped"] == 1 and len(prepared.train) == 19
    assert f"p.jsonl line 8 {message}" in prepared.summary
    config = write_config_yaml(tmp_path / "c.yaml", _config(tiny_llama, data, max_bad_fraction=0.0))
    assert main(["data", "inspect", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: data.path: 1 of 20 rows are bad") and \
        f"p.jsonl line 8 {message}" in err, err


def test_dpo_on_data_that_is_not_pairs_names_the_row(tiny_llama: Path, dialogue_file: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(DataError, match=r"train.objective dpo needs preference rows .* dialogues.jsonl line 1 has "
                                        r"dialogue, id, summary"):
        _prepare(_config(tiny_llama, dialogue_file))
    config = write_config_yaml(tmp_path / "c.yaml", _config(tiny_llama, dialogue_file))
    assert main(["train", str(config), "--set", f"output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: data.path: train.objective dpo needs preference rows") and "\n" not in err
    assert not (tmp_path / "run").exists()


def test_objective_and_format_must_agree(tiny_llama: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match="data.format: train.objective dpo trains on preference pairs"):
        validate_config({"data": {"format": "chat"}, "train": {"objective": "dpo"}})
    with pytest.raises(ConfigError, match="train.objective: preference pairs .* train with train.objective dpo or"):
        validate_config({"data": {"format": "preference_chat"}})
    assert validate_config({"train": {"objective": "orpo"}}).data.format == "auto"  # auto finds the pairs
    with pytest.raises(ConfigError, match="train.precompute_reference: only DPO has a reference model"):
        validate_config({"train": {"objective": "orpo", "precompute_reference": True}})
    assert main(["plan", "--set", "train.objective=dpo", "--set", "data.format=summarization"]) == 2
    assert capsys.readouterr().err.strip().startswith(
        "error: --set data.format=summarization: data.format: train.objective dpo trains on preference pairs")
    sft = _config(tiny_llama, write_jsonl(tmp_path / "p.jsonl", pairs(4))).model_copy(deep=True)
    sft.train.objective = "sft"
    with pytest.raises(DataError, match=r"^train.objective: preference pairs \(data.format auto found preference in "
                                        r"p.jsonl\) train with train.objective dpo or orpo, not sft$"):
        _prepare(sft)


def test_long_pairs_truncate_from_the_end_or_drop(tiny_llama: Path, tmp_path: Path) -> None:
    rows = pairs(6)
    rows[2] = {**rows[2], "rejected": rows[2]["rejected"] + " and so on" * 40}
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    cut = _prepare(_config(tiny_llama, data, template=TEMPLATE))
    assert cut.stats["truncated"] == 1 and max(len(sides(r)[1]["input_ids"]) for r in cut.train) == 256
    dropped = _prepare(_config(tiny_llama, data, template=TEMPLATE, overlong="drop"))
    assert len(dropped.train) == 5 and "dropped 1 rows over seq_len 256 (p.jsonl line 3 has" in dropped.summary


def test_the_cache_gives_the_same_pairs(tiny_llama: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "p.jsonl", pairs(12))
    config = _config(tiny_llama, data, cache=True, eval_fraction=0.25, template=TEMPLATE)
    first, second = _prepare(config), _prepare(config)
    assert not first.stats["cached"] and second.stats["cached"]
    assert first.train == second.train and first.eval == second.eval and first.held_out == second.held_out
    assert second.pairs and len(second.eval) == 3


def test_builtin_preference_set_is_deterministic_and_disjoint_from_the_dialogues() -> None:
    from lorafit.builtin.dialogues import SPLITS as DIALOGUES
    from lorafit.builtin.dialogues import generate as dialogues
    from lorafit.builtin.preferences import SPLITS, generate

    rows = generate(200, SPLITS["dialogue-preferences"][1])
    assert rows == generate(200, SPLITS["dialogue-preferences"][1])
    assert all(r["chosen"] != r["rejected"] and r["prompt"] for r in rows)
    seen = {r["dialogue"] for r in dialogues(*DIALOGUES["dialogues"])}
    assert sum(r["prompt"] in seen for r in rows) < 5  # other seeds: an SFT run on builtin:dialogues saw (almost) none


def test_the_embedded_dpo_config_loads_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    from lorafit.config import load_config

    config = load_config("builtin:dpo")
    assert config.train.objective == "dpo" and config.model.adapter == "output/lorafit-default"
    assert config.data.path == "builtin:dialogue-preferences" and "{prompt}" in config.data.template
    assert main(["plan", "builtin:nope"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: builtin:nope: no such embedded config (known: ")


def test_plan_counts_two_sequences_per_pair_and_the_reference(tiny_llama: Path) -> None:
    from lorafit.planner import estimate

    base = {"model": {"name_or_path": str(tiny_llama)},
            "train": {"seq_len": 256, "batch_size": 2, "gradient_checkpointing": False}}
    sft = estimate(validate_config(base), "a10g", capacity=False)
    dpo = estimate(validate_config({**base, "train": {**base["train"], "objective": "dpo"}}), "a10g", capacity=False)
    pre = estimate(validate_config({**base, "train": {**base["train"], "objective": "dpo",
                                                      "precompute_reference": True}}), "a10g", capacity=False)
    assert dpo.part_bytes("activations") == pytest.approx(2 * sft.part_bytes("activations"), rel=0.01)
    reference = next(p for p in dpo.parts if p.name == "reference")
    assert reference.bytes > 0 and "adapter disabled" in reference.detail
    assert next(p for p in pre.parts if p.name == "reference").bytes == 0
    assert dpo.settings["sequences_per_row"] == 2 and dpo.settings["batch_size"] == 2
