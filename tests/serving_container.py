"""A SageMaker inference container's model worker on 127.0.0.1, for tests: the real toolkit, no image.

Run as ``PYTHONPATH=MODEL_DIR/code python tests/serving_container.py MODEL_DIR`` (the toolkit puts
``code/`` on the workers' PYTHONPATH exactly so: ``sagemaker_inference.model_server._set_python_path``).
It loads the Hugging Face inference toolkit's handler service with multi-model-server's own model
loader (``mms.model_loader.MmsModelLoader``, handler ``...handler_service:handle`` as the toolkit
configures it), so the toolkit imports ``code/inference.py`` from the model folder and calls its
``model_fn`` as on an endpoint. Requests go through MMS's ``Service.predict`` and its wire format
(``mms.protocol.otf_message_handler``), decoded here. What MMS's Java front end adds is played
by this script: ``GET /ping``, ``POST /invocations``, and an error as ``{"code", "type",
"message"}`` with the worker's status code. It prints ``PORT <n>`` once the model has loaded and
``LORAFIT <path>`` naming the lorafit package the handler imported (the vendored copy in code/).
"""

from __future__ import annotations

import json
import struct
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from threading import Lock
from typing import Any

HANDLER = "sagemaker_huggingface_inference_toolkit.handler_service:handle"


def _decode(message: bytes) -> tuple[int, str, bytes]:
    """(status, message, body) of MMS's predict response for one request."""
    offset = 0

    def integer() -> int:
        nonlocal offset
        (value,) = struct.unpack_from("!i", message, offset)
        offset += 4
        return value

    def chunk() -> bytes:
        nonlocal offset
        length = integer()
        data = message[offset:offset + length]
        offset += length
        return bytes(data)

    code = integer()
    text = chunk().decode()
    if integer() == -1:  # no per-request part
        return code, text, b""
    offset -= 4
    chunk()  # request id
    chunk()  # content type
    status = integer()
    chunk()  # reason phrase
    for _ in range(integer()):  # response headers
        chunk()
        chunk()
    body = chunk()
    return (status if code == 200 else code), text, body


def main() -> None:
    from mms.model_loader import MmsModelLoader

    model_dir = sys.argv[1]
    service = MmsModelLoader().load("model", model_dir, HANDLER, None, 1)
    import lorafit

    print(f"LORAFIT {lorafit.__file__}", flush=True)
    lock = Lock()  # one worker: requests one at a time, as with SAGEMAKER_MODEL_SERVER_WORKERS=1

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _reply(self, status: int, body: bytes, content_type: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802
            self._reply(200 if self.path == "/ping" else 404, b"{}")

        def do_POST(self) -> None:  # noqa: N802
            if self.path != "/invocations":
                self._reply(404, b"{}")
                return
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            content_type = self.headers.get("Content-Type", "application/json")
            headers = [{"name": b"Content-Type", "value": content_type.encode()},
                       {"name": b"Accept", "value": self.headers.get("Accept", "application/json").encode()}]
            batch = [{"requestId": b"0", "headers": headers,
                      "parameters": [{"name": "body", "contentType": content_type, "value": body}]}]
            with lock:
                status, message, payload = _decode(service.predict(batch))
            if status == 200:
                self._reply(200, payload)
            else:
                self._reply(status, json.dumps({"code": status, "type": "PredictionException",
                                                "message": message}).encode())

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(f"PORT {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
