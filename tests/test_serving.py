"""The endpoint's handler under the real Hugging Face inference toolkit, on the CPU.

``lorafit sagemaker deploy RUN --package-only DIR`` writes the model folder; tests/serving_container.py
runs it the way the image's model worker does (code/ on PYTHONPATH, the toolkit's handler service
loaded by multi-model-server's own loader, ``code/inference.py`` imported by the toolkit from the
folder) in a fresh interpreter, where ``lorafit`` is the copy vendored in code/. Greedy answers
are compared with ``lorafit generate`` on the same run, token for token, merged and as adapter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import tiny_run_config, write_jsonl

from lorafit.cli import main

pytest.importorskip("sagemaker_huggingface_inference_toolkit")
CONTAINER = Path(__file__).with_name("serving_container.py")
DIALOGUES = ["Anna: are we still on for lunch?\nBen: yes, 12:30 at the usual place.",
             "Tom: I lost my keys again.\nSue: check the kitchen drawer.\nTom: found them, thanks!",
             "Mia: the report is late.\nLeo: I will send it tonight."]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> Path:
    """A trained run on the tiny Llama (8 steps): adapter, config.yaml with the summarization template."""
    from lorafit.builtin.dialogues import generate

    root = tmp_path_factory.mktemp("serving-run")
    data = write_jsonl(root / "dialogues.jsonl", generate(64, 11))
    config = root / "lorafit.yaml"
    config.write_text(yaml.safe_dump(tiny_run_config(tiny_llama, data, root / "run")), encoding="utf-8")
    assert main(["train", str(config)]) == 0
    return root / "run"


def package(run: Path, out: Path, *extra: str) -> Path:
    code = main(["sagemaker", "deploy", str(run), "--instance-type", "ml.m5.xlarge", "--package-only", str(out),
                 *extra])
    assert code == 0
    return out


class Container:
    """tests/serving_container.py on a model folder: POST /invocations like SageMaker's runtime."""

    def __init__(self, model_dir: Path) -> None:
        env = dict(os.environ, PYTHONPATH=str(model_dir / "code"), OMP_NUM_THREADS="1")
        self.process = subprocess.Popen([sys.executable, str(CONTAINER), str(model_dir)], stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL, text=True, env=env)
        self.lorafit = ""
        for line in self.process.stdout:
            if line.startswith("LORAFIT "):
                self.lorafit = line.split(" ", 1)[1].strip()
            if line.startswith("PORT "):
                self.url = f"http://127.0.0.1:{int(line.split()[1])}"
                return
        raise AssertionError("the serving container did not start")

    def invoke(self, body: object, raw: bytes | None = None) -> tuple[int, object]:
        data = raw if raw is not None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.url}/invocations", data=data, method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=300) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


@pytest.fixture
def container() -> Iterator:
    started: list[Container] = []

    def start(model_dir: Path) -> Container:
        started.append(Container(model_dir))
        return started[-1]

    yield start
    for item in started:
        item.close()


def local_generate(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture, max_new_tokens: int) -> list[str]:
    """``lorafit generate RUN --input rows.jsonl`` with batch size 1 (one prompt per request on the endpoint)."""
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"dialogue": d} for d in DIALOGUES])
    capsys.readouterr()
    assert main(["generate", str(run), "--input", str(rows), "--batch-size", "1",
                 "--max-new-tokens", str(max_new_tokens)]) == 0
    return [json.loads(line)["generated"] for line in capsys.readouterr().out.splitlines()]


