"""boto3 plumbing shared by the launcher and the job commands: a session, one-line call errors, S3 URIs.

boto3's standard configuration applies: profiles, AWS_DEFAULT_REGION, AWS_ENDPOINT_URL, and so on.
AWS_REGION, which the AWS CLI v2 and most SDKs read first but boto3 does not, is honoured too
(``--region`` > AWS_REGION > AWS_DEFAULT_REGION > the profile's region).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from lorafit.sagemaker.errors import NO_CREDENTIALS, NO_REGION, SageMakerError, aws_error

Echo = Callable[[str], None]


def quiet(message: str) -> None:
    del message


def session(profile: str | None = None, region: str | None = None) -> Any:
    """A boto3 session with credentials and a region, or a one-line error saying which is missing."""
    try:
        import boto3
    except ImportError as exc:
        raise SageMakerError("boto3 is not installed: pip install 'lorafit[sagemaker]'") from exc
    from botocore.exceptions import BotoCoreError

    region = region or os.environ.get("AWS_REGION") or None
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


def call(action: str, function: Callable[..., Any], **kwargs: Any) -> Any:
    """Run one AWS API call; any botocore failure becomes a one-line SageMakerError."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return function(**kwargs)
    except (BotoCoreError, ClientError) as exc:
        raise aws_error(exc, action) from exc


def error_code(exc: Exception) -> str:
    """A botocore ClientError's code (``NoSuchEntity``, ``404``, ...); '' for anything else."""
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def account_id(boto_session: Any) -> str:
    """The caller's AWS account (STS GetCallerIdentity)."""
    sts = boto_session.client("sts")
    return str(call("sts get-caller-identity", sts.get_caller_identity)["Account"])


def parse_s3_uri(uri: str, what: str = "S3 URI") -> tuple[str, str]:
    """``s3://bucket/key/prefix`` -> (bucket, key); the key may be empty."""
    if not uri.startswith("s3://") or not uri[5:].split("/", 1)[0]:
        raise SageMakerError(f"{what}: not an s3:// URI: {uri}")
    bucket, _, key = uri[5:].partition("/")
    return bucket, key
