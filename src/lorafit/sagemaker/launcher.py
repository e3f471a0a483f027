"""Create, follow and fetch SageMaker training jobs for a lorafit config, with plain boto3.

S3 layout of one job (everything under ``s3://BUCKET/lorafit/JOB/``)::

    input/training/...       the training data (channel ``training`` -> SM_CHANNEL_TRAINING)
    input/test/...           data.eval_path, when it is a local file (channel ``test``)
    input/model/...          a local or builtin base model folder (channel ``model``)
    input/config/lorafit.yaml  the resolved config (channel ``config``)
    source/sourcedir.tar.gz  lorafit's own code + requirements.txt, run by the image's toolkit
    checkpoints/             synced with /opt/ml/checkpoints: a restarted (spot) job resumes
    output/model.tar.gz      SM_MODEL_DIR: the adapter run folder (written by SageMaker)

boto3's standard configuration applies: profiles, AWS_REGION, AWS_ENDPOINT_URL, and so on.
"""

from __future__ import annotations

import io
import json
import os
import re
import secrets
import shutil
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from lorafit.config import LorafitConfig, load_config
from lorafit.errors import ConfigError, DataError
from lorafit.sagemaker.errors import NO_CREDENTIALS, NO_REGION, SageMakerError, aws_error
from lorafit.sagemaker.images import training_image_uri
from lorafit.sagemaker.instances import gpu_count

KEY_PREFIX = "lorafit"
CHECKPOINT_LOCAL_PATH = "/opt/ml/checkpoints"
CONFIG_CHANNEL_FILE = "lorafit.yaml"
PROGRAM = "lorafit_sagemaker_entry.py"
SOURCE_ARCHIVE = "sourcedir.tar.gz"
TERMINAL = ("Completed", "Failed", "Stopped")
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".arrow", ".txt", ".gz")

_ROLE_ARN = re.compile(r"^arn:aws[a-z\-]*:iam::\d{12}:role/?[a-zA-Z_0-9+=,.@\-/]{1,512}$")
_JOB_NAME = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")

PROGRAM_SOURCE = '''"""SageMaker runs this file (hyperparameter sagemaker_program); lorafit ships next to it."""
import sys

from lorafit.sagemaker.entry import main

sys.exit(main())
'''

Echo = Callable[[str], None]


def _quiet(message: str) -> None:
    del message


@dataclass
class LaunchOptions:
    """Everything ``lorafit sagemaker launch`` takes."""

    config_path: str | None
    role: str
    instance_type: str
    overrides: list[str] = field(default_factory=list)
    instance_count: int = 1
    spot: bool = False
    max_runtime: int = 86400
    max_wait: int | None = None
    bucket: str | None = None
    image: str | None = None
    job_name: str | None = None
    volume_size: int = 100
    merge: bool = False
    environment: dict[str, str] = field(default_factory=dict)


@dataclass
class LaunchResult:
    """What was created: the job, where its files are, and the request that was sent."""

    job_name: str
    job_arn: str
    region: str
    bucket: str
    prefix: str
    uploaded: list[str]
    request: dict[str, Any]


@dataclass
class _Channel:
    """An input channel: an s3:// URI given by the user, or local files uploaded under ``key``."""

    name: str
    s3_uri: str | None = None
    key: str = ""  # under the job prefix, e.g. input/training/
    files: list[tuple[Path, str]] = field(default_factory=list)  # (local file, key below ``key``)

    def uri(self, bucket: str, prefix: str) -> str:
        return self.s3_uri or f"s3://{bucket}/{prefix}/{self.key}"


# ------------------------------------------------------------------------------------- checks
def check_role_arn(role: str) -> str:
    """An IAM role ARN (arn:aws:iam::123456789012:role/Name); SageMaker assumes it to run the job."""
    if not _ROLE_ARN.match(role or ""):
        raise SageMakerError(
            f"--role: '{role}' is not an IAM role ARN (expected arn:aws:iam::ACCOUNT_ID:role/NAME)"
        )
    return role


def check_job_name(name: str) -> str:
    if not _JOB_NAME.match(name or ""):
        raise SageMakerError(
            f"--job-name: '{name}' must be 1-63 letters, digits and hyphens, starting with a letter or digit"
        )
    return name


