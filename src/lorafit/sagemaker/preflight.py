"""What ``lorafit sagemaker launch`` checks before it uploads anything or starts an instance.

Local, in this order: the options against the instance's GPU (``lorafit.preflight``), the data rows
through lorafit's data pipeline exactly as a local run reads them (bad data: exit 2, nothing
uploaded), and ``lorafit plan`` against one GPU of the instance type (refused when it will not fit,
unless ``--force``). Then in AWS: the role (IAM GetRole: exists, trusts SageMaker) and the bucket
(the default ``sagemaker-REGION-ACCOUNT`` bucket only with ``ExpectedBucketOwner``, so a bucket of
that name in someone else's account is never written to).

The CLI imports this module to parse arguments, so the torch-backed checks (``lorafit.preflight``,
the data pipeline, the planner, the tokenizer) are imported inside the functions that run them.
"""

from __future__ import annotations

import json
import re
from typing import Any

from lorafit.config import LorafitConfig
from lorafit.data.detect import mismatch
from lorafit.data.formats import BadRow, check_row
from lorafit.data.sources import as_list, load_rows, resolve
from lorafit.errors import ConfigError, DataError, LorafitError, first_line
from lorafit.resolved import resolve_precision
from lorafit.sagemaker.aws import Echo, call, error_code, quiet
from lorafit.sagemaker.errors import SageMakerError, aws_error
from lorafit.sagemaker.instances import gpu_count, gpu_device, instance_gpu, job_processes

_MISSING = ("404", "NoSuchBucket", "NotFound")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")


# ------------------------------------------------------------------------------------ local
def check_settings_for(config: LorafitConfig, instance_type: str, instance_count: int) -> None:
    """``lorafit.preflight.check_settings`` for the job's machine instead of this one.

    bf16 and flash attention are judged by the instance's GPU; flash-attn and bitsandbytes are
    in the image or the job's requirements, so their absence here does not count.
    """
    from lorafit.preflight import check_settings

    gpus = gpu_count(instance_type)
    gpu = instance_gpu(instance_type)
    checked = config.model_copy(deep=True)
    attention = config.model.attn_implementation or ""
    if gpu is not None:
        try:
            resolve_precision(config.model.dtype, config.train.precision, device_kind="cuda",
                              bf16_supported=gpu.bf16)
        except ConfigError as exc:
            raise ConfigError(f"{exc} ({instance_type}'s {gpu.name})") from exc
        if attention == "flash_attention_2" and not gpu.bf16:  # the GPUs without bf16 predate Ampere
            raise ConfigError(f"model.attn_implementation: flash_attention_2 needs an Ampere or newer GPU, "
                              f"not {instance_type}'s {gpu.name}; use sdpa")
        if attention.startswith("flash_attention"):
            checked.model.attn_implementation = "sdpa"
    check_settings(checked, device_type="cuda" if gpus else "cpu",
                   processes=job_processes(instance_type, instance_count))


def check_data(config: LorafitConfig, instance_type: str, instance_count: int, echo: Echo = quiet) -> None:
    """Read and validate the data rows as a local run does; raises ``DataError`` (exit 2) on bad data.

    With the model's tokenizer at hand (a local or builtin model, or a hub id that downloads) this is
    ``prepare_data`` itself: rows, templates, masks, lengths. Without one (offline, a gated model)
    each row is still read and rendered, with the same bad-row limits.
    """
    paths = as_list(config.data.path) + as_list(config.data.eval_path)
    remote = [p for p in paths if p.startswith("s3://") or not _is_local(p)]
    if remote:
        echo(f"data: not checked here ({remote[0]} is read by the job)")
        return
    run, tokenizer, reason = _tokenizer(config, instance_type, instance_count)
    if tokenizer is not None:
        from lorafit.data import prepare_data

        echo(prepare_data(run, tokenizer).summary)  # "data: N rows -> ..."
        return
    _check_rows(config)
    echo(f"data: every row reads and renders (token lengths not checked: {reason})")


