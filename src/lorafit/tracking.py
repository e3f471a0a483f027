"""Experiment trackers (``train.report_to``): TensorBoard, Weights & Biases, MLflow, trackio.

Each backend is accelerate's tracker class (``accelerate.tracking``), which wraps the library's own
client; none of these packages is a lorafit dependency (``pip install 'lorafit[tracking]'``), and a
missing one is a one-line error before any data or model loads. Only the main process tracks.

Where each writes (nothing by default outside the run folder, except trackio's own store):

- ``tensorboard``: event files in ``<run>/tensorboard`` (``tensorboard --logdir <run>``).
- ``wandb``: the W&B run; its local files under ``<run>/wandb`` (``WANDB_MODE=offline`` works
  without an account; ``wandb sync`` uploads later). Project: ``$WANDB_PROJECT`` or ``lorafit``.
- ``mlflow``: ``$MLFLOW_TRACKING_URI`` when set, else an SQLite store ``<run>/mlflow.db`` with
  artifacts in ``<run>/mlartifacts`` (MLflow 3's own default store, kept in the run folder).
  Experiment: ``$MLFLOW_EXPERIMENT_NAME`` or ``lorafit``.
- ``trackio``: trackio's store (``$TRACKIO_DIR``, default ``~/.cache/huggingface/trackio``),
  project ``lorafit``, run named after the run folder (``trackio show --project lorafit``).

What is logged: the resolved config (plus a few facts of the run) as hyperparameters; per logging
step ``train/loss``, ``train/lr``, ``train/tokens_per_s``, ``train/tokens``,
``train/peak_memory_gib``; per evaluation ``eval/loss``; with a preference objective also
``train/`` and ``eval/`` ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``,
``rewards/accuracies``, ``logps/chosen``, ``logps/rejected`` (TRL's names); and from ``lorafit eval RUN`` the ROUGE /
perplexity scores (``eval/rouge1`` ..., ``baseline/...``) at the run's last step, with the example
generations as a table. The tracker runs' identities are kept in ``<run>/trackers.json``, so a
resumed run and a later ``lorafit eval`` continue the same W&B / MLflow / trackio run.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lorafit.errors import ConfigError
from lorafit.runs import RESULT_FILE, TRACKERS_FILE

TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")
PROJECT = "lorafit"
# module to import -> the pip package that provides it
_NEEDS = {
    "tensorboard": {"tensorboard": "tensorboard"},
    "wandb": {"wandb": "wandb"},
    "mlflow": {"mlflow": "mlflow-skinny"},
    "trackio": {"trackio": "trackio"},
}
# MLflow's SQLite store (the default here) needs these besides mlflow-skinny
_MLFLOW_SQLITE = {"sqlalchemy": "sqlalchemy", "alembic": "alembic"}
_TRAIN_KEYS = {"loss": "train/loss", "lr": "train/lr", "tokens_per_s": "train/tokens_per_s",
               "tokens": "train/tokens", "peak_memory_gib": "train/peak_memory_gib", "eval_loss": "eval/loss"}
# a preference objective's metrics (lorafit.objectives), named as TRL's DPO logs them
_PREFERENCE_KEYS = {"rewards_chosen": "rewards/chosen", "rewards_rejected": "rewards/rejected",
                    "reward_margin": "rewards/margins", "reward_accuracy": "rewards/accuracies",
                    "logps_chosen": "logps/chosen", "logps_rejected": "logps/rejected", "nll_loss": "nll_loss",
                    "log_odds_ratio": "log_odds_ratio"}
_TRAIN_KEYS.update({k: f"train/{v}" for k, v in _PREFERENCE_KEYS.items()})
_TRAIN_KEYS.update({f"eval_{k}": f"eval/{v}" for k, v in _PREFERENCE_KEYS.items()})


def check_trackers(names: list[str]) -> None:
    """Raise a one-line ``ConfigError`` naming the pip install when a tracker's package is missing."""
    for name in names:
        if name not in _NEEDS:
            raise ConfigError(f"train.report_to: unknown tracker '{name}' (known: {', '.join(TRACKERS)})")
        needs = dict(_NEEDS[name])
        if name == "mlflow" and not os.environ.get("MLFLOW_TRACKING_URI"):
            needs.update(_MLFLOW_SQLITE)
        missing = [pip for module, pip in needs.items() if importlib.util.find_spec(module) is None]
        if missing:
            raise ConfigError(f"train.report_to: {name} needs {' '.join(missing)}: pip install 'lorafit[tracking]' "
                              f"(or pip install {' '.join(missing)})")