def new_job_name(prefix: str = "lorafit") -> str:
    """``lorafit-YYYYmmdd-HHMMSS-xxxx``: sortable, unique, within SageMaker's 63 characters."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{prefix}-{stamp}-{secrets.token_hex(2)}"


def session(profile: str | None = None, region: str | None = None) -> Any:
    """A boto3 session with credentials and a region, or a one-line error saying which is missing."""
    try:
        import boto3
    except ImportError as exc:
        raise SageMakerError("boto3 is not installed: pip install 'lorafit[sagemaker]'") from exc
    from botocore.exceptions import BotoCoreError

    try:
        boto_session = boto3.Session(profile_name=profile, region_name=region)
        credentials = boto_session.get_credentials()
    except BotoCoreError as exc:
        raise aws_error(exc, "AWS session") from exc
    if credentials is None:
        raise SageMakerError(NO_CREDENTIALS)
    if not boto_session.region_name:
        raise SageMakerError(NO_REGION)
    return boto_session


def _call(action: str, function: Callable[..., Any], **kwargs: Any) -> Any:
    """Run one AWS API call; any botocore failure becomes a one-line SageMakerError."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return function(**kwargs)
    except (BotoCoreError, ClientError) as exc:
        raise aws_error(exc, action) from exc


# -------------------------------------------------------------------------------------- bucket
def default_bucket_name(boto_session: Any) -> str:
    """``sagemaker-{region}-{account}``, the SageMaker Python SDK's default bucket."""
    sts = boto_session.client("sts")
    account = _call("sts get-caller-identity", sts.get_caller_identity)["Account"]
    return f"sagemaker-{boto_session.region_name}-{account}"


def ensure_bucket(boto_session: Any, bucket: str | None, echo: Echo = _quiet) -> str:
    """The named bucket, which must exist; or the default bucket, created when missing."""
    from botocore.exceptions import ClientError

    s3 = boto_session.client("s3")
    if bucket is not None:
        if not _BUCKET.match(bucket):
            raise SageMakerError(f"--bucket: '{bucket}' is not a valid S3 bucket name")
        _head_bucket(s3, bucket, f"--bucket: s3://{bucket} does not exist (create it, or omit --bucket "
                                 "to use the default sagemaker-REGION-ACCOUNT bucket)")
        return bucket
    name = default_bucket_name(boto_session)
    try:
        s3.head_bucket(Bucket=name)
        return name
    except ClientError as exc:
        if str(exc.response.get("Error", {}).get("Code")) not in ("404", "NoSuchBucket", "NotFound"):
            raise aws_error(exc, f"s3://{name}") from exc
    region = boto_session.region_name
    kwargs: dict[str, Any] = {"Bucket": name}
    if region != "us-east-1":
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
    _call(f"create bucket s3://{name}", s3.create_bucket, **kwargs)
    echo(f"created the default bucket s3://{name}")
    return name


def _head_bucket(s3: Any, bucket: str, missing: str) -> None:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        s3.head_bucket(Bucket=bucket)
    except ClientError as exc:
        if str(exc.response.get("Error", {}).get("Code")) in ("404", "NoSuchBucket", "NotFound"):
            raise SageMakerError(missing) from exc
        raise aws_error(exc, f"s3://{bucket}") from exc
    except BotoCoreError as exc:
        raise aws_error(exc, f"s3://{bucket}") from exc


# -------------------------------------------------------------------------------------- inputs
def _looks_like_path(value: str) -> bool:
    """A file-system path (must exist here), as opposed to a hub name like ``knkarthick/samsum``."""
    return (value.startswith(("/", ".", "~")) or value.lower().endswith(DATA_SUFFIXES)
            or value.count("/") > 1 or (os.sep != "/" and os.sep in value))


def _local_files(path: Path, under: str) -> list[tuple[Path, str]]:
    """(file, relative key) pairs: a file keeps its name, a folder keeps its name and layout."""
    if path.is_file():
        return [(path, f"{under}{path.name}")]
    files = sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    return [(p, f"{under}{path.name}/{p.relative_to(path).as_posix()}") for p in files]


def _data_channel(name: str, field_name: str, value: str | list[str]) -> _Channel | None:
    """The channel for data.path / data.eval_path; None when the job reads it itself (hub names)."""
    from lorafit.builtin import is_builtin, resolve_data

    items = value if isinstance(value, list) else [value]
    remote = [v for v in items if v.startswith("s3://")]
    if remote:
        if len(items) > 1:
            raise DataError(f"{field_name}: give one s3:// prefix, not a list with s3:// entries")
        return _Channel(name, s3_uri=remote[0])
    local: list[Path] = []
    for item in items:
        if is_builtin(item):
            local.append(Path(resolve_data(item)))
            continue
        path = Path(item).expanduser()
        if path.exists():
            local.append(path)
        elif _looks_like_path(item):
            raise DataError(f"{field_name}: '{item}' does not exist")
    if not local:
        return None  # hub data set names: the job downloads them
    if len(local) != len(items):
        raise DataError(f"{field_name}: mixes local files and hub names; upload all or none")
    channel = _Channel(name, key=f"input/{name}/")
    seen: set[str] = set()
    for index, path in enumerate(local):
        channel.files += _local_files(path, "" if path.name not in seen else f"{index}-")
        seen.add(path.name)
    return channel


