"""Put a trained run behind a SageMaker endpoint, use it, and clean up: deploy, wait, invoke, list, delete.

Deploy (the recipe's step 4 with plain boto3): the model folder (``lorafit.sagemaker.package``) as
model.tar.gz, CreateModel with the Hugging Face inference image, CreateEndpointConfig (instances
or serverless), CreateEndpoint. Everything is named alike (the endpoint's name) and tagged
``lorafit:endpoint``, so ``endpoints`` lists lorafit's and ``delete`` finds each part even after a
partial deploy. Before anything is created: the options, the run (or the finished job), and the
fit check (``lorafit.inference_plan``). A deploy that fails or is interrupted (Ctrl-C) deletes
what it created; SageMaker refuses to delete an endpoint while it is Creating, so then it waits
for it to leave that state (a second Ctrl-C leaves it, naming the command that deletes it).

The CLI imports this module to parse arguments, so the planner and ``lorafit.inference_plan``
(torch) are imported inside the fit check and the serving settings.
"""

from __future__ import annotations

import contextlib
import json
import re
import tempfile
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lorafit.builtin import is_builtin
from lorafit.config import validate_config
from lorafit.errors import ConfigError, LorafitError, first_line
from lorafit.paths import looks_like_path
from lorafit.resolved import resolve_precision
from lorafit.sagemaker import images, jobs, preflight
from lorafit.sagemaker.aws import Echo, account_id, call, error_code, parse_s3_uri, quiet, session
from lorafit.sagemaker.errors import SageMakerError, aws_error
from lorafit.sagemaker.handler import SETTINGS_ENV, ServingSettings
from lorafit.sagemaker.hyperparameters import decode
from lorafit.sagemaker.images import inference_image_uri
from lorafit.sagemaker.instances import (
    gpu_count,
    gpu_instance_types,
    has_local_storage,
    host_device,
    instance_gpu,
    serverless_device,
)
from lorafit.sagemaker.jobs import download, failure_message
from lorafit.sagemaker.launcher import LaunchOptions, check_role_arn
from lorafit.sagemaker.launcher import check_options as check_launch_options
from lorafit.sagemaker.package import default_weights, package_run, run_folder, tar_folder

KEY_PREFIX = "lorafit/endpoints"
TAG = "lorafit:endpoint"
PACKAGE_TAG = "lorafit:package"  # the model.tar.gz lorafit uploaded (deleted with the endpoint)
SERVING_CODE_TAG = "lorafit:serving-code"  # on training jobs whose model.tar.gz carries code/
VARIANT = "AllTraffic"
_NAME = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")
_IN_PROGRESS = ("Creating", "Updating", "SystemUpdating", "RollingBack", "Deleting")


@dataclass
class DeployOptions:
    """Everything ``lorafit sagemaker deploy`` takes."""

    source: str  # a run folder, or a training job's name
    role: str | None = None
    instance_type: str | None = None
    instance_count: int = 1
    serverless_memory: int | None = None  # MB; a serverless endpoint instead of instances
    serverless_concurrency: int = 1
    endpoint_name: str | None = None
    weights: str | None = None  # merged | adapter; None: package.default_weights
    quantization: str | None = None
    dtype: str | None = None
    context: int | None = None
    concurrency: int = 1
    environment: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    vpc_subnets: list[str] = field(default_factory=list)
    security_groups: list[str] = field(default_factory=list)
    kms_key: str | None = None
    image: str | None = None
    bucket: str | None = None
    package_only: str | None = None
    force: bool = False
    profile: str | None = None
    region: str | None = None


@dataclass
class DeployResult:
    endpoint: str
    region: str
    model_data: str
    uploaded: bool
    request: dict[str, Any]
    package_dir: Path | None = None


# ------------------------------------------------------------------------------------ checks
def check_name(name: str, flag: str = "--endpoint-name") -> str:
    if not _NAME.match(name or ""):
        raise SageMakerError(f"{flag}: '{name}' must be 1-63 letters, digits and hyphens, starting with a letter "
                             "or digit")
    return name


