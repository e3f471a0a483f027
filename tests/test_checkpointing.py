"""train.checkpoint_every: which layers recompute, and the gradients don't change."""

from __future__ import annotations

import tempfile

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.modeling_layers import GradientCheckpointingLayer

from lorafit.config import LorafitConfig
from lorafit.loss import compute_loss
from lorafit.modeling import attach_adapter
from lorafit.resolved import resolve


def _model(every: int, checkpointing: bool = True) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    with tempfile.TemporaryDirectory() as folder:
        cfg.save_pretrained(folder)
        run = resolve(LorafitConfig.model_validate({
            "model": {"name_or_path": folder}, "lora": {"dropout": 0.0},
            "train": {"gradient_checkpointing": checkpointing, "checkpoint_every": every}}))
    return attach_adapter(AutoModelForCausalLM.from_config(cfg, dtype=torch.float32), run)[0]


def _flags(model: torch.nn.Module) -> list[bool]:
    return [m.gradient_checkpointing for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


@pytest.mark.parametrize("every,expected", [(1, [True] * 4), (2, [True, False, True, False]),
                                            (3, [True, False, False, True])])
def test_every_nth_layer_is_checkpointed(every, expected):
    assert _flags(_model(every)) == expected


def test_gradients_match_full_checkpointing_and_none():
    batch = {"input_ids": torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))}
    batch["labels"] = batch["input_ids"].clone()
    grads = []
    for model in (_model(1), _model(2), _model(1, checkpointing=False)):
        model.train()
        loss, _ = compute_loss(model, batch)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    assert grads[0].abs().sum() > 0
    for other in grads[1:]:
        assert (other - grads[0]).norm() <= 1e-5 * grads[0].norm()


def test_checkpoint_every_must_be_positive():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="checkpoint_every"):
        LorafitConfig.model_validate({"train": {"checkpoint_every": 0}})
