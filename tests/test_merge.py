"""lorafit merge: a plain transformers model whose logits equal base + adapter, written only to --output."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers_adapters import fake_run, logits, peft_adapter, sample_ids

from lorafit.cli import main


@pytest.fixture(scope="module")
def adapter(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return peft_adapter(tiny_llama, tmp_path_factory.mktemp("merge") / "adapter", seed=5)


def test_merged_model_loads_plainly_and_matches(tiny_llama: Path, adapter: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    assert main(["merge", str(adapter), "--output", str(out), "--max-shard-size", "200KB"]) == 0
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").exists()  # sharded
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
    assert not list(out.glob("*.bin")) and not (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), str(adapter)).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    ids = sample_ids()
    diff = (logits(merged, ids) - logits(reference, ids)).abs().max().item()
    assert diff < 1e-4
    assert (logits(merged, ids) - logits(base, ids)).abs().max().item() > 1e-2  # the adapter is in there
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer("Summary:")["input_ids"]


def test_refuses_non_empty_output_and_overwrites_on_request(adapter: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "merged"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["merge", str(adapter), "--output", str(out)]) == 2
    assert "is not empty; pass --overwrite" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "keep me"
    assert main(["merge", str(adapter), "--output", str(out), "--overwrite"]) == 0
    assert not (out / "notes.txt").exists() and (out / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written beside --output


def test_refuses_output_inside_the_adapter(adapter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["merge", str(adapter), "--output", str(adapter), "--overwrite"]) == 2
    assert "contains the input" in capsys.readouterr().err
    assert (adapter / "adapter_model.safetensors").exists()


def test_quantized_run_merges_into_unquantized_base(tiny_llama: Path, adapter: Path, tmp_path: Path,
                                                   dialogue_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A run trained on nf4 is merged into the full-precision base, and the command says so."""
    import json

    from transformers import AutoModelForCausalLM

    run = fake_run(tiny_llama, adapter, tmp_path / "run", dialogue_file, quantization="nf4")
    out = tmp_path / "merged"
    assert main(["merge", str(run), "--output", str(out)]) == 0
    said = capsys.readouterr().out
    assert "trained on a nf4 base; merging into the unquantized base in float32" in said
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert all(type(m).__name__ != "Linear4bit" for m in merged.modules())
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32


def test_missing_adapter_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["merge", str(tmp_path / "nope"), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "no such run or adapter folder" in err and "\n" not in err
    assert not (tmp_path / "out").exists()
