"""Stop when asked, save what was done: real signals (``os.kill``) at exact points of real runs.

The child (``helpers_faults``) sends the signal to itself at the start of step 3, so it arrives
while that step's forward and backward are still to run: the run must stop after step 3, not
run step 4 (the stop vote used to be taken before each step). A second signal during a save must
not cut the save short.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest
import yaml
from conftest import tiny_run_config
from helpers_faults import child, finish

from lorafit.checkpoint import checkpoint_problem, list_checkpoints


def write_config(tmp_path: Path, model: Path, data: Path, out: Path, **train: object) -> Path:
    raw = tiny_run_config(model, data, out, **{"max_steps": 8, "eval_steps": None, **train})
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def steps_logged(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if json.loads(line).get("loss") is not None]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_a_step_stops_after_that_step(signum: int, tiny_llama: Path, dialogue_file: Path,
                                                      tmp_path: Path) -> None:
    name = signal.Signals(signum).name
    out = tmp_path / "run"
    code, stdout, err = finish(child(f"{name.lower()}-in-step-3", "train",
                                     str(write_config(tmp_path, tiny_llama, dialogue_file, out)), "--no-progress"))
    assert code == 128 + signum, err
    assert f"stopped by {name} at step 3 of 8" in stdout
    assert steps_logged(out) == [1, 2, 3]
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-0000003"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_second_signal_during_the_final_save_does_not_cut_it_short(signum: int, tiny_llama: Path,
                                                                     dialogue_file: Path, tmp_path: Path) -> None:
    """First signal in step 3; the second lands in the middle of the checkpoint save that follows."""
    name = signal.Signals(signum).name
    out = tmp_path / "run"
    code, stdout, err = finish(child(f"{name.lower()}-in-step-3-and-saves", "train",
                                     str(write_config(tmp_path, tiny_llama, dialogue_file, out)), "--no-progress"))
    assert code == 128 + signum, err
    assert f"{name} received: the save in progress finishes first" in stdout
    saved = list_checkpoints(out / "checkpoints")
    assert [p.name for p in saved] == ["step-0000003"] and checkpoint_problem(saved[0]) is None
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_a_signal_during_the_export_lets_it_finish(tiny_llama: Path, dialogue_file: Path, tmp_path: Path) -> None:
    """No step is left when the last checkpoint and the adapter are written: the run finishes."""
    out = tmp_path / "run"
    config = write_config(tmp_path, tiny_llama, dialogue_file, out, max_steps=2)
    code, stdout, err = finish(child("sigterm-in-step-3-and-saves", "train", str(config), "--no-progress"))
    assert code == 0, err
    assert "SIGTERM received: the save in progress finishes first" in stdout
    assert (out / "result.json").exists() and (out / "adapter" / "adapter_model.safetensors").exists()


def test_merge_stopped_by_sigterm_leaves_nothing_and_the_rerun_works(tiny_llama: Path, dialogue_file: Path,
                                                                    tmp_path: Path) -> None:
    from lorafit.cli import main

    out = tmp_path / "run"
    assert main(["train", str(write_config(tmp_path, tiny_llama, dialogue_file, out, max_steps=1)),
                 "--no-progress"]) == 0
    merged = tmp_path / "merged"
    code, _, err = finish(child("sigterm-while-merging", "merge", str(out), "--output", str(merged)))
    assert code == 128 + signal.SIGTERM, err
    assert err.strip() == f"error: merge stopped by SIGTERM: nothing was written to {merged}"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["run", "run.yaml", "dialogues.jsonl"])
    assert main(["merge", str(out), "--output", str(merged)]) == 0
    assert (merged / "config.json").exists() and (merged / "lorafit_merge.json").exists()


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo, as the distributed tests")
def test_two_ranks_stop_after_the_same_step_when_one_gets_the_signal(tiny_llama: Path, dialogue_file: Path,
                                                                     tmp_path: Path) -> None:
    """Only rank 0 gets SIGTERM (in step 3); its vote rides the step's one all-reduce, so rank 1 stops
    after step 3 too and the checkpoint holds both ranks' states."""
    import subprocess

    from helpers_faults import lorafit_env

    out = tmp_path / "run"
    config = write_config(tmp_path, tiny_llama, dialogue_file, out, batch_size=2)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(Path(__file__).with_name("helpers_faults.py")), "sigterm-in-step-3", "train", str(config),
               "--no-progress"]
    done = subprocess.run(command, capture_output=True, text=True, env=lorafit_env(), timeout=600)
    # only rank 0 reports; rank 1 stopping at step 3 shows in the checkpoint's two RNG states (gathered
    # at that save) and in the run ending at all (a rank that went on would wait in step 4's all-reduce)
    assert done.stdout.count("stopped by SIGTERM at step 3 of 8") == 1, done.stdout + done.stderr
    saved = list_checkpoints(out / "checkpoints")
    assert [p.name for p in saved] == ["step-0000003"] and checkpoint_problem(saved[0]) is None
    import torch

    assert len(torch.load(saved[0] / "rng_state.pt", weights_only=True)) == 2
