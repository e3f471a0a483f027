"""One run owns its folder: an OS lock while it runs, no file it did not create touched, and a run
that replaces another never leaves a folder made of parts of both.

- Lock: ``fcntl.flock`` on ``.lorafit.lock`` in the run folder, held by the process that writes the
  run's files (rank 0) for the whole run. The kernel drops it when that process ends, however it
  ends (SIGKILL, OOM, a lost container), so nothing stale is left behind, and a restored folder
  (SageMaker's checkpoint sync) carries no lock. The file names the holder (pid, host) for the
  second run's message. ``lorafit train --nproc`` takes the lock in the launching process, which
  outlives its ranks, and names itself in ``LORAFIT_RUN_LOCK_OWNER``; rank 0 then runs under that
  claim instead of taking the lock a second time.
- Ownership: a folder that is not empty and holds no run is the user's (their config, their data):
  refused, never written into. In a run folder only the run's own entries (``RUN_ENTRIES``) are
  moved or removed; anything else the user put there stays as it is.
- Replacing (``--overwrite``, ``--no-resume``, or a start over a run that never reached a
  checkpoint): the previous run's entries are renamed into ``.lorafit-replaced/`` (renames inside
  the folder: atomic each, no extra space, so they work on a full disk). If the new run stops before
  its first checkpoint, they are moved back; once it has one, they are dropped, except the old
  checkpoints, which stay as ``checkpoints.old-TIME``. A process killed anywhere in between is
  completed or undone by ``recover`` at the next start, under the lock.

``lorafit.checkpoint`` (torch) is imported inside ``recover``: the CLI imports this module to
parse arguments.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from lorafit import runs
from lorafit.errors import LorafitError

LOCK_FILE = ".lorafit.lock"
OWNER_ENV = "LORAFIT_RUN_LOCK_OWNER"
ASIDE_DIR = ".lorafit-replaced"
ASIDE_PARTIAL = ".lorafit-replaced.partial"  # renamed to ASIDE_DIR once every entry is inside
OLD_CHECKPOINTS = f"{runs.CHECKPOINTS_DIR}.old-"
STAGING_PREFIX = ".tmp-"  # lorafit.checkpoint's staging folders: .tmp-step-NNNNNNN
# files that only a lorafit run writes: a folder holding one of them is a run folder
_MARKERS = (LOCK_FILE, ASIDE_DIR, ASIDE_PARTIAL, runs.RUN_FILE, runs.METRICS_FILE, runs.RESULT_FILE,
            runs.CHECKPOINTS_DIR)
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class RunLock:
    """The held lock (``fd``), or the launcher's claim this process runs under (``fd`` None)."""

    def __init__(self, path: Path, fd: int | None, note: str | None = None) -> None:
        self.path = path
        self.fd = fd
        self.note = note  # why the folder is not locked (a file system without locks), for the log

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the only descriptor releases the flock
            self.fd = None


def _holder(fd: int) -> str:
    with contextlib.suppress(OSError):
        text = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
        if text:
            return text
    return "another process"


def acquire(folder: Path) -> RunLock:
    """Lock ``folder`` for this run, or raise naming the process that holds it."""
    path = folder / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise LorafitError(f"output_dir: cannot create {path} ({exc.strerror or exc})") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        owner = os.environ.get(OWNER_ENV)
        if owner and holder.split()[:2] == ["pid", owner]:
            return RunLock(path, None)  # the launcher of this very run holds it
        raise LorafitError(f"output_dir: {folder} is in use by another lorafit run ({holder}); wait for it to "
                           "finish or choose another output_dir") from None
    except OSError as exc:
        os.close(fd)
        if exc.errno in _NO_LOCKS:
            return RunLock(path, None, note=f"{folder} is on a file system without locks; a second run "
                                            "started into it would not be stopped")
        raise LorafitError(f"output_dir: cannot lock {path} ({exc.strerror or exc})") from exc
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    except OSError:
        pass  # a full disk: the lock holds all the same, the message names no pid
    return RunLock(path, fd)


def check_owned(folder: Path) -> None:
    """Refuse a non-empty folder that holds no lorafit run: its files are the user's."""
    if not folder.is_dir():
        return
    names = sorted(p.name for p in folder.iterdir())
    if not names or any(n in _MARKERS or n.startswith(OLD_CHECKPOINTS) for n in names):
        return
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    raise LorafitError(f"output_dir: {folder} is not empty and holds no lorafit run ({shown}); lorafit writes "
                       "over nothing it did not create: choose a new or empty folder")


