"""Create a SageMaker training job for a lorafit config, with plain boto3, after checking it locally.

S3 layout of one job (everything under ``s3://BUCKET/lorafit/JOB/``)::

    input/training/...       the training data (channel ``training`` -> SM_CHANNEL_TRAINING)
    input/test/...           data.eval_path, when it is a local file (channel ``test``)
    input/model/...          a local or builtin base model folder (channel ``model``)
    input/adapter/...        model.adapter's adapter folder (channel ``adapter``), its settings in the config
    input/config/lorafit.yaml  the resolved config (channel ``config``)
    source/sourcedir.tar.gz  lorafit's own code + requirements.txt, run by the image's toolkit
    checkpoints/             synced with /opt/ml/checkpoints: a restarted (spot) job resumes;
                             ``--resume-from`` copies an earlier job's checkpoints here first
    output/model.tar.gz      SM_MODEL_DIR: the adapter run folder (written by SageMaker)

Nothing is uploaded before the local checks (``preflight``) and the role and bucket checks pass;
if anything fails after the first upload (an upload, CreateTrainingJob), what was uploaded for
the job is deleted again. Following, reading and fetching jobs is in ``jobs``.
"""

from __future__ import annotations

import io
import json
import re
import secrets
import tarfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from lorafit.builtin import is_builtin, resolve_data
from lorafit.config import LorafitConfig, load_config
from lorafit.data.sources import FILE_SUFFIXES
from lorafit.errors import ConfigError, DataError
from lorafit.paths import looks_like_path
from lorafit.reporting import METRIC_REGEXES
from lorafit.resolved import resolve_model_source
from lorafit.sagemaker import hyperparameters as hp
from lorafit.sagemaker import images, preflight
from lorafit.sagemaker.aws import Echo, account_id, call, parse_s3_uri, quiet, session
from lorafit.sagemaker.errors import SageMakerError
from lorafit.sagemaker.images import DEFAULT_TAG, training_image_uri
from lorafit.sagemaker.instances import gpu_count
from lorafit.sagemaker.jobs import describe
from lorafit.start_adapter import adopt

KEY_PREFIX = "lorafit"
CHECKPOINT_LOCAL_PATH = "/opt/ml/checkpoints"
CONFIG_CHANNEL_FILE = "lorafit.yaml"
PROGRAM = "lorafit_sagemaker_entry.py"
SOURCE_ARCHIVE = "sourcedir.tar.gz"
RUN_SUBDIR = "run"  # the entry's output_dir below the checkpoint folder (entry.RUN_SUBDIR)
MAX_KEEP_ALIVE_S = 3600  # SageMaker's limit for warm pools
# lorafit's one-line log format in a job (``lorafit: step 12/60 loss=... lr=... tokens_per_s=...``)
# SageMaker reads these off the job's log: the plain lines lorafit.reporting prints (one contract)
METRIC_DEFINITIONS = [{"Name": name, "Regex": regex} for name, regex in METRIC_REGEXES.items()]
# Pinned to the versions installed here (what this lorafit runs and is tested with) in the job's
# requirements.txt; torch is the image's own CUDA build and is only held at the image's version.
PINNED_ALSO = ("huggingface-hub", "tokenizers")

_ROLE_ARN = re.compile(r"^arn:aws[a-z\-]*:iam::\d{12}:role/?[a-zA-Z_0-9+=,.@\-/]{1,512}$")
_JOB_NAME = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")
_SUBNET = re.compile(r"^subnet-[0-9a-f]{8,17}$")
_SECURITY_GROUP = re.compile(r"^sg-[0-9a-f]{8,17}$")

PROGRAM_SOURCE = '''"""SageMaker runs this file (hyperparameter sagemaker_program); lorafit ships next to it."""
import sys

from lorafit.sagemaker.entry import main

sys.exit(main())
'''


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
    tags: dict[str, str] = field(default_factory=dict)
    vpc_subnets: list[str] = field(default_factory=list)
    security_groups: list[str] = field(default_factory=list)
    volume_kms_key: str | None = None
    output_kms_key: str | None = None
    keep_alive: int | None = None
    resume_from: str | None = None
    force: bool = False
    profile: str | None = None
    region: str | None = None


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


