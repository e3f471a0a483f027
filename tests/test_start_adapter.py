"""model.adapter: continue from a lorafit run or a peft adapter (SFT then DPO, or more SFT)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_run_config
from helpers_preference import pairs, preference_config, write_jsonl
from safetensors.torch import load_file

from lorafit.cli import main
from lorafit.config import validate_config
from lorafit.errors import ConfigError
from lorafit.training import LoraFinetuneRecipe, train


@pytest.fixture(scope="module")
def sft_run(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 6-step SFT run (r=8, alpha 16, lorafit's default Llama targets) on dialogues."""
    from lorafit.builtin.dialogues import generate

    root = tmp_path_factory.mktemp("sft")
    data = write_jsonl(root / "dialogues.jsonl", generate(48, 11))
    train(validate_config(tiny_run_config(tiny_llama, data, root / "run", max_steps=6, eval_steps=None)),
          progress=False)
    return root / "run"


def _dpo(tiny_llama: Path, sft_run: Path, tmp_path: Path, name: str = "dpo", **train_settings: object) -> dict:
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs(40, 9))
    raw = preference_config(tiny_llama, data, tmp_path / name, model={"adapter": str(sft_run)}, **train_settings)
    del raw["model"]["name_or_path"]  # the base comes from the adapter
    raw["lora"] = {"dropout": 0.0}  # rank, alpha and targets too
    return raw


def test_dpo_from_an_sft_run_adopts_it_and_its_adapter_is_the_reference(tiny_llama: Path, sft_run: Path,
                                                                         tmp_path: Path) -> None:
    result = train(validate_config(_dpo(tiny_llama, sft_run, tmp_path, max_steps=4)), progress=False)
    saved = yaml.safe_load((tmp_path / "dpo" / "config.yaml").read_text())
    assert saved["model"]["name_or_path"] == str(tiny_llama)
    assert (saved["lora"]["r"], saved["lora"]["alpha"]) == (8, 16)
    assert sorted(saved["lora"]["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    run = json.loads((tmp_path / "dpo" / "run.json").read_text())
    assert run["start_adapter"] == str(sft_run / "adapter")
    # at the start the policy is the SFT adapter and so is the reference: every reward 0, loss ln 2
    # (were the reference the bare base, the SFT adapter's log-probabilities would differ from it)
    first = next(json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()
                 if "eval_loss" in line)
    assert first["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["eval_rewards_chosen"] == 0.0 and first["eval_rewards_rejected"] == 0.0
    start = load_file(str(sft_run / "adapter" / "adapter_model.safetensors"))
    end = load_file(str(Path(result.adapter_dir) / "adapter_model.safetensors"))
    assert start.keys() == end.keys() and any(not start[k].equal(end[k]) for k in start)


def test_the_reference_is_the_starting_adapter_not_the_base(tiny_llama: Path, sft_run: Path, tmp_path: Path) -> None:
    recipe = LoraFinetuneRecipe(validate_config(_dpo(tiny_llama, sft_run, tmp_path)), progress=False)
    recipe.setup()
    batch = recipe.data.collate(recipe.data.train[:2])
    objective = recipe.objective
    with torch.no_grad():
        for p in recipe.trainable:  # whatever the policy has become by now
            p.add_(0.01)
        policy = objective.logps(recipe.model, batch)[0]
        reference = objective.reference_logps(recipe.model, batch)
        after = objective.logps(recipe.model, batch)[0]
        with recipe.model.disable_adapter():
            base = objective.logps(recipe.model, batch)[0]
    assert policy.equal(after)  # swapped back
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    sft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_llama)), str(sft_run / "adapter"))
    with torch.no_grad():
        expected = objective.logps(sft.train(), batch)[0]
    assert (reference - expected).abs().max() < 1e-4
    assert (reference - base).abs().max() > 1e-3 and (reference - policy).abs().max() > 1e-3


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_in_a_16bit_step_the_policy_is_not_the_reference(precision: str, tiny_llama: Path, sft_run: Path,
                                                         tmp_path: Path) -> None:
    """A GPU's step: the reference forward (the starting adapter swapped in) and then the policy's, in
    one autocast region. Autocast keeps its 16-bit copy of each fp32 adapter weight for the whole
    region, so without care the policy ran on the reference's copy: every reward 0, loss ln 2 at
    every step, while the weights moved."""
    raw = _dpo(tiny_llama, sft_run, tmp_path, precision=precision)
    raw["model"]["dtype"] = "bfloat16" if precision == "bf16" else "float16"
    recipe = LoraFinetuneRecipe(validate_config(raw), progress=False)
    recipe.setup()
    batch = recipe.data.collate(recipe.data.train[:2])
    objective, model = recipe.objective, recipe.model
    with torch.no_grad():
        for p in recipe.trainable:  # whatever the policy has become by now
            p.add_(0.01)
        with recipe._lora_in_compute_dtype(), recipe._autocast():
            alone = objective.logps(model, batch)[0]
        with recipe._lora_in_compute_dtype(), recipe._autocast():
            reference = objective.reference_logps(model, batch)
            policy = objective.logps(model, batch)[0]
    assert policy.equal(alone)
    assert (policy - reference).abs().max() > 1e-3


