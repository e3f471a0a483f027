"""Data-parallel training on torch.distributed (gloo on CPU), launched by ``lorafit train --nproc``.

FSDP (train.fsdp) is measured in test_fsdp.py."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from conftest import tiny_run_config
from helpers_trackers import tensorboard_scalars
from safetensors.torch import load_file

from lorafit.training import rank_slice

STEPS = 6


def config_file(tmp_path: Path, model: Path, data: Path, name: str, batch_size: int, steps: int = STEPS,
                report_to: tuple[str, ...] = ()) -> Path:
    raw = tiny_run_config(model, data, tmp_path / name, max_steps=steps, batch_size=batch_size,
                          eval_steps=3, save_steps=2, report_to=list(report_to))
    raw["data"]["packing"] = "none"
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def lorafit(*args: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "lorafit", "train", *args, "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def run(*args: str) -> str:
    return run_output(*args)[0]


def run_output(*args: str) -> tuple[str, str]:
    process = lorafit(*args)
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    return out, err


def adapter(path: Path) -> dict:
    return load_file(str(path / "adapter" / "adapter_model.safetensors"))


def test_rank_slices_are_disjoint_and_cover_each_global_batch() -> None:
    global_rows = list(range(12))
    world, per_rank = 3, 4
    slices = [rank_slice(global_rows, rank, per_rank) for rank in range(world)]
    assert sorted(i for s in slices for i in s) == global_rows
    assert all(len(set(a) & set(b)) == 0 for i, a in enumerate(slices) for b in slices[i + 1 :])


def test_two_processes_match_one_process_with_twice_the_batch(
    tiny_llama: Path, dialogue_file: Path, tmp_path: Path
) -> None:
    single = config_file(tmp_path, tiny_llama, dialogue_file, "single", batch_size=2, report_to=("tensorboard",))
    double = config_file(tmp_path, tiny_llama, dialogue_file, "double", batch_size=1, report_to=("tensorboard",))
    run(str(single))
    out, err = run_output(str(double), "--nproc", "2")
    # lorafit's lines from the first on (no torchrun banner, no library advice on import, in any
    # rank), and only rank 0 reports the run (rank 1 has no adapter to name)
    assert [line for line in (out + err).splitlines() if not line.startswith("lorafit: ")] == [], (out + err)[-3000:]
    assert out.startswith("lorafit: model: ")
    assert len(re.findall(r"^lorafit: done in \d+ s\. adapter: .*double/adapter$", out, re.M)) == 1, out[-2000:]
    assert "adapter: None" not in out
    a, b = adapter(tmp_path / "single"), adapter(tmp_path / "double")
    assert a.keys() == b.keys()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff < 1e-5, diff
    # only rank 0 wrote: the 2-process run folder holds exactly what the 1-process one does
    # (TensorBoard's files are named by host, pid and time: compared by count)
    def listing(run: Path) -> set[str]:
        return {re.sub(r"[0-9.]+", "N", p.relative_to(run).as_posix()) if "tensorboard" in p.parts
                else p.relative_to(run).as_posix() for p in run.rglob("*")}

    assert listing(tmp_path / "single") == listing(tmp_path / "double")
    assert len(list((tmp_path / "double" / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert [s for s, _ in tensorboard_scalars(tmp_path / "double" / "tensorboard")["train/loss"]] == \
        list(range(1, STEPS + 1))
    assert re.findall(rf"^lorafit: step (\d+)/{STEPS} loss=", out, re.M) == [str(s) for s in range(1, STEPS + 1)]


def test_two_process_run_killed_and_resumed_matches(tiny_llama: Path, dialogue_file: Path, tmp_path: Path) -> None:
    straight = config_file(tmp_path, tiny_llama, dialogue_file, "straight", batch_size=1, steps=40)
    run(str(straight), "--nproc", "2")
    killed = config_file(tmp_path, tiny_llama, dialogue_file, "killed", batch_size=1, steps=40)
    process = subprocess.Popen([sys.executable, "-m", "lorafit", "train", str(killed), "--nproc", "2", "--no-progress"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, OMP_NUM_THREADS="1"))
    marker = tmp_path / "killed" / "checkpoints" / "step-0000002" / "trainer_state.json"
    deadline = time.time() + 300
    while not marker.exists():
        assert process.poll() is None and time.time() < deadline, process.communicate()
        time.sleep(0.05)
    import psutil

    tree = [process.pid] + [child.pid for child in psutil.Process(process.pid).children(recursive=True)]
    for pid in tree:  # the launcher, torchrun and both ranks, at once
        os.kill(pid, signal.SIGKILL)
    process.communicate()
    assert not (tmp_path / "killed" / "result.json").exists(), "killed too late: the run had finished"
    run(str(killed), "--nproc", "2")
    a, b = adapter(tmp_path / "straight"), adapter(tmp_path / "killed")
    for key in a:
        assert a[key].equal(b[key]), key