def check_options(options: DeployOptions) -> None:
    """Every option that can be checked without AWS or the model."""
    if options.package_only is None or options.role:
        check_role_arn(options.role or "")
    if options.serverless_memory is not None:
        if options.instance_type:
            raise SageMakerError("--serverless and --instance-type: choose one (a serverless endpoint has no instances)")
        serverless_device(options.serverless_memory)
        if not 1 <= options.serverless_concurrency <= 200:
            raise SageMakerError("--serverless-concurrency: 1 to 200 (SageMaker's MaxConcurrency)")
        if options.concurrency != 1:
            raise SageMakerError("--concurrency: a serverless endpoint serves one request per copy; scale with "
                                 "--serverless-concurrency")
    elif not options.instance_type:
        raise SageMakerError("--instance-type: required (e.g. ml.g5.xlarge), or --serverless MB")
    else:
        gpu_count(options.instance_type)
    if options.instance_count < 1:
        raise SageMakerError("--instance-count: must be at least 1")
    if options.concurrency < 1 or (options.context is not None and options.context < 2):
        raise SageMakerError("--concurrency must be at least 1 and --context at least 2 tokens")
    if options.endpoint_name:
        check_name(options.endpoint_name)
    if options.tags.keys() & {TAG, PACKAGE_TAG}:
        raise SageMakerError(f"--tags: {TAG} and {PACKAGE_TAG} are set by lorafit")
    # the launcher's checks of tags and VPC ids, with a placeholder for what deploy has no use for
    check_launch_options(LaunchOptions(None, options.role or "arn:aws:iam::000000000000:role/x",
                                       options.instance_type or "ml.m5.large", tags=options.tags,
                                       vpc_subnets=options.vpc_subnets, security_groups=options.security_groups))


def new_endpoint_name(source: str) -> str:
    """``lorafit-RUNNAME-YYYYmmdd-HHMMSS``: readable, unique, within SageMaker's 63 characters."""
    stem = re.sub(r"[^a-zA-Z0-9]+", "-", Path(source).name).strip("-")[:28] or "run"
    return f"lorafit-{stem}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"


# ------------------------------------------------------------------------------ what to serve
@dataclass
class _Source:
    """The run to serve: its config, and either a local folder or a finished job's model.tar.gz."""

    config: Any
    name: str
    run_path: Path | None = None
    job: dict[str, Any] | None = None
    job_has_code: bool = False
    job_merged: bool = False


def _local_source(path: str) -> _Source:
    target = run_folder(path)
    return _Source(config=target.config, name=Path(path).resolve().name, run_path=target.run_dir)


def _job_source(job: str, boto_session: Any) -> _Source:
    """A finished training job, read without downloading its model: its config from the config
    channel, whether its archive holds merged weights and serving code from its settings and tags."""
    info = jobs.describe(check_name(job, "RUN_OR_JOB"), boto_session)
    status = info.get("TrainingJobStatus")
    if status in ("Failed", "Stopped"):
        raise SageMakerError(f"RUN_OR_JOB: {failure_message(info)}")
    if status != "Completed" or not info.get("ModelArtifacts", {}).get("S3ModelArtifacts"):
        raise SageMakerError(f"RUN_OR_JOB: training job {job} is {status}, not Completed; deploy it once it is "
                             f"(follow it: lorafit sagemaker status {job} --wait)")
    channel = next((c for c in info.get("InputDataConfig", []) if c.get("ChannelName") == "config"), None)
    if channel is None:
        raise SageMakerError(f"RUN_OR_JOB: training job {job} has no config channel (not launched by lorafit)")
    bucket, key = parse_s3_uri(channel["DataSource"]["S3DataSource"]["S3Uri"])
    s3 = boto_session.client("s3")
    body = call(f"read s3://{bucket}/{key}lorafit.yaml", s3.get_object, Bucket=bucket,
                Key=f"{key.rstrip('/')}/lorafit.yaml")["Body"].read()
    import yaml

    config = validate_config(yaml.safe_load(body), f"s3://{bucket}/{key}lorafit.yaml")
    base = _decoded(info.get("HyperParameters", {}).get("base_model"))
    if base:
        config.model.name_or_path = base
    tags = _tags(boto_session, info["TrainingJobArn"])
    merged = json.loads(info.get("HyperParameters", {}).get("merge", "false") or "false") is True
    return _Source(config=config, name=job, job=info, job_has_code=tags.get(SERVING_CODE_TAG) == "1",
                   job_merged=merged)


def _decoded(value: str | None) -> str | None:
    return decode(json.loads(value)) if value else None


