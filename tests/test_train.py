"""End-to-end training on tiny real models: each quantization, the adapter format, peft parity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_run_config

from lorafit.config import validate_config
from lorafit.training import LoraFinetuneRecipe, train


@pytest.mark.parametrize("quantization", ["none", "int8", "nf4"])
def test_training_lowers_eval_loss_and_writes_the_adapter(
    quantization: str, tiny_llama: Path, dialogue_file: Path, tmp_path: Path
) -> None:
    raw = tiny_run_config(tiny_llama, dialogue_file, tmp_path / "run", max_steps=10, eval_steps=5)
    raw["model"]["quantization"] = quantization
    result = train(validate_config(raw), progress=False)

    assert result.steps == 10
    assert result.final_eval_loss < result.first_eval_loss - 0.05, (result.first_eval_loss, result.final_eval_loss)
    run = tmp_path / "run"
    adapter = run / "adapter"
    assert (adapter / "adapter_config.json").exists()
    assert (adapter / "adapter_model.safetensors").stat().st_size > 1000
    assert (adapter / "tokenizer.json").exists() or (adapter / "tokenizer_config.json").exists()
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_llama)
    assert (config["r"], config["lora_alpha"]) == (8, 16)
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "result.json"):
        assert (run / name).stat().st_size > 0, name
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if "loss" in r]
    assert train_steps == list(range(1, 11))
    assert all({"lr", "tokens", "tokens_per_s"} <= r.keys() for r in records if "loss" in r)
    assert sum("eval_loss" in r for r in records) == 3  # start, step 5, end


def test_adapter_loads_in_plain_peft_with_identical_logits(
    tiny_llama: Path, dialogue_file: Path, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    raw = tiny_run_config(tiny_llama, dialogue_file, tmp_path / "run", max_steps=4)
    recipe = LoraFinetuneRecipe(validate_config(raw), progress=False)
    recipe.setup()
    recipe.fit()
    result = recipe.finish()

    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8]])
    recipe.model.eval()
    with torch.no_grad():
        expected = recipe.model(input_ids=ids).logits
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, result.adapter_dir).eval()
    with torch.no_grad():
        actual = reloaded(input_ids=ids).logits
    assert (actual - expected).abs().max().item() < 1e-4
    # and the adapter really changed the model
    with torch.no_grad(), reloaded.disable_adapter():
        plain = reloaded(input_ids=ids).logits
    assert (plain - expected).abs().max().item() > 1e-4


def test_bloom_uses_query_key_value_by_default(tiny_bloom: Path, dialogue_file: Path, tmp_path: Path) -> None:
    raw = tiny_run_config(tiny_bloom, dialogue_file, tmp_path / "run", max_steps=2, eval_steps=None)
    result = train(validate_config(raw), progress=False)
    config = json.loads((Path(result.adapter_dir) / "adapter_config.json").read_text())
    assert config["target_modules"] == ["query_key_value"]
    # 2 layers x (A: 64x8 + B: 8x192)
    assert result.trainable_params == 2 * (64 * 8 + 8 * 192)


def test_nf4_gradients_are_the_same_after_an_evaluation(tiny_llama: Path, dialogue_file: Path, tmp_path: Path) -> None:
    """bitsandbytes switches 4-bit layers to a backward-less CPU layout in eval mode; we must not."""
    from lorafit.modeling import load_model
    from lorafit.resolved import resolve

    raw = tiny_run_config(tiny_llama, dialogue_file, tmp_path / "run")
    raw["model"]["quantization"] = "nf4"
    run = resolve(validate_config(raw))
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8, 11, 12]])
    grads = []
    for evaluate_first in (False, True):
        model, _ = load_model(run)
        if evaluate_first:
            model.eval()
            with torch.no_grad():
                model(input_ids=ids)
        model.train()
        for name, p in model.named_parameters():  # make lora_B non-zero so A gets a gradient
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(1))
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    first_layer_a = next(n for n in grads[0] if "layers.0." in n and "lora_A" in n)
    assert grads[0][first_layer_a].abs().sum() > 0
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


def test_bloom_bf16_fused_training_matches_fp32_eager_in_one_process(
    tiny_bloom: Path, dialogue_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The recipe's fused path end to end (bf16 autocast, BLOOM's SDPA attention and fused GELU,
    LoRA in bf16 with fp32 master weights, every second layer checkpointed) tracks the plain fp32
    run of the same data, and a second run in the same process may change the precision."""
    def run(name: str, **train_settings: object) -> object:
        raw = tiny_run_config(tiny_bloom, dialogue_file, tmp_path / name, max_steps=6, eval_steps=None,
                              gradient_checkpointing=True, **train_settings)
        return train(validate_config(raw), progress=False)

    plain = run("fp32-eager", precision="fp32", fused_ops=False)
    assert "fused:" not in capsys.readouterr().out
    fused = run("bf16-fused", precision="bf16", fused_ops=True, checkpoint_every=2)
    out = capsys.readouterr().out
    assert "fused: 2 tanh-GELUs -> fused GELU; 2 BLOOM attentions" in out
    assert "fused: tanh_gelu_swap, bloom_sdpa_attention, lora-in-compute-dtype" in out
    for result in (plain, fused):
        assert result.steps == 6 and result.final_eval_loss < result.first_eval_loss
    assert abs(fused.first_eval_loss - plain.first_eval_loss) < 1e-3 * plain.first_eval_loss
    assert abs(fused.final_eval_loss - plain.final_eval_loss) < 1e-3 * plain.final_eval_loss
