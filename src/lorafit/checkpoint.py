"""Checkpoints that survive crashes: written aside, then renamed; only complete ones count.

A checkpoint is ``checkpoints/step-NNNNNNN/`` with the adapter (PEFT format), the optimizer and
scheduler states, every RNG state and the data position, so a resumed run continues exactly where
the uninterrupted one would be (CPU fp32: bit-identical). It is written to ``.tmp-step-N`` and
renamed only when complete, and ``trainer_state.json`` is its last file: a crash mid-save leaves a
temporary folder that is ignored and cleaned, never a broken "latest".

A checkpoint can still arrive incomplete from elsewhere: SageMaker uploads /opt/ml/checkpoints to S3
while training runs and restores it into a restarted job's container, so the newest one can be
half there. Resume therefore takes the newest checkpoint whose files are all present and readable
(``checkpoint_problem``) and falls back to the one before.

Optimizer/RNG states are our own files, read back with ``torch.load(weights_only=True)``, which
refuses arbitrary pickled objects.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError

from lorafit.distributed import load_optimizer_state, load_trainable_state
from lorafit.errors import LorafitError, first_line
from lorafit.rundir import replace_folder
from lorafit.runs import ADAPTER_CONFIG, ADAPTER_DIR, ADAPTER_WEIGHTS

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng_state.pt"
TRAINABLE_FILE = "trainable.safetensors"
PREFIX = "step-"
# every file ``save_checkpoint`` writes, each of which ``load_checkpoint`` or a reader of the adapter needs
REQUIRED_FILES = (STATE_FILE, TRAINABLE_FILE, OPTIMIZER_FILE, RNG_FILE,
                  f"{ADAPTER_DIR}/{ADAPTER_CONFIG}", f"{ADAPTER_DIR}/{ADAPTER_WEIGHTS}")


@dataclass
class TrainerState:
    """Where training stands: enough to continue exactly."""

    step: int
    micro_batches_done: int
    tokens_seen: int  # non-padding input tokens processed (all ranks)
    skipped_nonfinite: int = 0


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:07d}"


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary and partial folders are not listed)."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / STATE_FILE).exists()]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(path: Path) -> int:
    return int(path.name[len(PREFIX) :])


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` cannot be resumed from (a missing, empty, truncated or unreadable file), or None.

    Each file is read the way resuming reads it (safetensors, ``torch.load(weights_only=True)``,
    JSON); a truncated safetensors or torch zip file fails there.
    """
    from safetensors.torch import load_file

    for name in REQUIRED_FILES:
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size == 0:
            return f"{name} is empty"
    current = ""
    try:
        current = STATE_FILE
        TrainerState(**json.loads((path / STATE_FILE).read_text(encoding="utf-8")))
        current = f"{ADAPTER_DIR}/{ADAPTER_CONFIG}"
        json.loads((path / ADAPTER_DIR / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        for current in (TRAINABLE_FILE, f"{ADAPTER_DIR}/{ADAPTER_WEIGHTS}"):
            load_file(str(path / current))
        for current in (OPTIMIZER_FILE, RNG_FILE):
            torch.load(path / current, weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - any failure to read means this checkpoint cannot be resumed
        return f"{current} is unreadable ({first_line(exc)})"
    return None


def latest_checkpoint(folder: Path, report: Callable[[str], None] | None = None) -> Path | None:
    """The newest complete checkpoint; newer incomplete ones are skipped (and named to ``report``)."""
    for path in reversed(list_checkpoints(folder)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        if report is not None:
            report(f"checkpoint {path} is incomplete ({problem}); trying the one before")
    return None


def rng_states() -> dict[str, Any]:
    """This process's RNG states (torch, CUDA, Python, NumPy), as tensors and plain lists."""
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": int(np.random.get_state()[2]),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _restore_rng(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate((states["python_version"], tuple(states["python"]), states["python_gauss"]))
    np.random.set_state(("MT19937", states["numpy"].numpy().astype(np.uint32), states["numpy_pos"], 0, 0.0))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(
    folder: Path,
    state: TrainerState,
    model: Any,
    scheduler: Any,
    keep: int,
    *,
    trainable: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    rng_per_rank: list[dict[str, Any]],
) -> Path:
    """Write a complete checkpoint for ``state.step`` and prune to the newest ``keep``.

    ``trainable`` / ``optimizer_state`` are full tensors keyed by parameter name and
    ``rng_per_rank`` every rank's RNG states: gathered by the caller (collectively, on all ranks).
    """
    from safetensors.torch import save_file

    final = folder / checkpoint_name(state.step)
    staging = folder / f".tmp-{checkpoint_name(state.step)}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()
        model.save_pretrained(staging / ADAPTER_DIR, state_dict=trainable, safe_serialization=True)
        save_file(trainable, str(staging / TRAINABLE_FILE))
        torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict()}, staging / OPTIMIZER_FILE)
        torch.save(rng_per_rank, staging / RNG_FILE)
        _write_json_synced(staging / STATE_FILE, asdict(state))
        replace_folder(staging, final)  # an existing step-N is swapped out by renames, never half gone
    except (OSError, SafetensorError) as exc:  # disk full, permission denied, file too large
        shutil.rmtree(staging, ignore_errors=True)
        last = latest_checkpoint(folder)
        kept = f"; last good checkpoint kept: {last}" if last else ""
        where = getattr(exc, "filename", None) or staging
        reason = getattr(exc, "strerror", None) or first_line(exc)
        raise LorafitError(f"could not save checkpoint to {where} ({reason}){kept}") from exc
    # Only checkpoints up to this one count towards ``keep``: a newer one can only be an incomplete
    # checkpoint that resume skipped, and counting it could prune the last good one.
    for old in [p for p in list_checkpoints(folder) if checkpoint_step(p) <= state.step][:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_json_synced(path: Path, data: dict[str, Any]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        json.dump(data, handle)
        handle.flush()
        os.fsync(handle.fileno())


def load_checkpoint(
    path: Path, model: Any, optimizer: torch.optim.Optimizer, scheduler: Any, rank: int = 0
) -> TrainerState:
    """Restore adapter weights, optimizer, scheduler and this rank's RNG from ``path``."""
    from safetensors.torch import load_file

    try:
        state = TrainerState(**json.loads((path / STATE_FILE).read_text(encoding="utf-8")))
        trainable = load_file(str(path / TRAINABLE_FILE))
        saved = torch.load(path / OPTIMIZER_FILE, weights_only=True, map_location="cpu")
        rng = torch.load(path / RNG_FILE, weights_only=True)
    except (OSError, ValueError, TypeError, RuntimeError) as exc:
        raise LorafitError(f"{path}: cannot resume from this checkpoint ({exc}); pass --no-resume to start over") from exc
    if rank >= len(rng):
        raise LorafitError(f"{path}: saved by {len(rng)} process(es); resume with the same number of processes")
    load_trainable_state(model, trainable, str(path))
    load_optimizer_state(model, optimizer, saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    _restore_rng(rng[rank])
    return state
