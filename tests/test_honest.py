"""A run reports what happened: eval scores exactly the held-out rows, resume checks the config,
eval loads the base as trained, skipping non-finite steps has limits, and the run is on record."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_run_config, write_jsonl

from lorafit.config import validate_config
from lorafit.errors import ConfigError, LorafitError
from lorafit.training import LoraFinetuneRecipe, train


def _rows(n_short: int, n_long: int) -> list[dict]:
    from lorafit.builtin.dialogues import generate

    rows = [{"dialogue": r["dialogue"], "summary": r["summary"]} for r in generate(n_short + n_long, 3)]
    for row in rows[::max(1, (n_short + n_long) // n_long)][:n_long]:  # spread over the file
        row["dialogue"] = (row["dialogue"] + "\n") * 8  # far over seq_len
    return rows


def _config(model: Path, data: Path, out: Path, **train_settings: object) -> dict:
    settings = {"max_steps": 3, "eval_steps": None, "seq_len": 400, "batch_size": 2}
    settings.update(train_settings)
    raw = tiny_run_config(model, data, out, **settings)
    raw["data"].update({"eval_fraction": 0.2, "packing": "none"})
    return raw


def test_eval_scores_exactly_the_rows_training_held_out(tiny_llama: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """60 rows, 15 far too long and dropped: the held-out rows are drawn after dropping, kept with
    their identity, disjoint from what trained, and are what `lorafit eval RUN` scores."""
    from lorafit.cli import main
    from lorafit.data import prepare_data
    from lorafit.data.prepare import row_hash
    from lorafit.modeling import load_tokenizer
    from lorafit.resolved import resolve

    data = write_jsonl(tmp_path / "rows.jsonl", _rows(45, 15))
    raw = _config(tiny_llama, data, tmp_path / "run")
    raw["data"]["overlong"] = "drop"
    train(validate_config(raw), progress=False)

    kept = [json.loads(line) for line in (tmp_path / "run" / "heldout.jsonl").read_text().splitlines()]
    assert len(kept) == 9  # 20% of the 45 usable rows
    lines = data.read_text().splitlines()
    for record in kept:
        assert record["source"] == str(data) and record["where"].startswith("line ")
        number = int(record["where"].split()[1])
        assert json.loads(lines[number - 1]) == record["row"] and record["sha256"] == row_hash(record["row"])
        assert len(record["row"]["dialogue"]) < 1000  # never a dropped (over-long) row

    run = resolve(validate_config(raw))
    prepared = prepare_data(run, load_tokenizer(run))
    assert [r["sha256"] for r in prepared.held_out] == [r["sha256"] for r in kept]
    trained = {tuple(r["input_ids"]) for r in prepared.train}
    held = {tuple(r["input_ids"]) for r in prepared.eval}
    assert len(trained) == 36 and len(held) == 9 and not trained & held

    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--json", "--max-new-tokens", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["meta"]["rows"] == 9 and result["meta"]["data"].startswith("held-out rows of the run: 9 rows")
    assert "rows.jsonl" in result["meta"]["data"]

    # a damaged held-out file: one line naming the file and the line
    held_out = tmp_path / "run" / "heldout.jsonl"
    held_out.write_text(held_out.read_text() + '{"source": "x"}\n')
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {held_out}:10: not a held-out record") and err.count("\n") == 1, err


def test_resume_with_a_changed_config_refuses_then_records(tiny_llama: Path, dialogue_file: Path,
                                                           tmp_path: Path) -> None:
    raw = _config(tiny_llama, dialogue_file, tmp_path / "run", max_steps=4, save_steps=2)
    recipe = LoraFinetuneRecipe(validate_config(raw), progress=False)
    recipe.setup()
    recipe.max_steps = 2  # stop after the checkpoint at step 2, as an interrupted run would
    recipe.fit()
    recipe.close()  # let go of the run folder, as an interrupted run's process would
    assert (tmp_path / "run" / "checkpoints" / "step-0000002").exists()

    changed = json.loads(json.dumps(raw))
    changed["train"]["lr"] = 1e-3
    changed["train"]["batch_size"] = 4
    changed["train"]["eval_steps"] = 1  # cadence: allowed to differ
    path = tmp_path / "changed.yaml"
    path.write_text(yaml.safe_dump(changed), encoding="utf-8")
    process = subprocess.run([sys.executable, "-m", "lorafit", "train", str(path), "--no-progress"],
                             capture_output=True, text=True, timeout=600)
    assert process.returncode == 2
    line = process.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and "train.batch_size: 2 -> 4" in line and "train.lr: 0.005 -> 0.001" in line
    assert "eval_steps" not in line and "--resume-anyway" in line
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]["lr"] == 0.005  # untouched

    with pytest.raises(ConfigError):
        train(validate_config(changed), progress=False)
    result = train(validate_config(changed), progress=False, resume_anyway=True)
    assert result.steps == 4 and result.resumed_from
    history = [json.loads(line) for line in (tmp_path / "run" / "config-history.jsonl").read_text().splitlines()]
    assert history[0]["step"] == 2 and history[0]["changed"]["train.lr"] == {"old": 0.005, "new": 0.001}
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(e.get("event") == "config_changed" and "train.batch_size" in e["changed"] for e in events)
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]["lr"] == 0.001


def test_eval_and_generate_load_the_base_as_the_run_trained_it(tiny_llama: Path, dialogue_file: Path,
                                                               tmp_path: Path) -> None:
    from lorafit.adapters import AdapterSession

    raw = _config(tiny_llama, dialogue_file, tmp_path / "run", max_steps=1)
    raw["model"]["quantization"] = "nf4"
    train(validate_config(raw), progress=False)
    session = AdapterSession.open(tmp_path / "run", device=torch.device("cpu"))
    assert session.run.quantization == "nf4"
    assert any(type(m).__name__ == "Linear4bit" for m in session.model.modules())
    assert "quantization nf4" in session.describe_base() and "as the run trained it" in session.describe_base()
    plain = AdapterSession.open(tmp_path / "run", quantization="none", device=torch.device("cpu"))
    assert not any(type(m).__name__ == "Linear4bit" for m in plain.model.modules())
    assert "the run trained with quantization nf4" in plain.describe_base()


def test_skipped_steps_are_not_steps_and_are_bounded(tiny_llama: Path, dialogue_file: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Micro-batches 3 and 4 give a NaN loss (one step with grad_accum 2): that step is skipped,
    changes nothing, and does not count; a run that keeps producing NaN stops with one line."""
    from lorafit import objectives

    real = objectives.compute_loss
    calls = {"n": 0}

    def nan_on(bad: set[int]):
        def compute(*args, **kwargs):
            loss, n = real(*args, **kwargs)
            if torch.is_grad_enabled():
                calls["n"] += 1
                if calls["n"] in bad or "all" in bad:
                    loss = loss * float("nan")
            return loss, n
        return compute

    monkeypatch.setattr(objectives, "compute_loss", nan_on({3, 4}))
    raw = _config(tiny_llama, dialogue_file, tmp_path / "run", max_steps=4, grad_accum=2, on_nonfinite="skip")
    recipe = LoraFinetuneRecipe(validate_config(raw), progress=False)
    recipe.setup()
    recipe.fit()
    result = recipe.finish()
    assert result.steps == 4 and result.skipped_nonfinite == 1
    assert recipe.scheduler.last_epoch == 4  # the skipped step did not move the schedule
    assert recipe.state.micro_batches_done == 10  # its data was consumed
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    assert saved["skipped_nonfinite"] == 1
    losses = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in losses if r.get("loss") is not None] == [1, 2, 3, 4]
    assert sum(1 for r in losses if "loss" in r and r["loss"] is None) == 1

    calls["n"] = 0
    monkeypatch.setattr(objectives, "compute_loss", nan_on({"all"}))
    raw = _config(tiny_llama, dialogue_file, tmp_path / "diverged", max_steps=50, on_nonfinite="skip")
    with pytest.raises(LorafitError, match=r"training diverged: 5 non-finite steps in a row"):
        train(validate_config(raw), progress=False)
    assert not (tmp_path / "diverged" / "result.json").exists()
    assert not (tmp_path / "diverged" / "adapter").exists()