@pytest.mark.parametrize("weights", ["merged", "adapter"])
def test_served_tokens_equal_lorafit_generate(tiny_run: Path, tmp_path: Path, container, weights: str,
                                              capsys: pytest.CaptureFixture) -> None:
    folder = package(tiny_run, tmp_path / "model", "--weights", weights)
    assert (folder / "code" / "inference.py").is_file() and (folder / "code" / "sitecustomize.py").is_file()
    assert (folder / ("merged" if weights == "merged" else "base") / "config.json").is_file()
    served = container(folder)
    assert served.lorafit == str(folder / "code" / "lorafit" / "__init__.py")  # the vendored copy serves
    expected = local_generate(tiny_run, tmp_path, capsys, max_new_tokens=12)
    for dialogue, want in zip(DIALOGUES, expected, strict=True):
        # the row's own fields, and the raw text that the template wraps: both the run's template
        for inputs in ({"dialogue": dialogue}, dialogue):
            status, answer = served.invoke({"inputs": inputs, "parameters": {"max_new_tokens": 12}})
            assert status == 200, answer
            assert answer == [{"generated_text": want}]
    assert any(expected)  # something was generated (the tiny model may stop at EOS early)


def test_bad_requests_are_one_line_client_errors(tiny_run: Path, tmp_path: Path, container) -> None:
    served = container(package(tiny_run, tmp_path / "model", "--context", "64", "--concurrency", "2"))
    cases = [
        ({"parameters": {"max_new_tokens": 4}}, "inputs: missing"),
        ({"inputs": 42}, "inputs: expected text or an object with the row's fields, got a number"),
        ({"inputs": {"summary": "x"}}, "inputs: missing 'dialogue'"),
        ({"inputs": "hi", "parameters": {"max_new_tokens": "4"}}, "parameters.max_new_tokens: expected int, got str"),
        ({"inputs": "hi", "parameters": {"num_beams": 4}}, "parameters: unknown 'num_beams'"),
        ({"inputs": "word " * 80}, "exceeds this endpoint's context of 64 tokens"),
        ({"inputs": ["a", "b", "c"]}, "inputs: 3 inputs, this endpoint takes at most 2 per request"),
        ({"inputs": "hi", "stream": True}, "request: unknown field 'stream'"),
        (["not", "an", "object"], "request: expected a JSON object"),
    ]
    for body, message in cases:
        status, answer = served.invoke(body)
        assert status == 400, (body, answer)
        assert message in answer["message"] and "\n" not in answer["message"] and "Traceback" not in answer["message"]
    status, answer = served.invoke(None, raw=b"{not json")
    assert status == 400 and answer["message"].startswith("request body: not JSON")
    status, answer = served.invoke({"inputs": ["a", "b"], "parameters": {"max_new_tokens": 2}})
    assert status == 200 and len(answer) == 2  # still serving after the refusals


def test_toolkit_imports_beside_transformers_5_only_with_the_shipped_sitecustomize(tiny_run: Path,
                                                                                    tmp_path: Path) -> None:
    folder = package(tiny_run, tmp_path / "model", "--weights", "adapter")
    probe = [sys.executable, "-c", "import sagemaker_huggingface_inference_toolkit.handler_service"]
    plain = subprocess.run(probe, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=""))
    if plain.returncode != 0:  # the toolkit's import of a name transformers 5 removed: why the shim exists
        assert "is_tf_available" in plain.stderr
    worker = subprocess.run(probe, capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=str(folder / "code")))
    assert worker.returncode == 0, worker.stderr


@pytest.mark.heavy
@pytest.mark.parametrize("weights", ["merged", "adapter"])
def test_embedded_default_served_equals_generate(tmp_path_factory: pytest.TempPathFactory, container,
                                                 weights: str, capsys: pytest.CaptureFixture,
                                                 embedded_default_run: Path) -> None:
    """The embedded default (SmolLM2-135M, trained as `lorafit train` runs it) served both ways."""
    root = tmp_path_factory.mktemp("default-served")
    run = embedded_default_run
    folder = package(run, root / f"model-{weights}", "--weights", weights)
    served = container(folder)
    expected = local_generate(run, root, capsys, max_new_tokens=24)
    for dialogue, want in zip(DIALOGUES, expected, strict=True):
        status, answer = served.invoke({"inputs": {"dialogue": dialogue}, "parameters": {"max_new_tokens": 24}})
        assert status == 200 and answer == [{"generated_text": want}], (answer, want)
