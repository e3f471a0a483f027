"""Real faults for the robustness tests: small and read-only file systems, full disks, and a child
process that sends itself a real signal at a chosen moment.

File systems are mounted for real: a size-limited tmpfs (``mount -t tmpfs -o size=...``) and a
read-only bind mount (``mount --bind`` + ``remount,ro``). Both need root or CAP_SYS_ADMIN: our CI
and these machines run the tests as root. Where ``mount`` is refused, the tests that need them are
skipped with that reason; a chmod-based fallback is not used because root ignores file modes.

As a child (``python tests/helpers_faults.py HOOK ARGS...``) this module runs ``lorafit ARGS`` with
one hook that makes a fault happen at an exact point of the run (a signal during step 3, a disk
that fills up just before the adapter export, ...); the fault itself is real: ``os.kill`` of the
process by itself, or a file filling the mounted file system.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path


def _mount(*args: str) -> str | None:
    """Run ``mount ARGS``; None when it worked, else why not."""
    try:
        done = subprocess.run(["mount", *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    return None if done.returncode == 0 else (done.stderr.strip() or f"mount exited {done.returncode}")


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


@contextlib.contextmanager
def small_disk(folder: Path, size: str = "8m") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``folder``: writes past it fail with ENOSPC, as on a full disk."""
    import pytest

    folder.mkdir(parents=True, exist_ok=True)
    problem = _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder))
    if problem:
        pytest.skip(f"cannot mount a small tmpfs here ({problem}); the full-disk tests need root or CAP_SYS_ADMIN")
    try:
        yield folder
    finally:
        _umount(folder)


@contextlib.contextmanager
def read_only(source: Path, view: Path) -> Iterator[Path]:
    """``source`` seen read-only at ``view`` (a bind mount remounted ro: root cannot write it either)."""
    import pytest

    view.mkdir(parents=True, exist_ok=True)
    problem = _mount("--bind", str(source), str(view))
    if problem is None:
        problem = _mount("-o", "remount,bind,ro", str(view))
        if problem:
            _umount(view)
    if problem:
        pytest.skip(f"cannot make a read-only bind mount here ({problem}); needs root or CAP_SYS_ADMIN")
    try:
        yield view
    finally:
        _umount(view)


def fill(disk: Path) -> Path:
    """Fill the file system of ``disk`` to the last byte with one file (returned: delete it to free)."""
    filler = disk / "filler.bin"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for chunk in (1 << 20, 1 << 12, 1):
            try:
                while os.write(fd, b"\0" * chunk):
                    pass
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    finally:
        os.close(fd)
    return filler


def lorafit_env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def child(hook: str, *args: str, **kwargs: object) -> subprocess.Popen:
    """``lorafit ARGS`` in a child process with ``hook`` (see ``HOOKS``)."""
    return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), hook, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=lorafit_env(), **kwargs)


def lorafit(*args: str, **kwargs: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lorafit", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=lorafit_env(), **kwargs)


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def wait_until(condition: object, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not condition():  # type: ignore[operator]
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, "condition never met"
        time.sleep(0.05)


# ------------------------------------------------------------------------------- child hooks
def _signal_in_step(signum: int, step: int) -> None:
    """Send ``signum`` to this process at the start of optimizer step ``step`` (its forward and
    backward still to run), on rank 0 only."""
    from lorafit import training

    original = training.LoraFinetuneRecipe._train_step
    calls = {"n": 0}

    def step_with_signal(self: object, micro: object, votes: object) -> object:
        calls["n"] += 1
        if calls["n"] == step and int(os.environ.get("RANK", "0")) == 0:
            os.kill(os.getpid(), signum)
        return original(self, micro, votes)

    training.LoraFinetuneRecipe._train_step = step_with_signal


def _signal_in_saves(signum: int) -> None:
    """Send ``signum`` to this process inside every checkpoint save and the adapter export, after
    their first file is written (and wait a moment, so it lands mid-save)."""
    from lorafit import checkpoint

    original = checkpoint._write_json_synced

    def write_with_signal(path: Path, data: dict) -> None:
        os.kill(os.getpid(), signum)
        time.sleep(0.2)
        original(path, data)

    checkpoint._write_json_synced = write_with_signal


def _fill_before_export() -> None:
    """Fill the output disk just before the final adapter export."""
    from lorafit import training

    original = training.LoraFinetuneRecipe._save_adapter

    def save_on_a_full_disk(self: training.LoraFinetuneRecipe, *args: object) -> object:
        fill(self.output_dir.parent)
        return original(self, *args)

    training.LoraFinetuneRecipe._save_adapter = save_on_a_full_disk


def _signal_while_merging(signum: int) -> None:
    """Send ``signum`` to this process when the merged model's weights start being written."""
    from transformers import PreTrainedModel

    original = PreTrainedModel.save_pretrained

    def save_with_signal(self: object, *args: object, **kwargs: object) -> object:
        os.kill(os.getpid(), signum)
        time.sleep(0.2)
        return original(self, *args, **kwargs)

    PreTrainedModel.save_pretrained = save_with_signal


HOOKS = {
    "sigterm-in-step-3": lambda: _signal_in_step(signal.SIGTERM, 3),
    "sigint-in-step-3": lambda: _signal_in_step(signal.SIGINT, 3),
    "sigterm-in-step-3-and-saves": lambda: (_signal_in_step(signal.SIGTERM, 3), _signal_in_saves(signal.SIGTERM)),
    "sigint-in-step-3-and-saves": lambda: (_signal_in_step(signal.SIGINT, 3), _signal_in_saves(signal.SIGINT)),
    "fill-before-export": _fill_before_export,
    "sigterm-while-merging": lambda: _signal_while_merging(signal.SIGTERM),
}

if __name__ == "__main__":  # also as each rank of ``torchrun helpers_faults.py HOOK train ...``
    HOOKS[sys.argv[1]]()
    from lorafit.cli import main

    sys.exit(main(sys.argv[2:]))
