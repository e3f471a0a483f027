"""``lorafit sagemaker launch|status|download`` against moto's AWS server on 127.0.0.1 (real HTTP).

The server runs in its own process (tests/sagemaker_server.py); boto3 finds it through
AWS_ENDPOINT_URL with fake credentials, exactly as it would find AWS. moto completes every
training job at once and cannot fail one, so the failed-job and still-running paths set the job's
status server-side through that helper's one test-only route (see its docstring).
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import write_jsonl

from lorafit.cli import main

ROLE = "arn:aws:iam::123456789012:role/service-role/AmazonSageMaker-ExecutionRole"
IMAGE_US = ("763104351884.dkr.ecr.us-east-1.amazonaws.com/huggingface-pytorch-training:"
            "2.8.0-transformers4.56.2-gpu-py312-cu129-ubuntu22.04")


@pytest.fixture(scope="module")
def moto_url() -> str:
    server = Path(__file__).with_name("sagemaker_server.py")
    process = subprocess.Popen([sys.executable, str(server)], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    try:
        line = process.stdout.readline()
        assert line.startswith("PORT "), f"moto server did not start: {line!r}"
        yield f"http://127.0.0.1:{int(line.split()[1])}"
    finally:
        process.terminate()
        process.wait(timeout=20)


@pytest.fixture
def aws(moto_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """Fresh server state, fake credentials, region us-east-1, and no way to reach real AWS."""
    urllib.request.urlopen(urllib.request.Request(f"{moto_url}/moto-api/reset", method="POST")).read()
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_ROLE_ARN",
                 "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                 "AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return moto_url


def client(name: str, region: str = "us-east-1"):  # noqa: ANN201 - a boto3 client
    import boto3

    return boto3.Session(region_name=region).client(name)


def set_job(url: str, name: str, status: str, reason: str | None = None, region: str = "us-east-1") -> None:
    query = f"name={name}&status={status}&region={region}"
    if reason:
        query += "&reason=" + urllib.request.quote(reason)
    urllib.request.urlopen(urllib.request.Request(f"{url}/_lorafit/training-job?{query}", method="POST")).read()


def cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    code = main(["sagemaker", *args])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, err: str) -> str:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def s3_objects(bucket: str, prefix: str = "", region: str = "us-east-1") -> dict[str, bytes]:
    s3 = client("s3", region)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]
    return {key: s3.get_object(Bucket=bucket, Key=key)["Body"].read() for key in keys}


@pytest.fixture
def run_config(tmp_path: Path, tiny_llama: Path, dialogue_file: Path) -> Path:
    """A config with a local tiny model, local training data and a local held-out file."""
    from lorafit.builtin.dialogues import generate

    eval_file = write_jsonl(tmp_path / "held-out.jsonl", generate(8, 5))
    raw = {"model": {"name_or_path": str(tiny_llama)},
           "data": {"path": str(dialogue_file), "eval_path": str(eval_file), "format": "summarization"},
           "train": {"max_steps": 50, "seq_len": 128}, "output_dir": str(tmp_path / "local-run")}
    path = tmp_path / "lorafit.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def launch_args(config: Path, *extra: str) -> list[str]:
    return ["launch", str(config), "--role", ROLE, "--instance-type", "ml.g5.2xlarge", *extra]


def test_launch_uploads_inputs_and_creates_the_job(aws: str, run_config: Path, tiny_llama: Path,
                                                   dialogue_file: Path, capsys: pytest.CaptureFixture) -> None:
    client("s3").create_bucket(Bucket="team-bucket")
    code, out, err = cli(capsys, *launch_args(run_config, "--spot", "--max-runtime", "3600", "--bucket",
                                              "team-bucket", "--job-name", "lorafit-test-1", "--set",
                                              "train.max_steps=5"))
    assert code == 0, err
    assert "created training job lorafit-test-1 on 1 x ml.g5.2xlarge (1 x NVIDIA A10G (24 GB)) spot" in out

    prefix = "lorafit/lorafit-test-1/"
    objects = s3_objects("team-bucket", prefix)
    assert objects[f"{prefix}input/training/dialogues.jsonl"] == dialogue_file.read_bytes()
    assert objects[f"{prefix}input/test/held-out.jsonl"] == (run_config.parent / "held-out.jsonl").read_bytes()
    model_files = {p.relative_to(tiny_llama).as_posix() for p in tiny_llama.rglob("*") if p.is_file()}
    assert {k[len(f"{prefix}input/model/"):] for k in objects if k.startswith(f"{prefix}input/model/")} == model_files
    assert objects[f"{prefix}input/model/model.safetensors"] == (tiny_llama / "model.safetensors").read_bytes()
    uploaded = yaml.safe_load(objects[f"{prefix}input/config/lorafit.yaml"])
    assert uploaded["train"]["max_steps"] == 5  # --set is applied before upload
    assert uploaded["model"]["name_or_path"] == str(tiny_llama)
    with tarfile.open(fileobj=io.BytesIO(objects[f"{prefix}source/sourcedir.tar.gz"])) as archive:
        names = set(archive.getnames())
        requirements = archive.extractfile("requirements.txt").read().decode()
        program = archive.extractfile("lorafit_sagemaker_entry.py").read().decode()
    assert {"lorafit_sagemaker_entry.py", "requirements.txt", "lorafit/__init__.py", "lorafit/config.py",
            "lorafit/sagemaker/entry.py", "lorafit/training.py", "lorafit/defaults/default.yaml"} <= names
    assert not any("__pycache__" in n for n in names)
    assert "peft" in requirements and "transformers" in requirements
    assert not any(line.split(">")[0].split("=")[0].strip() == "torch" for line in requirements.splitlines())
    assert "from lorafit.sagemaker.entry import main" in program
    assert set(objects) == {f"{prefix}input/training/dialogues.jsonl", f"{prefix}input/test/held-out.jsonl",
                            f"{prefix}input/config/lorafit.yaml", f"{prefix}source/sourcedir.tar.gz",
                            *(f"{prefix}input/model/{f}" for f in model_files)}

    job = client("sagemaker").describe_training_job(TrainingJobName="lorafit-test-1")
    assert job["AlgorithmSpecification"]["TrainingImage"] == IMAGE_US
    assert job["AlgorithmSpecification"]["TrainingInputMode"] == "File"
    assert job["RoleArn"] == ROLE
    assert job["ResourceConfig"] == {"InstanceType": "ml.g5.2xlarge", "InstanceCount": 1, "VolumeSizeInGB": 100}
    assert job["HyperParameters"] == {
        "sagemaker_program": '"lorafit_sagemaker_entry.py"',
        "sagemaker_submit_directory": '"s3://team-bucket/lorafit/lorafit-test-1/source/sourcedir.tar.gz"',
        "sagemaker_region": '"us-east-1"',
        "sagemaker_job_name": '"lorafit-test-1"',
        "sagemaker_container_log_level": "20",
        "config": '"/opt/ml/input/data/config/lorafit.yaml"',
        "checkpoint_dir": '"/opt/ml/checkpoints"',
        "base_model": json.dumps(str(tiny_llama)),
    }
    channels = {c["ChannelName"]: c["DataSource"]["S3DataSource"] for c in job["InputDataConfig"]}
    assert channels == {
        name: {"S3DataType": "S3Prefix", "S3Uri": f"s3://team-bucket/{prefix}input/{name}/",
               "S3DataDistributionType": "FullyReplicated"}
        for name in ("training", "test", "model", "config")
    }
    assert job["OutputDataConfig"]["S3OutputPath"] == "s3://team-bucket/lorafit"
    assert job["ModelArtifacts"]["S3ModelArtifacts"] == f"s3://team-bucket/{prefix}output/model.tar.gz"
    assert job["CheckpointConfig"] == {"S3Uri": f"s3://team-bucket/{prefix}checkpoints",
                                       "LocalPath": "/opt/ml/checkpoints"}
    assert job["EnableManagedSpotTraining"] is True
    assert job["StoppingCondition"] == {"MaxRuntimeInSeconds": 3600, "MaxWaitTimeInSeconds": 7200}


def test_launch_default_bucket_builtin_data_hub_model_and_multi_node(
        aws: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    config = tmp_path / "hub.yaml"
    config.write_text(yaml.safe_dump({"model": {"name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"},
                                      "data": {"path": "builtin:dialogues"}}), encoding="utf-8")
    image = "111122223333.dkr.ecr.eu-west-1.amazonaws.com/my-lorafit:latest"
    code, out, err = cli(capsys, "launch", str(config), "--role", ROLE, "--instance-type", "ml.g5.12xlarge",
                         "--instance-count", "2", "--max-runtime", "600", "--image", image,
                         "--job-name", "lorafit-multi", "--merge", "--env", "HF_TOKEN=abc", "--wait", "--poll", "0.01")
    assert code == 0, err
    bucket = "sagemaker-eu-west-1-123456789012"  # the SDK's default bucket, created on first use
    assert f"created the default bucket s3://{bucket}" in out
    assert "Completed" in out and "lorafit sagemaker download lorafit-multi" in out
    s3 = client("s3", "eu-west-1")
    assert s3.get_bucket_location(Bucket=bucket)["LocationConstraint"] == "eu-west-1"
    objects = s3_objects(bucket, "lorafit/lorafit-multi/", "eu-west-1")
    from lorafit.builtin import resolve_data

    assert objects["lorafit/lorafit-multi/input/training/" + Path(resolve_data("builtin:dialogues")).name] == \
        Path(resolve_data("builtin:dialogues")).read_bytes()
    assert not any("/input/model/" in k for k in objects)  # a hub model is downloaded by the job itself

    job = client("sagemaker", "eu-west-1").describe_training_job(TrainingJobName="lorafit-multi")
    assert job["AlgorithmSpecification"]["TrainingImage"] == image
    assert job["ResourceConfig"]["InstanceCount"] == 2
    assert job["ResourceConfig"]["InstanceType"] == "ml.g5.12xlarge"
    assert job["HyperParameters"]["distribution"] == '"torchrun"'
    assert job["HyperParameters"]["merge"] == "true"
    assert job["HyperParameters"]["base_model"] == '"HuggingFaceTB/SmolLM2-135M-Instruct"'
    assert job["HyperParameters"]["sagemaker_region"] == '"eu-west-1"'
    assert [c["ChannelName"] for c in job["InputDataConfig"]] == ["training", "config"]
    assert job["EnableManagedSpotTraining"] is False
    assert job["StoppingCondition"] == {"MaxRuntimeInSeconds": 600}

    # what the image's toolkit makes of them: JSON-decoded, sagemaker_* kept for itself, the rest
    # passed as --key str(value); the entry point must read every one of them
    from lorafit.sagemaker import entry

    decoded = {k: json.loads(v) for k, v in job["HyperParameters"].items() if not k.startswith("sagemaker_")}
    argv = [item for key, value in sorted(decoded.items()) for item in (f"--{key}", str(value))]
    parser = entry.argparse.ArgumentParser()
    entry.add_entry_arguments(parser)
    args, extra = parser.parse_known_args(argv)
    assert extra == []
    assert args.config == "/opt/ml/input/data/config/lorafit.yaml"
    assert args.checkpoint_dir == "/opt/ml/checkpoints"
    assert args.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert args.merge is True and args.distribution == "torchrun"

    # a second launch reuses the default bucket
    code, out, err = cli(capsys, "launch", str(config), "--role", ROLE, "--instance-type", "ml.g5.2xlarge",
                         "--job-name", "lorafit-again")
    assert code == 0, err
    assert "created the default bucket" not in out
    assert "lorafit sagemaker status lorafit-again --wait" in out


def test_image_uri_per_region() -> None:
    from lorafit.sagemaker.errors import SageMakerError
    from lorafit.sagemaker.images import training_image_uri

    assert training_image_uri("us-east-1") == IMAGE_US
    assert training_image_uri("eu-west-1").startswith("763104351884.dkr.ecr.eu-west-1.amazonaws.com/")
    assert training_image_uri("af-south-1").startswith("626614931356.dkr.ecr.af-south-1.amazonaws.com/")
    assert training_image_uri("cn-north-1").startswith("727897471807.dkr.ecr.cn-north-1.amazonaws.com.cn/")
    with pytest.raises(SageMakerError, match="not a region"):
        training_image_uri("mars")


def test_status_follow_and_download(aws: str, run_config: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture) -> None:
    client("s3").create_bucket(Bucket="team-bucket")
    code, _, err = cli(capsys, *launch_args(run_config, "--bucket", "team-bucket", "--job-name", "lorafit-dl"))
    assert code == 0, err

    # still running: status --wait follows it until it completes
    set_job(aws, "lorafit-dl", "InProgress")
    # long enough that the first poll sees InProgress even when the CLI starts slowly (loaded CI)
    timer = threading.Timer(3.0, set_job, args=(aws, "lorafit-dl", "Completed"))
    timer.start()
    started = time.monotonic()
    code, out, err = cli(capsys, "status", "lorafit-dl", "--wait", "--poll", "0.1")
    timer.join()
    assert code == 0, err
    assert time.monotonic() - started >= 2.9
    assert out.index("InProgress /") < out.index("Completed /")
    assert "status: Completed" in out

    code, out, err = cli(capsys, "status", "lorafit-dl", "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["TrainingJobName"] == "lorafit-dl" and info["TrainingJobStatus"] == "Completed"

    # not written yet: a clear error, nothing unpacked
    code, _, err = cli(capsys, "download", "lorafit-dl", "--output", str(tmp_path / "early"))
    assert "model.tar.gz not found" in one_line_error(code, err)
    assert not (tmp_path / "early").exists()

    # simulate the job's upload of SM_MODEL_DIR
    import torch
    from safetensors.torch import save_file

    model_dir = tmp_path / "sm-model"
    (model_dir / "adapter").mkdir(parents=True)
    (model_dir / "adapter" / "adapter_config.json").write_text(json.dumps(
        {"base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct", "peft_type": "LORA", "r": 8}))
    save_file({"lora_A.weight": torch.ones(8, 4)}, str(model_dir / "adapter" / "adapter_model.safetensors"))
    (model_dir / "config.yaml").write_text(yaml.safe_dump({"model": {"name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"}}))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for path in sorted(model_dir.rglob("*")):
            archive.add(path, arcname=path.relative_to(model_dir).as_posix(), recursive=False)
    client("s3").put_object(Bucket="team-bucket", Key="lorafit/lorafit-dl/output/model.tar.gz",
                            Body=buffer.getvalue())

    target = tmp_path / "downloaded"
    code, out, err = cli(capsys, "download", "lorafit-dl", "--output", str(target))
    assert code == 0, err
    assert f"adapter: {target / 'adapter'}" in out
    assert (target / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (model_dir / "adapter" / "adapter_model.safetensors").read_bytes()
    from lorafit.runs import locate_run

    run = locate_run(target)  # what lorafit generate / eval / merge use
    assert run.adapter_dir == target / "adapter"
    assert run.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"

    code, _, err = cli(capsys, "download", "lorafit-dl", "--output", str(target))
    assert "is not an empty folder" in one_line_error(code, err)


def test_failed_job_reports_its_failure_reason(aws: str, run_config: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    client("s3").create_bucket(Bucket="team-bucket")
    code, _, err = cli(capsys, *launch_args(run_config, "--bucket", "team-bucket", "--job-name", "lorafit-bad"))
    assert code == 0, err
    reason = "AlgorithmError: CUDA out of memory. Tried to allocate 2.00 GiB\nexit code 1"
    set_job(aws, "lorafit-bad", "Failed", reason)

    code, out, err = cli(capsys, "status", "lorafit-bad")
    assert code == 0, err
    assert "status: Failed" in out
    assert "failure reason: AlgorithmError: CUDA out of memory. Tried to allocate 2.00 GiB exit code 1" in out

    expected = "error: training job lorafit-bad failed: AlgorithmError: CUDA out of memory. Tried to allocate 2.00 GiB exit code 1"
    code, _, err = cli(capsys, "status", "lorafit-bad", "--wait", "--poll", "0.01")
    assert one_line_error(code, err) == expected
    code, _, err = cli(capsys, "download", "lorafit-bad", "--output", str(tmp_path / "out"))
    assert one_line_error(code, err) == expected


def test_no_credentials(aws: str, run_config: Path, monkeypatch: pytest.MonkeyPatch,
                        capsys: pytest.CaptureFixture) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    for args in (launch_args(run_config), ["status", "some-job"], ["download", "some-job", "--output", "x"]):
        code, _, err = cli(capsys, *args)
        assert "no AWS credentials found" in one_line_error(code, err)


def test_no_region(aws: str, run_config: Path, monkeypatch: pytest.MonkeyPatch,
                   capsys: pytest.CaptureFixture) -> None:
    monkeypatch.delenv("AWS_REGION")
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    code, _, err = cli(capsys, "status", "some-job")
    assert "no AWS region configured" in one_line_error(code, err)


@pytest.mark.parametrize("role", ["not-an-arn", "arn:aws:iam::12345:role/x", "arn:aws:iam::123456789012:user/bob"])
def test_malformed_role_arn(aws: str, run_config: Path, role: str, capsys: pytest.CaptureFixture) -> None:
    code, _, err = cli(capsys, "launch", str(run_config), "--role", role, "--instance-type", "ml.g5.2xlarge")
    assert one_line_error(code, err) == f"error: --role: '{role}' is not an IAM role ARN " \
                                        "(expected arn:aws:iam::ACCOUNT_ID:role/NAME)"
    assert client("s3").list_buckets()["Buckets"] == []  # nothing was created


def test_missing_bucket(aws: str, run_config: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = cli(capsys, *launch_args(run_config, "--bucket", "no-such-bucket"))
    assert one_line_error(code, err).startswith("error: --bucket: s3://no-such-bucket does not exist")
    assert client("sagemaker").list_training_jobs()["TrainingJobSummaries"] == []


def test_missing_data_path(aws: str, run_config: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "nowhere" / "train.jsonl"
    code, _, err = cli(capsys, *launch_args(run_config, "--set", f"data.path={missing}"))
    assert one_line_error(code, err) == f"error: data.path: '{missing}' does not exist"
    code, _, err = cli(capsys, *launch_args(run_config, "--set", f"data.eval_path={missing}"))
    assert one_line_error(code, err) == f"error: data.eval_path: '{missing}' does not exist"
    assert client("s3").list_buckets()["Buckets"] == []  # checked before anything is created


def test_unknown_instance_type(aws: str, run_config: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = cli(capsys, "launch", str(run_config), "--role", ROLE, "--instance-type", "ml.g5.2xlage")
    assert one_line_error(code, err).startswith(
        "error: --instance-type: unknown SageMaker training instance type 'ml.g5.2xlage'")


def test_unknown_job_and_bad_spot_settings(aws: str, run_config: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = cli(capsys, "status", "lorafit-missing")
    assert one_line_error(code, err) == "error: training job 'lorafit-missing' not found in us-east-1"
    code, _, err = cli(capsys, *launch_args(run_config, "--spot", "--max-runtime", "100", "--max-wait", "50"))
    assert "--max-wait: must be at least --max-runtime" in one_line_error(code, err)
    code, _, err = cli(capsys, *launch_args(run_config, "--max-wait", "500"))
    assert "--max-wait: only applies with --spot" in one_line_error(code, err)
