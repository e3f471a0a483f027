"""moto's AWS server in its own process, for tests that talk to S3 / STS / SageMaker over HTTP.

Run as ``python tests/sagemaker_server.py``: binds 127.0.0.1 on a free port and prints
``PORT <n>`` once it is serving. Everything is moto's standard server (``moto_server``) except one
test-only route: moto completes every training job at once and has no way to make one fail, so
``POST /_lorafit/training-job?name=N&status=Failed&reason=R`` sets a job's status (and
FailureReason) in the server's state, as SageMaker itself would when a job fails or is running.
The client under test still only sees the ordinary DescribeTrainingJob API.
"""

from __future__ import annotations

import sys
from typing import Any
from urllib.parse import parse_qs

CONTROL_PATH = "/_lorafit/training-job"


def _control(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.sagemaker.models import sagemaker_backends

    query = {k: v[-1] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
    region = query.get("region", "us-east-1")
    backend = sagemaker_backends[query.get("account", DEFAULT_ACCOUNT_ID)][region]
    job = backend.training_jobs.get(query.get("name", ""))
    if job is None:
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"no such training job"]
    job.training_job_status = query.get("status", "Failed")
    job.secondary_status = query.get("secondary", job.training_job_status)
    if "reason" in query:
        job.failure_reason = query["reason"]
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]


def main() -> None:
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    moto_app = DomainDispatcherApplication(create_backend_app)

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        if environ.get("PATH_INFO") == CONTROL_PATH:
            return _control(environ, start_response)
        return moto_app(environ, start_response)

    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=MotoRequestHandler)
    print(f"PORT {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