def _model_channel(config: LorafitConfig) -> _Channel | None:
    """A local (or builtin) base model is uploaded; a hub id is downloaded by the job itself."""
    from lorafit.builtin import is_builtin, resolve_model

    name = config.model.name_or_path
    if name.startswith("s3://"):
        return _Channel("model", s3_uri=name)
    path = Path(resolve_model(name) if is_builtin(name) else name).expanduser()
    if not path.exists():
        if name.startswith(("/", ".", "~")) or name.count("/") > 1:
            raise ConfigError(f"model.name_or_path: '{name}' does not exist")
        return None
    if not path.is_dir():
        raise ConfigError(f"model.name_or_path: '{name}' is a file, expected a model folder")
    files = sorted(p for p in path.rglob("*") if p.is_file() and ".cache" not in p.parts)
    return _Channel("model", key="input/model/", files=[(p, p.relative_to(path).as_posix()) for p in files])


def requirements() -> list[str]:
    """lorafit's runtime dependencies for the job's pip, minus torch (the image's CUDA build stays)."""
    from importlib.metadata import PackageNotFoundError, requires

    try:
        found = requires("lorafit") or []
    except PackageNotFoundError:
        found = []
    keep = [r for r in found if "extra ==" not in r]
    return [r for r in keep if re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].strip().lower() != "torch"]


