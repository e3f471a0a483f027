"""train.report_to: real local backends, read back with each library's own reader.

TensorBoard event files (EventAccumulator), MLflow's SQLite store (MlflowClient), W&B offline run
files, trackio's local store; then ``lorafit eval RUN`` logs its scores into the same tracker runs.
The tracker packages come with ``lorafit[tracking]`` (CI installs it): a missing one fails here.
That only rank 0 tracks is checked by tests/test_distributed.py (one TensorBoard stream from --nproc 2).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from conftest import tiny_run_config
from helpers_trackers import tensorboard_scalars, tensorboard_texts, wandb_history

from lorafit.cli import main
from lorafit.config import validate_config
from lorafit.training import train

ALL = ["tensorboard", "mlflow", "wandb", "trackio"]
STEPS = 6


@pytest.fixture(scope="module")
def tracker_env(tmp_path_factory: pytest.TempPathFactory):
    """Offline W&B and trackio's store in a temporary folder; no user MLflow/W&B settings."""
    root = tmp_path_factory.mktemp("tracker-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")
        for name in ("WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
            patch.setenv(name, str(root / name.lower()))
        patch.setenv("TRACKIO_DIR", str(root / "trackio"))
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_PROJECT", "LORAFIT_DEBUG"):
            patch.delenv(name, raising=False)
        yield root


@pytest.fixture(scope="module")
def tracked_run(tracker_env: Path, tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lorafit.builtin.dialogues import generate

    root = tmp_path_factory.mktemp("tracked")
    data = root / "dialogues.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in generate(64, 11)), encoding="utf-8")
    raw = tiny_run_config(tiny_llama, data, root / "run", max_steps=STEPS, eval_steps=3)
    raw["train"]["report_to"] = ALL
    train(validate_config(raw), log_format="plain")
    return root / "run"


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def mlflow_client(run: Path):
    from mlflow.tracking import MlflowClient

    ids = json.loads((run / "trackers.json").read_text())["mlflow"]
    assert ids["tracking_uri"] == f"sqlite:///{(run / 'mlflow.db').resolve()}"  # inside the run folder
    return MlflowClient(ids["tracking_uri"]), ids["run_id"]


def trackio_logs(run: Path) -> list[dict]:
    from trackio.sqlite_storage import SQLiteStorage

    return SQLiteStorage.get_logs(project="lorafit", run=run.name)


def test_every_tracker_gets_the_config_and_each_logged_step(tracked_run: Path) -> None:
    metrics = records(tracked_run)
    losses = [(r["step"], r["loss"]) for r in metrics if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in metrics if "eval_loss" in r]
    assert [s for s, _ in losses] == list(range(1, STEPS + 1)) and [s for s, _ in evals] == [0, 3, STEPS]

    scalars = tensorboard_scalars(tracked_run / "tensorboard")
    assert [s for s, _ in scalars["train/loss"]] == [s for s, _ in losses]
    assert all(abs(v - loss) < 1e-5 for (_, v), (_, loss) in zip(scalars["train/loss"], losses, strict=True))
    assert [s for s, _ in scalars["eval/loss"]] == [0, 3, STEPS]
    for tag in ("train/lr", "train/tokens_per_s", "train/peak_memory_gib", "train/tokens"):
        assert len(scalars[tag]) == STEPS, tag
    assert all(v > 0 for _, v in scalars["train/peak_memory_gib"])

    client, run_id = mlflow_client(tracked_run)
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted((m.step, round(m.value, 6)) for m in history) == [(s, round(v, 6)) for s, v in losses]
    assert [m.step for m in client.get_metric_history(run_id, "eval/loss")] == [0, 3, STEPS]
    params = client.get_run(run_id).data.params
    assert params["lora.r"] == "8" and params["train.max_steps"] == str(STEPS)
    assert params["run.trainable_params"] == str(metrics and json.loads((tracked_run / "result.json").read_text())
                                                 ["trainable_params"])
    assert client.get_run(run_id).info.status == "FINISHED"

    rows, config = wandb_history(tracked_run)
    wandb_losses = [(r["_step"], r["train/loss"]) for r in rows if "train/loss" in r]
    assert [s for s, _ in wandb_losses] == [s for s, _ in losses]
    assert config["lora.r"] == 8 and config["run.max_steps"] == STEPS

    logs = trackio_logs(tracked_run)
    assert [log["step"] for log in logs if "train/loss" in log] == [s for s, _ in losses]
    assert [log["step"] for log in logs if "eval/loss" in log] == [0, 3, STEPS]


def test_eval_scores_and_examples_go_to_the_same_tracker_runs(
    tracked_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["eval", str(tracked_run), "--max-new-tokens", "6", "--limit", "3"]) == 0
    capsys.readouterr()
    scores = json.loads((tracked_run / "eval.json").read_text())["adapter"]

    scalars = tensorboard_scalars(tracked_run / "tensorboard")
    assert scalars["eval/rouge1"] == [(STEPS, pytest.approx(scores["rouge1"], abs=1e-4))]
    assert scalars["eval/rougeL"] == [(STEPS, pytest.approx(scores["rougeL"], abs=1e-4))]
    assert len(scalars["train/loss"]) == STEPS  # the training curve is still there
    table = tensorboard_texts(tracked_run / "tensorboard")["eval/examples/text_summary"]
    assert table[0][0] == STEPS and table[0][1].startswith("| reference | default |")

    client, run_id = mlflow_client(tracked_run)  # the same MLflow run, continued
    assert client.get_metric_history(run_id, "eval/rouge1")[0].value == pytest.approx(scores["rouge1"])
    local = client.download_artifacts(run_id, "eval/examples.json")
    assert "reference" in json.loads(Path(local).read_text())["columns"]

    rows, _ = wandb_history(tracked_run)
    assert any(r.get("eval/rouge1") == pytest.approx(scores["rouge1"]) for r in rows)
    assert any(r.get("eval/examples/_type") == "table-file" for r in rows)
    run_ids = {p.name.rsplit("-", 1)[1] for p in (tracked_run / "wandb").glob("offline-run-*")}
    assert len(run_ids) == 1  # the eval continued the training's W&B run

    logs = trackio_logs(tracked_run)
    assert any(log.get("eval/rouge1") == pytest.approx(scores["rouge1"]) for log in logs)
    assert any("eval/examples" in log for log in logs)


def test_a_missing_tracker_package_is_one_line_before_the_model_loads(
    tiny_llama: Path, dialogue_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str]
) -> None:
    raw = tiny_run_config(tiny_llama, dialogue_file, tmp_path / "run")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw), encoding="utf-8")
    monkeypatch.setitem(sys.modules, "wandb", None)  # what an environment without wandb looks like to import
    assert main(["train", str(config), "--set", "train.report_to=[tensorboard,wandb]"]) == 2
    captured = capsys.readouterr()
    assert captured.err == ("error: train.report_to: wandb needs wandb: pip install 'lorafit[tracking]' "
                            "(or pip install wandb)\n")
    assert "trainable params" not in captured.out and not (tmp_path / "run").exists()

    monkeypatch.setitem(sys.modules, "sqlalchemy", None)  # MLflow's default (SQLite) store needs it
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["train", str(config), "--set", "train.report_to=mlflow"]) == 2
    assert "mlflow needs sqlalchemy: pip install 'lorafit[tracking]'" in capsys.readouterr().err

    assert main(["train", str(config), "--set", "train.report_to=[comet]"]) == 2
    assert "train.report_to" in capsys.readouterr().err
