"""DPO against the peer and on learning: ln 2 and TRL's log-probabilities at the start, then it learns."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers_preference import TEMPLATE, pairs, preference_config, write_jsonl

from lorafit.config import validate_config
from lorafit.training import LoraFinetuneRecipe


def _recipe(raw: dict) -> LoraFinetuneRecipe:
    recipe = LoraFinetuneRecipe(validate_config(raw), progress=False)
    recipe.setup()
    recipe.model.train()
    return recipe


def _trl_logps(model_dir: Path, rows: list[dict], batch_size: int) -> tuple[torch.Tensor, torch.Tensor, list[list[int]],
                                                                              float]:
    """TRL DPOTrainer's per-row reference log-probabilities (chosen, rejected), its chosen token ids
    and its loss on the first batch, for a fresh LoRA adapter on the same base (fp32, CPU)."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    data = Dataset.from_list([{"prompt": TEMPLATE.format(prompt=r["prompt"]), "chosen": r["chosen"],
                               "rejected": r["rejected"]} for r in rows])
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    args = DPOConfig(output_dir=str(model_dir.parent / "trl-out"), bf16=False, use_cpu=True, report_to=[],
                     per_device_train_batch_size=batch_size, max_length=256, beta=0.1, gradient_checkpointing=False)
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    tokenized = trainer.train_dataset
    chosen, rejected = [], []
    for start in range(0, len(rows), batch_size):
        batch = trainer.data_collator([tokenized[i] for i in range(start, min(start + batch_size, len(rows)))])
        c, r = trainer.compute_ref_log_probs(trainer.model, batch)
        chosen.append(c)
        rejected.append(r)
    trainer.model.train()
    first = trainer.data_collator([tokenized[i] for i in range(batch_size)])
    loss = float(trainer.compute_loss(trainer.model, first))
    ids = [tokenized[i]["prompt_ids"] + tokenized[i]["chosen_ids"] for i in range(len(rows))]
    return torch.cat(chosen), torch.cat(rejected), ids, loss


@pytest.mark.parametrize("loss_mode", ["chunked", "full"])
def test_initial_state_is_ln2_and_matches_trl_logps(loss_mode: str, tiny_llama: Path, tmp_path: Path) -> None:
    rows = pairs(8)
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    raw = preference_config(tiny_llama, data, tmp_path / "run", data_settings={"eval_fraction": 0.0},
                            loss=loss_mode)
    recipe = _recipe(raw)
    objective = recipe.objective
    assert [r["input_ids"] for r in recipe.data.train] == _trl_logps_cache(tiny_llama, rows)[2]
    ours_c, ours_r = [], []
    with torch.no_grad():
        for start in range(0, len(rows), 4):
            batch = recipe.data.collate(recipe.data.train[start : start + 4])
            logps = objective.logps(recipe.model, batch)[0]
            ours_c.append(logps.chunk(2)[0])
            ours_r.append(logps.chunk(2)[1])
            loss, units, _ = objective.loss(recipe.model, batch)
            assert units == 4
            assert float(loss) / units == pytest.approx(math.log(2), abs=1e-6)
            for loss_type, expected in (("hinge", 1.0), ("ipo", (1 / (2 * 0.1)) ** 2)):  # at Delta = 0
                objective.loss_type = loss_type
                assert float(objective.loss(recipe.model, batch)[0]) / units == pytest.approx(expected, rel=1e-6)
            objective.loss_type = "sigmoid"
    theirs_c, theirs_r, _, trl_loss = _trl_logps_cache(tiny_llama, rows)
    assert trl_loss == pytest.approx(math.log(2), abs=1e-6)
    assert (torch.cat(ours_c) - theirs_c).abs().max().item() < 1e-4
    assert (torch.cat(ours_r) - theirs_r).abs().max().item() < 1e-4
    # the rows do differ: a check that could fail
    assert (theirs_c - theirs_r).abs().max().item() > 0.1


_TRL: dict[str, tuple] = {}


def _trl_logps_cache(model_dir: Path, rows: list[dict]) -> tuple:
    key = str(model_dir)
    if key not in _TRL:
        _TRL[key] = _trl_logps(model_dir, rows, 4)
    return _TRL[key]


