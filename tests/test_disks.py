"""Full and read-only disks, for real: a size-limited tmpfs the test mounts and fills, and a
read-only bind mount (root cannot write it either). See ``helpers_faults`` for the mounts and the
fallback where ``mount`` is refused. Each case: one ``error:`` line naming the file, no traceback,
and nothing finished lost."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import tiny_run_config
from helpers_faults import child, fill, finish, lorafit, read_only, small_disk

from lorafit import rundir
from lorafit.checkpoint import checkpoint_problem, list_checkpoints
from lorafit.cli import main


def write_config(tmp_path: Path, model: Path, data: Path, out: Path, name: str = "c", **train: object) -> Path:
    raw = tiny_run_config(model, data, out, **{"max_steps": 2, "eval_steps": None, **train})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


PROGRESS = re.compile(r"\r|\d+/\d+ \[[\d:<?]+")  # a library's progress bar (transformers' "Loading weights")


def one_error_line(err: str) -> str:
    lines = [line for line in err.split("\n") if line.strip() and not PROGRESS.search(line)]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def snapshot(root: Path) -> dict[str, bytes | str]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else "folder")
            for p in sorted(root.rglob("*")) if p.name != rundir.LOCK_FILE}


def test_a_full_disk_at_the_start_is_one_line_and_leaves_nothing(tiny_llama: Path, dialogue_file: Path,
                                                                 tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                                 ) -> None:
    with small_disk(tmp_path / "disk") as disk:
        filler = fill(disk)
        out = disk / "run"
        capsys.readouterr()
        assert main(["train", str(write_config(tmp_path, tiny_llama, dialogue_file, out)), "--no-progress"]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert line.startswith(f"error: output_dir: cannot write {out}/") and "No space left on device" in line
        assert sorted(p.name for p in disk.iterdir()) == [filler.name]  # the half-made run folder is gone


def test_a_disk_that_fills_during_the_export_keeps_the_checkpoint_and_the_rerun_exports(
        tiny_llama: Path, dialogue_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with small_disk(tmp_path / "disk") as disk:
        out = disk / "run"
        config = write_config(tmp_path, tiny_llama, dialogue_file, out)
        code, _, err = finish(child("fill-before-export", "train", str(config), "--no-progress"))
        assert code == 2
        line = one_error_line(err)
        assert line == (f"error: could not write the adapter to {out / 'adapter'} (No space left on device); the "
                        "last checkpoint is kept: run the same command again to export it")
        assert not (out / "adapter").exists() and not list(out.glob(".tmp-*"))
        saved = list_checkpoints(out / "checkpoints")
        assert [p.name for p in saved] == ["step-0000002"] and checkpoint_problem(saved[0]) is None
        stamp = (saved[0] / "trainer_state.json").stat().st_mtime_ns

        (disk / "filler.bin").unlink()
        capsys.readouterr()
        assert main(["train", str(config), "--no-progress"]) == 0
        stdout = capsys.readouterr().out
        assert f"resuming from {saved[0]}" in stdout
        assert "checkpoint saved" not in stdout  # the same step is not written a second time
        assert (saved[0] / "trainer_state.json").stat().st_mtime_ns == stamp
        assert (out / "adapter" / "adapter_model.safetensors").exists() and (out / "result.json").exists()


def test_overwrite_on_a_full_disk_keeps_the_finished_run(tiny_llama: Path, dialogue_file: Path,
                                                         tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with small_disk(tmp_path / "disk") as disk:
        out = disk / "run"
        config = write_config(tmp_path, tiny_llama, dialogue_file, out)
        assert main(["train", str(config), "--no-progress"]) == 0
        before = snapshot(out)
        fill(disk)
        capsys.readouterr()
        assert main(["train", str(config), "--no-progress", "--overwrite"]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert line.startswith(f"error: output_dir: cannot write {out}/") and "No space left on device" in line
        assert snapshot(out) == before  # the finished run whole: metrics and result included


def test_a_read_only_run_is_scored_and_generated_from_and_only_output_is_written(
        tiny_llama: Path, dialogue_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "run"
    assert main(["train", str(write_config(tmp_path, tiny_llama, dialogue_file, source)), "--no-progress"]) == 0
    before = snapshot(source)
    with read_only(source, tmp_path / "ro") as run:
        capsys.readouterr()
        assert main(["eval", str(run), "--max-new-tokens", "2"]) == 2
        assert one_error_line(capsys.readouterr().err) == (
            f"error: {run}: not writable (a read-only run); pass --output FILE to write the scores elsewhere and "
            "leave the run as it is")
        scores = tmp_path / "scores" / "eval.json"
        assert main(["eval", str(run), "--max-new-tokens", "2", "--output", str(scores)]) == 0
        assert "perplexity" in json.loads(scores.read_text())["adapter"]
        assert main(["generate", str(run), "--prompt", "A: hi\nB: hello", "--max-new-tokens", "3",
                     "--no-stream"]) == 0
    assert snapshot(source) == before


def test_merge_onto_a_read_only_file_system_fails_before_loading(tiny_llama: Path, dialogue_file: Path,
                                                                 tmp_path: Path) -> None:
    source = tmp_path / "run"
    assert main(["train", str(write_config(tmp_path, tiny_llama, dialogue_file, source)), "--no-progress"]) == 0
    shelf = tmp_path / "shelf"
    shelf.mkdir()
    with read_only(shelf, tmp_path / "ro") as ro:
        code, stdout, err = finish(lorafit("merge", str(source), "--output", str(ro / "merged")))
        assert code == 2
        assert one_error_line(err) == f"error: --output: cannot write into {ro} (Read-only file system)"
        assert "merged" not in stdout  # refused before the base was loaded and merged
    assert not any(shelf.iterdir())
    shutil.rmtree(tmp_path / "ro", ignore_errors=True)
