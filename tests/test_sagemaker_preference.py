"""A preference run as a SageMaker job: the launcher uploads model.adapter as the ``adapter`` channel
with the adapter's settings in the config, and the in-container entry trains DPO from it."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import tiny_run_config
from helpers_preference import pairs, preference_config, write_jsonl
from test_sagemaker import ROLE, aws, cli, client, launch_args, moto_url, s3_objects  # noqa: F401 - fixtures

from lorafit.config import validate_config


@pytest.fixture(scope="module")
def sft_run(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lorafit.builtin.dialogues import generate
    from lorafit.training import train

    root = tmp_path_factory.mktemp("sm-sft")
    data = write_jsonl(root / "dialogues.jsonl", generate(24, 11))
    train(validate_config(tiny_run_config(tiny_llama, data, root / "run", max_steps=2, eval_steps=None)),
          progress=False)
    return root / "run"


def test_launch_uploads_the_starting_adapter_with_its_settings(aws: str, sft_run: Path, tiny_llama: Path,  # noqa: F811
                                                               tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs(24))
    raw = preference_config(tiny_llama, data, tmp_path / "local", model={"adapter": str(sft_run)})
    del raw["model"]["name_or_path"]
    raw["lora"] = {"dropout": 0.0}
    config = tmp_path / "dpo.yaml"
    config.write_text(yaml.safe_dump(raw))
    client("s3").create_bucket(Bucket="team-bucket")
    code, out, err = cli(capsys, *launch_args(config, "--bucket", "team-bucket", "--job-name", "lorafit-dpo"))
    assert code == 0, err
    assert "uploaded adapter: " in out and "lorafit: data: 24 rows -> " in out
    job = client("sagemaker").describe_training_job(TrainingJobName="lorafit-dpo")
    channels = {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"] for c in job["InputDataConfig"]}
    assert channels["adapter"] == "s3://team-bucket/lorafit/lorafit-dpo/input/adapter/"
    objects = s3_objects("team-bucket", "lorafit/lorafit-dpo/input/")
    assert {"lorafit/lorafit-dpo/input/adapter/adapter_config.json",
            "lorafit/lorafit-dpo/input/adapter/adapter_model.safetensors"} <= objects.keys()
    sent = yaml.safe_load(objects["lorafit/lorafit-dpo/input/config/lorafit.yaml"])
    assert sent["model"]["name_or_path"] == str(tiny_llama)  # the adapter's base, uploaded as the model channel
    assert (sent["lora"]["r"], sent["lora"]["alpha"], sent["train"]["objective"]) == (8, 16, "dpo")
    assert "lorafit/lorafit-dpo/input/model/config.json" in objects


def test_the_entry_trains_dpo_from_the_adapter_channel(sft_run: Path, tiny_llama: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture) -> None:
    """In this process (a job's single-process path runs in-process too)."""
    from lorafit.sagemaker import entry

    channels = tmp_path / "input" / "data"
    for name in ("training", "config", "adapter"):
        (channels / name).mkdir(parents=True)
    write_jsonl(channels / "training" / "pairs.jsonl", pairs(32))
    for item in (sft_run / "adapter").iterdir():  # what the launcher uploads: the adapter folder's files
        shutil.copy(item, channels / "adapter" / item.name)
    raw = preference_config(tiny_llama, "/user/pairs.jsonl", tmp_path / "user-out", max_steps=2, eval_steps=None)
    raw["model"] = {"name_or_path": "my-org/tiny-llama", "adapter": "/user/runs/sft"}
    raw["lora"] = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
    (channels / "config" / "lorafit.yaml").write_text(yaml.safe_dump(raw))
    env = dict(SM_MODEL_DIR=str(tmp_path / "model"), SM_CHECKPOINT_DIR=str(tmp_path / "checkpoints"),
               SM_CHANNEL_TRAINING=str(channels / "training"), SM_CHANNEL_CONFIG=str(channels / "config"),
               SM_CHANNEL_MODEL=str(tiny_llama), SM_CHANNEL_ADAPTER=str(channels / "adapter"),
               SM_HOSTS='["algo-1"]', SM_CURRENT_HOST="algo-1", SM_NUM_GPUS="0",
               SM_OUTPUT_DIR=str(tmp_path / "output"))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "SM_TRAINING_ENV"):
        monkeypatch.delenv(name, raising=False)
    code = entry.main(["--base_model", "my-org/tiny-llama", "--train.beta", "0.2"])
    out, err = capsys.readouterr()
    assert code == 0, out[-3000:] + err[-3000:]
    exported = yaml.safe_load((tmp_path / "model" / "config.yaml").read_text())
    assert exported["model"]["adapter"] == str(channels / "adapter") and exported["train"]["beta"] == 0.2
    first = next(json.loads(line) for line in (tmp_path / "model" / "metrics.jsonl").read_text().splitlines()
                 if "eval_loss" in line)
    assert first["eval_loss"] == pytest.approx(0.6931471805599453, abs=1e-6)  # the channel's adapter is the reference
    from lorafit.sagemaker.launcher import METRIC_DEFINITIONS

    regex = {m["Name"]: re.compile(m["Regex"]) for m in METRIC_DEFINITIONS}
    steps = [line for line in out.splitlines() if line.startswith("lorafit: step ") and " loss=" in line]
    assert len(steps) == 2 and all(regex["train:reward_accuracy"].search(line) for line in steps)
    assert any(regex["eval:reward_margin"].search(line) for line in out.splitlines())