def source_archive() -> bytes:
    """sourcedir.tar.gz: the entry script, lorafit's package folder, requirements.txt (deterministic)."""
    import lorafit

    package = Path(lorafit.__file__).parent
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", format=tarfile.PAX_FORMAT) as archive:

        def add_bytes(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            archive.addfile(info, io.BytesIO(data))

        add_bytes(PROGRAM, PROGRAM_SOURCE.encode())
        add_bytes("requirements.txt", ("\n".join(requirements()) + "\n").encode())
        for path in sorted(package.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".pyc", ".pyo"):
                add_bytes(f"lorafit/{path.relative_to(package).as_posix()}", path.read_bytes())
    return buffer.getvalue()


def _hyperparameters(options: LaunchOptions, config: LorafitConfig, job: str, region: str,
                     source_uri: str) -> dict[str, str]:
    """JSON-encoded values, as the SageMaker SDK sends them; the toolkit passes them as --key value."""
    values: dict[str, Any] = {
        "sagemaker_program": PROGRAM,
        "sagemaker_submit_directory": source_uri,
        "sagemaker_region": region,
        "sagemaker_job_name": job,
        "sagemaker_container_log_level": 20,
        "config": f"/opt/ml/input/data/config/{CONFIG_CHANNEL_FILE}",
        "checkpoint_dir": CHECKPOINT_LOCAL_PATH,
        "base_model": config.model.name_or_path,
    }
    if options.merge:
        values["merge"] = True
    if options.instance_count > 1:
        values["distribution"] = "torchrun"
    return {key: json.dumps(value) for key, value in values.items()}


# -------------------------------------------------------------------------------------- launch
def launch(options: LaunchOptions, echo: Echo = _quiet, boto_session: Any = None) -> LaunchResult:
    """Validate locally, upload inputs, create the training job; returns without waiting."""
    check_role_arn(options.role)
    gpu_count(options.instance_type)
    if options.instance_count < 1:
        raise SageMakerError("--instance-count: must be at least 1")
    if options.max_runtime < 1:
        raise SageMakerError("--max-runtime: must be a positive number of seconds")
    max_wait = options.max_wait
    if options.spot:
        max_wait = max_wait or 2 * options.max_runtime
        if max_wait < options.max_runtime:
            raise SageMakerError("--max-wait: must be at least --max-runtime (it includes waiting for spot capacity)")
    elif max_wait is not None:
        raise SageMakerError("--max-wait: only applies with --spot")
    job = check_job_name(options.job_name or new_job_name())
    config = load_config(options.config_path, options.overrides)
    channels = [c for c in (  # local files are checked before anything is created in AWS
        _data_channel("training", "data.path", config.data.path),
        _data_channel("test", "data.eval_path", config.data.eval_path) if config.data.eval_path is not None else None,
        _model_channel(config),
    ) if c is not None]
    channels.append(_Channel("config", key="input/config/"))

    boto_session = boto_session or session()
    region = boto_session.region_name
    image = options.image or training_image_uri(region)
    bucket = ensure_bucket(boto_session, options.bucket, echo)
    prefix = f"{KEY_PREFIX}/{job}"

    s3 = boto_session.client("s3")
    uploaded: list[str] = []

    def put(key: str, body: bytes | Path) -> None:
        action = f"upload to s3://{bucket}/{key}"
        if isinstance(body, Path):
            _call(action, s3.upload_file, Filename=str(body), Bucket=bucket, Key=key)
        else:
            _call(action, s3.put_object, Bucket=bucket, Key=key, Body=body)
        uploaded.append(key)

    for channel in channels:
        for local, key in channel.files:
            put(f"{prefix}/{channel.key}{key}", local)
        if channel.files:
            echo(f"uploaded {channel.name}: {len(channel.files)} file(s) -> {channel.uri(bucket, prefix)}")
    put(f"{prefix}/input/config/{CONFIG_CHANNEL_FILE}",
        yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False).encode())
    source_key = f"{prefix}/source/{SOURCE_ARCHIVE}"
    put(source_key, source_archive())

    request: dict[str, Any] = {
        "TrainingJobName": job,
        "RoleArn": options.role,
        "AlgorithmSpecification": {
            "TrainingImage": image,
            "TrainingInputMode": "File",
            "MetricDefinitions": [
                {"Name": "eval:loss", "Regex": r"eval loss ([0-9.eE+\-]+)"},
                {"Name": "train:loss", "Regex": r"loss=([0-9.eE+\-]+)"},
            ],
        },
        "HyperParameters": _hyperparameters(options, config, job, region, f"s3://{bucket}/{source_key}"),
        "InputDataConfig": [
            {
                "ChannelName": c.name,
                "DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": c.uri(bucket, prefix),
                                                "S3DataDistributionType": "FullyReplicated"}},
            }
            for c in channels
        ],
        "OutputDataConfig": {"S3OutputPath": f"s3://{bucket}/{KEY_PREFIX}"},
        "ResourceConfig": {"InstanceType": options.instance_type, "InstanceCount": options.instance_count,
                           "VolumeSizeInGB": options.volume_size},
        "StoppingCondition": {"MaxRuntimeInSeconds": options.max_runtime},
        "EnableManagedSpotTraining": options.spot,
        "CheckpointConfig": {"S3Uri": f"s3://{bucket}/{prefix}/checkpoints", "LocalPath": CHECKPOINT_LOCAL_PATH},
        "Tags": [{"Key": "lorafit:job", "Value": job}],
    }
    if options.spot:
        request["StoppingCondition"]["MaxWaitTimeInSeconds"] = max_wait
    if options.environment:
        request["Environment"] = dict(options.environment)
    sagemaker = boto_session.client("sagemaker")
    response = _call(f"create training job {job}", sagemaker.create_training_job, **request)
    return LaunchResult(job_name=job, job_arn=response["TrainingJobArn"], region=region, bucket=bucket,
                        prefix=prefix, uploaded=uploaded, request=request)


# ------------------------------------------------------------------------------ status / wait
def describe(job: str, boto_session: Any = None) -> dict[str, Any]:
    """DescribeTrainingJob, with a one-line error for a job that does not exist."""
    from botocore.exceptions import BotoCoreError, ClientError

    boto_session = boto_session or session()
    client = boto_session.client("sagemaker")
    try:
        return client.describe_training_job(TrainingJobName=job)
    except ClientError as exc:
        message = str(exc.response.get("Error", {}).get("Message", ""))
        if "not find" in message.lower() or "not found" in message.lower():
            raise SageMakerError(f"training job '{job}' not found in {boto_session.region_name}") from exc
        raise aws_error(exc, f"describe training job {job}") from exc
    except BotoCoreError as exc:
        raise aws_error(exc, f"describe training job {job}") from exc


def failure_message(info: dict[str, Any]) -> str:
    job, status = info.get("TrainingJobName"), info.get("TrainingJobStatus")
    reason = " ".join(str(info.get("FailureReason") or "no FailureReason given").split())
    return f"training job {job} {status.lower() if status else 'failed'}: {reason}"


