"""The in-container entry point, run locally with the SM_* variables pointing at temporary folders.

A real short training run laid out as the launcher lays out a job (config, data, eval and model
channels; SageMaker-style hyperparameters), then a simulated spot restart: a fresh container whose
checkpoint folder holds only the step-2 checkpoint resumes there and ends bit-identical.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import tiny_run_config, write_jsonl
from safetensors.torch import load_file

from lorafit.sagemaker import entry

STEPS = 4


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> dict[str, Path]:
    """Channel folders as SageMaker fills them from S3 (/opt/ml/input/data/<channel>/)."""
    from lorafit.builtin.dialogues import generate

    channels = tmp_path_factory.mktemp("sm-job") / "input" / "data"
    for name in ("training", "test", "config"):
        (channels / name).mkdir(parents=True)
    write_jsonl(channels / "training" / "dialogues.jsonl", generate(64, 11))
    write_jsonl(channels / "test" / "held-out.jsonl", generate(8, 5))
    raw = tiny_run_config(Path("/where/the/user/had/it"), Path("/user/data.jsonl"), Path("/user/out"),
                          max_steps=50, save_steps=2, eval_steps=2)
    raw["model"]["name_or_path"] = "my-org/tiny-llama"
    (channels / "config" / "lorafit.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    return {"training": channels / "training", "test": channels / "test", "config": channels / "config",
            "model": tiny_llama}


def sm_env(job: dict[str, Path], model_dir: Path, checkpoint_dir: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", SM_MODEL_DIR=str(model_dir), SM_CHECKPOINT_DIR=str(checkpoint_dir),
               SM_CHANNEL_TRAINING=str(job["training"]), SM_CHANNEL_TEST=str(job["test"]),
               SM_CHANNEL_CONFIG=str(job["config"]), SM_CHANNEL_MODEL=str(job["model"]),
               SM_HOSTS='["algo-1"]', SM_CURRENT_HOST="algo-1", SM_NUM_GPUS="0")
    env.update(extra)
    for name in ("LOCAL_RANK", "RANK", "WORLD_SIZE"):
        env.pop(name, None)
    return env


def run(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def eval_losses(folder: Path) -> list[float]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["eval_loss"] for line in lines if "eval_loss" in json.loads(line)]


@pytest.fixture(scope="module")
def first_run(job: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The job as launched: hyperparameters exactly as the SageMaker toolkit passes them."""
    root = tmp_path_factory.mktemp("sm-first")
    model_dir, checkpoint_dir = root / "model", root / "checkpoints"
    hyperparameters = ["--config", str(job["config"] / "lorafit.yaml"), "--checkpoint_dir", str(checkpoint_dir),
                       "--base_model", "my-org/tiny-llama", "--train.max_steps", str(STEPS)]
    done = run([sys.executable, "-m", "lorafit.sagemaker.entry", *hyperparameters],
               sm_env(job, model_dir, root / "unused"))
    return {"model": model_dir, "checkpoints": checkpoint_dir, "stdout": done.stdout}