def _is_local(path: str) -> bool:
    from pathlib import Path

    return Path(resolve(path, "data.path")).exists()


def job_run(config: LorafitConfig, instance_type: str, instance_count: int) -> Any:
    """The run resolved as the job will resolve it: the instance's GPU (bf16 or not), its processes."""
    from lorafit.planner import resolve_device, resolve_for

    device = gpu_device(instance_type) or resolve_device("cpu")
    return resolve_for(config, device, job_processes(instance_type, instance_count))


def _tokenizer(config: LorafitConfig, instance_type: str, instance_count: int) -> tuple[Any, Any, str]:
    """The resolved run (packing decided as the job will) and its tokenizer, when readable here."""
    if config.model.name_or_path.startswith("s3://"):
        return None, None, "the model is in S3"
    from lorafit.modeling import load_tokenizer

    try:
        run = job_run(config, instance_type, instance_count)
        return run, load_tokenizer(run), ""
    except LorafitError as exc:
        return None, None, f"no tokenizer here: {exc}"


def _check_rows(config: LorafitConfig) -> None:
    """Every row read and rendered without a tokenizer; the bad-row limits of ``prepare_data``."""
    from lorafit.data.prepare import _check_bad

    data = config.data
    raw = load_rows(as_list(data.path), data.split, subset=data.subset)
    raw_eval = load_rows(as_list(data.eval_path), data.split, "data.eval_path", data.subset) if data.eval_path else []
    if not raw:
        raise DataError(f"data.path: no rows in {', '.join(as_list(data.path))}")
    from lorafit.data.preference import choose_run_format

    detection = choose_run_format(raw + raw_eval, data, config.train.objective)  # as training decides
    rendering = data.model_copy(update={"format": detection.format})
    problems, good = [], []
    for row in raw + raw_eval:
        if row.error is not None:
            problems.append(f"{row.label} {row.error}")
            continue
        try:
            other = mismatch(row.data, detection.format, rendering)
            if other is not None:
                raise BadRow(other)
            check_row(row.data, rendering)
            good.append(row)
        except BadRow as exc:
            problems.append(f"{row.label} {exc}")
    _check_bad(len(raw) + len(raw_eval), problems, [], good, data.max_bad_fraction, config.train.seq_len,
               data.overlong)


def check_plan(config: LorafitConfig, instance_type: str, instance_count: int, force: bool = False,
               echo: Echo = quiet) -> None:
    """``lorafit plan`` for one GPU of ``instance_type``: refuse a run predicted not to fit unless ``force``."""
    from lorafit.planner import GIB, estimate

    device = gpu_device(instance_type)
    if device is None:
        echo(f"plan: {instance_type} has no GPU; not planned")
        return
    processes = job_processes(instance_type, instance_count)
    try:
        plan = estimate(config, device, processes=processes)
    except Exception as exc:  # noqa: BLE001 - the plan is advice when it cannot be made (offline hub id)
        echo(f"plan: skipped ({first_line(exc)})")
        return
    numbers = (f"{plan.peak_bytes / GIB:.2f} GiB predicted per GPU, {plan.device} has "
               f"{plan.memory_bytes / GIB:.1f} GiB")
    if plan.fits:
        echo(f"plan: fits on {instance_type} ({numbers})")
        return
    if force:
        echo(f"plan: does NOT fit on {instance_type} ({numbers}); launching anyway (--force)")
        return
    first = plan.suggestions[0].change if plan.suggestions else "a larger --instance-type"
    raise SageMakerError(f"--instance-type: the run will not fit on {instance_type} ({numbers}); try: {first}, "
                         f"or a larger --instance-type; --force launches anyway (details: lorafit plan CONFIG "
                         f"--gpu {device.memory_bytes / GIB:.0f}GiB)")