def test_the_run_is_on_record(tiny_llama: Path, dialogue_file: Path, tmp_path: Path) -> None:
    raw = _config(tiny_llama, dialogue_file, tmp_path / "run", max_steps=1)
    result = train(validate_config(raw), progress=False)
    saved = json.loads((tmp_path / "run" / "result.json").read_text())
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert saved["run"] == run == result.run
    for key in ("torch", "transformers", "peft", "bitsandbytes", "lorafit"):
        assert run["versions"][key]
    assert run["precision"] == {"weights": "float32", "compute": "float32"}
    assert run["environment"]["device_kind"] == "cpu" and run["seed"] == 0
    assert run["data_files"][str(dialogue_file)] and len(run["data_files"][str(dialogue_file)]) == 64
    assert run["packing"] == "none" and run["loss"] == "chunked" and "fused" in run
    start = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert start["event"] == "start" and start["versions"] == run["versions"]
    assert math.isfinite(result.final_train_loss)


def test_unwritable_output_dir_fails_before_anything_loads(tmp_path: Path) -> None:
    process = subprocess.run([sys.executable, "-m", "lorafit", "train", "--set", "output_dir=/proc/x"],
                             capture_output=True, text=True, timeout=120)
    assert process.returncode == 2 and "Traceback" not in process.stderr
    assert process.stderr.strip() == "error: output_dir: cannot create /proc/x (No such file or directory)" \
        or process.stderr.startswith("error: output_dir: ")
    assert "lorafit: model:" not in process.stdout  # failed before resolving or loading anything


def test_a_bad_set_value_is_blamed_on_the_set(tmp_path: Path) -> None:
    process = subprocess.run([sys.executable, "-m", "lorafit", "train", "--set", "train.lr=abc"],
                             capture_output=True, text=True, timeout=120)
    assert process.returncode == 2
    assert process.stderr.startswith("error: --set train.lr=abc: train.lr: ")
    assert "default.yaml" not in process.stderr and process.stderr.count("\n") == 1