def test_train_and_export_to_model_dir(job: dict[str, Path], first_run: dict) -> None:
    model_dir, checkpoint_dir = first_run["model"], first_run["checkpoints"]
    assert "resuming" not in first_run["stdout"]
    checkpoints = checkpoint_dir / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-0000002", "step-0000004"]
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "config.yaml",
                 "metrics.jsonl", "result.json"):
        assert (model_dir / name).is_file(), name
    assert not (model_dir / "checkpoints").exists()  # checkpoints stay out of model.tar.gz
    result = json.loads((model_dir / "result.json").read_text())
    assert result["steps"] == STEPS and result["output_dir"] == str(checkpoint_dir / "run")
    adapter_config = json.loads((model_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "my-org/tiny-llama"  # not the container's path
    exported = yaml.safe_load((model_dir / "config.yaml").read_text())
    assert exported["model"]["name_or_path"] == "my-org/tiny-llama"
    assert exported["data"]["path"] == str(job["training"] / "dialogues.jsonl")
    assert exported["data"]["eval_path"] == str(job["test"] / "held-out.jsonl")
    assert exported["train"]["max_steps"] == STEPS
    from lorafit.runs import locate_run

    assert locate_run(model_dir).base_model == "my-org/tiny-llama"


def test_spot_restart_resumes_from_the_checkpoint_folder(job: dict[str, Path], first_run: dict,
                                                         tmp_path: Path) -> None:
    # a fresh container; the checkpoint folder restored from S3 as it was at step 2
    model_dir, checkpoint_dir = tmp_path / "model", tmp_path / "checkpoints"
    (checkpoint_dir / "run" / "checkpoints").mkdir(parents=True)
    shutil.copytree(first_run["checkpoints"] / "run" / "checkpoints" / "step-0000002",
                    checkpoint_dir / "run" / "checkpoints" / "step-0000002")
    done = run([sys.executable, "-m", "lorafit", "sagemaker", "train", "--set", f"train.max_steps={STEPS}",
                "--base-model", "my-org/tiny-llama"],  # config from SM_CHANNEL_CONFIG, folders from SM_*
               sm_env(job, model_dir, checkpoint_dir))
    assert f"resuming from {checkpoint_dir / 'run' / 'checkpoints' / 'step-0000002'}" in done.stdout
    a = load_file(str(first_run["model"] / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(model_dir / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        assert a[key].equal(b[key]), key
    assert json.loads((model_dir / "result.json").read_text())["resumed_from"].endswith("step-0000002")

    # restarted once more after it had finished: nothing is retrained, the export is redone,
    # this time with the merged model as well (hyperparameter merge=true)
    again = tmp_path / "model-again"
    can_merge = importlib.util.find_spec("lorafit.export") is not None
    old = dict(os.environ)
    try:
        os.environ.update(sm_env(job, again, checkpoint_dir))
        code = entry.main(["--base_model", "my-org/tiny-llama", "--merge", str(can_merge)])
    finally:
        os.environ.clear()
        os.environ.update(old)
    assert code == 0
    assert load_file(str(again / "adapter" / "adapter_model.safetensors")).keys() == b.keys()
    if not can_merge:
        return
    merged = again / "merged"
    assert (merged / "config.json").is_file()
    weights = {}
    for shard in merged.glob("*.safetensors"):
        weights.update(load_file(str(shard)))
    assert weights and not any("lora" in k for k in weights)  # a plain model: the adapter is folded in
    base = load_file(str(job["model"] / "model.safetensors"))
    changed = [k for k in base if k in weights and not base[k].equal(weights[k])]
    assert changed and all(("q_proj" in k or "v_proj" in k or "k_proj" in k or "o_proj" in k) for k in changed)


def test_two_processes_go_through_torchrun(job: dict[str, Path], first_run: dict, tmp_path: Path) -> None:
    """SM_NUM_GPUS=2: two data-parallel ranks (gloo on CPU); batch 2 x 2 ranks = batch 4 x 1 process."""
    model_dir = tmp_path / "model"
    done = run([sys.executable, "-m", "lorafit.sagemaker.entry", "--train.max_steps", str(STEPS),
                "--train.batch_size", "2"],
               sm_env(job, model_dir, tmp_path / "checkpoints", SM_NUM_GPUS="2"))
    assert "2 processes on 1 host(s)" in done.stdout and "--nproc_per_node=2" in done.stdout
    assert json.loads((model_dir / "result.json").read_text())["steps"] == STEPS
    assert len(eval_losses(model_dir)) == 3
    assert eval_losses(model_dir) == pytest.approx(eval_losses(first_run["model"]), rel=1e-4)


# ---------------------------------------------------------------------------- fast, in-process
def test_hyperparameters_both_styles() -> None:
    assert entry.hyperparameter_overrides(["--train.max_steps", "100", "--lora.r=16", "--train.lr", "1e-4"]) == \
        ["train.max_steps=100", "lora.r=16", "train.lr=1e-4"]
    for bad, message in ((["--epochs", "3"], "unknown hyperparameter --epochs"),
                         (["--train.max_steps"], "missing a value"),
                         (["stray"], "expected --section.key VALUE")):
        with pytest.raises(entry.LorafitError, match=message):
            entry.hyperparameter_overrides(bad)


def test_channels_and_folders_override_the_config(tmp_path: Path) -> None:
    (tmp_path / "training").mkdir()
    write_jsonl(tmp_path / "training" / "b.jsonl", [{"dialogue": "x", "summary": "y"}])
    write_jsonl(tmp_path / "training" / "a.jsonl", [{"dialogue": "x", "summary": "y"}])
    saved = tmp_path / "test" / "my-dataset"
    saved.mkdir(parents=True)
    (saved / "dataset_dict.json").write_text("{}")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"data": {"path": "elsewhere.jsonl"}, "output_dir": "/somewhere"}))
    environ = {"SM_CHANNEL_TRAINING": str(tmp_path / "training"), "SM_CHANNEL_TEST": str(tmp_path / "test"),
               "SM_MODEL_DIR": str(tmp_path / "model"), "SM_CHECKPOINT_DIR": str(tmp_path / "ckpt"),
               "SM_HOSTS": '["algo-1", "algo-2"]', "SM_CURRENT_HOST": "algo-2", "SM_NUM_GPUS": "4"}
    parser = entry.argparse.ArgumentParser()
    entry.add_entry_arguments(parser)
    args, extra = parser.parse_known_args(["--config", str(config), "--train.max_steps", "7"])
    env = entry.SageMakerEnv.read(args, environ)
    assert env.hosts == ["algo-1", "algo-2"] and not env.is_master_host and env.num_gpus == 4
    config_obj, base_model = entry.build_config(args, extra, env)
    assert config_obj.data.path == [str(tmp_path / "training" / "a.jsonl"), str(tmp_path / "training" / "b.jsonl")]
    assert config_obj.data.eval_path == str(saved)
    assert config_obj.output_dir == str(tmp_path / "ckpt" / "run")
    assert config_obj.train.max_steps == 7 and base_model is None
    command = entry._torchrun_command(env, ["--train.max_steps=7"])
    assert command[-3:] == ["-m", "lorafit.sagemaker.entry", "--train.max_steps=7"]
    assert {"--nnodes=2", "--node_rank=1", "--master_addr=algo-1", "--nproc_per_node=4"} <= set(command)
    # the default locations when nothing is set
    defaults = entry.SageMakerEnv.read(parser.parse_known_args([])[0], {})
    assert defaults.checkpoint_dir == Path("/opt/ml/checkpoints") and defaults.model_dir == Path("/opt/ml/model")
    assert defaults.hosts == ["localhost"] and defaults.is_master_host


def test_entry_errors_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("SM_CHANNEL_TRAINING", str(tmp_path / "empty"))
    monkeypatch.setenv("SM_CHECKPOINT_DIR", str(tmp_path / "ckpt"))
    assert entry.main([]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: SM_CHANNEL_TRAINING: no data files (.jsonl, .json, .csv, .parquet) in {tmp_path / 'empty'}"
    monkeypatch.delenv("SM_CHANNEL_TRAINING")
    assert entry.main(["--epochs", "3"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: unknown hyperparameter --epochs")
