"""moto's AWS server in its own process, for tests that talk to S3 / STS / IAM / SageMaker / Logs over HTTP.

Run as ``python tests/sagemaker_server.py``: binds 127.0.0.1 on a free port and prints
``PORT <n>`` once it is serving. Everything is moto's standard server (``moto_server``) except
what moto lacks and these tests need, each done as the real service documents it:

- ``POST /_lorafit/training-job?name=N&status=S[&secondary=..][&reason=R][&training_time=T][&billable_time=B]``
  (test-only): moto completes every training job at once and cannot fail one; this sets a job's
  status, FailureReason and TrainingTimeInSeconds / BillableTimeInSeconds in the server's state,
  as SageMaker itself would while a job runs, fails or ends.
- ``POST /_lorafit/fail-next?target=SageMaker.CreateTrainingJob&code=C&message=M`` (test-only):
  the next request for that JSON API target gets that error (HTTP 400), as AWS returns it.
- SageMaker ``StopTrainingJob`` (moto has none): an InProgress job becomes Stopping; any other
  status is a ValidationException, as SageMaker answers.
- SageMaker ``CreateTrainingJob``'s ``Environment``, which moto drops, is kept on the job, so
  DescribeTrainingJob returns it as SageMaker does.
- S3 ``ExpectedBucketOwner`` (moto ignores it): a request whose ``x-amz-expected-bucket-owner``
  is not the bucket's account gets 403 AccessDenied, as S3 answers.
- Endpoints (moto makes each InService at once): ``POST /_lorafit/endpoint-next?creating=N&final=S
  [&reason=R]`` (test-only) makes the next CreateEndpoint's endpoint Creating for N
  DescribeEndpoint calls, then S (InService, or Failed with FailureReason R), as SageMaker moves
  one; DeleteEndpoint of a Creating endpoint is a ValidationException, as SageMaker answers.
- InvokeEndpoint (moto answers canned text): ``POST /_lorafit/endpoint-backend?name=N&url=U``
  (test-only) sends N's invocations to a model container at U (``POST U/invocations``, as
  SageMaker does); its 4xx/5xx answer becomes SageMaker's ModelError (HTTP 424 with
  OriginalStatusCode and OriginalMessage).
The clients under test only use the ordinary AWS APIs.
"""

from __future__ import annotations

import io
import json
import re
import sys
from typing import Any
from urllib.parse import parse_qs

CONTROL_PATH = "/_lorafit/training-job"
FAIL_PATH = "/_lorafit/fail-next"
ENDPOINT_NEXT_PATH = "/_lorafit/endpoint-next"
BACKEND_PATH = "/_lorafit/endpoint-backend"
_failures: dict[str, tuple[str, str]] = {}
_next_endpoint: list[dict[str, str]] = []
_lifecycles: dict[str, dict[str, Any]] = {}
_backends: dict[str, str] = {}
_INVOKE = re.compile(r"^/endpoints/([^/]+)/invocations$")


def _query(environ: dict[str, Any]) -> dict[str, str]:
    return {k: v[-1] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}


def _backend(region: str, account: str | None = None) -> Any:
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.sagemaker.models import sagemaker_backends

    return sagemaker_backends[account or DEFAULT_ACCOUNT_ID][region]


def _reply(start_response: Any, status: str, body: str, content_type: str = "text/plain") -> list[bytes]:
    start_response(status, [("Content-Type", content_type)])
    return [body.encode()]


def _json_error(start_response: Any, code: str, message: str) -> list[bytes]:
    return _reply(start_response, "400 Bad Request", json.dumps({"__type": code, "message": message}),
                  "application/x-amz-json-1.1")


