"""One run owns its folder: a second run is refused while the first holds it, the user's files are
never written over, and replacing a run never leaves a folder made of parts of two runs."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest
import yaml
from conftest import tiny_run_config
from helpers_faults import finish, lorafit, wait_until

from lorafit import rundir
from lorafit.cli import main


def write_config(tmp_path: Path, model: Path, data: Path, out: Path, name: str = "c", **train: object) -> Path:
    raw = tiny_run_config(model, data, out, **train)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def snapshot(root: Path) -> dict[str, bytes | str]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else "folder")
            for p in sorted(root.rglob("*")) if p.name != rundir.LOCK_FILE}


def test_a_second_run_is_refused_while_the_first_holds_the_folder(tiny_llama: Path, dialogue_file: Path,
                                                                  tmp_path: Path) -> None:
    out = tmp_path / "twin"
    first = lorafit("train", str(write_config(tmp_path, tiny_llama, dialogue_file, out, "a", max_steps=400)),
                    "--no-progress")
    wait_until(lambda: (out / "metrics.jsonl").exists() and '"loss"' in (out / "metrics.jsonl").read_text(), first)
    second = write_config(tmp_path, tiny_llama, dialogue_file, out, "b", max_steps=6, seed=7)
    code, _, err = finish(lorafit("train", str(second), "--no-progress"))
    assert code == 2
    assert err.strip() == (f"error: output_dir: {out} is in use by another lorafit run (pid {first.pid} on "
                           f"{os.uname().nodename}); wait for it to finish or choose another output_dir")
    first.send_signal(signal.SIGKILL)  # the lock dies with the process: nothing stale is left
    first.communicate()
    starts = [r for r in records(out) if r.get("event") == "start"]
    assert len(starts) == 1 and starts[0]["seed"] == 0  # the first run's records alone
    lock = rundir.acquire(out)
    assert lock.fd is not None
    lock.release()


def test_nproc_launcher_refuses_a_held_folder_before_starting_ranks(tiny_llama: Path, dialogue_file: Path,
                                                                    tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    held = rundir.acquire(out)
    try:
        config = write_config(tmp_path, tiny_llama, dialogue_file, out, max_steps=2)
        code, out_text, err = finish(lorafit("train", str(config), "--nproc", "2", "--no-progress"), timeout=120)
    finally:
        held.release()
    assert code == 2, err
    assert err.strip().startswith(f"error: output_dir: {out} is in use by another lorafit run (pid {os.getpid()}")
    assert "torch.distributed" not in err + out_text


@pytest.mark.parametrize("what", ["config", "data"])
def test_a_folder_of_the_users_files_is_never_written_into(what: str, tiny_llama: Path, dialogue_file: Path,
                                                          tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("# my own config, with comments\ntrain: {max_steps: 2}\n", encoding="utf-8")
    if what == "data":
        (mine / "rows.jsonl").write_bytes(dialogue_file.read_bytes())
    before = snapshot(mine)
    config = write_config(tmp_path, tiny_llama, dialogue_file, mine, max_steps=2)
    code, _, err = finish(lorafit("train", str(config), "--no-progress"))
    assert code == 2
    assert err.strip().startswith(f"error: output_dir: {mine} is not empty and holds no lorafit run (config.yaml")
    assert snapshot(mine) == before and not (mine / rundir.LOCK_FILE).exists()


def test_overwrite_that_fails_before_its_first_checkpoint_puts_the_old_run_back(
        tiny_llama: Path, dialogue_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    config = write_config(tmp_path, tiny_llama, dialogue_file, out, max_steps=2)
    assert main(["train", str(config), "--no-progress"]) == 0
    (out / "notes.txt").write_text("the user's own notes", encoding="utf-8")
    before = snapshot(out)
    # an absurd learning rate: step 2's loss is inf, and the run stops before any checkpoint
    broken = write_config(tmp_path, tiny_llama, dialogue_file, out, "broken", max_steps=6, lr=1e30,
                          max_grad_norm=None)
    capsys.readouterr()
    assert main(["train", str(broken), "--no-progress", "--overwrite"]) == 2
    stdout, err = capsys.readouterr()
    assert err.strip().splitlines()[-1].startswith("error: non-finite loss nan at step 2"), err
    assert f"the previous run in {out} was put back" in stdout
    assert snapshot(out) == before  # the finished run exactly as it was, the user's notes included


def test_overwrite_stopped_after_a_step_leaves_only_the_new_run(tiny_llama: Path, dialogue_file: Path,
                                                               tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                               ) -> None:
    """The issue's case: interrupted after step 1, the folder held the old adapter with the new
    held-out rows, and eval scored the old adapter on rows it had trained on."""
    out = tmp_path / "run"
    old_config = write_config(tmp_path, tiny_llama, dialogue_file, out, "old", max_steps=2)
    assert main(["train", str(old_config), "--no-progress"]) == 0
    new_config = write_config(tmp_path, tiny_llama, dialogue_file, out, "new", max_steps=400, seed=5)
    process = lorafit("train", str(new_config), "--no-progress", "--overwrite")
    wait_until(lambda: (out / rundir.ASIDE_DIR).is_dir() and (out / "metrics.jsonl").exists()
               and '"loss"' in (out / "metrics.jsonl").read_text(), process)
    process.send_signal(signal.SIGTERM)
    code, stdout, _ = finish(process)
    assert code == 128 + signal.SIGTERM
    names = {p.name for p in out.iterdir()}
    assert "adapter" not in names and "result.json" not in names and rundir.ASIDE_DIR not in names
    assert [p.name.startswith("checkpoints.old-") for p in out.iterdir()].count(True) == 1  # set aside, kept
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["seed"] == 5
    assert [r["seed"] for r in records(out) if r.get("event") == "start"] == [5]
    capsys.readouterr()
    assert main(["eval", str(out), "--max-new-tokens", "2"]) == 2
    newest = sorted((out / "checkpoints").glob("step-*"))[-1]
    assert capsys.readouterr().err.strip() == (f"error: {out}: no adapter/ yet: the run stopped before it finished; resume it "
                               f"with `lorafit train {out / 'config.yaml'}`, or use its newest checkpoint ({newest})")


def test_a_start_over_killed_halfway_is_completed_or_undone_at_the_next_start(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}", encoding="utf-8")
    for name in ("config.yaml", "run.json", "metrics.jsonl", "result.json", "heldout.jsonl"):
        (run / name).write_text(f"old {name}", encoding="utf-8")
    (run / "mine.txt").write_text("not lorafit's", encoding="utf-8")
    before = snapshot(run)

    # killed while moving entries aside: two moved, the rest not
    partial = run / rundir.ASIDE_PARTIAL
    partial.mkdir()
    for name in ("config.yaml", "adapter"):
        os.rename(run / name, partial / name)
    assert "put back" in (rundir.recover(run) or "")
    assert snapshot(run) == before

    # killed after setting aside and writing new files, before the new run's first checkpoint
    rundir.set_aside(run)
    assert {p.name for p in run.iterdir()} == {rundir.ASIDE_DIR, "mine.txt"}
    (run / "config.yaml").write_text("new config", encoding="utf-8")
    (run / "metrics.jsonl").write_text("new metrics", encoding="utf-8")
    assert "put back" in (rundir.recover(run) or "")
    assert snapshot(run) == before


def test_stale_checkpoint_staging_is_removed_at_the_next_start(tiny_llama: Path, dialogue_file: Path,
                                                              tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                              ) -> None:
    out = tmp_path / "run"
    stale = out / "checkpoints" / ".tmp-step-0000003"
    stale.mkdir(parents=True)
    (stale / "optimizer.pt").write_bytes(b"half")
    (out / "run.json").write_text("{}", encoding="utf-8")  # what a killed run leaves besides
    config = write_config(tmp_path, tiny_llama, dialogue_file, out, max_steps=1, eval_steps=None, epochs=1)
    assert main(["train", str(config), "--no-progress"]) == 0
    stdout = capsys.readouterr().out
    assert "lorafit: note: ignored train.epochs: train.max_steps is set" in stdout  # said, not silently ignored
    assert "removed 1 unfinished checkpoint save(s) of an earlier process (checkpoints/.tmp-step-0000003)" in stdout
    assert not stale.exists()


if sys.platform != "linux":  # flock semantics are checked where lorafit runs: Linux hosts and containers
    pytestmark = pytest.mark.skip("Linux only")
