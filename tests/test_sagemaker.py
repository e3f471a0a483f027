"""``lorafit sagemaker launch|status|logs|stop|download`` against moto's AWS server on 127.0.0.1 (real HTTP).

The server runs in its own process (tests/sagemaker_server.py); boto3 finds it through
AWS_ENDPOINT_URL with fake credentials, exactly as it would find AWS. moto completes every
training job at once and cannot fail one, so the failed-job and still-running paths set the job's
status server-side through that helper's test-only route; the helper also answers what moto lacks
(StopTrainingJob, S3's ExpectedBucketOwner check) and can make the next CreateTrainingJob fail
(see its docstring).
"""

from __future__ import annotations

import contextlib
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
TRUST_SAGEMAKER = {"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Principal": {"Service": "sagemaker.amazonaws.com"}, "Action": "sts:AssumeRole"}]}
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
    client("iam").create_role(RoleName="AmazonSageMaker-ExecutionRole", Path="/service-role/",
                              AssumeRolePolicyDocument=json.dumps(TRUST_SAGEMAKER))
    return moto_url


def client(name: str, region: str = "us-east-1"):  # noqa: ANN201 - a boto3 client
    import boto3

    return boto3.Session(region_name=region).client(name)


def set_job(url: str, name: str, status: str, reason: str | None = None, region: str = "us-east-1",
            **fields: object) -> None:
    query = f"name={name}&status={status}&region={region}"
    if reason:
        query += "&reason=" + urllib.request.quote(reason)
    for key, value in fields.items():  # secondary, training_time, billable_time
        query += f"&{key}={urllib.request.quote(str(value))}"
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
    code, out, err = cli(capsys, *launch_args(run_config, "--spot", "--max-run", "3600", "--bucket",
                                              "team-bucket", "--job-name", "lorafit-test-1", "--set",
                                              "train.max_steps=5"))
    assert code == 0, err
    assert "created training job lorafit-test-1 on 1 x ml.g5.2xlarge (1 x NVIDIA A10G (24 GB)) spot" in out
    # checked before the upload: the data through lorafit's pipeline, the plan, the role
    assert out.index("lorafit: data: 72 rows") < out.index("lorafit: plan: fits on ml.g5.2xlarge (") \
        < out.index("lorafit: role: AmazonSageMaker-ExecutionRole exists and trusts sagemaker.amazonaws.com") \
        < out.index("lorafit: uploaded training")

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
    from importlib.metadata import version

    pins = dict(line.split("==") for line in requirements.split())  # every line pinned to what runs here
    for name in ("transformers", "peft", "accelerate", "bitsandbytes", "datasets", "safetensors",
                 "huggingface-hub", "tokenizers"):
        assert pins[name] == version(name), name
    assert pins["torch"] == "2.8.0"  # held at the default image's own build, never replaced
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
        "base_model": json.dumps(str(tiny_llama)),  # shell-safe: sent as it is
        "max_run": "3600",
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
                         "--instance-count", "2", "--max-run", "600", "--image", image,
                         "--job-name", "lorafit-multi", "--merge", "--env", "HF_TOKEN=abc", "--wait", "--poll", "0.01")
    assert code == 0, err
    # offline, the hub model's tokenizer and config cannot be read here: rows are still checked
    assert "lorafit: data: every row reads and renders (token lengths not checked" in out
    assert "lorafit: plan: skipped (" in out
    assert "abc" not in out  # the token is not echoed, not even by the summary after --wait
    assert "environment: HF_TOKEN=***" in out
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

    # what the image's toolkit makes of them (its own code): JSON-decoded, sagemaker_* kept for
    # itself, the rest passed as --key str(value); the entry point must read every one of them
    from sagemaker_training import mapping, params

    from lorafit.sagemaker import entry

    decoded = {k: json.loads(v) for k, v in job["HyperParameters"].items()}
    user = mapping.split_by_criteria(decoded, keys=params.SAGEMAKER_HYPERPARAMETERS,
                                     prefix=params.SAGEMAKER_PREFIX).excluded
    parser = entry.argparse.ArgumentParser()
    entry.add_entry_arguments(parser)
    args, extra = parser.parse_known_args(mapping.to_cmd_args(user))
    assert extra == []
    assert args.config is None and args.checkpoint_dir is None  # the entry's defaults: SM_CHANNEL_CONFIG, /opt/ml/checkpoints
    assert args.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert args.merge is True and args.distribution == "torchrun" and args.max_run == 600

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