def _tags(boto_session: Any, arn: str) -> dict[str, str]:
    client = boto_session.client("sagemaker")
    try:
        return {t["Key"]: t["Value"] for t in client.list_tags(ResourceArn=arn).get("Tags", [])}
    except Exception as exc:  # noqa: BLE001 - tags are a hint; without them nothing is assumed
        if error_code(exc):
            return {}
        raise


def _looks_like_job(source: str) -> bool:
    return not Path(source).expanduser().exists() and bool(_NAME.match(source))


def serving_settings(options: DeployOptions, config: Any) -> ServingSettings:
    from lorafit.inference_plan import default_context

    quantization = options.quantization or config.model.quantization
    weights = options.weights or default_weights(quantization)
    context = options.context
    if context is None:
        try:
            from lorafit.planner import resolve_device, resolve_for

            context = default_context(resolve_for(_serving_config(config, options), resolve_device("cpu")).model_config)
        except LorafitError:
            context = 2048  # a model config that cannot be read here (an offline hub id)
    return ServingSettings(weights=weights, quantization=options.quantization, dtype=serving_dtype(options, config),
                           max_total_tokens=context, max_batch_size=options.concurrency)


def serving_dtype(options: DeployOptions, config: Any) -> str:
    """The dtype the endpoint loads the model in (16-bit on GPUs; fp32 on CPU instances unless the run or
    ``--dtype`` names one), decided here once: the merge saves in it, the fit check counts it, and the
    package pins it, so neither this machine's CPU nor the worker's turns ``auto`` into something else."""
    gpu = None if options.serverless_memory is not None else instance_gpu(options.instance_type)
    # "auto" for the compute: serving computes in the weights' dtype, whatever precision training used
    precision = resolve_precision(options.dtype or config.model.dtype, "auto",
                                  device_kind="cuda" if gpu else "cpu", bf16_supported=bool(gpu and gpu.bf16))
    return precision.weights


def _serving_config(config: Any, options: DeployOptions) -> Any:
    """The run's config as the endpoint loads the model (the deploy's quantization, the serving dtype)."""
    served = config.model_copy(deep=True)
    if options.quantization:
        served.model.quantization = options.quantization
    served.model.dtype = serving_dtype(options, config)
    return served


def _device(options: DeployOptions) -> Any:
    if options.serverless_memory is not None:
        return serverless_device(options.serverless_memory)
    return host_device(options.instance_type)


def _where(options: DeployOptions) -> str:
    if options.serverless_memory is not None:
        return f"a serverless endpoint with {options.serverless_memory} MB"
    return options.instance_type or ""


def check_fit(options: DeployOptions, config: Any, settings: ServingSettings, echo: Echo = quiet) -> None:
    """Refuse (unless ``--force``) a model predicted not to fit, saying what would."""
    from lorafit.inference_plan import estimate_serving

    served = _serving_config(config, options)
    adapter = settings.weights == "adapter"

    def plan(cfg: Any, device: Any) -> Any:
        return estimate_serving(cfg, device, context=settings.max_total_tokens, concurrency=settings.max_batch_size,
                                adapter=adapter)

    try:
        result = plan(served, _device(options))
    except Exception as exc:  # noqa: BLE001 - the plan is advice when it cannot be made (an offline hub id)
        echo(f"fit: not checked ({first_line(exc)})")
        return
    if result.fits:
        echo(f"fit: fits on {_where(options)}: {result.line()}")
        return
    if options.force:
        echo(f"fit: does NOT fit on {_where(options)} ({result.line()}); deploying anyway (--force)")
        return
    ideas = []
    for quant in ("int8", "nf4"):
        if served.model.quantization in ("none", "int8") and quant != served.model.quantization:
            variant = served.model_copy(deep=True)
            variant.model.quantization = quant
            if plan(variant, _device(options)).fits:
                ideas.append(f"--quantization {quant}")
                break
    for instance in gpu_instance_types():  # each sized in the dtype it would serve in (fp16 on a T4, ...)
        elsewhere = replace(options, instance_type=instance, serverless_memory=None)
        try:
            fits = plan(_serving_config(config, elsewhere), host_device(instance)).fits
        except ConfigError:  # a bf16 the run or --dtype asks for, on a GPU without bf16
            continue
        if fits:
            ideas.append(f"--instance-type {instance}")
            break
    hint = " or ".join(ideas) if ideas else "a smaller --context or --concurrency"
    raise SageMakerError(f"--instance-type: the model will not fit on {_where(options)} ({result.line()}); "
                         f"try {hint}; --force deploys anyway")


