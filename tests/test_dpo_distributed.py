"""DPO on several processes (gloo on this CPU): 2 processes x batch 1 equal 1 process x batch 2,
replicated (DDP) with a precomputed reference and sharded (FSDP) with the starting adapter as reference,
and in bf16 (DDP, the starting adapter as reference: the path where autocast's weight cache once made
the policy compute with the reference's weights, so the loss stayed at ln 2).

About 30-50 s each on 2 loaded cores (the launch dominates): both run with the heavy tests (the main
suite's 15-minute budget); the planner, data and objective tests of the main suite cover one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import tiny_run_config
from helpers_preference import pairs, preference_config, write_jsonl
from safetensors.torch import load_file

from lorafit.config import validate_config

ENV = dict(os.environ, OMP_NUM_THREADS="1")


def _train(config: Path, *extra: str) -> None:
    done = subprocess.run([sys.executable, "-m", "lorafit", "train", str(config), "--no-progress", *extra],
                          capture_output=True, text=True, env=ENV, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.heavy
@pytest.mark.parametrize("mode", ["ddp-precomputed", "fsdp-from-adapter", "ddp-from-adapter-bf16"])
def test_two_processes_match_one_with_twice_the_batch(mode: str, tiny_llama: Path, tmp_path: Path) -> None:
    from lorafit.training import train

    data = write_jsonl(tmp_path / "pairs.jsonl", pairs(24, 4))
    settings = {"max_steps": 3, "eval_steps": 3, "lr": 1e-2}
    from_adapter = mode.endswith(("from-adapter", "from-adapter-bf16"))
    bf16 = mode.endswith("bf16")
    if from_adapter:
        from lorafit.builtin.dialogues import generate

        sft = tmp_path / "sft"
        dialogues = write_jsonl(tmp_path / "dialogues.jsonl", generate(24, 11))
        train(validate_config(tiny_run_config(tiny_llama, dialogues, sft, max_steps=2, eval_steps=None)),
              progress=False)
        settings.update(fsdp=mode.startswith("fsdp"), precision="bf16" if bf16 else "auto")
    else:
        settings.update(precompute_reference=True)
    runs = {}
    for name, batch, nproc in (("single", 2, "1"), ("double", 1, "2")):
        raw = preference_config(tiny_llama, data, tmp_path / name, batch_size=batch, **settings)
        if from_adapter:
            raw["model"] = {"adapter": str(tmp_path / "sft")}
            raw["lora"] = {"dropout": 0.0}
        if nproc == "1":  # in this process: the launch is what costs time
            train(validate_config(raw), progress=False)
        else:
            path = tmp_path / f"{name}.yaml"
            path.write_text(yaml.safe_dump(raw))
            _train(path, "--nproc", nproc)
        runs[name] = tmp_path / name
    a, b = (load_file(str(runs[n] / "adapter" / "adapter_model.safetensors")) for n in ("single", "double"))
    assert a.keys() == b.keys()
    if bf16:  # one batch of 2 and two of 1 round differently, and Adam scales small differences up to lr
        assert max(((a[k] - b[k]).norm() / a[k].norm()).item() for k in a) < 0.1
    else:
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 2e-5  # fp32 sums in other orders
    single, double = (_records(runs[n]) for n in ("single", "double"))
    for key in ("loss", "reward_accuracy", "reward_margin", "logps_chosen"):
        assert [r[key] for r in single if key in r] == pytest.approx([r[key] for r in double if key in r],
                                                                     abs=2e-3 if bf16 else 1e-4,
                                                                     rel=1e-4 if bf16 else None)
    evals = [r for r in double if "eval_loss" in r]
    assert evals[0]["eval_loss"] == pytest.approx(0.6931471805599453, abs=1e-6)  # the reference is the start
    if from_adapter:  # after the first update the policy is no longer the reference: the loss leaves ln 2
        losses = [r["loss"] for r in double if "loss" in r]
        assert abs(losses[1] - 0.6931471805599453) > 1e-3
    run = json.loads((runs["double"] / "run.json").read_text())
    assert run["fsdp"] is (mode == "fsdp-from-adapter") and run["environment"]["world_size"] == 2