# -------------------------------------------------------------------------------------- AWS
def check_role(boto_session: Any, role_arn: str, account: str, echo: Echo = quiet) -> None:
    """The role exists and SageMaker may assume it (IAM GetRole); skipped where IAM cannot tell us."""
    role_account = role_arn.split(":")[4]
    name = role_arn.rsplit("/", 1)[-1]
    if role_account != account:
        echo(f"role: in account {role_account}, not yours ({account}); not checked")
        return
    iam = boto_session.client("iam")
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        role = iam.get_role(RoleName=name)["Role"]
    except ClientError as exc:
        code = error_code(exc)
        if code == "NoSuchEntity":
            raise SageMakerError(f"--role: role '{name}' does not exist in account {account}") from exc
        if code in ("AccessDenied", "AccessDeniedException"):
            echo(f"role: not checked (no permission for iam:GetRole on {name})")
            return
        raise aws_error(exc, f"iam get-role {name}") from exc
    except BotoCoreError as exc:
        raise aws_error(exc, f"iam get-role {name}") from exc
    policy = role.get("AssumeRolePolicyDocument") or {}
    if isinstance(policy, str):
        from urllib.parse import unquote

        policy = json.loads(unquote(policy))
    if not _trusts_sagemaker(policy):
        raise SageMakerError(f"--role: SageMaker cannot assume '{name}': its trust policy does not allow "
                             "sagemaker.amazonaws.com (add it to the role's trust relationships)")
    echo(f"role: {name} exists and trusts sagemaker.amazonaws.com")


def _trusts_sagemaker(policy: dict[str, Any]) -> bool:
    statements = policy.get("Statement") or []
    for statement in statements if isinstance(statements, list) else [statements]:
        if statement.get("Effect") != "Allow":
            continue
        actions = statement.get("Action") or []
        actions = [actions] if isinstance(actions, str) else actions
        if not any(a in ("sts:AssumeRole", "sts:*", "*") for a in actions):
            continue
        services = (statement.get("Principal") or {}).get("Service") or []
        services = [services] if isinstance(services, str) else services
        if "sagemaker.amazonaws.com" in services:
            return True
    return False


def ensure_bucket(boto_session: Any, bucket: str | None, account: str, echo: Echo = quiet) -> tuple[str, str | None]:
    """(bucket, expected owner): the named bucket, which must exist; or the default bucket
    ``sagemaker-REGION-ACCOUNT``, checked to be this account's (ExpectedBucketOwner) or created.

    The expected owner (this account for the default bucket, None for ``--bucket``, which may be
    shared across accounts) is then passed with every S3 request lorafit makes to the bucket.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    s3 = boto_session.client("s3")
    if bucket is not None:
        if not _BUCKET.match(bucket):
            raise SageMakerError(f"--bucket: '{bucket}' is not a valid S3 bucket name")
        try:
            s3.head_bucket(Bucket=bucket)
        except ClientError as exc:
            if error_code(exc) in _MISSING:
                raise SageMakerError(f"--bucket: s3://{bucket} does not exist (create it, or omit --bucket "
                                     "to use the default sagemaker-REGION-ACCOUNT bucket)") from exc
            raise aws_error(exc, f"s3://{bucket}") from exc
        except BotoCoreError as exc:
            raise aws_error(exc, f"s3://{bucket}") from exc
        return bucket, None
    region = boto_session.region_name
    name = f"sagemaker-{region}-{account}"
    try:
        s3.head_bucket(Bucket=name, ExpectedBucketOwner=account)
        return name, account
    except ClientError as exc:
        code = error_code(exc)
        if code in ("403", "AccessDenied", "Forbidden"):
            raise SageMakerError(f"s3://{name} exists but does not belong to your account {account} (or denies "
                                 "you access); lorafit will not upload there. Pass --bucket NAME") from exc
        if code not in _MISSING:
            raise aws_error(exc, f"s3://{name}") from exc
    except BotoCoreError as exc:
        raise aws_error(exc, f"s3://{name}") from exc
    kwargs: dict[str, Any] = {"Bucket": name}
    if region != "us-east-1":
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
    call(f"create bucket s3://{name}", s3.create_bucket, **kwargs)
    echo(f"created the default bucket s3://{name}")
    return name, account