def test_aws_region_alone_is_honoured(aws: str, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture) -> None:
    """The docs, --region's help and the no-region error tell users to set AWS_REGION; boto3 itself
    reads only AWS_DEFAULT_REGION."""
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    code, _, err = cli(capsys, "status", "some-job")
    assert one_line_error(code, err) == "error: training job 'some-job' not found in eu-west-3"


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
        "error: --instance-type: unknown SageMaker instance type 'ml.g5.2xlage'")


def test_unknown_job_and_bad_spot_settings(aws: str, run_config: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = cli(capsys, "status", "lorafit-missing")
    assert one_line_error(code, err) == "error: training job 'lorafit-missing' not found in us-east-1"
    code, _, err = cli(capsys, *launch_args(run_config, "--spot", "--max-runtime", "100", "--max-wait", "50"))
    assert "--max-wait: must be at least --max-run" in one_line_error(code, err)
    code, _, err = cli(capsys, *launch_args(run_config, "--max-wait", "500"))
    assert "--max-wait: only applies with --spot" in one_line_error(code, err)


# ------------------------------------------------------------------- checks before money
def no_job_and_nothing_uploaded(region: str = "us-east-1") -> None:
    assert client("sagemaker", region).list_training_jobs()["TrainingJobSummaries"] == []
    s3 = client("s3", region)
    for bucket in s3.list_buckets()["Buckets"]:
        assert s3.list_objects_v2(Bucket=bucket["Name"]).get("KeyCount", 0) == 0, bucket["Name"]


def test_bad_data_fails_locally_before_any_upload(aws: str, run_config: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"dialogue": "A: hi", "summary": "greeting"},
                                               {"dialogue": "B: yo"}, {"dialog": "C: hey", "summary": "x"}])
    client("s3").create_bucket(Bucket="team-bucket")
    code, out, err = cli(capsys, *launch_args(run_config, "--bucket", "team-bucket", "--set", f"data.path={bad}"))
    line = one_line_error(code, err)
    assert line == ("error: data.path: 2 of 11 rows are bad (18% > data.max_bad_fraction 0.1): "  # + 8 held out
                    "bad.jsonl line 2 missing 'summary', bad.jsonl line 3 missing 'dialogue'"), line
    assert "uploaded" not in out
    no_job_and_nothing_uploaded()
    # launcher and entry accept the same data files as a local run: a .txt file is refused here
    text = tmp_path / "rows.txt"
    text.write_text("hello\n")
    code, _, err = cli(capsys, *launch_args(run_config, "--set", f"data.path={text}"))
    assert "has an unsupported extension (use .jsonl, .json, .csv or .parquet)" in one_line_error(code, err)
    from lorafit.data.sources import FILE_SUFFIXES
    from lorafit.sagemaker import entry, launcher

    assert launcher.FILE_SUFFIXES is FILE_SUFFIXES
    for suffix in FILE_SUFFIXES:  # the entry finds a channel's data file by the same suffixes
        channel = tmp_path / f"channel{suffix}"
        channel.mkdir()
        (channel / f"rows{suffix}").write_text("x")
        assert entry.channel_data(channel, "SM_CHANNEL_TRAINING") == str(channel / f"rows{suffix}")
    no_job_and_nothing_uploaded()


