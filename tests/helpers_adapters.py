"""Adapters made by peft itself (not by lorafit) and a tiny lorafit run, for the eval-area tests."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from conftest import tiny_run_config


def peft_adapter(base_dir: Path, out: Path, *, seed: int = 0, r: int = 4,
                 targets: tuple[str, ...] = ("q_proj", "v_proj")) -> Path:
    """A LoRA adapter saved by ``get_peft_model(...).save_pretrained`` with random (non-zero) B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=8, target_modules=list(targets), init_lora_weights=False,
                        task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    with torch.no_grad():  # make the update large enough to change greedy outputs
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    model.save_pretrained(out)
    return out


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def sample_ids(vocab: int = 384, length: int = 12, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (2, length), generator=generator)


def fake_run(base_dir: Path, adapter_src: Path, run_dir: Path, data_file: Path, **model: object) -> Path:
    """A run folder as lorafit writes it (config.yaml + adapter/), around a given adapter."""
    import shutil

    run_dir.mkdir(parents=True, exist_ok=True)
    raw = tiny_run_config(base_dir, data_file, run_dir)
    raw["model"].update(model)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    shutil.copytree(adapter_src, run_dir / "adapter")
    return run_dir


def train_tiny_run(model_dir: Path, data_file: Path, run_dir: Path, **train: object) -> Path:
    """A real (short) lorafit training run on a tiny model; returns the run folder."""
    from lorafit.config import validate_config
    from lorafit.training import train as train_run

    settings: dict[str, object] = {"max_steps": 12, "eval_steps": 6, "lr": 1e-2, "seq_len": 512}
    settings.update(train)
    raw = tiny_run_config(model_dir, data_file, run_dir, **settings)
    train_run(validate_config(raw), progress=False)
    return run_dir
