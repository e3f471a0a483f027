"""Checkpoints on a clock, a last one at a deadline, and resume from the newest *complete* checkpoint.

For runs that end without a signal the script sees (SageMaker spot interruptions and MaxRuntime),
and for checkpoint folders restored from S3 while their newest checkpoint was still uploading.
Real short trainings on the tiny Llama; CPU fp32 resume is bit-identical.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from conftest import tiny_run_config
from safetensors.torch import load_file

from lorafit import checkpoint as ckpt
from lorafit.config import validate_config
from lorafit.training import train


def checkpoints(out: Path) -> list[str]:
    return [p.name for p in ckpt.list_checkpoints(out / "checkpoints")]


def test_save_minutes_and_the_deadline(tiny_llama: Path, dialogue_file: Path, tmp_path: Path) -> None:
    def config(out: Path, **settings: object):  # noqa: ANN202
        settings = {"eval_steps": None, "save_total_limit": 5, "max_steps": 3, **settings}
        return validate_config(tiny_run_config(tiny_llama, dialogue_file, out, **settings))

    timed = train(config(tmp_path / "timed", save_minutes=1e-6), progress=False)  # due after every step
    assert timed.steps == 3 and checkpoints(tmp_path / "timed") == ["step-0000001", "step-0000002", "step-0000003"]
    off = train(config(tmp_path / "off", save_minutes=0), progress=False)
    assert off.steps == 3 and checkpoints(tmp_path / "off") == ["step-0000003"]  # only the final one

    late = train(config(tmp_path / "late"), progress=False, deadline=time.time())
    assert late.stopped_by == "deadline" and late.steps == 1 and late.adapter_dir is None
    assert checkpoints(tmp_path / "late") == ["step-0000001"]
    assert not (tmp_path / "late" / "result.json").exists()
    # the same deadline on the last step: finishing saves anyway, so it finishes
    last = train(config(tmp_path / "last", max_steps=1), progress=False, deadline=time.time())
    assert last.stopped_by is None and last.adapter_dir is not None


def test_resume_falls_back_from_an_incomplete_newest_checkpoint(tiny_llama: Path, dialogue_file: Path,
                                                                tmp_path: Path) -> None:
    def config(out: Path, steps: int, **settings: object):  # noqa: ANN202
        return validate_config(tiny_run_config(tiny_llama, dialogue_file, out, eval_steps=None, max_steps=steps,
                                               **settings))

    reference = train(config(tmp_path / "straight", 3), progress=False)
    out = tmp_path / "interrupted"
    train(config(out, 3, save_steps=1, save_total_limit=3), progress=False)
    folder = out / "checkpoints"
    step1, step2 = folder / "step-0000001", folder / "step-0000002"
    shutil.rmtree(folder / "step-0000003")  # as if it had been killed right after step 2's checkpoint
    (out / "result.json").unlink()
    assert ckpt.latest_checkpoint(folder) == step2

    reports: list[str] = []
    for name, damage in (("optimizer.pt", "truncated"), ("trainable.safetensors", "truncated"),
                         ("adapter/adapter_model.safetensors", "missing"), ("rng_state.pt", "empty")):
        broken = tmp_path / "broken"
        shutil.copytree(step2, broken)
        target = broken / name
        if damage == "missing":
            target.unlink()
        else:
            data = target.read_bytes()
            target.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"")
        assert ckpt.checkpoint_problem(broken) is not None, name
        assert name in ckpt.checkpoint_problem(broken)
        shutil.rmtree(step2)
        shutil.copytree(broken, step2)
        shutil.rmtree(broken)
        reports.clear()
        assert ckpt.latest_checkpoint(folder, report=reports.append) == step1, name
        assert reports == [f"checkpoint {step2} is incomplete ({ckpt.checkpoint_problem(step2)}); trying the one before"]
    assert ckpt.checkpoint_problem(step1) is None

    # resume takes step 1 and ends where the uninterrupted run ended; with save_total_limit 1 the
    # broken newer checkpoint must not count, or pruning would delete the good one just saved
    step2.rename(folder / "step-0000009")
    resumed = train(config(out, 3, save_steps=1, save_total_limit=1), progress=False)
    assert resumed.resumed_from == str(step1) and resumed.steps == 3
    a = load_file(str(tmp_path / "straight" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        assert a[key].equal(b[key]), key
    assert resumed.final_train_loss == reference.final_train_loss
    assert checkpoints(out) == ["step-0000003", "step-0000009"]
    assert ckpt.latest_checkpoint(folder) == folder / "step-0000003"