def test_plan_refuses_a_run_that_will_not_fit_unless_forced(aws: str, run_config: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    from transformers import LlamaConfig

    big = tmp_path / "llama-7b-config"  # the config alone: the planner needs no weights
    LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000).save_pretrained(big)
    client("s3").create_bucket(Bucket="team-bucket")
    args = launch_args(run_config, "--bucket", "team-bucket", "--set", f"model.name_or_path={big}",
                       "--set", "train.seq_len=2048")
    args[args.index("ml.g5.2xlarge")] = "ml.g4dn.xlarge"
    code, out, err = cli(capsys, *args)
    line = one_line_error(code, err)
    assert line.startswith("error: --instance-type: the run will not fit on ml.g4dn.xlarge ("), line
    assert "T4 16GB has 15.0 GiB); try: " in line and "--force launches anyway" in line
    no_job_and_nothing_uploaded()
    code, out, err = cli(capsys, *args, "--force", "--job-name", "lorafit-forced")
    assert code == 0, err
    assert "plan: does NOT fit on ml.g4dn.xlarge (" in out and "launching anyway (--force)" in out
    assert client("sagemaker").describe_training_job(TrainingJobName="lorafit-forced")["ResourceConfig"][
        "InstanceType"] == "ml.g4dn.xlarge"
    # the instance's GPU decides what the options may be: no bf16 on a T4
    code, _, err = cli(capsys, *args, "--force", "--set", "train.precision=bf16")
    assert one_line_error(code, err) == ("error: train.precision: bf16 is not supported by this GPU; use "
                                         "float16 / fp16 or auto (ml.g4dn.xlarge's NVIDIA T4)")


def test_data_check_resolves_the_run_for_the_instance(run_config: Path) -> None:
    """The local data check decides the run as the job will: the instance's GPU and process count."""
    from lorafit.config import load_config
    from lorafit.sagemaker.preflight import job_run

    config = load_config(run_config)
    t4 = job_run(config, "ml.g4dn.12xlarge", 2)  # 4 T4s per instance: no bf16
    env = t4.environment
    assert (env.device_kind, env.bf16_supported, env.world_size, env.device_name) == ("cuda", False, 8, "T4 16GB")
    assert t4.precision.compute == "float16"
    a10g = job_run(config, "ml.g5.2xlarge", 1)
    assert (a10g.environment.bf16_supported, a10g.environment.world_size) == (True, 1)
    assert a10g.precision.compute == "bfloat16"
    assert job_run(config, "ml.m5.xlarge", 1).environment.device_kind == "cpu"


def test_role_is_checked_with_iam(aws: str, run_config: Path, capsys: pytest.CaptureFixture) -> None:
    client("s3").create_bucket(Bucket="team-bucket")
    missing = "arn:aws:iam::123456789012:role/NoSuchRole"
    args = launch_args(run_config, "--bucket", "team-bucket")
    args[args.index(ROLE)] = missing
    code, _, err = cli(capsys, *args)
    assert one_line_error(code, err) == "error: --role: role 'NoSuchRole' does not exist in account 123456789012"
    client("iam").create_role(RoleName="LambdaRole", AssumeRolePolicyDocument=json.dumps({"Statement": [
        {"Effect": "Allow", "Principal": {"Service": "lambda.amazonaws.com"}, "Action": "sts:AssumeRole"}]}))
    args[args.index(missing)] = "arn:aws:iam::123456789012:role/LambdaRole"
    code, _, err = cli(capsys, *args)
    assert one_line_error(code, err).startswith("error: --role: SageMaker cannot assume 'LambdaRole': its trust "
                                                "policy does not allow sagemaker.amazonaws.com")
    no_job_and_nothing_uploaded()