# ------------------------------------------------------------------------------------- deploy
def deploy(options: DeployOptions, echo: Echo = quiet, boto_session: Any = None) -> DeployResult:
    """Check, package or reuse, upload, and create model + endpoint config + endpoint (no waiting)."""
    check_options(options)
    job = _looks_like_job(options.source)
    if job and options.package_only is None:
        boto_session = boto_session or session(options.profile, options.region)
        source = _job_source(options.source, boto_session)
    elif job:
        raise SageMakerError(f"RUN_OR_JOB: {options.source} is not a run folder here (--package-only packages a "
                             "local run; download a job first: lorafit sagemaker download JOB --output DIR)")
    else:
        source = _local_source(options.source)
    settings = serving_settings(options, source.config)
    if settings.weights not in ("merged", "adapter"):
        raise SageMakerError(f"--weights: '{settings.weights}' (expected merged or adapter)")
    check_fit(options, source.config, settings, echo)
    merge_dtype = settings.dtype
    image_torch = _image_torch(options)
    if options.package_only is not None:
        folder = package_run(source.run_path, options.package_only, settings, merge_dtype=merge_dtype,
                             image_torch=image_torch, echo=echo)
        return DeployResult(endpoint="", region="", model_data=str(folder), uploaded=False, request={},
                            package_dir=folder)

    boto_session = boto_session or session(options.profile, options.region)
    region = boto_session.region_name

    account = account_id(boto_session)
    preflight.check_role(boto_session, options.role, account, echo)
    name = check_name(options.endpoint_name or new_endpoint_name(source.name))
    _refuse_existing(boto_session, name)
    created = _Created(boto_session, name)
    try:
        model_data, uploaded = _model_data(options, source, settings, merge_dtype, image_torch, boto_session,
                                           account, name, created, echo)
        request = _requests(options, settings, name, region, model_data, source, uploaded)
        client = boto_session.client("sagemaker")
        call(f"create model {name}", client.create_model, **request["model"])
        created.model = True
        call(f"create endpoint config {name}", client.create_endpoint_config, **request["endpoint_config"])
        created.config = True
        call(f"create endpoint {name}", client.create_endpoint, **request["endpoint"])
        created.endpoint = True
    except BaseException as exc:
        done = created.remove(echo)
        if isinstance(exc, LorafitError) and done:
            raise SageMakerError(f"{exc}; {done}") from exc
        raise
    return DeployResult(endpoint=name, region=region, model_data=model_data, uploaded=uploaded, request=request)


def _image_torch(options: DeployOptions) -> str | None:
    return images.image_torch_version(options.image, tuple(images.INFERENCE_TAGS.values()))


def _image(options: DeployOptions, region: str) -> str:
    if options.image:
        return options.image
    gpu = options.serverless_memory is None and gpu_count(options.instance_type) > 0
    return inference_image_uri(region, gpu=gpu)


def _refuse_existing(boto_session: Any, name: str) -> None:
    client = boto_session.client("sagemaker")
    if _describe_or_none(client.describe_endpoint, EndpointName=name) is not None:
        raise SageMakerError(f"--endpoint-name: endpoint {name} already exists (lorafit sagemaker delete {name}, "
                             "or choose another name)")