def test_a_short_run_learns_the_pairs(tiny_llama: Path, tmp_path: Path) -> None:
    """Held-out reward accuracy rises above chance; metrics.jsonl carries DPO's numbers. A random tiny
    model cannot learn which summary the dialogue supports (the embedded demo on SmolLM2 does, in
    test_dpo_heavy), so the rejected answers here differ in a way it can learn: shouted."""
    from lorafit.training import train

    rows = [{**r, "rejected": r["chosen"].upper()} for r in pairs(96, 5)]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    raw = preference_config(tiny_llama, data, tmp_path / "run", max_steps=20, eval_steps=10, lr=1e-2, beta=0.5,
                            data_settings={"eval_fraction": 0.25}, report_to=["tensorboard"])
    result = train(validate_config(raw), progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_loss" in r]
    assert evals[0]["eval_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert evals[0]["eval_reward_accuracy"] == 0.0  # policy == reference: every reward is 0
    assert evals[-1]["eval_reward_accuracy"] > 0.6, evals[-1]
    assert evals[-1]["eval_reward_margin"] > 0
    assert result.final_eval_loss < math.log(2)
    steps = [r for r in records if r.get("loss") is not None]
    assert {"rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy", "logps_chosen",
            "logps_rejected"} <= steps[-1].keys()
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["objective"] == "dpo" and run["packing"] == "none"
    from helpers_trackers import tensorboard_scalars

    scalars = tensorboard_scalars(tmp_path / "run" / "tensorboard")  # TRL's names
    assert [s for s, _ in scalars["train/rewards/accuracies"]] == list(range(1, 21))
    assert scalars["eval/rewards/accuracies"][-1][1] == pytest.approx(evals[-1]["eval_reward_accuracy"])
    assert {"train/rewards/chosen", "train/rewards/margins", "train/logps/rejected", "eval/rewards/margins"} <= \
        scalars.keys()


@pytest.mark.parametrize(("quantization", "precision", "checkpointing", "objective"), [
    ("int8", "fp32", True, "dpo"), ("nf4", "bf16", True, "dpo"), ("none", "bf16", False, "dpo"),
    ("none", "fp16", True, "dpo"), ("nf4", "bf16", False, "orpo"), ("bf16-stored", "fp32", False, "dpo")])
def test_every_gpu_path_runs_a_preference_step(quantization: str, precision: str, checkpointing: bool,
                                               objective: str, tiny_llama: Path, tmp_path: Path) -> None:
    """int8 / nf4 bases, bf16 / fp16 autocast, gradient checkpointing, a bf16-stored base computed in
    fp32: the reference forward takes the policy's path exactly (DPO starts at ln 2), steps are finite."""
    from lorafit.training import train

    data = write_jsonl(tmp_path / "pairs.jsonl", pairs(24, 6))
    model = {"dtype": "bfloat16"} if quantization == "bf16-stored" else {"quantization": quantization}
    raw = preference_config(tiny_llama, data, tmp_path / "run", max_steps=2, eval_steps=None, precision=precision,
                            gradient_checkpointing=checkpointing, objective=objective,
                            model=model, data_settings={"eval_fraction": 0.2})
    result = train(validate_config(raw), progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 2 and all(math.isfinite(r["loss"]) for r in steps)
    assert all(math.isfinite(r["reward_margin"]) for r in steps)
    if objective == "dpo":
        assert result.first_eval_loss == pytest.approx(math.log(2), abs=1e-6)
    else:
        assert {"nll_loss", "log_odds_ratio"} <= steps[0].keys() and result.first_eval_loss > 0


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_chunked_logps_and_gradients_equal_the_full_logits_path(precision: str, tiny_llama: Path,
                                                                 tmp_path: Path) -> None:
    """The fused per-token log-probabilities (head matmul not recomputed in backward) against the
    model's full logits: the same DPO loss and adapter gradients, the adapter moved off its start."""
    from lorafit import objectives

    data = write_jsonl(tmp_path / "pairs.jsonl", pairs(8))
    recipe = _recipe(preference_config(tiny_llama, data, tmp_path / "run", precision=precision,
                                       data_settings={"eval_fraction": 0.0}))
    with torch.no_grad():
        for p in recipe.trainable:
            p.add_(torch.randn_like(p) * 0.05)
    batch = recipe.data.collate(recipe.data.train[:4])
    results = {}
    for mode in ("chunked", "full"):
        recipe.objective.loss_mode = mode
        recipe.model.zero_grad(set_to_none=True)
        with recipe._autocast():
            loss, _, metrics = recipe.objective.loss(recipe.model, batch)
        loss.backward()
        results[mode] = (loss.detach(), metrics, [p.grad.clone() for p in recipe.trainable])
    head = objectives.backbone_and_head(recipe.model)[1]
    with recipe._autocast():
        assert objectives._fusable(head, torch.zeros(1, 64))  # the fused path is the one compared
    tolerance = 1e-5 if precision == "fp32" else 2e-2
    (a_loss, a_metrics, a_grads), (b_loss, b_metrics, b_grads) = results["chunked"], results["full"]
    assert (a_loss - b_loss).abs().item() < tolerance * max(1.0, b_loss.abs().item())
    assert torch.allclose(a_metrics, b_metrics, rtol=tolerance, atol=tolerance * 10)
    scale = max(g.abs().max().item() for g in b_grads)
    assert max((x - y).abs().max().item() for x, y in zip(a_grads, b_grads, strict=True)) < tolerance * scale
