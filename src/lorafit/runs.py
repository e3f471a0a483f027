"""The run folder's layout, and finding the adapter and config behind a user-given path.

    output_dir/
      config.yaml          the resolved config that produced the run
      adapter/             PEFT format: adapter_config.json + adapter_model.safetensors + tokenizer
      checkpoints/         step-NNNNNNN/ folders (see lorafit.checkpoint)
      run.json             the resolved run: model source, device, precision, packing, loss, fused
                           paths, library versions, data hashes, seed (lorafit.resolved), the
                           data format and how it was chosen
      lorafit_template.json the template rows rendered with (lorafit.data.template; also in adapter/)
      heldout.jsonl        the held-out eval rows as training drew them (file, line, hash, row)
      config-history.jsonl fields changed on a resume with --resume-anyway (absent otherwise)
      metrics.jsonl        one JSON object per logged step / evaluation
      loss.png             the loss curve
      result.json          written last: the run finished
      .lorafit.lock        held by the run's process while it runs (lorafit.rundir)

Commands that take RUN_OR_ADAPTER accept a run folder, an adapter folder, or a checkpoint folder
(``locate_run``).

``lorafit.checkpoint`` (torch) is imported where a checkpoint is looked for: the CLI, the
SageMaker entry and the handler import this module before the libraries are quieted.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafit.config import RESULT_NEUTRAL_FIELDS, LorafitConfig, read_yaml, validate_config
from lorafit.errors import AdapterError
from lorafit.paths import looks_like_path
from lorafit.resolved import RUN_FILE

CONFIG_FILE = "config.yaml"
ADAPTER_DIR = "adapter"
CHECKPOINTS_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
LOSS_PLOT = "loss.png"
RESULT_FILE = "result.json"
HELD_OUT_FILE = "heldout.jsonl"
HELD_OUT_LABEL = "held-out rows of the run"  # how evaluation names those rows (card.py reads it)
CONFIG_HISTORY_FILE = "config-history.jsonl"
EVAL_FILE = "eval.json"  # lorafit eval's scores
TRACKERS_FILE = "trackers.json"  # the trackers' run ids (lorafit.tracking)
# Everything a run writes into its folder (trackers' folders and files included): what replacing a
# run moves aside; anything else in the folder is the user's and stays untouched (lorafit.rundir).
RUN_ENTRIES = (CONFIG_FILE, RUN_FILE, HELD_OUT_FILE, CONFIG_HISTORY_FILE, METRICS_FILE, LOSS_PLOT, RESULT_FILE,
               ADAPTER_DIR, CHECKPOINTS_DIR, EVAL_FILE, TRACKERS_FILE, "tensorboard", "wandb", "mlflow.db",
               "mlartifacts")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class RunTarget:
    """What a RUN_OR_ADAPTER(_OR_MODEL) path points at: an adapter (maybe inside a run), or a bare
    model (``adapter_dir`` None). ``base_model`` is the run config's model, else the adapter's
    recorded base, else the model itself."""

    adapter_dir: Path | None
    run_dir: Path | None
    config: LorafitConfig | None
    base_model: str


def locate_run(path: str | Path, *, allow_model: bool = False) -> RunTarget:
    """Find the adapter (and the run's config, when there is one) behind ``path``; with
    ``allow_model`` a model folder or hub id is accepted as a bare model."""
    text = str(path)
    root = Path(text).expanduser()
    is_model_dir = root.is_dir() and (root / "config.json").exists() \
        and not (root / ADAPTER_CONFIG).exists() and not (root / ADAPTER_DIR).is_dir()
    if allow_model and (is_model_dir or (not root.exists() and not looks_like_path(text))):
        return RunTarget(adapter_dir=None, run_dir=None, config=None, base_model=text)
    if not root.exists():
        raise AdapterError(f"{root}: no such run or adapter folder")
    if not root.is_dir():
        raise AdapterError(f"{root}: expected a run or adapter folder, got a file")
    if (root / ADAPTER_CONFIG).exists():
        adapter_dir = root
        run_dir = _run_dir_above(root)
    elif (root / ADAPTER_DIR / ADAPTER_CONFIG).exists():
        adapter_dir, run_dir = root / ADAPTER_DIR, root
    else:
        _refuse_unfinished_run(root)
        raise AdapterError(f"{root}: no {ADAPTER_CONFIG} here or in {ADAPTER_DIR}/ (not a run or adapter folder)")
    config = None
    if run_dir is not None and (run_dir / CONFIG_FILE).exists():
        config = read_run_config(run_dir / CONFIG_FILE)
    base = config.model.name_or_path if config is not None else _base_model(adapter_dir)
    return RunTarget(adapter_dir=adapter_dir, run_dir=run_dir, config=config, base_model=base)


def _refuse_unfinished_run(root: Path) -> None:
    """A run stopped before its export has checkpoints and no adapter/: say how to get one."""
    if not (root / CHECKPOINTS_DIR).is_dir():
        return
    from lorafit.checkpoint import latest_checkpoint

    newest = latest_checkpoint(root / CHECKPOINTS_DIR)
    if newest is None:
        return
    resume = f"lorafit train {root / CONFIG_FILE}" if (root / CONFIG_FILE).exists() else "lorafit train"
    raise AdapterError(f"{root}: no {ADAPTER_DIR}/ yet: the run stopped before it finished; resume it with "
                       f"`{resume}`, or use its newest checkpoint ({newest})")


def _run_dir_above(adapter_dir: Path) -> Path | None:
    """An adapter inside a run (adapter/ or checkpoints/step-N/adapter) belongs to that run."""
    for parent in list(adapter_dir.parents)[:3]:
        if (parent / CONFIG_FILE).exists():
            return parent
    return None


def _base_model(adapter_dir: Path) -> str:
    try:
        data = json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{adapter_dir / ADAPTER_CONFIG}: unreadable adapter config ({exc})") from exc
    base = data.get("base_model_name_or_path") if isinstance(data, dict) else None
    if not base:
        raise AdapterError(f"{adapter_dir / ADAPTER_CONFIG}: no base_model_name_or_path")
    return str(base)


def read_run_config(path: Path) -> LorafitConfig:
    """A run folder's config.yaml, validated."""
    return validate_config(read_yaml(path), str(path))


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and name != "data.columns":
            out.update(_flatten(value, name))
        else:
            out[name] = value
    return out


def result_changes(old: LorafitConfig, new: LorafitConfig) -> dict[str, tuple[Any, Any]]:
    """Fields that differ between two configs and change what a run produces (cadence of eval,
    logging and saving, and output verbosity, don't)."""
    before, after = _flatten(old.model_dump(mode="json")), _flatten(new.model_dump(mode="json"))
    return {key: (before.get(key), after.get(key)) for key in sorted(set(before) | set(after))
            if before.get(key) != after.get(key) and key not in RESULT_NEUTRAL_FIELDS}


def record_config_change(run_dir: Path, step: int, changes: dict[str, tuple[Any, Any]]) -> None:
    """Append an accepted config change to the run's history (config.yaml then holds the new one)."""
    line = {"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "changed": {key: {"old": old, "new": new} for key, (old, new) in changes.items()}}
    with (run_dir / CONFIG_HISTORY_FILE).open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(line) + "\n")