def check_options(options: LaunchOptions) -> int | None:
    """Every option that can be checked without AWS; returns MaxWaitTimeInSeconds (spot only)."""
    check_role_arn(options.role)
    gpu_count(options.instance_type)
    if options.instance_count < 1:
        raise SageMakerError("--instance-count: must be at least 1")
    if options.max_runtime < 1:
        raise SageMakerError("--max-run: must be a positive number of seconds")
    max_wait = options.max_wait
    if options.spot:
        max_wait = max_wait or 2 * options.max_runtime
        if max_wait < options.max_runtime:
            raise SageMakerError("--max-wait: must be at least --max-run (it includes waiting for spot capacity)")
    elif max_wait is not None:
        raise SageMakerError("--max-wait: only applies with --spot")
    if options.keep_alive is not None and not 0 <= options.keep_alive <= MAX_KEEP_ALIVE_S:
        raise SageMakerError(f"--keep-alive: must be 0 to {MAX_KEEP_ALIVE_S} seconds (SageMaker's warm pool limit)")
    if options.keep_alive and options.spot:
        raise SageMakerError("--keep-alive: warm pools are not available with --spot")
    if bool(options.vpc_subnets) != bool(options.security_groups):
        raise SageMakerError("--vpc-subnets and --security-groups: give both (a job in a VPC needs each)")
    for subnet in options.vpc_subnets:
        if not _SUBNET.match(subnet):
            raise SageMakerError(f"--vpc-subnets: '{subnet}' is not a subnet id (subnet-0123abcd...)")
    for group in options.security_groups:
        if not _SECURITY_GROUP.match(group):
            raise SageMakerError(f"--security-groups: '{group}' is not a security group id (sg-0123abcd...)")
    for key, value in options.tags.items():
        if not key or len(key) > 128 or len(value) > 256 or key.lower().startswith("aws:"):
            raise SageMakerError(f"--tags: '{key}={value}': keys are 1-128 characters not starting with "
                                 "'aws:', values at most 256")
    if options.tags.keys() & {"lorafit:job", "lorafit:resumed-from"}:
        raise SageMakerError("--tags: lorafit:job and lorafit:resumed-from are set by lorafit")
    return max_wait


