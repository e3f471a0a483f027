"""Every accepted row shape, from every kind of source, found by ``data.format: auto``; the
embedded default and samsum-shaped data detect as summarization with unchanged rows; ambiguous,
unknown and mixed shapes are one line or bad rows by line."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
from helpers_data import (
    CHAT_TEMPLATE,
    data_config,
    dialogues,
    load_tokenizer,
    write_config_yaml,
    write_jsonl,
)

from lorafit.cli import main
from lorafit.config import LorafitConfig
from lorafit.data import prepare_data
from lorafit.data.detect import choose_format
from lorafit.data.formats import FORMATS
from lorafit.data.packing import split_packed
from lorafit.errors import ConfigError, DataError
from lorafit.resolved import resolve

END = "<|pad|>"  # CHAT_TEMPLATE ends each turn with it
EOS = "<|endoftext|>"

SHAPES: dict[str, list[dict[str, Any]]] = {
    "summarization": [{"id": f"s{i}", "dialogue": f"Anna: cinema at {i}?\nTom: sure", "summary": f"Cinema at {i}."}
                      for i in range(5, 8)],
    # alpaca as published carries a 'text' column too: still instruction
    "instruction": [{"instruction": "Add the numbers.", "input": f"2 and {i}", "output": f"{2 + i}",
                     "text": f"Add 2 and {i}: {2 + i}"} for i in range(3)],
    "chat": [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Hi {i}"},
                           {"role": "assistant", "content": "Hello", "train": False},
                           {"role": "user", "content": "Cinema?"}, {"role": "assistant", "content": f"Sure {i}"}]}
             for i in range(3)],
    "sharegpt": [{"conversations": [{"from": "human", "value": f"Hi {i}"}, {"from": "gpt", "value": f"Hello {i}"}],
                  "system": "Be brief."} for i in range(3)],
    "prompt_completion": [{"prompt": f"Count to {i}:", "completion": " ".join(str(n) for n in range(i + 1))}
                          for i in range(1, 4)],
    "prompt_completion_chat": [{"prompt": [{"role": "user", "content": f"Count to {i}"}],
                                "completion": [{"role": "assistant", "content": str(i)}]} for i in range(1, 4)],
    "text": [{"text": f"Anna and Tom go to the cinema at {i}."} for i in range(3)],
}


def _trained(row: dict[str, Any], fmt: str) -> str:
    """What training must learn from ``row``: the response and its end."""
    if fmt == "summarization":
        return row["summary"] + EOS
    if fmt == "instruction":
        return row["output"] + EOS
    if fmt == "prompt_completion":
        return row["completion"] + EOS
    if fmt == "text":
        return row["text"] + EOS
    if fmt == "chat":
        return "".join(m["content"] + END for m in row["messages"] if m["role"] == "assistant" and m.get("train", True))
    if fmt == "sharegpt":
        return "".join(m["value"] + END for m in row["conversations"] if m["from"] == "gpt")
    return "".join(m["content"] + END for m in row["completion"])


def _write(kind: str, rows: list[dict[str, Any]], folder: Path) -> dict[str, Any]:
    """``rows`` as a ``kind`` source; returns the data settings that read them."""
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "jsonl":
        return {"path": str(write_jsonl(folder / "d.jsonl", rows))}
    if kind == "json":
        (folder / "d.json").write_text(json.dumps({"data": rows}), encoding="utf-8")
        return {"path": str(folder / "d.json")}
    if kind == "csv":
        with (folder / "d.csv").open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        return {"path": str(folder / "d.csv")}
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), folder / "d.parquet")
        return {"path": str(folder / "d.parquet")}
    from datasets import Dataset, DatasetDict

    if kind == "save_to_disk":
        DatasetDict({"train": Dataset.from_list(rows)}).save_to_disk(str(folder / "saved"))
        return {"path": str(folder / "saved")}
    # a data-set repository as the hub keeps it (what `hf download --repo-type dataset` writes):
    # read with datasets.load_dataset(path, subset, split) exactly as a hub name is
    repo = folder / "repo"
    for subset, split, part in (("main", "train", rows), ("main", "test", rows[:1]), ("other", "train", rows[:1])):
        (repo / subset).mkdir(parents=True, exist_ok=True)
        write_jsonl(repo / subset / f"{split}.jsonl", part)
    (repo / "README.md").write_text(
        "---\nconfigs:\n"
        "- config_name: main\n  data_files:\n  - split: train\n    path: main/train.jsonl\n"
        "  - split: test\n    path: main/test.jsonl\n"
        "- config_name: other\n  data_files:\n  - split: train\n    path: other/train.jsonl\n---\n", encoding="utf-8")
    return {"path": str(repo), "subset": "main", "split": "train"}


KINDS = ["jsonl", "json", "csv", "parquet", "save_to_disk", "repository"]
TEXT_ONLY = {"summarization", "instruction", "prompt_completion", "text"}  # CSV holds text, not message lists


@pytest.mark.parametrize("fmt", list(SHAPES))
def test_every_shape_is_detected_from_every_source(fmt: str, tiny_llama: Path, tmp_path: Path) -> None:
    tokenizer = load_tokenizer(tiny_llama, CHAT_TEMPLATE)
    rows = SHAPES[fmt]
    for kind in KINDS:
        if kind == "csv" and fmt not in TEXT_ONLY:
            continue
        settings = _write(kind, rows, tmp_path / kind)
        prepared = prepare_data(resolve(data_config(tiny_llama, settings.pop("path"), packing="none",
                                                    eval_fraction=0.0, **settings)), tokenizer)
        assert prepared.detection["format"] == fmt and prepared.detection["detected"], kind
        assert prepared.detection["counts"] == {fmt: len(rows)}, kind
        assert prepared.format_line.startswith(f"data format: {fmt} (auto, from column"), kind
        assert set(prepared.detection["columns"]) >= set(FORMATS[fmt].required)
        assert prepared.template["format"] == fmt and prepared.template["append_eos"] == (not FORMATS[fmt].chat)
        assert prepared.stats["skipped"] == 0, (kind, prepared.summary)
        trained = sorted(tokenizer.decode([t for t in r["labels"] if t != -100]) for r in prepared.train)
        assert trained == sorted(_trained(r, fmt) for r in rows), kind


def test_repository_subset_and_split_pick_the_rows(tiny_llama: Path, tmp_path: Path) -> None:
    settings = _write("repository", SHAPES["text"], tmp_path)
    tokenizer = load_tokenizer(tiny_llama)
    for subset, split, count in (("main", "train", 3), ("main", "test", 1), ("other", "train", 1)):
        config = data_config(tiny_llama, settings["path"], subset=subset, split=split, packing="none", eval_fraction=0.0)
        assert prepare_data(resolve(config), tokenizer).stats["rows"] == count
    config = data_config(tiny_llama, settings["path"], subset="missing", eval_fraction=0.0)
    with pytest.raises(DataError, match=r"^data.path: '.*repo' subset 'missing' split 'train': a data-set folder that "
                                         r"could not be loaded \("):
        prepare_data(resolve(config), tokenizer)


def test_hub_name_offline_is_one_line_naming_subset_and_split(tiny_llama: Path) -> None:
    config = data_config(tiny_llama, "lorafit-test/no-such-data", subset="chat", split="validation")
    with pytest.raises(DataError, match=r"^data.path: 'lorafit-test/no-such-data' subset 'chat' split 'validation': "
                                         r"not a local file and could not be loaded \(") as caught:
        prepare_data(resolve(config), load_tokenizer(tiny_llama))
    assert "\n" not in str(caught.value)


def test_embedded_default_and_samsum_detect_as_summarization_with_the_same_rows(tiny_llama: Path,
                                                                                tmp_path: Path) -> None:
    """The default config leaves data.format to auto; builtin dialogues and samsum-shaped files
    (id, dialogue, summary) come out exactly as with format summarization, so runs do not change."""
    assert LorafitConfig().data.format == "auto"
    from lorafit.config import load_config

    assert load_config(None, []).data.format == "auto"  # the embedded default's own config
    tokenizer = load_tokenizer(tiny_llama)
    samsum = write_jsonl(tmp_path / "samsum.jsonl", [{"id": str(i), **r} for i, r in enumerate(dialogues(40))])
    for path in ("builtin:dialogues-test", samsum):
        auto = prepare_data(resolve(data_config(tiny_llama, path, max_eval_rows=32)), tokenizer)
        named = prepare_data(resolve(data_config(tiny_llama, path, max_eval_rows=32, format="summarization")),
                             tokenizer)
        assert auto.detection["format"] == "summarization" and auto.detection["detected"]
        assert named.detection["format"] == "summarization" and not named.detection["detected"]
        assert (auto.train, auto.eval, auto.held_out) == (named.train, named.eval, named.held_out)
        assert auto.summary == named.summary


def test_mixed_shapes_in_one_file_are_bad_rows_by_line(tiny_llama: Path, tmp_path: Path) -> None:
    rows: list[dict[str, Any]] = SHAPES["chat"] * 6 + [SHAPES["sharegpt"][0]] + SHAPES["chat"] * 3
    rows.insert(5, SHAPES["summarization"][0])
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    prepared = prepare_data(resolve(data_config(tiny_llama, path, packing="none", eval_fraction=0.0,
                                                max_bad_fraction=0.2)), load_tokenizer(tiny_llama, CHAT_TEMPLATE))
    assert prepared.detection["counts"] == {"chat": 27, "summarization": 1, "sharegpt": 1}
    assert prepared.format_line == ("data format: chat (auto, from column messages; 27 of 29 rows; other shapes: "
                                    "summarization 1, sharegpt 1)")
    assert ("skipped 2 of 29 rows: mixed.jsonl line 6 looks like a summarization row (dialogue, summary), but the "
            "data is chat (messages), mixed.jsonl line 20 looks like a sharegpt row (conversations, [system]), but "
            "the data is chat (messages)") in prepared.summary


def test_named_format_on_other_shaped_rows_says_what_they_look_like(tiny_llama: Path, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "share.jsonl", SHAPES["sharegpt"])
    with pytest.raises(DataError, match=r"all 3 rows are bad: share.jsonl line 1 looks like a sharegpt row "
                                        r"\(conversations, \[system\]\), but the data is summarization"):
        prepare_data(resolve(data_config(tiny_llama, path, format="summarization")), load_tokenizer(tiny_llama))


def _cli_error(tiny_llama: Path, tmp_path: Path, rows: list[dict[str, Any]], capsys: pytest.CaptureFixture[str],
               **settings: Any) -> str:
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    config = write_config_yaml(tmp_path / "c.yaml", data_config(tiny_llama, path, **settings))
    assert main(["data", "inspect", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    return err


def test_ambiguous_and_unknown_shapes_are_one_line(tiny_llama: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    both = [{"prompt": "Hi", "completion": "Hello", "dialogue": "A: hi", "summary": "A greets."}] * 3
    assert _cli_error(tiny_llama, tmp_path, both, capsys) == (
        "error: data.format: auto cannot choose for d.jsonl: its rows (columns: prompt, completion, dialogue, "
        "summary) fit summarization (dialogue, summary), prompt_completion (prompt, completion) equally well; "
        "set data.format")
    unknown = _cli_error(tiny_llama, tmp_path, [{"question": "Hi", "answer": "Hello"}] * 3, capsys)
    assert unknown.startswith("error: data.format: auto found no known shape in d.jsonl (columns: question, answer); "
                              "formats: summarization (dialogue, summary); instruction (instruction, output, [input]); "
                              "chat (messages); sharegpt (conversations, [system]);")
    assert unknown.endswith("; set data.format and data.columns")
    # mapped columns make the same rows a known shape
    mapped = data_config(tiny_llama, tmp_path / "d.jsonl", columns={"prompt": "question", "completion": "answer"})
    assert choose_format([{"question": "Hi", "answer": "Hello"}], mapped.data).format == "prompt_completion"


def test_settings_the_format_does_not_use_are_refused(tiny_llama: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    err = _cli_error(tiny_llama, tmp_path, SHAPES["chat"], capsys, template="Q: {dialogue}\nA: ")
    assert err == ("error: data.template: the chat format does not use a prompt template (only summarization, "
                   "instruction, preference do); it renders through the tokenizer's chat template")
    with pytest.raises(ConfigError, match=r"data.format: unknown format; use auto or one of "
                                          r"summarization, instruction, chat, sharegpt.*\(got 'alpaca'\)"):
        data_config(tiny_llama, tmp_path / "d.jsonl", format="alpaca")


def test_data_inspect_shows_format_counts_and_trained_spans(tiny_llama: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    path = write_jsonl(tmp_path / "share.jsonl", SHAPES["sharegpt"] * 3 + [SHAPES["chat"][0]])
    config = data_config(tiny_llama, path, packing="none", eval_fraction=0.0, max_bad_fraction=0.2)
    yaml_path = write_config_yaml(tmp_path / "c.yaml", config)
    # the tiny model's own tokenizer has no chat template: lorafit's fallback renders the turns
    assert main(["data", "inspect", str(yaml_path), "-n", "1", "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert "data format: sharegpt (auto, from columns conversations, system; 9 of 10 rows; other shapes: chat 1)" in out
    assert "rows per shape: sharegpt 9, chat 1" in out
    assert f"chat template: lorafit fallback (assistant turns end with {EOS})" in out
    assert f"[[### System:\nBe brief.\n\n### User:\nHi 0\n\n### Assistant:\n]]Hello 0{EOS}" in out


def test_packed_rows_keep_chat_masks(tiny_llama: Path, tmp_path: Path) -> None:
    """Packing joins samples; each keeps its own mask (first label of a sample masked, nothing else changes)."""
    path = write_jsonl(tmp_path / "c.jsonl", SHAPES["chat"] * 4)
    tokenizer = load_tokenizer(tiny_llama, CHAT_TEMPLATE)
    alone = prepare_data(resolve(data_config(tiny_llama, path, packing="none", eval_fraction=0.0)), tokenizer)
    packed = prepare_data(resolve(data_config(tiny_llama, path, packing="packed", eval_fraction=0.0)), tokenizer)
    samples = sorted((row["input_ids"][a:b], row["labels"][a:b]) for row in packed.train for a, b in split_packed(row))
    assert samples == sorted((r["input_ids"], r["labels"]) for r in alone.train)


def test_docs_show_every_registered_format_with_a_row_that_is_that_format(tiny_llama: Path) -> None:
    """docs/data.md's table has one row per registered format, and that row is the registry's
    example: detected as the format and rendered without a problem."""
    from lorafit.data.detect import row_formats
    from lorafit.data.formats import segments

    doc = (Path(__file__).parents[1] / "docs" / "data.md").read_text(encoding="utf-8")
    tokenizer = load_tokenizer(tiny_llama, CHAT_TEMPLATE)
    auto = LorafitConfig().data
    for name, fmt in FORMATS.items():
        line = next((x for x in doc.splitlines() if x.startswith(f"| `{name}` |")), None)
        assert line is not None, name
        assert f"`{json.dumps(fmt.example)}`" in line, name
        assert row_formats(fmt.example, auto) == [name]
        assert any(part.trained for part in segments(fmt.example, auto, tokenizer))
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    assert "docs/data.md" in readme and "| `data.format` | `auto` |" in readme
