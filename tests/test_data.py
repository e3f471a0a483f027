"""Data pipeline on real files and a real tokenizer: formats, masking token by token, packing
modes, batching, held-out split and the cache."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from helpers_data import CHAT_TEMPLATE, data_config, dialogues, load_tokenizer, write_jsonl

from lorafit.data import prepare_data, render
from lorafit.data.formats import SUMMARIZATION_TEMPLATE
from lorafit.data.packing import split_packed
from lorafit.resolved import resolve


def _samples(prepared) -> list[tuple[list[int], list[int]]]:
    out = []
    for row in prepared.train + (prepared.eval or []):
        for start, end in split_packed(row):
            out.append((row["input_ids"][start:end], row["labels"][start:end]))
    return out


def _trained_and_masked(tokenizer, ids: list[int], labels: list[int]) -> tuple[str, str]:
    trained = [t for t, label in zip(ids, labels, strict=True) if label != -100]
    masked = [t for t, label in zip(ids, labels, strict=True) if label == -100]
    return tokenizer.decode(trained), tokenizer.decode(masked)


def test_summarization_masks_the_prompt_token_by_token(tiny_llama: Path, tmp_path: Path) -> None:
    rows = dialogues(12)
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    tokenizer = load_tokenizer(tiny_llama)
    config = data_config(tiny_llama, path, packing="none", eval_fraction=0.0, seq_len=512)
    prepared = prepare_data(resolve(config), tokenizer)

    assert prepared.eval is None and len(prepared.train) == 12
    by_prompt = {}
    for row in rows:
        rendered = render(row, config.data, tokenizer)
        assert rendered.prompt == SUMMARIZATION_TEMPLATE.format(dialogue=row["dialogue"])
        assert rendered.response == row["summary"]
        by_prompt[rendered.prompt] = rendered.response
    for sample in prepared.train:
        ids, labels = sample["input_ids"], sample["labels"]
        assert all(label in (-100, token) for token, label in zip(ids, labels, strict=True))
        trained, masked = _trained_and_masked(tokenizer, ids, labels)
        assert masked in by_prompt, masked  # exactly the prompt is masked ...
        assert trained == by_prompt[masked] + tokenizer.eos_token  # ... and the response + EOS trained
        assert ids[-1] == tokenizer.eos_token_id
        first_trained = next(i for i, label in enumerate(labels) if label != -100)
        assert all(label == -100 for label in labels[:first_trained])
        assert all(label != -100 for label in labels[first_trained:])  # one contiguous trained tail


def test_train_on_prompt_and_custom_template(tiny_llama: Path, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"chat": r["dialogue"], "gist": r["summary"]} for r in dialogues(4)])
    tokenizer = load_tokenizer(tiny_llama)
    config = data_config(tiny_llama, path, packing="none", eval_fraction=0.0, train_on_prompt=True,
                         columns={"dialogue": "chat", "summary": "gist"}, template="Chat:\n{dialogue}\nTL;DR: ")
    prepared = prepare_data(resolve(config), tokenizer)
    for sample in prepared.train:
        assert sample["labels"] == sample["input_ids"]
        assert tokenizer.decode(sample["input_ids"]).startswith("Chat:\n")
    assert render({"chat": "a: b", "gist": "c"}, config.data, tokenizer).prompt == "Chat:\na: b\nTL;DR: "


def test_instruction_format_from_csv(tiny_llama: Path, tmp_path: Path) -> None:
    import csv

    path = tmp_path / "alpaca.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["instruction", "input", "output"])
        writer.writeheader()
        writer.writerow({"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"})
        writer.writerow({"instruction": "Say hi,\nnicely.", "input": "", "output": "Hi there!"})
    tokenizer = load_tokenizer(tiny_llama)
    config = data_config(tiny_llama, path, format="instruction", packing="none", eval_fraction=0.0)
    prepared = prepare_data(resolve(config), tokenizer)
    assert len(prepared.train) == 2
    with_input, without_input = (render(r, config.data, tokenizer) for r in
                                 ({"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
                                  {"instruction": "Say hi,\nnicely.", "input": "", "output": "Hi there!"}))
    assert "### Input:\n2 and 3" in with_input.prompt and "### Input" not in without_input.prompt
    decoded = [_trained_and_masked(tokenizer, s["input_ids"], s["labels"]) for s in prepared.train]
    assert decoded[0] == ("5" + tokenizer.eos_token, with_input.prompt)
    assert decoded[1] == ("Hi there!" + tokenizer.eos_token, without_input.prompt)


CHAT_ROWS = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi Anna"},
                  {"role": "assistant", "content": "Hello Tom"}, {"role": "user", "content": "Cinema at 6 pm?"},
                  {"role": "assistant", "content": "Sure, see you"}]},
    {"messages": [{"role": "user", "content": "Can I borrow your bike?"},
                  {"role": "assistant", "content": "Yes, on Monday"}]},
]


def test_chat_format_trains_every_assistant_turn(tiny_llama: Path, tmp_path: Path) -> None:
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(CHAT_ROWS), encoding="utf-8")
    tokenizer = load_tokenizer(tiny_llama, CHAT_TEMPLATE)
    config = data_config(tiny_llama, path, format="chat", packing="none", eval_fraction=0.0)
    prepared = prepare_data(resolve(config), tokenizer)
    first = prepared.train[0]
    # exactly the template's ids for the whole conversation: no EOS appended, the template ends turns
    assert first["input_ids"] == tokenizer.apply_chat_template(CHAT_ROWS[0]["messages"], tokenize=True,
                                                               return_dict=False)
    trained, masked = _trained_and_masked(tokenizer, first["input_ids"], first["labels"])
    assert trained == "Hello Tom<|pad|>Sure, see you<|pad|>"  # each turn through its end-of-turn token
    assert "Be brief." in masked and "Cinema at 6 pm?" in masked and "Hello Tom" not in masked
    rendered = render(CHAT_ROWS[0], config.data, tokenizer)
    assert rendered.prompt.endswith("Cinema at 6 pm?<|pad|>\n<|endoftext|>assistant\n")
    assert rendered.response == "Sure, see you"


def test_chat_fallback_without_a_chat_template(tiny_llama: Path, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "chat.jsonl", CHAT_ROWS[1:])
    tokenizer = load_tokenizer(tiny_llama)
    assert not tokenizer.chat_template
    config = data_config(tiny_llama, path, format="chat", packing="none", eval_fraction=0.0)
    sample = prepare_data(resolve(config), tokenizer).train[0]
    trained, masked = _trained_and_masked(tokenizer, sample["input_ids"], sample["labels"])
    assert masked == "### User:\nCan I borrow your bike?\n\n### Assistant:\n"
    assert trained == "Yes, on Monday<|endoftext|>"  # the fallback ends the assistant turn with EOS
    assert render(CHAT_ROWS[1], config.data, tokenizer).prompt == masked


def test_text_format_from_parquet_and_saved_dataset(tiny_llama: Path, tmp_path: Path) -> None:
    import datasets

    texts = [f"{r['dialogue']}\n{r['summary']}" for r in dialogues(6)]
    table = datasets.Dataset.from_dict({"body": texts})
    table.to_parquet(str(tmp_path / "t.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    tokenizer = load_tokenizer(tiny_llama)
    for path in (tmp_path / "t.parquet", tmp_path / "saved"):
        config = data_config(tiny_llama, path, format="text", packing="none", eval_fraction=0.0,
                             columns={"text": "body"}, seq_len=512)
        prepared = prepare_data(resolve(config), tokenizer)
        decoded = sorted(tokenizer.decode(s["input_ids"]) for s in prepared.train)
        assert decoded == sorted(t + tokenizer.eos_token for t in texts)
        assert all(s["labels"] == s["input_ids"] for s in prepared.train)


def test_several_paths_are_concatenated(tiny_llama: Path, tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", dialogues(3, seed=1))
    b = write_jsonl(tmp_path / "b.jsonl", dialogues(4, seed=2))
    config = data_config(tiny_llama, [str(a), str(b)], packing="none", eval_fraction=0.0, seq_len=512)
    assert prepare_data(resolve(config), load_tokenizer(tiny_llama)).stats["rows"] == 7


@pytest.mark.parametrize("mode", ["none", "chunk", "packed"])
def test_packing_modes_keep_every_token(mode: str, tiny_llama: Path, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", dialogues(40))
    tokenizer = load_tokenizer(tiny_llama)
    reference = prepare_data(resolve(data_config(tiny_llama, path, packing="none", eval_fraction=0.0, seq_len=512)),
                             tokenizer)
    samples = [(tuple(s["input_ids"]), tuple(s["labels"])) for s in reference.train]
    prepared = prepare_data(resolve(data_config(tiny_llama, path, packing=mode, eval_fraction=0.0, seq_len=512)), tokenizer)
    rows = prepared.train
    assert all(len(r["input_ids"]) <= 512 for r in rows)
    if mode == "none":
        assert [(tuple(r["input_ids"]), tuple(r["labels"])) for r in rows] == samples
    elif mode == "chunk":
        assert all(len(r["input_ids"]) == 512 for r in rows[:-1])
        assert [t for r in rows for t in r["input_ids"]] == [t for s in samples for t in s[0]]
        assert [t for r in rows for t in r["labels"]] == [t for s in samples for t in s[1]]
    else:
        assert len(rows) < len(samples)  # several samples per row
        found = []
        for row in rows:
            assert len(row["position_ids"]) == len(row["input_ids"])
            for start, end in split_packed(row):
                assert row["position_ids"][start:end] == list(range(end - start))
                assert row["labels"][start] == -100  # no label predicted across the boundary
                found.append((tuple(row["input_ids"][start:end]), tuple(row["labels"][start + 1 : end])))
        assert Counter(found) == Counter((ids, labels[1:]) for ids, labels in samples)
    assert 0 < prepared.stats["packing_efficiency"] <= 1
    assert f"packing {mode}" in prepared.summary and "efficiency" in prepared.summary


def test_collate_pads_and_masks(tiny_llama: Path, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", dialogues(8))
    tokenizer = load_tokenizer(tiny_llama)
    for mode in ("none", "packed"):
        prepared = prepare_data(resolve(data_config(tiny_llama, path, packing=mode, eval_fraction=0.0, seq_len=512)),
                                tokenizer)
        rows = sorted(prepared.train, key=lambda r: len(r["input_ids"]))[:2]
        short, longest = len(rows[0]["input_ids"]), len(rows[1]["input_ids"])
        assert short < longest
        assert prepared.pad_to_multiple_of == 64  # on a CPU: the longest row rounded up to x64
        width = -(-longest // 64) * 64
        batch = prepared.collate(rows)
        assert all(v.shape == (2, width) and v.dtype.is_floating_point is False for v in batch.values())
        assert batch["input_ids"][0, short:].eq(tokenizer.pad_token_id).all()
        assert batch["labels"][0, short:].eq(-100).all()
        if mode == "none":
            assert set(batch) == {"input_ids", "labels", "attention_mask"}
            assert batch["attention_mask"][0].tolist() == [1] * short + [0] * (width - short)
        else:
            assert set(batch) == {"input_ids", "labels", "position_ids"}
            assert batch["position_ids"][0, short:].tolist() == list(range(width - short))


def test_epoch_batches_are_deterministic_full_and_grouped(tiny_llama: Path, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", dialogues(50))
    prepared = prepare_data(resolve(data_config(tiny_llama, path, packing="none", eval_fraction=0.0, seq_len=512)),
                            load_tokenizer(tiny_llama))
    first = prepared.epoch_batches(0, 8, seed=3)
    assert first == prepared.epoch_batches(0, 8, seed=3)
    assert first != prepared.epoch_batches(1, 8, seed=3) and first != prepared.epoch_batches(0, 8, seed=4)
    assert len(first) == 7 and all(len(b) == 8 for b in first)  # 50 rows -> 56 slots, topped up
    assert set().union(*first) == set(range(50))
    lengths = [len(r["input_ids"]) for r in prepared.train]
    from lorafit.data.batching import epoch_batches, padding_efficiency

    grouped = padding_efficiency(lengths, first)
    plain = padding_efficiency(lengths, epoch_batches(lengths, 0, 8, 3, group_by_length=False))
    assert grouped > plain
    assert max(lengths[i] for i in first[0]) == max(lengths)  # longest batch first


def test_held_out_split_is_deterministic_and_disjoint(tiny_llama: Path, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", dialogues(40))
    tokenizer = load_tokenizer(tiny_llama)
    config = data_config(tiny_llama, path, packing="none", eval_fraction=0.25, max_eval_rows=6, seq_len=512)
    one, two = prepare_data(resolve(config), tokenizer), prepare_data(resolve(config), tokenizer)
    assert len(one.eval) == 6 and len(one.train) == 34
    assert one.eval == two.eval
    assert not {tuple(r["input_ids"]) for r in one.eval} & {tuple(r["input_ids"]) for r in one.train}
    other = prepare_data(resolve(data_config(tiny_llama, path, packing="none", eval_fraction=0.25, max_eval_rows=6,
                                     seq_len=512, seed=1)), tokenizer)
    assert other.eval != one.eval
    held = [r["row"] for r in one.held_out]
    assert len(held) == 6 and all(r in dialogues(40) for r in held)
    # the records render to exactly the held-out rows' prompts
    prompts = {render(r, config.data, tokenizer).prompt for r in held}
    assert prompts == {tokenizer.decode([t for t, lab in zip(r["input_ids"], r["labels"], strict=True) if lab == -100])
                       for r in one.eval}
    held = write_jsonl(tmp_path / "held.jsonl", dialogues(3, seed=9))
    from_file = prepare_data(resolve(data_config(tiny_llama, path, packing="none", eval_path=str(held), seq_len=512)),
                             tokenizer)
    assert len(from_file.train) == 40 and len(from_file.eval) == 3


def test_cache_is_reused_and_data_untouched(tiny_llama: Path, tmp_path: Path) -> None:
    import os

    path = write_jsonl(tmp_path / "d.jsonl", dialogues(20))
    before = (path.read_bytes(), os.stat(path).st_mtime_ns)
    tokenizer = load_tokenizer(tiny_llama)
    config = data_config(tiny_llama, path, packing="packed", cache=True)
    first = prepare_data(resolve(config), tokenizer)
    second = prepare_data(resolve(config), tokenizer)
    assert not first.stats["cached"] and second.stats["cached"]
    assert second.train == first.train and second.eval == first.eval
    assert second.held_out == first.held_out and first.held_out
    assert "from cache" in second.summary
    assert (path.read_bytes(), os.stat(path).st_mtime_ns) == before
    write_jsonl(path, dialogues(21))  # changed data -> new key
    assert not prepare_data(resolve(config), tokenizer).stats["cached"]
    changed = data_config(tiny_llama, path, packing="none", cache=True)  # changed settings -> new key
    assert not prepare_data(resolve(changed), tokenizer).stats["cached"]


def test_template_placeholders_bom_and_chat_template_errors(tiny_llama: Path, tmp_path: Path) -> None:
    rows = [{"topic": "plans", "dialogue": "A: hi", "summary": "A greets."}]
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(rows[0]).encode() + b"\n")  # UTF-8 byte-order mark
    tokenizer = load_tokenizer(tiny_llama)
    config = data_config(tiny_llama, path, packing="none", eval_fraction=0.0, template="[{topic}] {dialogue} => ")
    prepared = prepare_data(resolve(config), tokenizer)
    assert prepared.stats["skipped"] == 0
    assert render(rows[0], config.data, tokenizer).prompt == "[plans] A: hi => "
    leaky = data_config(tiny_llama, path, packing="none", template="{dialogue} {summary}")  # never the answer
    with pytest.raises(Exception, match=r"all 1 rows are bad: d.jsonl line 1 missing 'summary' \(a placeholder"):
        prepare_data(resolve(leaky), tokenizer)
    strict = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}" + CHAT_TEMPLATE
    chat = write_jsonl(tmp_path / "c.jsonl", CHAT_ROWS * 5)
    prepared = prepare_data(resolve(data_config(tiny_llama, chat, format="chat", packing="none", eval_fraction=0.0,
                                        max_bad_fraction=0.5)), load_tokenizer(tiny_llama, strict))
    assert "skipped 5 of 10 rows: c.jsonl line 1 rejected by the chat template (user first)" in prepared.summary
