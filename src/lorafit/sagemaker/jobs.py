"""Follow, read, stop and fetch SageMaker training jobs: status, wait, logs, stop, download.

Everything here reads the ordinary SageMaker / CloudWatch Logs / S3 APIs. Secrets passed with
``--env`` are never printed: ``redacted`` masks environment values whose names look like a token,
secret, password or key, in the plain status and in ``--json``.
"""

from __future__ import annotations

import re
import shutil
import tarfile
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lorafit.sagemaker.aws import Echo, call, error_code, parse_s3_uri, quiet, session
from lorafit.sagemaker.errors import SageMakerError, aws_error

TERMINAL = ("Completed", "Failed", "Stopped")
LOG_GROUP = "/aws/sagemaker/TrainingJobs"
REDACTED = "***"
# a name part (between _ . -) ending like a token, key or credential, or naming a secret or password
_SECRET_PART = re.compile(r"(TOKEN|KEY|PWD|PASSWD|CREDENTIALS?|AUTH)S?$|SECRET|PASSWORD", re.IGNORECASE)


# ----------------------------------------------------------------------------------- describe
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


def is_secret(name: str) -> bool:
    """An environment variable whose value must not be shown: HF_TOKEN, WANDB_API_KEY, DB_PASSWORD,
    AWS_SECRET_ACCESS_KEY, ... (not TOKENIZERS_PARALLELISM)."""
    return any(_SECRET_PART.search(part) for part in re.split(r"[_.\-]", name) if part)


def redacted(info: dict[str, Any]) -> dict[str, Any]:
    """DescribeTrainingJob without ResponseMetadata and with secret-looking environment values masked."""
    shown = {k: v for k, v in info.items() if k != "ResponseMetadata"}
    if isinstance(shown.get("Environment"), dict):
        shown["Environment"] = {k: REDACTED if is_secret(k) else v for k, v in shown["Environment"].items()}
    return shown


def failure_message(info: dict[str, Any]) -> str:
    job, status = info.get("TrainingJobName"), info.get("TrainingJobStatus")
    reason = " ".join(str(info.get("FailureReason") or "no FailureReason given").split())
    return f"training job {job} {status.lower() if status else 'failed'}: {reason}"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def time_lines(info: dict[str, Any]) -> list[str]:
    """Training time, billable time x instances, and what managed spot saved.

    SageMaker bills BillableTimeInSeconds per instance; with spot it is below TrainingTimeInSeconds
    and the saving is 1 - billable / training (AWS's formula).
    """
    lines = []
    training = info.get("TrainingTimeInSeconds")
    billable = info.get("BillableTimeInSeconds")
    count = int(info.get("ResourceConfig", {}).get("InstanceCount") or 1)
    if training is not None:
        lines.append(f"training time: {_duration(training)} ({training} s)")
    if billable is not None:
        lines.append(f"billable time: {_duration(billable)} x {count} instance{'s' if count > 1 else ''} = "
                     f"{_duration(billable * count)} ({billable * count} instance-seconds)")
    if info.get("EnableManagedSpotTraining") and training and billable is not None:
        lines.append(f"spot savings: {100 * (1 - billable / training):.1f}% (billed {billable} s of {training} s)")
    return lines


def summary_lines(info: dict[str, Any]) -> list[str]:
    """Human-readable status of a job, one fact per line (secret environment values masked)."""
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
    lines += time_lines(info)
    environment = redacted(info).get("Environment")
    if environment:
        lines.append("environment: " + ", ".join(f"{k}={v}" for k, v in sorted(environment.items())))
    if info.get("ModelArtifacts", {}).get("S3ModelArtifacts"):
        lines.append(f"model: {info['ModelArtifacts']['S3ModelArtifacts']}")
    if info.get("CheckpointConfig", {}).get("S3Uri"):
        lines.append(f"checkpoints: {info['CheckpointConfig']['S3Uri']}")
    if info.get("FailureReason"):
        lines.append(f"failure reason: {' '.join(str(info['FailureReason']).split())}")
    return lines


def still_running_message(job: str) -> str:
    """What Ctrl-C during ``--wait`` / ``--follow`` leaves behind, and how to end it."""
    return (f"stopped following; training job {job} is still running (and billing). "
            f"Stop it: lorafit sagemaker stop {job}; follow it again: lorafit sagemaker status {job} --wait")