def _own_entries(folder: Path) -> list[Path]:
    """The previous run's entries: what a run writes, not the lock, a set-aside or the user's files."""
    return [folder / name for name in runs.RUN_ENTRIES if (folder / name).exists() or (folder / name).is_symlink()]


def has_previous_run(folder: Path) -> bool:
    return bool(_own_entries(folder))


def remove(path: Path) -> None:
    """A file or folder, gone (nothing if absent)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def set_aside(folder: Path) -> None:
    """Move the previous run's entries into ``ASIDE_DIR`` (see the module docstring)."""
    partial = folder / ASIDE_PARTIAL
    partial.mkdir(exist_ok=True)
    for entry in _own_entries(folder):
        os.rename(entry, partial / entry.name)
    os.rename(partial, folder / ASIDE_DIR)


def pending(folder: Path) -> bool:
    """Whether a replaced run waits in ``ASIDE_DIR`` for this run's first checkpoint."""
    return (folder / ASIDE_DIR).is_dir()


def restore(folder: Path) -> None:
    """Undo ``set_aside``: remove what the new run wrote, move the previous run back."""
    aside = folder / ASIDE_DIR
    for entry in _own_entries(folder):
        remove(entry)
    for entry in sorted(aside.iterdir()):
        os.rename(entry, folder / entry.name)
    aside.rmdir()


def commit(folder: Path) -> Path | None:
    """The new run has a checkpoint: drop the replaced run, keeping its checkpoints as
    ``checkpoints.old-TIME`` (returned)."""
    aside = folder / ASIDE_DIR
    kept = None
    old = aside / runs.CHECKPOINTS_DIR
    if old.is_dir() and any(old.iterdir()):
        stamp = int(time.time())
        kept = folder / f"{OLD_CHECKPOINTS}{stamp}"
        while kept.exists():
            stamp += 1
            kept = folder / f"{OLD_CHECKPOINTS}{stamp}"
        os.rename(old, kept)
    shutil.rmtree(aside)
    return kept


def recover(folder: Path) -> str | None:
    """Complete or undo a replacement that a killed process left half done; a line for the log."""
    from lorafit.checkpoint import latest_checkpoint

    partial = folder / ASIDE_PARTIAL
    if partial.is_dir():  # cut short while moving aside: nothing of the new run was written yet
        for entry in sorted(partial.iterdir()):
            os.rename(entry, folder / entry.name)
        partial.rmdir()
        return f"an interrupted start over left {folder} half set aside; the previous run was put back"
    if not pending(folder):
        return None
    if latest_checkpoint(folder / runs.CHECKPOINTS_DIR) is not None:
        kept = commit(folder)
        return "the run that replaced an earlier one has a checkpoint; the earlier run was dropped" + (
            f" (its checkpoints kept in {kept})" if kept else "")
    restore(folder)
    return "a start over stopped before its first checkpoint; the previous run was put back"


def replace_folder(new: Path, target: Path) -> None:
    """Put the finished folder ``new`` at ``target`` by renames: ``target`` is whole, old or new."""
    old = target.with_name(f"{STAGING_PREFIX}old-{target.name}")
    if target.exists():
        remove(old)
        os.rename(target, old)
    os.rename(new, target)
    remove(old)


def remove_stale_staging(folder: Path) -> list[str]:
    """Staging folders (``.tmp-*``: checkpoints, the adapter export) of saves that a killed process
    never finished; called under the lock, so no save is in progress."""
    stale = [p for parent in (folder, folder / runs.CHECKPOINTS_DIR) if parent.is_dir()
             for p in parent.iterdir() if p.name.startswith(STAGING_PREFIX) and p.is_dir()]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return [str(p.relative_to(folder)) for p in stale]


@contextlib.contextmanager
def held_for_ranks(folder: Path) -> Iterator[None]:
    """``lorafit train --nproc``: the launching process holds the lock for the ranks it starts (it
    outlives them, and a second run is refused before any rank starts) and names itself to their
    rank 0 in ``OWNER_ENV``."""
    check_owned(folder)
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        lock = None  # rank 0's own checks name the problem
    else:
        lock = acquire(folder)
        os.environ[OWNER_ENV] = str(os.getpid())
    try:
        yield
    finally:
        os.environ.pop(OWNER_ENV, None)
        if lock is not None:
            if created and {p.name for p in folder.iterdir()} <= {LOCK_FILE}:
                with contextlib.suppress(OSError):
                    (folder / LOCK_FILE).unlink()
                    folder.rmdir()
            lock.release()
