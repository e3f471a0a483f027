"""Interoperability: lorafit's adapters load in plain peft, unchanged, and give the same outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import build_model
from helpers_adapters import logits, peft_adapter, sample_ids, train_tiny_run

from lorafit.adapters import AdapterSession


@pytest.fixture(scope="module")
def run(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lorafit.builtin.dialogues import generate

    root = tmp_path_factory.mktemp("interop")
    data = root / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in generate(32, 5)), encoding="utf-8")
    return train_tiny_run(tiny_llama, data, root / "run", max_steps=3, eval_steps=3)


def test_lorafit_adapter_loads_in_plain_peft(run: Path, tiny_llama: Path) -> None:
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    adapter = run / "adapter"
    recorded = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(recorded) == tiny_llama  # points at a base that loads offline
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), str(adapter)).eval()
    auto = AutoPeftModelForCausalLM.from_pretrained(str(adapter)).eval()  # base found from the adapter alone
    ours = AdapterSession.open(run, device=torch.device("cpu"))
    ids = sample_ids()
    assert torch.allclose(logits(plain, ids), logits(ours.model, ids), atol=1e-5)
    assert torch.allclose(logits(auto, ids), logits(ours.model, ids), atol=1e-5)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    assert (logits(plain, ids) - logits(base, ids)).abs().max() > 1e-4  # trained weights, not a no-op


def test_peft_adapter_for_an_architecture_without_default_targets(tmp_path: Path) -> None:
    """The adapter names its own targets: loading and merging it needs no per-architecture default
    (training such a model needs lora.target_modules, and says so)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorafit.export import merge

    base = build_model(tmp_path / "olmo2", "olmo2")
    adapter = peft_adapter(base, tmp_path / "adapter")
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter)).eval()
    ours = AdapterSession.open(adapter, device=torch.device("cpu"))
    ids = sample_ids()
    assert torch.allclose(logits(plain, ids), logits(ours.model, ids), atol=1e-5)
    merge(adapter, tmp_path / "merged", log=lambda *_: None)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert torch.allclose(logits(plain, ids), logits(merged, ids), atol=1e-4)