# ---------------------------------------------------------------------------------------- wait
def wait(job: str, poll_s: float = 30.0, echo: Echo = quiet, boto_session: Any = None,
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


# ---------------------------------------------------------------------------------------- stop
def stop(job: str, boto_session: Any = None) -> dict[str, Any]:
    """StopTrainingJob: SageMaker sends the container SIGTERM, then ends it; returns the job after."""
    from botocore.exceptions import ClientError

    boto_session = boto_session or session()
    info = describe(job, boto_session)  # a one-line error for an unknown job
    status = info.get("TrainingJobStatus")
    if status in TERMINAL or status == "Stopping":
        raise SageMakerError(f"training job {job} is already {status}; nothing to stop")
    client = boto_session.client("sagemaker")
    try:
        client.stop_training_job(TrainingJobName=job)
    except ClientError as exc:
        raise aws_error(exc, f"stop training job {job}") from exc
    return describe(job, boto_session)


# ---------------------------------------------------------------------------------------- logs
def log_streams(job: str, boto_session: Any) -> list[str]:
    """The job's CloudWatch log streams (``JOB/algo-1-...``, one per host and container start)."""
    logs = boto_session.client("logs")
    streams: list[str] = []
    token = None
    while True:
        kwargs: dict[str, Any] = {"logGroupName": LOG_GROUP, "logStreamNamePrefix": f"{job}/"}
        if token:
            kwargs["nextToken"] = token
        try:
            page = logs.describe_log_streams(**kwargs)
        except Exception as exc:
            if error_code(exc) == "ResourceNotFoundException":  # no job has logged in this region yet
                return []
            if not _is_aws(exc):
                raise
            raise aws_error(exc, f"read log streams of {job}") from exc
        streams += [s["logStreamName"] for s in page.get("logStreams", [])]
        token = page.get("nextToken")
        if not token:
            return sorted(streams)


def _is_aws(exc: Exception) -> bool:
    from botocore.exceptions import BotoCoreError, ClientError

    return isinstance(exc, BotoCoreError | ClientError)


def _new_events(logs: Any, stream: str, tokens: dict[str, str]) -> Iterator[str]:
    """Messages of ``stream`` after the position in ``tokens`` (updated as pages are read)."""
    while True:
        kwargs: dict[str, Any] = {"logGroupName": LOG_GROUP, "logStreamName": stream, "startFromHead": True}
        if stream in tokens:
            kwargs["nextToken"] = tokens[stream]
        page = call(f"read log stream {stream}", logs.get_log_events, **kwargs)
        for event in page.get("events", []):
            yield str(event.get("message", "")).rstrip("\n")
        token = page.get("nextForwardToken")
        done = token is None or token == tokens.get(stream)
        if token is not None:
            tokens[stream] = token
        if done or not page.get("events"):
            return


def logs(job: str, follow: bool = False, poll_s: float = 10.0, boto_session: Any = None,
         out: Echo = print, timeout_s: float | None = None) -> dict[str, Any]:
    """Print the job's CloudWatch log (every stream; lines prefixed by host when there are several).

    With ``follow``, keep printing new lines until the job has ended and its last lines are out.
    """
    boto_session = boto_session or session()
    info = describe(job, boto_session)
    client = boto_session.client("logs")
    tokens: dict[str, str] = {}
    started = time.monotonic()
    while True:
        ended = info.get("TrainingJobStatus") in TERMINAL  # read before the logs: no line is missed
        streams = log_streams(job, boto_session)
        for stream in streams:
            prefix = f"[{stream.split('/', 1)[-1]}] " if len(streams) > 1 else ""
            for message in _new_events(client, stream, tokens):
                out(prefix + message)
        if not follow or ended:
            if not streams and not follow:
                raise SageMakerError(f"training job {job} has no log yet ({info.get('TrainingJobStatus')}; "
                                     f"the log starts with the instance); follow it: lorafit sagemaker logs {job} --follow")
            return info
        if timeout_s is not None and time.monotonic() - started > timeout_s:
            raise SageMakerError(f"training job {job} still {info.get('TrainingJobStatus')} after {timeout_s:.0f} s")
        time.sleep(poll_s)
        info = describe(job, boto_session)


# ------------------------------------------------------------------------------------ download
def download(job: str, output: str | Path, boto_session: Any = None, echo: Echo = quiet) -> Path:
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
    bucket, key = parse_s3_uri(uri)
    s3 = boto_session.client("s3")
    with tempfile.TemporaryDirectory(prefix="lorafit-sm-") as scratch:
        archive = Path(scratch) / "model.tar.gz"
        try:
            s3.download_file(Bucket=bucket, Key=key, Filename=str(archive))
        except Exception as exc:  # botocore raises ClientError 404 for a missing object
            if error_code(exc) in ("404", "NoSuchKey"):
                raise SageMakerError(f"{uri}: model.tar.gz not found (the job wrote no model)") from exc
            if _is_aws(exc):
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