def new_job_name(prefix: str = "lorafit") -> str:
    """``lorafit-YYYYmmdd-HHMMSS-xxxx``: sortable, unique, within SageMaker's 63 characters."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{prefix}-{stamp}-{secrets.token_hex(2)}"


# -------------------------------------------------------------------------------------- inputs
def _local_files(path: Path, under: str) -> list[tuple[Path, str]]:
    """(file, relative key) pairs: a file keeps its name, a folder keeps its name and layout."""
    if path.is_file():
        return [(path, f"{under}{path.name}")]
    files = sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    return [(p, f"{under}{path.name}/{p.relative_to(path).as_posix()}") for p in files]


def _data_channel(name: str, field_name: str, value: str | list[str]) -> _Channel | None:
    """The channel for data.path / data.eval_path; None when the job reads it itself (hub names)."""
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
        elif looks_like_path(item, FILE_SUFFIXES):
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
    source = resolve_model_source(config.model.name_or_path, s3_ok=True)
    if source.kind == "s3":
        return _Channel("model", s3_uri=source.location)
    if source.kind == "hub":
        return None
    path = Path(source.location)
    files = sorted(p for p in path.rglob("*") if p.is_file() and ".cache" not in p.parts)
    return _Channel("model", key="input/model/", files=[(p, p.relative_to(path).as_posix()) for p in files])


def _adopt_adapter(config: LorafitConfig) -> tuple[LorafitConfig, Path | None]:
    """``model.adapter`` as the job will see it: its base and LoRA settings written into the config
    (the job's copy of the adapter sits in a channel, away from the run it came from) and its folder,
    uploaded as the ``adapter`` channel (``SM_CHANNEL_ADAPTER``)."""
    if not config.model.adapter:
        return config, None
    if config.model.adapter.startswith("s3://"):
        raise ConfigError("model.adapter: give a local run or adapter folder; the launcher uploads it")

    adopted, folder = adopt(config)
    assert folder is not None
    return adopted, folder


def _adapter_channel(folder: Path) -> _Channel:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return _Channel("adapter", key="input/adapter/", files=[(p, p.relative_to(folder).as_posix()) for p in files])


def image_torch_version(image: str | None) -> str | None:
    """The torch version of the default Hugging Face training image; None for others."""
    return images.image_torch_version(image, (DEFAULT_TAG,))


def requirements(image_torch: str | None = None) -> list[str]:
    """The job's requirements.txt: lorafit's runtime dependencies (and ``PINNED_ALSO``) pinned to the
    versions installed here, so the container runs the library versions lorafit runs with.

    torch is never installed over the image's CUDA build: with the image's version known it is
    held there (``torch==2.8.0`` also matches ``2.8.0+cu129``), so a pin that needs another torch
    fails pip at the job's start instead of replacing the image's.
    """
    from importlib.metadata import PackageNotFoundError, requires, version

    try:
        declared = [r for r in (requires("lorafit") or []) if "extra ==" not in r]
    except PackageNotFoundError:
        declared = []
    names = [re.split(r"[<>=!~;\[ (]", r, maxsplit=1)[0].strip() for r in declared]
    pinned = []
    for requirement, name in [*zip(declared, names, strict=True), *((n, n) for n in PINNED_ALSO)]:
        if name.lower() == "torch":
            continue
        try:
            pinned.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            if requirement != name:  # a declared dependency that is not installed: keep its range
                pinned.append(requirement)
    if image_torch:
        pinned.append(f"torch=={image_torch}")
    return pinned


def source_archive(image_torch: str | None = None) -> bytes:
    """sourcedir.tar.gz: the entry script, lorafit's package folder, requirements.txt (deterministic)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", format=tarfile.PAX_FORMAT) as archive:

        def add_bytes(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            archive.addfile(info, io.BytesIO(data))

        add_bytes(PROGRAM, PROGRAM_SOURCE.encode())
        add_bytes("requirements.txt", ("\n".join(requirements(image_torch)) + "\n").encode())
        for path, name in lorafit_files():
            add_bytes(name, path.read_bytes())
    return buffer.getvalue()


def lorafit_files() -> list[tuple[Path, str]]:
    """lorafit's own package files (no caches) as (file, ``lorafit/...`` name): what a container
    that cannot pip-install lorafit gets beside its entry script."""
    import lorafit

    package = Path(lorafit.__file__).parent
    return [(path, f"lorafit/{path.relative_to(package).as_posix()}") for path in sorted(package.rglob("*"))
            if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".pyc", ".pyo")]


def job_hyperparameters(options: LaunchOptions, config: LorafitConfig, job: str, region: str,
                        source_uri: str) -> dict[str, str]:
    """JSON-encoded values, as the SageMaker SDK sends them; the toolkit passes the ones not starting
    with ``sagemaker_`` as ``--key value``. Values are ``hyperparameters.encode``d (/bin/sh-safe).
    The config and checkpoint folder are the entry's defaults (SM_CHANNEL_CONFIG, /opt/ml/checkpoints)."""
    values: dict[str, Any] = {
        "sagemaker_program": PROGRAM,
        "sagemaker_submit_directory": source_uri,
        "sagemaker_region": region,
        "sagemaker_job_name": job,
        "sagemaker_container_log_level": 20,
        "base_model": hp.encode(config.model.name_or_path),
        "max_run": options.max_runtime,
    }
    if options.merge:
        values["merge"] = True
    if options.instance_count > 1:
        values["distribution"] = "torchrun"
    return {key: json.dumps(value) for key, value in values.items()}


# -------------------------------------------------------------------------------------- resume
def resume_source(value: str, boto_session: Any) -> tuple[str, str, str]:
    """(bucket, prefix, name) of the checkpoints to continue from: a job name or an s3:// URI."""
    if value.startswith("s3://"):
        bucket, prefix = parse_s3_uri(value, "--resume-from")
        return bucket, prefix.rstrip("/"), value
    info = describe(check_job_name(value), boto_session)
    uri = (info.get("CheckpointConfig") or {}).get("S3Uri")
    if not uri:
        raise SageMakerError(f"--resume-from: training job {value} has no CheckpointConfig (no checkpoints to resume)")
    bucket, prefix = parse_s3_uri(uri, "--resume-from")
    return bucket, prefix.rstrip("/"), value


def _checkpoint_objects(s3: Any, bucket: str, prefix: str) -> list[str]:
    """Relative keys of what a job's checkpoint folder holds (what the entry left in /opt/ml/checkpoints),
    except result.json: without it the new job resumes from the last checkpoint instead of exporting."""
    keys: list[str] = []
    paginator = s3.get_paginator("list_objects_v2")
    base = f"{prefix}/" if prefix else ""
    pages = call(f"list s3://{bucket}/{base}", lambda: list(paginator.paginate(Bucket=bucket, Prefix=base)))
    for page in pages:
        keys += [o["Key"][len(base):] for o in page.get("Contents", [])]
    return [k for k in keys if k != f"{RUN_SUBDIR}/result.json"]


# -------------------------------------------------------------------------------------- launch
def launch(options: LaunchOptions, echo: Echo = quiet, boto_session: Any = None) -> LaunchResult:
    """Check locally, check the role and bucket, upload inputs, create the training job; returns
    without waiting. Nothing is uploaded before every check has passed."""
    max_wait = check_options(options)
    job = check_job_name(options.job_name or new_job_name())
    config = load_config(options.config_path, options.overrides)
    config, start_adapter = _adopt_adapter(config)
    channels = [c for c in (  # local files are checked before anything is created in AWS
        _data_channel("training", "data.path", config.data.path),
        _data_channel("test", "data.eval_path", config.data.eval_path) if config.data.eval_path is not None else None,
        _model_channel(config),
        _adapter_channel(start_adapter) if start_adapter else None,
    ) if c is not None]
    channels.append(_Channel("config", key="input/config/"))
    preflight.check_settings_for(config, options.instance_type, options.instance_count)
    preflight.check_data(config, options.instance_type, options.instance_count, echo)
    preflight.check_plan(config, options.instance_type, options.instance_count, options.force, echo)

    boto_session = boto_session or session(options.profile, options.region)
    region = boto_session.region_name
    image = options.image or training_image_uri(region)
    account = account_id(boto_session)
    preflight.check_role(boto_session, options.role, account, echo)
    bucket, owner = preflight.ensure_bucket(boto_session, options.bucket, account, echo)
    s3 = boto_session.client("s3")
    resume = None
    if options.resume_from:
        source_bucket, source_prefix, name = resume_source(options.resume_from, boto_session)
        objects = _checkpoint_objects(s3, source_bucket, source_prefix)
        if not any(k.startswith(f"{RUN_SUBDIR}/checkpoints/step-") for k in objects):
            raise SageMakerError(f"--resume-from: no lorafit checkpoints under s3://{source_bucket}/{source_prefix}/"
                                 f"{RUN_SUBDIR}/checkpoints/")
        resume = (source_bucket, source_prefix, name, objects)

    prefix = f"{KEY_PREFIX}/{job}"
    upload = _Uploader(s3, bucket, owner, options.output_kms_key)
    try:
        for channel in channels:
            for local, key in channel.files:
                upload.file(local, f"{prefix}/{channel.key}{key}")
            if channel.files:
                echo(f"uploaded {channel.name}: {len(channel.files)} file(s) -> {channel.uri(bucket, prefix)}")
        upload.bytes(f"{prefix}/input/config/{CONFIG_CHANNEL_FILE}",
                     yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False).encode())
        source_key = f"{prefix}/source/{SOURCE_ARCHIVE}"
        upload.bytes(source_key, source_archive(image_torch_version(options.image)))
        if resume is not None:
            source_bucket, source_prefix, name, objects = resume
            for key in objects:
                upload.copy(source_bucket, f"{source_prefix}/{key}" if source_prefix else key,
                            f"{prefix}/checkpoints/{key}")
            steps = sorted({k.split("/")[2] for k in objects if k.startswith(f"{RUN_SUBDIR}/checkpoints/step-")})
            echo(f"resuming from {name}: copied {len(objects)} checkpoint file(s) (newest {steps[-1]}) -> "
                 f"s3://{bucket}/{prefix}/checkpoints/")
        request = _request(options, config, job, region, image, bucket, prefix, channels, max_wait,
                           f"s3://{bucket}/{source_key}", resume[2] if resume else None)
        sagemaker = boto_session.client("sagemaker")
        response = call(f"create training job {job}", sagemaker.create_training_job, **request)
    except BaseException as exc:
        removed = upload.remove_all()
        if isinstance(exc, SageMakerError) and upload.keys:
            raise SageMakerError(f"{exc}; {removed}") from exc
        raise
    return LaunchResult(job_name=job, job_arn=response["TrainingJobArn"], region=region, bucket=bucket,
                        prefix=prefix, uploaded=upload.keys, request=request)


