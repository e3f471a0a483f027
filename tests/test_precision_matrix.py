"""Every precision path a GPU takes, run end to end on this CPU (the GPU's test bench).

precision fp32 / bf16 / fp16 (the weights in that dtype too, as ``auto`` gives them on a GPU)
x base none / int8 / nf4 x three families (Llama with every packing mode, Qwen2 with packed,
BLOOM with the modes ALiBi allows). Each run must give finite losses that fall, an adapter peft
loads, and (16-bit runs) losses that agree with the fp32 run of the same model, data and base.
The embedded default in bf16 takes minutes on a CPU without bf16 matrix units, so it is marked
``heavy``: .ci/run runs it as a step of its own; the default test command runs the rest.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_run_config

from lorafit.config import validate_config
from lorafit.training import TrainResult, train

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
FAMILIES = [("llama", "packed"), ("llama", "chunk"), ("llama", "none"), ("qwen2", "packed"),
            ("bloom", "none"), ("bloom", "chunk")]
# relative agreement of the first (untrained) eval loss with fp32: the rounding of 16-bit compute
AGREE = {"bf16": 2e-2, "fp16": 4e-3}
_done: dict[tuple[str, str, str, str], TrainResult] = {}


def _run(model: Path, data: Path, root: Path, family: str, packing: str, quant: str, precision: str) -> TrainResult:
    key = (family, packing, quant, precision)
    if key not in _done:
        out = root / "-".join(key)
        raw = tiny_run_config(model, data, out, max_steps=6, eval_steps=None, seq_len=128, precision=precision,
                              gradient_checkpointing=True)
        raw["model"].update({"quantization": quant, "dtype": DTYPES[precision]})
        raw["data"]["packing"] = packing
        _done[key] = train(validate_config(raw), progress=False)
    return _done[key]


@pytest.fixture(scope="module")
def models(tiny_llama: Path, tiny_bloom: Path, tiny_qwen2: Path) -> dict[str, Path]:
    return {"llama": tiny_llama, "bloom": tiny_bloom, "qwen2": tiny_qwen2}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import write_jsonl

    from lorafit.builtin.dialogues import generate

    root = tmp_path_factory.mktemp("matrix-data")
    return write_jsonl(root / "dialogues.jsonl", generate(64, 11))


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("quant", ["none", "int8", "nf4"])
@pytest.mark.parametrize(("family", "packing"), FAMILIES)
def test_precision_path_trains(family: str, packing: str, quant: str, precision: str, models: dict[str, Path],
                               data: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    root = tmp_path_factory.getbasetemp() / "matrix"
    result = _run(models[family], data, root, family, packing, quant, precision)
    run = json.loads((Path(result.output_dir) / "run.json").read_text())
    assert run["precision"] == {"weights": DTYPES[precision], "compute": DTYPES[precision]}
    assert run["packing"] == packing and run["quantization"] == quant
    assert result.steps == 6 and result.skipped_nonfinite == 0
    assert all(math.isfinite(v) for v in (result.first_eval_loss, result.final_eval_loss))
    assert result.final_eval_loss < result.first_eval_loss, (result.first_eval_loss, result.final_eval_loss)
    _check_adapter_loads(models[family], Path(result.adapter_dir))
    if precision != "fp32":
        reference = _run(models[family], data, root, family, packing, quant, "fp32")
        gap = abs(result.first_eval_loss - reference.first_eval_loss) / reference.first_eval_loss
        assert gap < AGREE[precision], (gap, result.first_eval_loss, reference.first_eval_loss)
        assert abs(result.final_eval_loss - reference.final_eval_loss) < 0.1 * reference.first_eval_loss


def _check_adapter_loads(model: Path, adapter: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)
    loaded: Any = PeftModel.from_pretrained(base, str(adapter)).eval()
    with torch.no_grad():
        logits = loaded(input_ids=torch.tensor([[5, 17, 42, 99, 3, 250]])).logits
    assert torch.isfinite(logits).all()


@pytest.mark.heavy
def test_embedded_default_in_bf16(tmp_path: Path) -> None:
    """What `precision: auto` / `dtype: auto` resolve to on any bf16 GPU, as a user runs it
    (the command crashed in setup before: peft's input cast was off for a forward outside autocast)."""
    import os
    import subprocess
    import sys

    out = tmp_path / "default-bf16"
    # a cache of its own: other heavy tests may already have converted the builtin model
    env = {**os.environ, "LORAFIT_CACHE": str(tmp_path / "cache")}
    process = subprocess.run(
        [sys.executable, "-m", "lorafit", "train", "--set", "model.dtype=bfloat16", "--set", "train.precision=bf16",
         "--set", "train.max_steps=2", "--set", f"output_dir={out}", "--no-progress"],
        capture_output=True, text=True, timeout=1500, env=env)
    assert process.returncode == 0, process.stderr[-3000:]
    # a fresh cache: the GGUF file was converted in this run, and transformers' conversion bar and
    # bitsandbytes' import-time advice stayed off the output (lorafit.quiet)
    lines = (process.stdout + process.stderr).splitlines()
    assert any("converting" in line for line in lines), lines[:5]
    assert [line for line in lines if not line.startswith("lorafit: ")] == [], lines[:10]
    result = json.loads((out / "result.json").read_text())
    assert result["steps"] == 2 and result["final_eval_loss"] < result["first_eval_loss"]
    assert result["run"]["precision"] == {"weights": "bfloat16", "compute": "bfloat16"}
    assert (out / "adapter" / "adapter_model.safetensors").stat().st_size > 1000


def test_fp16_steps_the_loss_scaler_skips_leave_the_schedule_where_it_was(models: dict[str, Path], data: Path,
                                                                         tmp_path: Path) -> None:
    """fp16 gradients that overflow under the loss scale: torch's GradScaler skips the update and
    halves the scale. As in transformers' Trainer, the learning-rate schedule (here: its warmup)
    waits for updates that ran; the step still counts, as the Trainer's global_step does."""
    from lorafit.training import LoraFinetuneRecipe

    raw = tiny_run_config(models["llama"], data, tmp_path / "out", max_steps=6, eval_steps=None, precision="fp16",
                          warmup_steps=2)
    raw["model"]["dtype"] = "float16"
    recipe = LoraFinetuneRecipe(validate_config(raw), progress=False)
    recipe.setup()
    start = 2.0**21  # fp16 gradients of these tiny models overflow above 2^18 or so
    recipe.scaler = torch.amp.GradScaler("cpu", init_scale=start)
    recipe.fit()
    overflows = round(math.log2(start / recipe.scaler.get_scale()))
    assert 0 < overflows < 6
    assert recipe.state.step == 6 and recipe.state.skipped_nonfinite == 0
    assert recipe.scheduler.last_epoch == 6 - overflows
