"""Interrupted runs lose nothing: SIGKILL + resume is exact, SIGTERM saves, failures keep checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import tiny_run_config
from safetensors.torch import load_file

STEPS = 12


def write_config(tmp_path: Path, model: Path, data: Path, out: Path, **train: object) -> Path:
    settings: dict[str, object] = {"max_steps": STEPS, "save_steps": 2, "eval_steps": 3}
    settings.update(train)
    raw = tiny_run_config(model, data, out, **settings)
    raw["lora"]["dropout"] = 0.1  # dropout draws random numbers: resume must restore the RNG too
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def lorafit(*args: str, **kwargs: object) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "lorafit", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kwargs)


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_sigkill_then_resume_is_bit_identical(tiny_llama: Path, dialogue_file: Path, tmp_path: Path) -> None:
    straight = write_config(tmp_path, tiny_llama, dialogue_file, tmp_path / "straight")
    code, _, err = finish(lorafit("train", str(straight), "--no-progress"))
    assert code == 0, err

    killed = write_config(tmp_path, tiny_llama, dialogue_file, tmp_path / "killed")
    process = lorafit("train", str(killed), "--no-progress")
    wait_for(tmp_path / "killed" / "checkpoints" / "step-0000006" / "trainer_state.json", process)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert not (tmp_path / "killed" / "result.json").exists()

    code, out, err = finish(lorafit("train", str(killed), "--no-progress"))
    assert code == 0, err
    assert "resuming from" in out
    results = [json.loads((tmp_path / name / "result.json").read_text()) for name in ("straight", "killed")]
    for key in ("first_eval_loss", "final_eval_loss", "first_train_loss", "final_train_loss"):
        assert results[1][key] == results[0][key], key  # the whole run's, not the resumed part's

    a = load_file(str(tmp_path / "straight" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].equal(b[key]), key
    timing = ("tokens_per_s", "elapsed_s", "peak_memory_gib")  # measured, not computed: differ per process
    straight_metrics = [{k: v for k, v in r.items() if k not in timing}
                        for r in metrics(tmp_path / "straight") if "event" not in r]
    resumed_metrics = [{k: v for k, v in r.items() if k not in timing}
                       for r in metrics(tmp_path / "killed") if "event" not in r]
    assert resumed_metrics == straight_metrics
    starts = [r for r in metrics(tmp_path / "killed") if r.get("event") == "start"]
    assert [r["resumed"] for r in starts] == [False, True]  # each (re)start is on record


def test_sigterm_saves_a_checkpoint_and_the_rerun_finishes(
    tiny_llama: Path, dialogue_file: Path, tmp_path: Path
) -> None:
    # long enough that SIGTERM arrives mid-run
    config = write_config(tmp_path, tiny_llama, dialogue_file, tmp_path / "run", save_steps=1000, max_steps=400)
    process = lorafit("train", str(config), "--no-progress")
    metrics_file = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics_file.exists() and '"loss"' in metrics_file.read_text()):  # a step has run
        assert process.poll() is None and time.time() < deadline, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    code, out, _ = finish(process)
    assert code == 128 + signal.SIGTERM
    assert "stopped by SIGTERM" in out
    saved = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))
    assert len(saved) == 1
    code, out, err = finish(lorafit("train", str(config), "--no-progress"))
    assert code == 0, err
    assert f"resuming from {saved[0]}" in out
    assert json.loads((tmp_path / "run" / "result.json").read_text())["steps"] == 400


def test_finished_run_is_not_overwritten_without_flag(tiny_llama: Path, dialogue_file: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path, tiny_llama, dialogue_file, tmp_path / "run", max_steps=2)
    assert finish(lorafit("train", str(config), "--no-progress"))[0] == 0
    before = (tmp_path / "run" / "adapter" / "adapter_model.safetensors").read_bytes()
    code, _, err = finish(lorafit("train", str(config), "--no-progress"))
    assert code == 2 and "holds a finished run; pass --overwrite" in err
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").read_bytes() == before
    code, out, err = finish(lorafit("train", str(config), "--no-progress", "--overwrite"))
    assert code == 0, err
    assert list(tmp_path.joinpath("run").glob("checkpoints.old-*")), "earlier checkpoints must be set aside"


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_nonfinite_loss(mode: str, tiny_llama: Path, dialogue_file: Path, tmp_path: Path) -> None:
    # An absurd learning rate blows the adapter up after the first update: the loss turns inf/nan.
    config = write_config(tmp_path, tiny_llama, dialogue_file, tmp_path / "run", lr=1e30,
                          max_grad_norm=None, on_nonfinite=mode, save_steps=1)
    code, out, err = finish(lorafit("train", str(config), "--no-progress"))
    if mode == "stop":
        assert code == 2
        line = err.strip().splitlines()[-1]
        assert line.startswith("error: non-finite loss") and "at step 2" in line
        assert "Traceback" not in err
        kept = tmp_path / "run" / "checkpoints" / "step-0000001"
        assert (kept / "trainer_state.json").exists() and str(kept) in line
    else:  # every step after the first is NaN: skipping stops as soon as the skip budget is spent
        assert code == 2
        line = err.strip().splitlines()[-1]
        assert line.startswith("error: training diverged: ") and "train.max_skipped_fraction" in line
        assert "Traceback" not in err and not (tmp_path / "run" / "result.json").exists()
        assert str(tmp_path / "run" / "checkpoints" / "step-0000001") in line


def test_failed_save_keeps_the_last_good_checkpoint(tiny_llama: Path, dialogue_file: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path, tiny_llama, dialogue_file, tmp_path / "run")
    process = lorafit("train", str(config), "--no-progress")
    wait_for(tmp_path / "run" / "checkpoints" / "step-0000004" / "trainer_state.json", process)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    good = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))[-1]
    before = {p.name: p.read_bytes() for p in good.rglob("*") if p.is_file()}

    def small_disk() -> None:  # files over 20 kB fail with EFBIG, as on a full disk
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    process = lorafit("train", str(config), "--no-progress", preexec_fn=small_disk)
    code, _, err = finish(process)
    assert code == 2, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: could not save checkpoint to") and "last good checkpoint kept" in line
    assert str(good) in line
    assert {p.name: p.read_bytes() for p in good.rglob("*") if p.is_file()} == before
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))