def summary_lines(info: dict[str, Any]) -> list[str]:
    """Human-readable status of a job, one fact per line."""
    resources = info.get("ResourceConfig", {})
    spot = " (spot)" if info.get("EnableManagedSpotTraining") else ""
    lines = [
        f"job: {info.get('TrainingJobName')}",
        f"status: {info.get('TrainingJobStatus')} ({info.get('SecondaryStatus', '-')})",
        f"instances: {resources.get('InstanceCount', '?')} x {resources.get('InstanceType', '?')}{spot}",
    ]
    if info.get("CreationTime"):
        lines.append(f"created: {info['CreationTime']}")
    if info.get("TrainingEndTime"):
        lines.append(f"ended: {info['TrainingEndTime']}")
    if info.get("BillableTimeInSeconds") is not None:
        lines.append(f"billable seconds: {info['BillableTimeInSeconds']}")
    if info.get("ModelArtifacts", {}).get("S3ModelArtifacts"):
        lines.append(f"model: {info['ModelArtifacts']['S3ModelArtifacts']}")
    if info.get("CheckpointConfig", {}).get("S3Uri"):
        lines.append(f"checkpoints: {info['CheckpointConfig']['S3Uri']}")
    if info.get("FailureReason"):
        lines.append(f"failure reason: {' '.join(str(info['FailureReason']).split())}")
    return lines


def wait(job: str, poll_s: float = 30.0, echo: Echo = _quiet, boto_session: Any = None,
         timeout_s: float | None = None) -> dict[str, Any]:
    """Follow a job until it ends; prints each status change; a failed job raises with its FailureReason."""
    boto_session = boto_session or session()
    started = time.monotonic()
    last: tuple[str, str] | None = None
    while True:
        info = describe(job, boto_session)
        state = (str(info.get("TrainingJobStatus")), str(info.get("SecondaryStatus", "")))
        if state != last:
            message = (info.get("SecondaryStatusTransitions") or [{}])[-1].get("StatusMessage", "")
            echo(f"{datetime.now(timezone.utc):%H:%M:%S} {state[0]} / {state[1]}" + (f": {message}" if message else ""))
            last = state
        if state[0] in TERMINAL:
            if state[0] != "Completed":
                raise SageMakerError(failure_message(info))
            return info
        if timeout_s is not None and time.monotonic() - started > timeout_s:
            raise SageMakerError(f"training job {job} still {state[0]} after {timeout_s:.0f} s")
        time.sleep(poll_s)


# ------------------------------------------------------------------------------------ download
def _parse_s3(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://") or "/" not in uri[5:]:
        raise SageMakerError(f"not an s3:// object URI: {uri}")
    bucket, key = uri[5:].split("/", 1)
    return bucket, key


def download(job: str, output: str | Path, boto_session: Any = None, echo: Echo = _quiet) -> Path:
    """Fetch a completed job's model.tar.gz and unpack it into ``output`` (a lorafit run folder)."""
    target = Path(output).expanduser()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise SageMakerError(f"--output: {target} exists and is not an empty folder")
    boto_session = boto_session or session()
    info = describe(job, boto_session)
    status = info.get("TrainingJobStatus")
    if status in ("Failed", "Stopped"):
        raise SageMakerError(failure_message(info))
    if status != "Completed":
        raise SageMakerError(f"training job {job} is {status}, not Completed yet "
                             f"(follow it with: lorafit sagemaker status {job})")
    uri = info.get("ModelArtifacts", {}).get("S3ModelArtifacts")
    if not uri:
        raise SageMakerError(f"training job {job} has no model artifacts")
    bucket, key = _parse_s3(uri)
    s3 = boto_session.client("s3")
    with tempfile.TemporaryDirectory(prefix="lorafit-sm-") as scratch:
        archive = Path(scratch) / "model.tar.gz"
        try:
            s3.download_file(Bucket=bucket, Key=key, Filename=str(archive))
        except Exception as exc:  # botocore raises ClientError 404 for a missing object
            from botocore.exceptions import BotoCoreError, ClientError

            if isinstance(exc, ClientError) and str(exc.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey"):
                raise SageMakerError(f"{uri}: model.tar.gz not found (the job wrote no model)") from exc
            if isinstance(exc, BotoCoreError | ClientError):
                raise aws_error(exc, f"download {uri}") from exc
            raise
        staging = Path(scratch) / "unpacked"
        staging.mkdir()
        try:
            with tarfile.open(archive, "r:gz") as handle:
                handle.extractall(staging, filter="data")
        except (tarfile.TarError, OSError) as exc:
            raise SageMakerError(f"{uri}: not a readable model.tar.gz ({exc})") from exc
        if not (staging / "adapter" / "adapter_config.json").exists():
            raise SageMakerError(f"{uri}: no adapter/adapter_config.json inside (not a lorafit job's model)")
        target.mkdir(parents=True, exist_ok=True)
        for item in staging.iterdir():
            shutil.move(str(item), str(target / item.name))
    echo(f"downloaded {uri} -> {target}")
    return target