def _model_data(options: DeployOptions, source: _Source, settings: ServingSettings, merge_dtype: str,
                image_torch: str | None, boto_session: Any, account: str, name: str, created: _Created,
                echo: Echo) -> tuple[str, bool]:
    """The model.tar.gz to serve: the job's own when it holds what serving needs, else packaged and uploaded."""
    if source.job is not None:
        uri = source.job["ModelArtifacts"]["S3ModelArtifacts"]
        base_kind = _source_kind(source.config.model.name_or_path)
        ready = source.job_has_code and (source.job_merged if settings.weights == "merged" else base_kind == "hub")
        if ready:
            if settings.weights == "adapter":
                settings.base = source.config.model.name_or_path
            echo(f"model: {uri} (the job's own archive: nothing downloaded or uploaded)")
            return uri, False
        why = ("it has no serving code (trained by an older lorafit)" if not source.job_has_code else
               "it has no merged weights (launch --merge)" if settings.weights == "merged" else
               "its base is not a hub model the endpoint can download")
        echo(f"model: {uri} cannot be served as it is ({why}); downloading it to package the run here")

    bucket, owner = preflight.ensure_bucket(boto_session, options.bucket, account, echo)
    with tempfile.TemporaryDirectory(prefix="lorafit-deploy-") as scratch:
        run_path = source.run_path
        if source.job is not None:
            run_path = download(source.name, Path(scratch) / "run", boto_session=boto_session, echo=echo)
        folder = package_run(run_path, Path(scratch) / "model", settings, merge_dtype=merge_dtype,
                             image_torch=image_torch, echo=echo)
        archive = tar_folder(folder, Path(scratch) / "model.tar.gz")
        key = f"{KEY_PREFIX}/{name}/model.tar.gz"
        extra: dict[str, Any] = {"ExpectedBucketOwner": owner} if owner else {}
        if options.kms_key:
            extra.update(ServerSideEncryption="aws:kms", SSEKMSKeyId=options.kms_key)
        s3 = boto_session.client("s3")
        created.package = (s3, bucket, key, owner)
        size = archive.stat().st_size
        call(f"upload to s3://{bucket}/{key}", s3.upload_file, Filename=str(archive), Bucket=bucket, Key=key,
             ExtraArgs=extra or None)
    uri = f"s3://{bucket}/{key}"
    echo(f"uploaded the model folder ({size / 2**20:.1f} MiB) -> {uri}")
    return uri, True


def _source_kind(name: str) -> str:
    if is_builtin(name):
        return "builtin"
    return "local" if looks_like_path(name) or Path(name).expanduser().exists() else "hub"


def _requests(options: DeployOptions, settings: ServingSettings, name: str, region: str, model_data: str,
              source: _Source, uploaded: bool) -> dict[str, Any]:
    """The CreateModel, CreateEndpointConfig and CreateEndpoint requests."""
    tags = [{"Key": TAG, "Value": name}, {"Key": "lorafit:source", "Value": source.name[:256]}]
    if uploaded:
        tags.append({"Key": PACKAGE_TAG, "Value": model_data[:256]})
    tags += [{"Key": k, "Value": v} for k, v in options.tags.items()]
    environment = {
        SETTINGS_ENV: json.dumps(settings.to_json()),
        "SAGEMAKER_PROGRAM": "inference.py",
        "SAGEMAKER_MODEL_SERVER_WORKERS": "1",  # one model copy: what the fit check counted
        **options.environment,
    }
    model: dict[str, Any] = {
        "ModelName": name,
        "ExecutionRoleArn": options.role,
        "PrimaryContainer": {"Image": _image(options, region), "ModelDataUrl": model_data,
                             "Environment": environment},
        "Tags": tags,
    }
    if options.vpc_subnets:
        model["VpcConfig"] = {"SecurityGroupIds": list(options.security_groups), "Subnets": list(options.vpc_subnets)}
    variant: dict[str, Any] = {"VariantName": VARIANT, "ModelName": name, "InitialVariantWeight": 1.0}
    if options.serverless_memory is not None:
        variant["ServerlessConfig"] = {"MemorySizeInMB": options.serverless_memory,
                                       "MaxConcurrency": options.serverless_concurrency}
    else:
        variant.update(InstanceType=options.instance_type, InitialInstanceCount=options.instance_count,
                       ContainerStartupHealthCheckTimeoutInSeconds=900, ModelDataDownloadTimeoutInSeconds=900)
    config: dict[str, Any] = {"EndpointConfigName": name, "ProductionVariants": [variant], "Tags": tags}
    if options.kms_key and options.serverless_memory is None and not has_local_storage(options.instance_type):
        config["KmsKeyId"] = options.kms_key
    endpoint = {"EndpointName": name, "EndpointConfigName": name, "Tags": tags}
    return {"model": model, "endpoint_config": config, "endpoint": endpoint}


class _Created:
    """What a deploy has created so far, and how to remove it again."""

    def __init__(self, boto_session: Any, name: str) -> None:
        self.boto_session, self.name = boto_session, name
        self.model = self.config = self.endpoint = False
        self.package: tuple[Any, str, str, str | None] | None = None

    def remove(self, echo: Echo) -> str:
        if not (self.model or self.config or self.endpoint or self.package):
            return ""
        try:
            gone = delete(self.name, boto_session=self.boto_session, echo=echo, package=self.package)
        except KeyboardInterrupt:
            return f"left endpoint {self.name} in place; delete it with: lorafit sagemaker delete {self.name}"
        except Exception as exc:  # noqa: BLE001 - report, keep the original error
            return f"could not remove what it created ({exc}); run: lorafit sagemaker delete {self.name}"
        return f"removed what it created ({', '.join(gone)})" if gone else ""