def test_a_mismatch_with_the_adapter_is_one_line(tiny_llama: Path, tiny_qwen2: Path, sft_run: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    raw = _dpo(tiny_llama, sft_run, tmp_path)
    raw["lora"]["r"] = 16
    with pytest.raises(ConfigError, match=r"^lora.r: 16 differs from the adapter's 8 \(model.adapter "):
        train(validate_config(raw), progress=False)
    raw = _dpo(tiny_llama, sft_run, tmp_path)
    raw["model"]["name_or_path"] = str(tiny_qwen2)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: model.name_or_path: '{tiny_qwen2}' is not the base the adapter in "
                          "model.adapter was trained on") and "\n" not in err
    raw = _dpo(tiny_llama, sft_run, tmp_path)
    raw["model"]["adapter"] = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="^model.adapter: .*nowhere: no such run or adapter folder"):
        train(validate_config(raw), progress=False)
    raw["lora"]["target_modules"] = ["q_proj", "k_proj", "v_proj", "o_proj"]  # the same targets: fine
    raw["model"]["adapter"] = str(sft_run)
    assert validate_config(raw).lora.target_modules


def test_continued_sft_starts_where_the_run_ended(tiny_llama: Path, sft_run: Path, tmp_path: Path) -> None:
    config = yaml.safe_load((sft_run / "config.yaml").read_text())
    config["model"]["adapter"] = str(sft_run)
    config["output_dir"] = str(tmp_path / "more")
    config["train"].update(max_steps=2, eval_steps=None)
    result = train(validate_config(config), progress=False)
    ended = json.loads((sft_run / "result.json").read_text())["final_eval_loss"]
    assert result.first_eval_loss == pytest.approx(ended, abs=1e-6)  # same rows, same adapter
    assert result.final_eval_loss < result.first_eval_loss


def test_a_plain_peft_adapter_folder_is_a_start(tiny_llama: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_llama)),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "peft-adapter")
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs(16))
    raw = preference_config(tiny_llama, data, tmp_path / "run", model={"adapter": str(tmp_path / "peft-adapter")})
    del raw["model"]["name_or_path"]
    raw["lora"] = {"dropout": 0.0}
    recipe = LoraFinetuneRecipe(validate_config(raw), progress=False)
    recipe.setup()
    assert recipe.config.lora.r == 4 and recipe.config.lora.target_modules == ["q_proj", "v_proj"]
    loaded = get_peft_model_state_dict(recipe.model)
    saved = load_file(str(tmp_path / "peft-adapter" / "adapter_model.safetensors"))
    assert loaded.keys() == saved.keys() and all(loaded[k].equal(saved[k]) for k in saved)

    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "adapter_config.json").write_text(
        (tmp_path / "peft-adapter" / "adapter_config.json").read_text())
    (tmp_path / "pickled" / "adapter_model.bin").write_bytes(b"not opened")
    raw["model"]["adapter"] = str(tmp_path / "pickled")
    raw["output_dir"] = str(tmp_path / "run-pickled")  # the recipe above still owns its folder
    with pytest.raises(Exception, match="adapter_model.bin: pickle adapter weights can run code"):
        train(validate_config(raw), progress=False)


@pytest.mark.parametrize("precompute", [False, True])
def test_dpo_resume_is_exact(precompute: bool, tiny_llama: Path, sft_run: Path, tmp_path: Path) -> None:
    """A DPO run stopped after its first step and resumed ends with the same adapter as one that ran
    straight through (CPU fp32: bit-identical), the reference included (dropout draws random numbers)."""
    outputs = []
    for name in ("straight", "stopped"):
        raw = _dpo(tiny_llama, sft_run, tmp_path, name=name, max_steps=4, eval_steps=2,
                   precompute_reference=precompute)
        raw["lora"]["dropout"] = 0.1
        if name == "stopped":
            first = train(validate_config(raw), progress=False, deadline=time.time())
            assert first.stopped_by == "deadline" and first.steps == 1
        result = train(validate_config(raw), progress=False)
        assert result.steps == 4
        outputs.append(load_file(str(Path(result.adapter_dir) / "adapter_model.safetensors")))
    assert outputs[0].keys() == outputs[1].keys()
    assert all(outputs[0][k].equal(outputs[1][k]) for k in outputs[0])


def test_eval_of_a_dpo_run_reports_rewards_and_the_starting_adapter(tiny_llama: Path, sft_run: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    raw = _dpo(tiny_llama, sft_run, tmp_path, max_steps=3, beta=0.5)
    train(validate_config(raw), progress=False)
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "dpo"), "--json", "--max-new-tokens", "4"]) == 0
    result = json.loads(capsys.readouterr().out)
    adapter = result["adapter"]
    assert {"reward_accuracy", "reward_margin", "rewards_chosen", "rewards_rejected", "logps_chosen",
            "logps_rejected", "dpo_loss", "rouge1", "perplexity"} <= adapter.keys()
    assert 0 <= adapter["reward_accuracy"] <= 1 and adapter["reward_margin"] != 0
    assert adapter["reward_margin"] == pytest.approx(adapter["rewards_chosen"] - adapter["rewards_rejected"], abs=1e-5)
    # the training loop's last held-out evaluation scored the same pairs the same way
    last = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()
            if "eval_loss" in line][-1]
    assert adapter["reward_accuracy"] == pytest.approx(last["eval_reward_accuracy"], abs=1e-6)
    assert adapter["reward_margin"] == pytest.approx(last["eval_reward_margin"], abs=1e-4)
    assert "reward_accuracy" not in result["starting_adapter"] and "perplexity" in result["starting_adapter"]
    card = (tmp_path / "dpo" / "adapter" / "README.md").read_text()
    assert "| starting adapter |" in card and "reward accuracy" in card and "Objective: dpo" in card
