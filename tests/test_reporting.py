"""Logs that read well anywhere: plain lines in files (the SageMaker regexes), json, quiet, --debug."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import tiny_run_config

from lorafit.config import validate_config
from lorafit.reporting import METRIC_REGEXES, eval_line, resolve_mode, train_line
from lorafit.training import train

STEP_LINE = re.compile(r"^lorafit: step (\d+)/(\d+) loss=(\S+) lr=(\S+) tokens_per_s=(\S+) elapsed=(\d+)s eta=(\d+)s$")
EVAL_LINE = re.compile(r"^lorafit: step (\d+)/(\d+) eval_loss=(\d+\.\d{4})$")


def test_plain_line_format_and_the_sagemaker_regexes() -> None:
    record = {"step": 12, "loss": 1.2345, "lr": 2e-4, "tokens": 999, "tokens_per_s": 1234.5, "elapsed_s": 62.0}
    line = train_line(record, total=60, steps_done=12)
    assert line == "lorafit: step 12/60 loss=1.2345 lr=2.000e-04 tokens_per_s=1234.5 elapsed=62s eta=248s"
    assert eval_line({"step": 12, "eval_loss": 1.2345}, 60) == "lorafit: step 12/60 eval_loss=1.2345"
    found = {name: re.search(regex, line + "\n" + eval_line({"step": 12, "eval_loss": 1.5}, 60))
             for name, regex in METRIC_REGEXES.items()}
    assert {name: float(m.group(1)) for name, m in found.items() if m} == {
        "train:loss": 1.2345, "eval:loss": 1.5, "train:learning_rate": 2e-4, "train:tokens_per_s": 1234.5}
    # a preference objective's reward accuracy and margin, on train and eval lines
    dpo = train_line({**record, "reward_accuracy": 0.75, "reward_margin": 0.125, "logps_chosen": -3.0}, 60, 12)
    assert dpo.startswith("lorafit: step 12/60 loss=1.2345 reward_accuracy=0.7500 reward_margin=0.1250 lr=")
    dpo_eval = eval_line({"step": 12, "eval_loss": 0.5, "eval_reward_accuracy": 0.5, "eval_reward_margin": -0.25}, 60)
    assert dpo_eval == "lorafit: step 12/60 eval_loss=0.5000 eval_reward_accuracy=0.5000 eval_reward_margin=-0.2500"
    found = {name: re.search(regex, dpo + "\n" + dpo_eval) for name, regex in METRIC_REGEXES.items()}
    assert {name: float(m.group(1)) for name, m in found.items()} == {
        "train:loss": 1.2345, "eval:loss": 0.5, "train:learning_rate": 2e-4, "train:tokens_per_s": 1234.5,
        "train:reward_accuracy": 0.75, "train:reward_margin": 0.125, "eval:reward_accuracy": 0.5,
        "eval:reward_margin": -0.25}
    skipped = train_line({**record, "loss": None}, total=60, steps_done=12)
    assert "loss=skipped" in skipped and re.search(METRIC_REGEXES["train:loss"], skipped) is None
    # a resumed run extrapolates from the steps this process ran
    assert train_line({**record, "step": 40, "elapsed_s": 20.0}, 60, steps_done=10).endswith("eta=40s")


def test_auto_mode_follows_the_terminal(tmp_path: Path) -> None:
    class Tty:
        def isatty(self) -> bool:
            return True

    with (tmp_path / "file").open("w") as handle:
        assert resolve_mode("auto", stream=handle) == "plain"
    assert resolve_mode("auto", stream=Tty()) == "bar"
    assert resolve_mode("json", stream=Tty()) == "json"
    assert resolve_mode("json", quiet=True) == "quiet"


def _config(tmp_path: Path, model: Path, data: Path, name: str, **train_settings: object) -> Path:
    raw = tiny_run_config(model, data, tmp_path / name, **train_settings)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def test_train_into_a_file_prints_one_plain_line_per_logging_step(
    tiny_llama: Path, dialogue_file: Path, tmp_path: Path
) -> None:
    config = _config(tmp_path, tiny_llama, dialogue_file, "run", max_steps=7, eval_steps=3, logging_steps=2)
    log, err = tmp_path / "run.log", tmp_path / "run.err"
    with log.open("w") as out, err.open("w") as errors:  # stdout is a file, not a terminal
        done = subprocess.run([sys.executable, "-m", "lorafit", "train", str(config)], stdout=out, stderr=errors,
                              env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    assert done.returncode == 0, err.read_text()[-3000:]
    raw = log.read_bytes()
    assert b"\r" not in raw
    lines = raw.decode().splitlines()
    assert all(line.startswith("lorafit: ") for line in lines), lines
    steps = [STEP_LINE.match(line) for line in lines if STEP_LINE.match(line)]
    assert [int(m.group(1)) for m in steps] == [2, 4, 6, 7]  # every 2nd step, and the last
    assert all(int(m.group(2)) == 7 for m in steps)
    evals = [EVAL_LINE.match(line) for line in lines if EVAL_LINE.match(line)]
    assert [int(m.group(1)) for m in evals] == [0, 3, 6, 7]
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert all(abs(float(m.group(3)) - losses[int(m.group(1))]) < 1e-4 for m in steps)
    assert all(r["peak_memory_gib"] > 0 for r in records if "loss" in r)
    assert err.read_text() == ""  # no library chatter without --debug


def test_debug_shows_library_output(tiny_llama: Path, dialogue_file: Path, tmp_path: Path) -> None:
    config = _config(tmp_path, tiny_llama, dialogue_file, "run", max_steps=1, eval_steps=None)
    done = subprocess.run([sys.executable, "-m", "lorafit", "--debug", "train", str(config)], capture_output=True,
                          text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.strip(), "--debug showed no library warnings or progress"
    assert "lorafit: step 1/1 loss=" in done.stdout


def test_json_format_prints_exactly_the_metrics_records(
    tiny_llama: Path, dialogue_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = tiny_run_config(tiny_llama, dialogue_file, tmp_path / "run", max_steps=4, eval_steps=2)
    train(validate_config(raw), log_format="json")
    captured = capsys.readouterr()
    printed = [json.loads(line) for line in captured.out.splitlines()]
    written = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert printed == written and len(printed) == 1 + 4 + 3  # the start record, 4 steps, 3 evaluations
    assert printed[0]["event"] == "start"
    assert "trainable params" in captured.err  # lorafit's messages go to stderr in json mode


def test_quiet_prints_nothing(tiny_llama: Path, dialogue_file: Path, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    raw = tiny_run_config(tiny_llama, dialogue_file, tmp_path / "run", max_steps=2, eval_steps=None)
    result = train(validate_config(raw), log_format="quiet")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "lorafit" not in captured.err  # (library bars are the CLI's to silence: it does without --debug)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert result.steps == 2 and [r["step"] for r in records if "loss" in r] == [1, 2]


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux /proc only")
def test_peak_memory_is_the_process_own_not_its_parent() -> None:
    """A rank started by a launcher that holds memory (torchrun, a benchmark parent) reports its own
    peak: ``ru_maxrss`` carries the image replaced at exec, VmHWM does not."""
    held = bytearray(600 * 2**20)  # touched pages: the parent's RSS is at least 600 MiB
    held[:: 4096] = b"x" * len(held[:: 4096])
    code = "from lorafit.reporting import peak_memory_gib; print(peak_memory_gib(None))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(out.stdout.strip()) < 0.5, out.stdout  # importing lorafit.reporting holds far less
    del held