def flat_config(config: Any, facts: dict[str, Any] | None = None) -> dict[str, Any]:
    """The config as ``section.field`` -> scalar (lists and mappings as JSON), which every tracker takes."""
    data = config.model_dump(mode="json") if hasattr(config, "model_dump") else dict(config)
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value and prefix.count(".") < 1:
            for key, child in value.items():
                walk(f"{prefix}.{key}" if prefix else key, child)
        elif isinstance(value, (list, dict)):
            flat[prefix] = json.dumps(value)
        elif value is None:
            flat[prefix] = "none"
        else:
            flat[prefix] = value

    walk("", data)
    for key, value in (facts or {}).items():
        flat[f"run.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def tracker_metrics(record: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl record as tracker metric names (``train/loss``, ``eval/loss``, ...)."""
    return {_TRAIN_KEYS[k]: float(v) for k, v in record.items() if k in _TRAIN_KEYS and v is not None}


def _debug() -> bool:
    return os.environ.get("LORAFIT_DEBUG") == "1"


@contextlib.contextmanager
def _library_output() -> Iterator[None]:
    """Tracker libraries print banners on stdout; stdout belongs to lorafit's log format. Shown on
    stderr with ``--debug``, dropped otherwise."""
    with contextlib.redirect_stdout(sys.stderr if _debug() else io.StringIO()):
        yield


class Trackers:
    """The run's open trackers: config once, metrics per record, tables, then finish."""

    def __init__(self, output_dir: Path, names: list[str], *, step_offset: int | None, config: Any,
                 facts: dict[str, Any] | None) -> None:
        self.output_dir = output_dir
        self.names = names
        self.ids = {} if step_offset == 0 else _read_ids(output_dir)
        self.fresh = step_offset == 0
        self.reopened = step_offset is None
        if facts is None:  # reopened: the facts recorded when the run started
            facts = self.ids.get("facts", {})
        self.ids["facts"] = facts
        self.open: dict[str, Any] = {}
        values = flat_config(config, facts) if config is not None else None
        run_name = output_dir.resolve().name
        try:
            with _library_output():
                for name in names:
                    continuing = bool(self.ids.get(name))
                    tracker = getattr(self, f"_open_{name}")(run_name, step_offset, values)
                    self.open[name] = tracker  # from here on close() finishes it, even if start() fails
                    tracker.start()
                    if name == "mlflow":  # the run id exists once started
                        self.ids["mlflow"]["run_id"] = tracker.active_run.info.run_id
                    if self._store_config(name, continuing) and values is not None:
                        tracker.store_init_configuration(values)
        except BaseException:
            self.close()  # the caller never gets this object: finish the trackers already started
            raise
        _write_ids(output_dir, self.ids)

    def _store_config(self, name: str, continuing: bool) -> bool:
        """trackio takes the config in ``init`` (every time: a resumed trackio run forgets it otherwise);
        MLflow refuses to change a param, so a continued MLflow run keeps the ones it has."""
        if name == "trackio":
            return False
        if name == "mlflow" and continuing:
            return False
        return not self.reopened

    # ------------------------------------------------------------------------------- backends
    def _open_tensorboard(self, run_name: str, step_offset: int | None, values: Any) -> Any:
        from accelerate.tracking import TensorBoardTracker

        # a resumed run drops the events logged after its checkpoint; a fresh one drops all earlier ones
        kwargs = {"purge_step": step_offset + 1 if step_offset else 0} if step_offset is not None else {}
        self.ids["tensorboard"] = {"logdir": str((self.output_dir / "tensorboard").resolve())}
        return TensorBoardTracker("tensorboard", str(self.output_dir), **kwargs)

    def _open_wandb(self, run_name: str, step_offset: int | None, values: Any) -> Any:
        from accelerate.tracking import WandBTracker

        saved = self.ids.get("wandb", {})
        run_id = saved.get("id") or uuid.uuid4().hex[:12]
        project = saved.get("project") or os.environ.get("WANDB_PROJECT", PROJECT)
        self.ids["wandb"] = {"id": run_id, "project": project}
        kwargs: dict[str, Any] = {}
        if not _debug():
            import wandb

            kwargs["settings"] = wandb.Settings(silent=True)  # no banner on stderr
        return WandBTracker(project, name=run_name, id=run_id, resume="allow", dir=str(self.output_dir), **kwargs)

    def _open_mlflow(self, run_name: str, step_offset: int | None, values: Any) -> Any:
        import mlflow
        from accelerate.tracking import MLflowTracker

        if not _debug():
            logging.getLogger("mlflow").setLevel(logging.WARNING)  # "Creating initial MLflow database tables..."

        saved = self.ids.get("mlflow", {})
        uri = saved.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI") \
            or f"sqlite:///{(self.output_dir / 'mlflow.db').resolve()}"
        mlflow.set_tracking_uri(uri)
        experiment = saved.get("experiment") or os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT)
        artifacts = str((self.output_dir / "mlartifacts").resolve()) if uri.startswith("sqlite") else None
        self.ids["mlflow"] = {"tracking_uri": uri, "experiment": experiment, "run_id": saved.get("run_id")}
        return MLflowTracker(experiment_name=experiment, logging_dir=artifacts, run_id=saved.get("run_id"),
                             run_name=run_name)

    def _open_trackio(self, run_name: str, step_offset: int | None, values: Any) -> Any:
        from accelerate.tracking import TrackioTracker

        project = self.ids.get("trackio", {}).get("project", PROJECT)
        self.ids["trackio"] = {"project": project, "name": run_name}
        kwargs: dict[str, Any] = {"name": run_name, "resume": "never" if self.fresh else "allow", "embed": False}
        if values is not None:
            kwargs["config"] = values
        return TrackioTracker(project, **kwargs)

    # -------------------------------------------------------------------------------- logging
    def log_record(self, record: dict[str, Any]) -> None:
        values = tracker_metrics(record)
        if values:
            self.log(values, int(record["step"]))

    def log(self, values: dict[str, float], step: int) -> None:
        with _library_output():
            for kind, tracker in self.open.items():
                tracker.log(values, step=self._step(kind, step))

    def _step(self, kind: str, step: int) -> int | None:
        """W&B refuses steps below a resumed run's last one: a reopened run logs at its next step."""
        return None if kind == "wandb" and self.reopened else step

    def log_table(self, name: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        """A table of texts (eval examples): a W&B / trackio table, an MLflow table artifact, a
        markdown table in TensorBoard's text tab."""
        with _library_output():
            for kind, tracker in self.open.items():
                if kind == "wandb":
                    tracker.log_table(name, columns=columns, data=rows, step=self._step(kind, step))
                elif kind == "trackio":
                    import trackio

                    tracker.log({name: trackio.Table(columns=columns, data=rows)}, step=self._step(kind, step))
                elif kind == "mlflow":
                    import mlflow

                    mlflow.log_table({c: [str(r[i]) for r in rows] for i, c in enumerate(columns)},
                                     artifact_file=f"{name}.json")
                elif kind == "tensorboard":
                    tracker.writer.add_text(name, markdown_table(columns, rows), global_step=step)
                    tracker.writer.flush()

    def finish(self, summary: dict[str, Any]) -> None:
        values = {f"final/{k}": float(v) for k, v in summary.items() if isinstance(v, (int, float))
                  and not isinstance(v, bool)}
        step = int(summary.get("steps", 0))
        if values:
            self.log(values, step)
        self.close()

    def close(self) -> None:
        with _library_output():
            for kind, tracker in self.open.items():
                with contextlib.suppress(Exception):  # one tracker failing to close must not hide the others
                    if kind == "trackio":
                        import trackio

                        trackio.finish()  # also forgets the run, which would otherwise finish again at exit
                    else:
                        tracker.finish()
        self.open = {}


def markdown_table(columns: list[str], rows: list[list[Any]]) -> str:
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", "<br>")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def open_trackers(names: list[str], output_dir: Path, config: Any, *, resumed_step: int = 0,
                  facts: dict[str, Any] | None = None) -> Trackers:
    """Start (or, when ``resumed_step`` > 0, continue) the run's trackers and log its config."""
    check_trackers(names)
    return Trackers(Path(output_dir), list(names), step_offset=resumed_step, config=config, facts=facts or {})