def _control(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    query = _query(environ)
    job = _backend(query.get("region", "us-east-1"), query.get("account")).training_jobs.get(query.get("name", ""))
    if job is None:
        return _reply(start_response, "404 Not Found", "no such training job")
    job.training_job_status = query.get("status", "Failed")
    job.secondary_status = query.get("secondary", job.training_job_status)
    if "reason" in query:
        job.failure_reason = query["reason"]
    if "training_time" in query:
        job.training_time_in_seconds = int(query["training_time"])
    if "billable_time" in query:
        job.billable_time_in_seconds = int(query["billable_time"])
    return _reply(start_response, "200 OK", "ok")


def _region(environ: dict[str, Any]) -> str:
    match = re.search(r"Credential=[^/]+/\d+/([a-z0-9-]+)/", environ.get("HTTP_AUTHORIZATION", ""))
    return match.group(1) if match else "us-east-1"


def _stop_training_job(environ: dict[str, Any], body: bytes, start_response: Any) -> list[bytes]:
    name = json.loads(body or b"{}").get("TrainingJobName", "")
    job = _backend(_region(environ)).training_jobs.get(name)
    if job is None:
        return _json_error(start_response, "ValidationException", "Requested resource not found.")
    if job.training_job_status != "InProgress":
        return _json_error(start_response, "ValidationException",
                           f"The request was rejected because the training job is in status {job.training_job_status}.")
    job.training_job_status = job.secondary_status = "Stopping"
    return _reply(start_response, "200 OK", "{}", "application/x-amz-json-1.1")


def _s3_owner_mismatch(environ: dict[str, Any]) -> bool:
    expected = environ.get("HTTP_X_AMZ_EXPECTED_BUCKET_OWNER")
    if not expected or "/s3/aws4_request" not in environ.get("HTTP_AUTHORIZATION", ""):
        return False
    from moto.s3.models import s3_backends

    bucket = environ.get("PATH_INFO", "/").lstrip("/").split("/", 1)[0]
    owner = s3_backends.bucket_accounts.get(bucket)
    return owner is not None and owner[1] != expected


def _json_target(environ: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
    body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
    environ["wsgi.input"] = io.BytesIO(body)
    return json.loads(body or b"{}"), body


def _endpoint(environ: dict[str, Any], name: str) -> Any:
    return _backend(_region(environ)).endpoints.get(name)


def _advance(environ: dict[str, Any], name: str) -> None:
    """One DescribeEndpoint of an endpoint on a queued lifecycle: Creating until its count runs out."""
    life = _lifecycles.get(name)
    endpoint = _endpoint(environ, name)
    if life is None or endpoint is None:
        return
    if life["creating"] > 0:
        life["creating"] -= 1
        endpoint.endpoint_status = "Creating"
        return
    endpoint.endpoint_status = life["final"]
    if life.get("reason"):
        endpoint.failure_reason = life["reason"]
    _lifecycles.pop(name)


def _invoke(name: str, environ: dict[str, Any], start_response: Any) -> list[bytes]:
    import urllib.error
    import urllib.request

    body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
    request = urllib.request.Request(f"{_backends[name]}/invocations", data=body, method="POST", headers={
        "Content-Type": environ.get("CONTENT_TYPE") or "application/json",
        "Accept": environ.get("HTTP_ACCEPT") or "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            return _reply(start_response, "200 OK", response.read().decode(), "application/json")
    except urllib.error.HTTPError as exc:
        original = exc.read().decode()
        message = (f"Received client error ({exc.code}) from primary with message \"{original}\". See the "
                   "endpoint's log in CloudWatch for more information.")
        start_response("424 Failed Dependency", [("Content-Type", "application/json"),
                                                 ("x-amzn-ErrorType", "ModelError:")])
        return [json.dumps({"message": message, "OriginalStatusCode": exc.code, "OriginalMessage": original,
                            "ErrorCode": "CLIENT_ERROR_FROM_MODEL"}).encode()]


def main() -> None:
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    moto_app = DomainDispatcherApplication(create_backend_app)

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        path = environ.get("PATH_INFO")
        if path == CONTROL_PATH:
            return _control(environ, start_response)
        if path == FAIL_PATH:
            query = _query(environ)
            _failures[query["target"]] = (query.get("code", "InternalFailure"), query.get("message", "injected"))
            return _reply(start_response, "200 OK", "ok")
        if path == ENDPOINT_NEXT_PATH:
            _next_endpoint.append(_query(environ))
            return _reply(start_response, "200 OK", "ok")
        if path == BACKEND_PATH:
            query = _query(environ)
            _backends[query["name"]] = query["url"]
            return _reply(start_response, "200 OK", "ok")
        invoked = _INVOKE.match(path or "")
        if invoked and invoked.group(1) in _backends:
            return _invoke(invoked.group(1), environ, start_response)
        target = environ.get("HTTP_X_AMZ_TARGET", "")
        if target in _failures:
            return _json_error(start_response, *_failures.pop(target))
        if target == "SageMaker.CreateEndpoint" and _next_endpoint:
            request, _ = _json_target(environ)
            life = _next_endpoint.pop(0)
            _lifecycles[request.get("EndpointName", "")] = {"creating": int(life.get("creating", 0)),
                                                            "final": life.get("final", "InService"),
                                                            "reason": life.get("reason")}
            response = moto_app(environ, start_response)
            endpoint = _endpoint(environ, request.get("EndpointName", ""))
            if endpoint is not None:
                endpoint.endpoint_status = "Creating"
            return response
        if target == "SageMaker.DescribeEndpoint":
            request, _ = _json_target(environ)
            _advance(environ, request.get("EndpointName", ""))
        if target == "SageMaker.DeleteEndpoint":
            request, _ = _json_target(environ)
            endpoint = _endpoint(environ, request.get("EndpointName", ""))
            if endpoint is not None and endpoint.endpoint_status == "Creating":
                return _json_error(start_response, "ValidationException",
                                   f"Cannot delete in-progress endpoint \"{endpoint.arn}\".")
        if target == "SageMaker.StopTrainingJob":
            body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
            return _stop_training_job(environ, body, start_response)
        if target == "SageMaker.CreateTrainingJob":
            body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
            environ["wsgi.input"] = io.BytesIO(body)
            response = moto_app(environ, start_response)
            request = json.loads(body or b"{}")
            job = _backend(_region(environ)).training_jobs.get(request.get("TrainingJobName", ""))
            if job is not None and request.get("Environment"):
                job.environment = request["Environment"]
            return response
        if _s3_owner_mismatch(environ):
            return _reply(start_response, "403 Forbidden", "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error>"
                          "<Code>AccessDenied</Code><Message>Access Denied</Message></Error>", "application/xml")
        return moto_app(environ, start_response)

    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=MotoRequestHandler)
    print(f"PORT {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