# -------------------------------------------------------------------------------------- wait
def _describe_or_none(function: Any, **kwargs: Any) -> dict[str, Any] | None:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return function(**kwargs)
    except ClientError as exc:
        message = str(exc.response.get("Error", {}).get("Message", "")).lower()
        if error_code(exc) == "ValidationException" and ("could not find" in message or "not found" in message):
            return None
        raise aws_error(exc, "describe") from exc
    except BotoCoreError as exc:
        raise aws_error(exc, "describe") from exc


def describe(name: str, boto_session: Any = None) -> dict[str, Any]:
    """DescribeEndpoint, with a one-line error for an endpoint that does not exist."""
    boto_session = boto_session or session()
    info = _describe_or_none(boto_session.client("sagemaker").describe_endpoint, EndpointName=name)
    if info is None:
        raise SageMakerError(f"endpoint '{name}' not found in {boto_session.region_name}")
    return info


def wait(name: str, poll_s: float = 30.0, echo: Echo = quiet, boto_session: Any = None,
         timeout_s: float | None = None) -> dict[str, Any]:
    """Follow an endpoint until it is InService; a Failed one raises with its FailureReason."""
    boto_session = boto_session or session()
    started = time.monotonic()
    last = None
    while True:
        info = describe(name, boto_session)
        status = info.get("EndpointStatus")
        if status != last:
            echo(f"{datetime.now(timezone.utc):%H:%M:%S} endpoint {name}: {status}")
            last = status
        if status == "InService":
            return info
        if status in ("Failed", "OutOfService"):
            reason = " ".join(str(info.get("FailureReason") or "no FailureReason given").split())
            raise SageMakerError(f"endpoint {name} {str(status).lower()}: {reason}")
        if timeout_s is not None and time.monotonic() - started > timeout_s:
            raise SageMakerError(f"endpoint {name} still {status} after {timeout_s:.0f} s")
        time.sleep(poll_s)


# ------------------------------------------------------------------------------------ delete
def delete(name: str, boto_session: Any = None, echo: Echo = quiet, poll_s: float = 15.0,
           package: tuple[Any, str, str, str | None] | None = None) -> list[str]:
    """Delete the endpoint, its endpoint config and model (named alike, or as the endpoint names
    them) and the model.tar.gz lorafit uploaded for it; what is already gone is skipped, so it is
    safe to repeat. An endpoint that is Creating cannot be deleted yet: wait for it to leave that."""
    boto_session = boto_session or session()
    client = boto_session.client("sagemaker")
    gone: list[str] = []
    endpoint = _describe_or_none(client.describe_endpoint, EndpointName=name)
    config_name = (endpoint or {}).get("EndpointConfigName", name)
    config = _describe_or_none(client.describe_endpoint_config, EndpointConfigName=config_name)
    models = {v.get("ModelName") for v in (config or {}).get("ProductionVariants", [])} | {name}
    model_infos = {m: _describe_or_none(client.describe_model, ModelName=m) for m in sorted(models) if m}
    if package is None:
        for info in model_infos.values():
            uri = _tags(boto_session, info["ModelArn"]).get(PACKAGE_TAG) if info else None
            if uri:
                bucket, key = parse_s3_uri(uri)
                package = (boto_session.client("s3"), bucket, key, None)
    if endpoint is not None:
        announced = False
        while endpoint is not None and endpoint.get("EndpointStatus") in ("Creating", "Updating"):
            if not announced:
                echo(f"endpoint {name} is {endpoint['EndpointStatus']}; SageMaker deletes it only after that ends: "
                     f"waiting (Ctrl-C leaves it; later: lorafit sagemaker delete {name})")
                announced = True
            time.sleep(poll_s)
            endpoint = _describe_or_none(client.describe_endpoint, EndpointName=name)
        if endpoint is not None and endpoint.get("EndpointStatus") != "Deleting":
            call(f"delete endpoint {name}", client.delete_endpoint, EndpointName=name)
            gone.append(f"endpoint {name}")
    if config is not None:
        call(f"delete endpoint config {config_name}", client.delete_endpoint_config, EndpointConfigName=config_name)
        gone.append(f"endpoint config {config_name}")
    for model, info in model_infos.items():
        if info is not None:
            call(f"delete model {model}", client.delete_model, ModelName=model)
            gone.append(f"model {model}")
    if package is not None:
        s3, bucket, key, owner = package
        extra = {"ExpectedBucketOwner": owner} if owner else {}
        try:
            s3.head_object(Bucket=bucket, Key=key, **extra)
        except Exception as exc:  # noqa: BLE001 - already gone (404) or unreadable: nothing to delete here
            if error_code(exc) not in ("404", "NoSuchKey", "NotFound"):
                raise aws_error(exc, f"s3://{bucket}/{key}") from exc
        else:
            call(f"delete s3://{bucket}/{key}", s3.delete_object, Bucket=bucket, Key=key, **extra)
            gone.append(f"s3://{bucket}/{key}")
    for item in gone:
        echo(f"deleted {item}")
    return gone