def _request(options: LaunchOptions, config: LorafitConfig, job: str, region: str, image: str, bucket: str,
             prefix: str, channels: list[_Channel], max_wait: int | None, source_uri: str,
             resumed_from: str | None) -> dict[str, Any]:
    """The CreateTrainingJob request."""
    resources: dict[str, Any] = {"InstanceType": options.instance_type, "InstanceCount": options.instance_count,
                                 "VolumeSizeInGB": options.volume_size}
    if options.volume_kms_key:
        resources["VolumeKmsKeyId"] = options.volume_kms_key
    if options.keep_alive:
        resources["KeepAlivePeriodInSeconds"] = options.keep_alive
    output: dict[str, Any] = {"S3OutputPath": f"s3://{bucket}/{KEY_PREFIX}"}
    if options.output_kms_key:
        output["KmsKeyId"] = options.output_kms_key
    # the job's model.tar.gz carries code/ for an endpoint (entry.export_run): deploy reads this tag
    tags = [{"Key": "lorafit:job", "Value": job}, {"Key": "lorafit:serving-code", "Value": "1"}]
    if resumed_from:
        tags.append({"Key": "lorafit:resumed-from", "Value": resumed_from[:256]})
    tags += [{"Key": k, "Value": v} for k, v in options.tags.items()]
    request: dict[str, Any] = {
        "TrainingJobName": job,
        "RoleArn": options.role,
        "AlgorithmSpecification": {"TrainingImage": image, "TrainingInputMode": "File",
                                   "MetricDefinitions": [dict(m) for m in METRIC_DEFINITIONS]},
        "HyperParameters": job_hyperparameters(options, config, job, region, source_uri),
        "InputDataConfig": [
            {
                "ChannelName": c.name,
                "DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": c.uri(bucket, prefix),
                                                "S3DataDistributionType": "FullyReplicated"}},
            }
            for c in channels
        ],
        "OutputDataConfig": output,
        "ResourceConfig": resources,
        "StoppingCondition": {"MaxRuntimeInSeconds": options.max_runtime},
        "EnableManagedSpotTraining": options.spot,
        "CheckpointConfig": {"S3Uri": f"s3://{bucket}/{prefix}/checkpoints", "LocalPath": CHECKPOINT_LOCAL_PATH},
        "Tags": tags,
    }
    if options.spot:
        request["StoppingCondition"]["MaxWaitTimeInSeconds"] = max_wait
    if options.environment:
        request["Environment"] = dict(options.environment)
    if options.vpc_subnets:
        request["VpcConfig"] = {"SecurityGroupIds": list(options.security_groups), "Subnets": list(options.vpc_subnets)}
    return request


