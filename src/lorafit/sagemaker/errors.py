"""AWS failures as one-line ``LorafitError``s: what went wrong and what the user can do about it."""

from __future__ import annotations

from lorafit.errors import LorafitError


class SageMakerError(LorafitError):
    """A SageMaker / S3 / credentials problem the user can fix (printed as one line, exit code 2)."""


NO_CREDENTIALS = (
    "no AWS credentials found: set AWS_PROFILE (or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY), "
    "or run 'aws configure'"
)
NO_REGION = "no AWS region configured: set AWS_REGION (or AWS_DEFAULT_REGION), or a region in your AWS profile"


def aws_error(exc: Exception, action: str) -> SageMakerError:
    """Translate a botocore exception raised while doing ``action`` into one readable line."""
    from botocore.exceptions import (
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
        NoRegionError,
        PartialCredentialsError,
        ProfileNotFound,
    )

    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return SageMakerError(NO_CREDENTIALS)
    if isinstance(exc, NoRegionError):
        return SageMakerError(NO_REGION)
    if isinstance(exc, ProfileNotFound):
        return SageMakerError(f"AWS profile not found: {exc.kwargs.get('profile')} (check AWS_PROFILE)")
    if isinstance(exc, EndpointConnectionError):
        return SageMakerError(f"{action}: cannot reach {exc.kwargs.get('endpoint_url')} (network or AWS_ENDPOINT_URL)")
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        message = " ".join(str(error.get("Message") or "").split())
        if code in ("InvalidClientTokenId", "UnrecognizedClientException", "SignatureDoesNotMatch",
                    "InvalidAccessKeyId"):
            return SageMakerError(f"{action}: AWS rejected the credentials ({code}); check your keys or profile")
        if code in ("ExpiredToken", "ExpiredTokenException", "RequestExpired"):
            return SageMakerError(f"{action}: AWS credentials have expired; refresh them (e.g. 'aws sso login')")
        if code in ("AccessDenied", "AccessDeniedException", "403", "Forbidden"):
            return SageMakerError(f"{action}: access denied{': ' + message if message else ''}")
        if code in ("NoSuchBucket", "404") and "bucket" in action:
            return SageMakerError(f"{action}: bucket does not exist")
        if code == "ResourceLimitExceeded":
            return SageMakerError(f"{action}: service quota reached ({message}); request an increase in "
                                  "Service Quotas or choose another --instance-type")
        return SageMakerError(f"{action}: {code}: {message}" if message else f"{action}: {code}")
    return SageMakerError(f"{action}: {exc.__class__.__name__}: {exc}")