# ------------------------------------------------------------------------------------- list
def list_endpoints(boto_session: Any = None) -> list[dict[str, Any]]:
    """lorafit's endpoints (tagged ``lorafit:endpoint``): name, status, instances, age."""
    boto_session = boto_session or session()
    client = boto_session.client("sagemaker")
    out = []
    token = None
    while True:
        page = call("list endpoints", client.list_endpoints, **({"NextToken": token} if token else {}))
        for summary in page.get("Endpoints", []):
            if TAG not in _tags(boto_session, summary["EndpointArn"]):
                continue
            name = summary["EndpointName"]
            info = _describe_or_none(client.describe_endpoint, EndpointName=name) or summary
            config = _describe_or_none(client.describe_endpoint_config,
                                       EndpointConfigName=info.get("EndpointConfigName", name)) or {}
            variant = (config.get("ProductionVariants") or [{}])[0]
            current = (info.get("ProductionVariants") or [{}])[0]
            if variant.get("ServerlessConfig"):
                where = f"serverless {variant['ServerlessConfig'].get('MemorySizeInMB')} MB"
            else:
                count = current.get("CurrentInstanceCount", variant.get("InitialInstanceCount", "?"))
                where = f"{count} x {variant.get('InstanceType', '?')}"
            out.append({"name": name, "status": info.get("EndpointStatus"), "instances": where,
                        "created": summary.get("CreationTime")})
        token = page.get("NextToken")
        if not token:
            return out


def age(created: Any, now: datetime | None = None) -> str:
    if not isinstance(created, datetime):
        return "?"
    seconds = int(((now or datetime.now(timezone.utc)) - created).total_seconds())
    days, rest = divmod(max(seconds, 0), 86400)
    hours, rest = divmod(rest, 3600)
    return f"{days}d {hours}h" if days else f"{hours}h {rest // 60:02d}m"


# ------------------------------------------------------------------------------------ invoke
def invoke(name: str, payload: dict[str, Any], boto_session: Any = None) -> Any:
    """InvokeEndpoint with a JSON request; the container's refusal (HTTP 4xx) as one line."""
    from botocore.exceptions import BotoCoreError, ClientError

    boto_session = boto_session or session()
    runtime = boto_session.client("sagemaker-runtime")
    try:
        response = runtime.invoke_endpoint(EndpointName=name, ContentType="application/json",
                                           Accept="application/json", Body=json.dumps(payload).encode())
    except ClientError as exc:
        error = exc.response
        if error_code(exc) == "ModelError":
            message = str(error.get("OriginalMessage") or error.get("Error", {}).get("Message", ""))
            with contextlib.suppress(ValueError, AttributeError):  # MMS answers {"code", "type", "message"}
                message = json.loads(message).get("message", message)
            status = error.get("OriginalStatusCode", "?")
            raise SageMakerError(f"endpoint {name} refused the request ({status}): {' '.join(message.split())}") \
                from exc
        text = str(error.get("Error", {}).get("Message", "")).lower()
        if error_code(exc) == "ValidationError" and "not found" in text:
            raise SageMakerError(f"endpoint '{name}' not found in {boto_session.region_name}") from exc
        raise aws_error(exc, f"invoke endpoint {name}") from exc
    except BotoCoreError as exc:
        raise aws_error(exc, f"invoke endpoint {name}") from exc
    body = response["Body"].read()
    try:
        return json.loads(body)
    except ValueError as exc:
        raise SageMakerError(f"endpoint {name}: the answer is not JSON ({body[:200]!r})") from exc