def reopen_trackers(run_dir: Path, names: list[str], config: Any = None) -> Trackers:
    """Continue a finished run's trackers (for ``lorafit eval RUN``): same runs, nothing purged, the
    config not logged again (``config`` only reaches trackio, which needs it on every init)."""
    check_trackers(names)
    return Trackers(Path(run_dir), list(names), step_offset=None, config=config, facts=None)


def log_eval(run_dir: Path, names: list[str], result: dict[str, Any], config: Any = None) -> None:
    """``lorafit eval RUN``: the scores (``eval/rouge1`` ..., ``baseline/...``) and the example
    generations (``eval/examples``), into the run's trackers at its last step."""
    values = {f"eval/{k}": float(v) for k, v in (result.get("adapter") or {}).items() if v is not None}
    values.update({f"baseline/{k}": float(v) for k, v in (result.get("baseline") or {}).items() if v is not None})
    try:
        step = int(json.loads((Path(run_dir) / RESULT_FILE).read_text(encoding="utf-8")).get("steps", 0))
    except (OSError, ValueError):
        step = 0
    trackers = reopen_trackers(Path(run_dir), names, config)
    try:
        if values:
            trackers.log(values, step)
        examples = result.get("examples") or []
        if examples:
            columns = list(dict.fromkeys(k for row in examples for k in row))
            trackers.log_table("eval/examples", columns, [[row.get(c, "") for c in columns] for row in examples], step)
    finally:
        trackers.close()


def _read_ids(output_dir: Path) -> dict[str, Any]:
    path = output_dir / TRACKERS_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_ids(output_dir: Path, ids: dict[str, Any]) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / TRACKERS_FILE).write_text(json.dumps(ids, indent=2) + "\n", encoding="utf-8")