def test_default_bucket_of_another_account_is_refused(aws: str, run_config: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    # someone else created the bucket name lorafit (like the SageMaker SDK) would use by default
    other = client("s3")
    other.meta.events.register("before-sign.s3.*",
                               lambda request, **_: request.headers.__setitem__("x-moto-account-id", "111111111111"))
    other.create_bucket(Bucket="sagemaker-us-east-1-123456789012")
    code, out, err = cli(capsys, *launch_args(run_config))
    assert one_line_error(code, err) == (
        "error: s3://sagemaker-us-east-1-123456789012 exists but does not belong to your account 123456789012 "
        "(or denies you access); lorafit will not upload there. Pass --bucket NAME")
    assert "uploaded" not in out
    assert other.list_objects_v2(Bucket="sagemaker-us-east-1-123456789012").get("KeyCount", 0) == 0
    assert client("sagemaker").list_training_jobs()["TrainingJobSummaries"] == []


def test_failed_create_removes_what_was_uploaded(aws: str, run_config: Path, capsys: pytest.CaptureFixture) -> None:
    message = "The account-level service limit 'ml.g5.2xlarge for spot training job usage' is 0 Instances"
    urllib.request.urlopen(urllib.request.Request(
        f"{aws}/_lorafit/fail-next?target=SageMaker.CreateTrainingJob&code=ResourceLimitExceeded&message="
        + urllib.request.quote(message), method="POST")).read()
    code, out, err = cli(capsys, *launch_args(run_config, "--spot", "--job-name", "lorafit-quota"))
    line = one_line_error(code, err)
    assert line.startswith(f"error: create training job lorafit-quota: service quota reached ({message}); ")
    assert line.endswith("; removed the 9 object(s) uploaded for it")
    assert "uploaded model: 5 file(s)" in out  # they had been uploaded (default bucket, created)
    assert s3_objects("sagemaker-us-east-1-123456789012") == {}


# ------------------------------------------------------------------------------ resume
def test_resume_from_an_earlier_job(aws: str, run_config: Path, capsys: pytest.CaptureFixture) -> None:
    client("s3").create_bucket(Bucket="team-bucket")
    code, _, err = cli(capsys, *launch_args(run_config, "--bucket", "team-bucket", "--spot", "--job-name", "first"))
    assert code == 0, err
    # what the first job's container left in /opt/ml/checkpoints, synced to its CheckpointConfig.S3Uri
    written = {"run/checkpoints/step-0000004/trainer_state.json": b'{"step": 4}',
               "run/checkpoints/step-0000004/adapter/adapter_model.safetensors": b"4",
               "run/checkpoints/step-0000006/trainer_state.json": b'{"step": 6}',
               "run/metrics.jsonl": b"{}\n", "run/config.yaml": b"x: 1\n", "run/result.json": b"{}"}
    for key, body in written.items():
        client("s3").put_object(Bucket="team-bucket", Key=f"lorafit/first/checkpoints/{key}", Body=body)
    code, out, err = cli(capsys, *launch_args(run_config, "--bucket", "team-bucket", "--spot",
                                              "--job-name", "second", "--resume-from", "first"))
    assert code == 0, err
    assert "resuming from first: copied 5 checkpoint file(s) (newest step-0000006)" in out
    copied = s3_objects("team-bucket", "lorafit/second/checkpoints/")
    # all but result.json: the new job resumes from the last checkpoint instead of re-exporting
    assert copied == {f"lorafit/second/checkpoints/{k}": v for k, v in written.items() if k != "run/result.json"}
    job = client("sagemaker").describe_training_job(TrainingJobName="second")
    assert job["CheckpointConfig"]["S3Uri"] == "s3://team-bucket/lorafit/second/checkpoints"
    tags = client("sagemaker").list_tags(ResourceArn=job["TrainingJobArn"])["Tags"]
    assert {"Key": "lorafit:resumed-from", "Value": "first"} in tags
    # an s3:// URI works too, into another bucket (the default one, written with ExpectedBucketOwner);
    # a location without checkpoints is refused before anything is uploaded
    code, out, err = cli(capsys, *launch_args(run_config, "--job-name", "third",
                                              "--resume-from", "s3://team-bucket/lorafit/first/checkpoints/"))
    assert code == 0, err
    assert "copied 5 checkpoint file(s)" in out
    assert s3_objects("sagemaker-us-east-1-123456789012", "lorafit/third/checkpoints/") == \
        {k.replace("lorafit/second/", "lorafit/third/"): v for k, v in copied.items()}
    code, _, err = cli(capsys, *launch_args(run_config, "--bucket", "team-bucket", "--job-name", "fourth",
                                            "--resume-from", "s3://team-bucket/lorafit/nothing"))
    assert one_line_error(code, err) == ("error: --resume-from: no lorafit checkpoints under "
                                         "s3://team-bucket/lorafit/nothing/run/checkpoints/")
    code, _, err = cli(capsys, *launch_args(run_config, "--bucket", "team-bucket", "--resume-from", "no-such-job"))
    assert one_line_error(code, err) == "error: training job 'no-such-job' not found in us-east-1"
    assert s3_objects("team-bucket", "lorafit/fourth/") == {}


# ----------------------------------------------------------------------------- options
def test_tags_vpc_kms_keep_alive_and_max_run(aws: str, run_config: Path, capsys: pytest.CaptureFixture) -> None:
    client("s3").create_bucket(Bucket="team-bucket")
    key = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    code, out, err = cli(capsys, *launch_args(
        run_config, "--bucket", "team-bucket", "--job-name", "lorafit-opts", "--tags", "team=nlp,cost-center=42",
        "--tags", "owner=me", "--vpc-subnets", "subnet-0123456789abcdef0,subnet-0fedcba9876543210",
        "--security-groups", "sg-0123456789abcdef0", "--volume-kms-key", key, "--output-kms-key", key,
        "--keep-alive", "1800", "--max-run", "7200"))
    assert code == 0, err
    job = client("sagemaker").describe_training_job(TrainingJobName="lorafit-opts")
    assert job["VpcConfig"] == {"SecurityGroupIds": ["sg-0123456789abcdef0"],
                                "Subnets": ["subnet-0123456789abcdef0", "subnet-0fedcba9876543210"]}
    assert job["ResourceConfig"] == {"InstanceType": "ml.g5.2xlarge", "InstanceCount": 1, "VolumeSizeInGB": 100,
                                     "VolumeKmsKeyId": key, "KeepAlivePeriodInSeconds": 1800}
    assert job["OutputDataConfig"] == {"S3OutputPath": "s3://team-bucket/lorafit", "KmsKeyId": key}
    assert job["StoppingCondition"] == {"MaxRuntimeInSeconds": 7200}
    assert job["HyperParameters"]["max_run"] == "7200"  # the entry saves and stops before it
    tags = {t["Key"]: t["Value"] for t in client("sagemaker").list_tags(ResourceArn=job["TrainingJobArn"])["Tags"]}
    assert tags == {"lorafit:job": "lorafit-opts", "lorafit:serving-code": "1", "team": "nlp", "cost-center": "42",
                    "owner": "me"}
    s3 = client("s3")
    for key_name in s3_objects("team-bucket", "lorafit/lorafit-opts/"):
        head = s3.head_object(Bucket="team-bucket", Key=key_name)
        assert head["ServerSideEncryption"] == "aws:kms" and head["SSEKMSKeyId"] == key, key_name

    for extra, message in (
            (["--vpc-subnets", "subnet-0123456789abcdef0"], "--vpc-subnets and --security-groups: give both"),
            (["--vpc-subnets", "subnet-1", "--security-groups", "sg-0123456789abcdef0"], "'subnet-1' is not a subnet id"),
            (["--keep-alive", "7200"], "--keep-alive: must be 0 to 3600 seconds"),
            (["--keep-alive", "60", "--spot"], "--keep-alive: warm pools are not available with --spot"),
            (["--tags", "novalue"], "--tags 'novalue': expected KEY=VALUE"),
            (["--tags", "aws:x=1"], "keys are 1-128 characters not starting with 'aws:'"),
            (["--max-run", "0"], "--max-run: must be a positive number of seconds")):
        code, _, err = cli(capsys, *launch_args(run_config, *extra))
        assert message in one_line_error(code, err), extra


def test_metric_definitions_match_the_log_format(aws: str, run_config: Path, capsys: pytest.CaptureFixture) -> None:
    """The regexes SageMaker applies to each log line, against lines of lorafit's documented one-line format."""
    import re

    from lorafit.sagemaker.launcher import METRIC_DEFINITIONS, LaunchOptions, launch

    result = launch(LaunchOptions(config_path=str(run_config), role=ROLE, instance_type="ml.g5.2xlarge",
                                  job_name="lorafit-metrics"))
    assert result.request["AlgorithmSpecification"]["MetricDefinitions"] == METRIC_DEFINITIONS
    regex = {m["Name"]: re.compile(m["Regex"]) for m in METRIC_DEFINITIONS}
    assert set(regex) == {"train:loss", "eval:loss", "train:learning_rate", "train:tokens_per_s",
                          "train:reward_accuracy", "train:reward_margin", "eval:reward_accuracy", "eval:reward_margin"}

    def values(line: str) -> dict[str, float]:
        return {name: float(m.group(1)) for name, r in regex.items() if (m := r.search(line))}

    assert values("lorafit: step 12/60 loss=1.2345 lr=2.000e-04 tokens_per_s=1234.5 elapsed=62s eta=250s") == \
        {"train:loss": 1.2345, "train:learning_rate": 2e-4, "train:tokens_per_s": 1234.5}
    assert values("lorafit: step 12/60 eval_loss=1.2345") == {"eval:loss": 1.2345}
    assert values("lorafit: step 13/60 loss=skipped lr=1.9e-04 tokens_per_s=1200.0 elapsed=66s eta=240s") == \
        {"train:learning_rate": 1.9e-4, "train:tokens_per_s": 1200.0}  # a skipped step has no loss
    # tqdm's bar (never shown in a job) is not mistaken for a step line
    assert "train:loss" not in values("train:  20%|##  | 12/60 [01:02<04:10, loss=1.2345, lr=2.00e-04]")


# ------------------------------------------------------------------- status / logs / stop
def test_status_shows_times_cost_and_hides_secrets(aws: str, run_config: Path, capsys: pytest.CaptureFixture) -> None:
    client("s3").create_bucket(Bucket="team-bucket")
    code, _, err = cli(capsys, *launch_args(run_config, "--bucket", "team-bucket", "--job-name", "lorafit-cost",
                                            "--spot", "--instance-count", "2", "--env", "HF_TOKEN=hf_secret123",
                                            "--env", "WANDB_API_KEY=wandb456", "--env", "DB_PASSWORD=pw789",
                                            "--env", "TOKENIZERS_PARALLELISM=false"))
    assert code == 0, err
    set_job(aws, "lorafit-cost", "Completed", training_time=3600, billable_time=1200)
    code, out, err = cli(capsys, "status", "lorafit-cost")
    assert code == 0, err
    assert "training time: 1h 00m 00s (3600 s)" in out
    assert "billable time: 20m 00s x 2 instances = 40m 00s (2400 instance-seconds)" in out
    assert "spot savings: 66.7% (billed 1200 s of 3600 s)" in out
    assert ("environment: DB_PASSWORD=***, HF_TOKEN=***, TOKENIZERS_PARALLELISM=false, WANDB_API_KEY=***") in out
    code, out, err = cli(capsys, "status", "lorafit-cost", "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["Environment"] == {"HF_TOKEN": "***", "WANDB_API_KEY": "***", "DB_PASSWORD": "***",
                                   "TOKENIZERS_PARALLELISM": "false"}
    assert not any(secret in out for secret in ("hf_secret123", "wandb456", "pw789"))
    assert info["BillableTimeInSeconds"] == 1200


def test_stop_and_ctrl_c_while_waiting(aws: str, run_config: Path, capsys: pytest.CaptureFixture) -> None:
    client("s3").create_bucket(Bucket="team-bucket")
    code, _, err = cli(capsys, *launch_args(run_config, "--bucket", "team-bucket", "--job-name", "lorafit-run"))
    assert code == 0, err
    set_job(aws, "lorafit-run", "InProgress", secondary="Training")

    # Ctrl-C while following: the job goes on, and the message says how to stop it
    import os
    import signal

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    # as from a terminal: a suite started in the background (`cmd &` without job control) ignores
    # SIGINT, and the child would inherit that
    process = subprocess.Popen([sys.executable, "-m", "lorafit", "sagemaker", "status", "lorafit-run", "--wait",
                                "--poll", "0.2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert "InProgress / Training" in process.stdout.readline()
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130
    assert ("lorafit: stopped following; training job lorafit-run is still running (and billing). "
            "Stop it: lorafit sagemaker stop lorafit-run; follow it again: lorafit sagemaker status lorafit-run "
            "--wait") in err
    assert client("sagemaker").describe_training_job(TrainingJobName="lorafit-run")["TrainingJobStatus"] == "InProgress"

    code, out, err = cli(capsys, "stop", "lorafit-run")
    assert code == 0, err
    assert "stopping training job lorafit-run (now Stopping)" in out
    assert "--resume-from lorafit-run" in out
    code, _, err = cli(capsys, "stop", "lorafit-run")
    assert one_line_error(code, err) == "error: training job lorafit-run is already Stopping; nothing to stop"
    code, _, err = cli(capsys, "stop", "lorafit-nope")
    assert one_line_error(code, err) == "error: training job 'lorafit-nope' not found in us-east-1"


def put_log(stream: str, *messages: str) -> None:
    logs = client("logs")
    with contextlib.suppress(logs.exceptions.ResourceAlreadyExistsException):
        logs.create_log_group(logGroupName="/aws/sagemaker/TrainingJobs")
    with contextlib.suppress(logs.exceptions.ResourceAlreadyExistsException):
        logs.create_log_stream(logGroupName="/aws/sagemaker/TrainingJobs", logStreamName=stream)
    now = int(time.time() * 1000)
    logs.put_log_events(logGroupName="/aws/sagemaker/TrainingJobs", logStreamName=stream,
                        logEvents=[{"timestamp": now + i, "message": m} for i, m in enumerate(messages)])


def test_logs_print_and_follow_the_cloudwatch_stream(aws: str, run_config: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    client("s3").create_bucket(Bucket="team-bucket")
    code, _, err = cli(capsys, *launch_args(run_config, "--bucket", "team-bucket", "--job-name", "lorafit-log"))
    assert code == 0, err
    set_job(aws, "lorafit-log", "InProgress", secondary="Training")
    code, _, err = cli(capsys, "logs", "lorafit-log")
    assert one_line_error(code, err).startswith("error: training job lorafit-log has no log yet (InProgress;")

    put_log("lorafit-log/algo-1-1700000000", "lorafit: step 1/4 loss=2.5 lr=2.000e-04 tokens_per_s=10.0",
            "lorafit: step 2/4 loss=2.4 lr=1.500e-04 tokens_per_s=11.0")
    put_log("lorafit-other/algo-1-1700000000", "another job's line")
    code, out, err = cli(capsys, "logs", "lorafit-log")
    assert code == 0, err
    assert out.splitlines() == ["lorafit: step 1/4 loss=2.5 lr=2.000e-04 tokens_per_s=10.0",
                                "lorafit: step 2/4 loss=2.4 lr=1.500e-04 tokens_per_s=11.0"]

    def later() -> None:  # the job writes more, then ends
        time.sleep(1.0)
        put_log("lorafit-log/algo-1-1700000000", "lorafit: step 3/4 loss=2.3 lr=1.000e-04 tokens_per_s=12.0")
        time.sleep(0.5)
        put_log("lorafit-log/algo-1-1700000000", "lorafit: exported the adapter to /opt/ml/model")
        set_job(aws, "lorafit-log", "Completed")

    thread = threading.Thread(target=later)
    thread.start()
    code, out, err = cli(capsys, "logs", "lorafit-log", "--follow", "--poll", "0.1")
    thread.join()
    assert code == 0, err
    assert out.splitlines() == ["lorafit: step 1/4 loss=2.5 lr=2.000e-04 tokens_per_s=10.0",
                                "lorafit: step 2/4 loss=2.4 lr=1.500e-04 tokens_per_s=11.0",
                                "lorafit: step 3/4 loss=2.3 lr=1.000e-04 tokens_per_s=12.0",
                                "lorafit: exported the adapter to /opt/ml/model",
                                "lorafit: training job lorafit-log completed"]

    put_log("lorafit-log/algo-2-1700000000", "second host")  # several hosts: each line names its own
    code, out, err = cli(capsys, "logs", "lorafit-log")
    assert code == 0, err
    assert "[algo-1-1700000000] lorafit: step 1/4 loss=2.5 lr=2.000e-04 tokens_per_s=10.0" in out.splitlines()
    assert "[algo-2-1700000000] second host" in out.splitlines()