class _Uploader:
    """Puts objects in the job's bucket (with ExpectedBucketOwner and SSE-KMS when set), remembers
    every key, and deletes them all again when the launch fails part way."""

    def __init__(self, s3: Any, bucket: str, owner: str | None, kms_key: str | None) -> None:
        self.s3, self.bucket, self.keys = s3, bucket, []
        self.extra: dict[str, str] = {"ExpectedBucketOwner": owner} if owner else {}
        if kms_key:
            self.extra.update(ServerSideEncryption="aws:kms", SSEKMSKeyId=kms_key)

    def file(self, local: Path, key: str) -> None:
        self.keys.append(key)
        call(f"upload to s3://{self.bucket}/{key}", self.s3.upload_file, Filename=str(local), Bucket=self.bucket,
             Key=key, ExtraArgs=dict(self.extra) or None)

    def bytes(self, key: str, body: bytes) -> None:
        self.keys.append(key)
        call(f"upload to s3://{self.bucket}/{key}", self.s3.put_object, Bucket=self.bucket, Key=key, Body=body,
             **self.extra)

    def copy(self, source_bucket: str, source_key: str, key: str) -> None:
        """One CopyObject: its ExpectedBucketOwner is the destination's only (the managed ``s3.copy``
        would also demand it of the source, which may be another account's). Checkpoint files of a
        LoRA run are far below CopyObject's 5 GB limit."""
        self.keys.append(key)
        call(f"copy s3://{source_bucket}/{source_key} to s3://{self.bucket}/{key}", self.s3.copy_object,
             CopySource={"Bucket": source_bucket, "Key": source_key}, Bucket=self.bucket, Key=key, **self.extra)

    def remove_all(self) -> str:
        """Delete every key written (or begun); returns what happened, for the error message."""
        if not self.keys:
            return ""
        owner = {k: v for k, v in self.extra.items() if k == "ExpectedBucketOwner"}
        try:
            for start in range(0, len(self.keys), 1000):
                batch = [{"Key": k} for k in self.keys[start:start + 1000]]
                self.s3.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}, **owner)
        except Exception as exc:  # noqa: BLE001 - report, keep the original error
            return f"could not remove the {len(self.keys)} uploaded object(s) under s3://{self.bucket}/ ({exc})"
        return f"removed the {len(self.keys)} object(s) uploaded for it"
