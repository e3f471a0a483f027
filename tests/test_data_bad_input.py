"""Bad rows: each case is counted and named (file + line) in the summary; when all rows, or more
than data.max_bad_fraction of them, are bad the CLI stops with exit code 2 and one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers_data import data_config, dialogues, load_tokenizer, write_config_yaml, write_jsonl

from lorafit.cli import main
from lorafit.data import prepare_data
from lorafit.errors import DataError
from lorafit.resolved import resolve

GOOD = dialogues(1, seed=3)[0]
LONG = {"dialogue": "\n".join([GOOD["dialogue"]] * 8), "summary": GOOD["summary"]}

# case -> (raw line bytes, expected message after "d.jsonl line N ")
CASES = {
    "missing column": (json.dumps({"dialogue": "A: hi"}).encode(), "missing 'summary'"),
    "wrong type": (json.dumps({"dialogue": "A: hi", "summary": 42}).encode(), "'summary' is a number, expected text"),
    "empty response": (json.dumps({"dialogue": "A: hi", "summary": "  "}).encode(), "empty 'summary'"),
    "non-UTF-8": ('{"dialogue": "A: caf\u00e9", "summary": "ok"}'.encode("latin-1"), "not UTF-8"),
    "truncated JSON": (json.dumps(GOOD).encode()[:25], "invalid JSON (truncated?)"),
    # valid JSON (JavaScript-exported, scraped), but "\ud83d" without its pair is no character
    "unpaired surrogate": (b'{"dialogue": "A: \\ud83d hi", "summary": "ok"}',
                           "has an unpaired surrogate escape \\ud83d in 'dialogue'"),
}


def _file(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def _good_lines(n: int) -> list[bytes]:
    return [json.dumps(r).encode() for r in dialogues(n, seed=4)]


@pytest.mark.parametrize("case", list(CASES))
def test_each_bad_row_is_counted_and_named(case: str, tiny_llama: Path, tmp_path: Path) -> None:
    line, message = CASES[case]
    lines = _good_lines(29)
    lines.insert(16, line)  # line 17
    path = _file(tmp_path / "d.jsonl", lines)
    prepared = prepare_data(resolve(data_config(tiny_llama, path, packing="none", eval_fraction=0.0)),
                            load_tokenizer(tiny_llama))
    assert f"skipped 1 of 30 rows: d.jsonl line 17 {message}" in prepared.summary
    assert prepared.stats["skipped"] == 1 and len(prepared.train) == 29


@pytest.mark.parametrize("case", list(CASES))
def test_all_rows_bad_stops_with_exit_code_2(case: str, tiny_llama: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    line, message = CASES[case]
    path = _file(tmp_path / "d.jsonl", [line] * 3)
    config = write_config_yaml(tmp_path / "c.yaml", data_config(tiny_llama, path))
    assert main(["data", "inspect", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err == (f"error: data.path: all 3 rows are bad: d.jsonl line 1 {message}, d.jsonl line 2 {message}, "
                   f"d.jsonl line 3 {message}")


def test_too_many_bad_rows_stops_before_the_model(tiny_llama: Path, tmp_path: Path) -> None:
    lines = _good_lines(16)
    for at, (line, _) in zip((2, 5, 9), list(CASES.values())[:3], strict=True):
        lines.insert(at, line)
    path = _file(tmp_path / "d.jsonl", lines)
    tokenizer = load_tokenizer(tiny_llama)
    with pytest.raises(DataError) as caught:
        prepare_data(resolve(data_config(tiny_llama, path)), tokenizer)
    assert str(caught.value) == (
        "data.path: 3 of 19 rows are bad (16% > data.max_bad_fraction 0.1): d.jsonl line 3 missing 'summary', "
        "d.jsonl line 6 'summary' is a number, expected text, d.jsonl line 10 empty 'summary'"
    )
    relaxed = prepare_data(resolve(data_config(tiny_llama, path, max_bad_fraction=0.2)), tokenizer)
    assert "skipped 3 of 19 rows: d.jsonl line 3 missing 'summary'" in relaxed.summary


def test_cli_subprocess_exit_code_and_one_line(tiny_llama: Path, tmp_path: Path) -> None:
    path = _file(tmp_path / "d.jsonl", [CASES["missing column"][0]] * 2)
    config = write_config_yaml(tmp_path / "c.yaml", data_config(tiny_llama, path))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    done = subprocess.run([sys.executable, "-m", "lorafit", "data", "inspect", str(config)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == ("error: data.path: all 2 rows are bad: d.jsonl line 1 missing 'summary', "
                                   "d.jsonl line 2 missing 'summary'")


def test_overlong_rows_truncated_or_dropped(tiny_llama: Path, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", dialogues(9, seed=4) + [LONG])
    tokenizer = load_tokenizer(tiny_llama)
    long_tokens = len(tokenizer(LONG["dialogue"])["input_ids"])
    seq_len = 400
    assert long_tokens > seq_len
    truncated = prepare_data(resolve(data_config(tiny_llama, path, packing="none", eval_fraction=0.0, seq_len=seq_len)),
                             tokenizer)
    # the over-long dialogue leaves no room for its summary: nothing to learn, so it is dropped and said so
    assert "dropped 1 rows over seq_len 400 (d.jsonl line 10 has no response within 400 tokens)" in truncated.summary
    dropped = prepare_data(resolve(data_config(tiny_llama, path, packing="none", eval_fraction=0.0, seq_len=seq_len,
                                       overlong="drop")), tokenizer)
    assert "dropped 1 rows over seq_len 400 (d.jsonl line 10 has " in dropped.summary
    assert len(dropped.train) == 9 and all(len(r["input_ids"]) <= seq_len for r in dropped.train)

    shorter = prepare_data(resolve(data_config(tiny_llama, path, packing="packed", eval_fraction=0.0, seq_len=180)), tokenizer)
    assert shorter.stats["truncated"] >= 1
    assert f"truncated {shorter.stats['truncated']} rows over seq_len 180 (d.jsonl line " in shorter.summary
    assert all(len(r["input_ids"]) <= 180 for r in shorter.train)

    only_long = write_jsonl(tmp_path / "long.jsonl", [LONG, LONG])
    config = write_config_yaml(tmp_path / "c.yaml", data_config(tiny_llama, only_long, seq_len=seq_len,
                                                                overlong="drop"))
    assert main(["data", "inspect", str(config)]) == 2


def test_file_level_problems_name_the_file(tiny_llama: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    cases = {
        "missing.jsonl": None,
        "broken.json": b'[{"dialogue": "A: hi", "summary": "x"},\n {"dialogue": ',
        "latin.csv": "dialogue,summary\nA: caf\u00e9,ok\nB: na\u00efve,ok\n".encode("latin-1"),
        "data.txt": b"hello\n",
    }
    expected = {
        "missing.jsonl": "error: data.path: '{p}' not found",
        "broken.json": "error: {p}: line 2 invalid JSON (Expecting value)",
        "latin.csv": "error: data.path: all 2 rows are bad: latin.csv line 2 not UTF-8, latin.csv line 3 not UTF-8",
        "data.txt": "error: data.path: '{p}' has an unsupported extension (use .jsonl, .json, .csv or .parquet)",
    }
    for name, content in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        config = write_config_yaml(tmp_path / "c.yaml", data_config(tiny_llama, path))
        assert main(["data", "inspect", str(config)]) == 2, name
        assert capsys.readouterr().err.strip() == expected[name].format(p=path)


def test_inspect_shows_masked_and_trained_text(tiny_llama: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    rows = dialogues(10, seed=4)
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    config = write_config_yaml(tmp_path / "c.yaml", data_config(tiny_llama, path, packing="packed"))
    assert main(["data", "inspect", str(config), "--set", "train.seq_len=512", "-n", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("data format: summarization (auto, from columns dialogue, summary; 10 of 10 rows)\n"
                          "rows per shape: summarization 10\ndata: 10 rows -> 9 train / 1 eval samples")
    for key in ("p50", "p95", "max", "total tokens", "efficiency"):
        assert key in out
    assert out.count("--- example") == 2
    assert "\x1b[" not in out  # not a terminal: plain text
    summaries = {r["summary"] for r in rows}
    shown = [line for line in out.splitlines() if line.startswith("]]")]
    assert len(shown) == 2
    for line in shown:  # the masked prompt closes with ']]', then the trained summary + EOS
        assert line[2:].removesuffix("<|endoftext|>") in summaries
    assert out.count("[[Summarize the chat dialogue:") == 2


def test_unknown_hub_name_offline_is_one_line(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError) as caught:
        prepare_data(resolve(data_config(tiny_llama, "someuser/no-such-dataset")), load_tokenizer(tiny_llama))
    message = str(caught.value)
    assert message.startswith("data.path: 'someuser/no-such-dataset' split 'train': not a local file and could not "
                              "be loaded (")
    assert "\n" not in message
