"""The run folder's layout, and finding the adapter and config behind a user-given path.

    output_dir/
      config.yaml          the resolved config that produced the run
      adapter/             PEFT format: adapter_config.json + adapter_model.safetensors + tokenizer
      checkpoints/         step-NNNNNNN/ folders (see lorafit.checkpoint)
      metrics.jsonl        one JSON object per logged step / evaluation
      loss.png             the loss curve
      result.json          written last: the run finished

Commands that take RUN_OR_ADAPTER accept a run folder, an adapter folder, or a checkpoint folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lorafit.config import LorafitConfig, read_yaml, validate_config
from lorafit.errors import AdapterError

CONFIG_FILE = "config.yaml"
ADAPTER_DIR = "adapter"
CHECKPOINTS_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
LOSS_PLOT = "loss.png"
RESULT_FILE = "result.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class RunInfo:
    """What a RUN_OR_ADAPTER path points at."""

    run_dir: Path | None
    adapter_dir: Path
    config: LorafitConfig | None
    base_model: str


def resolve_run(path: str | Path) -> RunInfo:
    """Find the adapter (and the run's config, when there is one) behind ``path``."""
    root = Path(path).expanduser()
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
        raise AdapterError(f"{root}: no {ADAPTER_CONFIG} here or in {ADAPTER_DIR}/ (not a run or adapter folder)")
    config = None
    if run_dir is not None and (run_dir / CONFIG_FILE).exists():
        config = validate_config(read_yaml(run_dir / CONFIG_FILE), str(run_dir / CONFIG_FILE))
    return RunInfo(run_dir=run_dir, adapter_dir=adapter_dir, config=config, base_model=_base_model(adapter_dir))


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
