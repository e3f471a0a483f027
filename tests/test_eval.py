"""lorafit eval: ROUGE as 0..100, perplexity consistent with training's eval loss, --json, --baseline."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from helpers_adapters import peft_adapter, train_tiny_run

from lorafit.cli import main
from lorafit.evaluation import rouge_scores, split_sentences


@pytest.fixture(scope="module")
def run(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lorafit.builtin.dialogues import generate

    root = tmp_path_factory.mktemp("eval-run")
    data = root / "dialogues.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in generate(64, 11)), encoding="utf-8")
    return train_tiny_run(tiny_llama, data, root / "run")


def test_rouge_bounds_and_lsum_sentences() -> None:
    same = rouge_scores(["Anna will meet Tom at 7 pm."], ["Anna will meet Tom at 7 pm."])
    assert same == {"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0, "rougeLsum": 100.0}
    none = rouge_scores(["completely unrelated words"], ["Anna will meet Tom."])
    assert none["rouge1"] == 0.0
    assert split_sentences("Anna is late. Tom waits! OK?") == "Anna is late.\nTom waits!\nOK?"
    # swapped sentences: rougeL (one sequence) drops, rougeLsum (per sentence) stays at 100
    swapped = rouge_scores(["Tom waits at home. Anna is late again."], ["Anna is late again. Tom waits at home."])
    assert swapped["rougeLsum"] == 100.0 and swapped["rougeL"] < 100.0


def test_eval_json_with_baseline(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", str(run), "--json", "--baseline", "--max-new-tokens", "12"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)  # stdout is exactly one JSON object
    for key in ("adapter", "baseline"):
        metrics = result[key]
        assert set(metrics) == {"rouge1", "rouge2", "rougeL", "rougeLsum", "perplexity"}
        assert all(0.0 <= metrics[k] <= 100.0 for k in ("rouge1", "rouge2", "rougeL", "rougeLsum"))
        assert metrics["perplexity"] > 1.0
    assert result["adapter"]["perplexity"] < result["baseline"]["perplexity"]  # training helped
    assert json.loads((run / "eval.json").read_text())["adapter"] == result["adapter"]
    # the held-out rows are the ones training evaluated on: perplexity = exp(final eval loss)
    final = json.loads((run / "result.json").read_text())["final_eval_loss"]
    assert math.log(result["adapter"]["perplexity"]) == pytest.approx(final, abs=2e-3)


def test_eval_with_data_file_limit_and_two_adapters(run: Path, tiny_llama: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from lorafit.builtin.dialogues import generate

    other = peft_adapter(tiny_llama, tmp_path / "peft-made", seed=4)
    assert main(["eval", str(other)]) == 2  # a bare adapter has no run config saying what data to use
    assert "name the data to score" in capsys.readouterr().err

    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in generate(10, 99)), encoding="utf-8")
    out = tmp_path / "scores.json"
    assert main(["eval", str(run / "adapter"), "--data", str(data), "--limit", "3", "--max-new-tokens", "4",
                 "--adapter", str(other), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "scoring 3 rows" in printed and "rougeL" in printed
    saved = json.loads(out.read_text())
    assert saved["meta"]["rows"] == 3 and "baseline" not in saved
    assert set(saved["adapters"]) == {"default", "peft-made"} and saved["adapter"] == saved["adapters"]["default"]
    assert saved["adapters"]["default"]["perplexity"] != saved["adapters"]["peft-made"]["perplexity"]
    assert not (run / "adapter" / "eval.json").exists()


def test_eval_text_data_reports_perplexity_only(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": f"Anna meets Tom at {h} pm."}) + "\n" for h in range(1, 6)))
    assert main(["eval", str(run), "--data", str(data), "--format", "text", "--json", "--output",
                 str(tmp_path / "e.json")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["adapter"]) == {"perplexity"} and result["adapter"]["perplexity"] > 1.0


def test_eval_bad_data_is_one_line(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", str(run), "--data", str(tmp_path / "missing.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --data: ") and "not found" in err and err.count("\n") == 1
