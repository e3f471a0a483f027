"""Options that are each valid but contradict each other or this machine, caught before anything loads.

Why a check of its own: pydantic validates fields one by one, but some combinations only fail
minutes later (after the data is tokenized and the model loaded) deep inside a library. Each error
names the field. (Precision combinations are checked where they are resolved: ``lorafit.resolved``.)
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

from lorafit.config import LorafitConfig
from lorafit.data.sources import FILE_SUFFIXES, as_list
from lorafit.errors import ConfigError
from lorafit.sharded_loading import fsdp_support_problem


def check_settings(config: LorafitConfig, *, device_type: str | None = None, processes: int | None = None) -> None:
    """Raise ``ConfigError`` for a contradictory combination of options on ``device_type`` x ``processes``."""
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    processes = processes or int(os.environ.get("WORLD_SIZE", "1"))
    model, train = config.model, config.train
    if train.fsdp_cpu_offload and not train.fsdp:
        raise ConfigError("train.fsdp_cpu_offload: offloads FSDP shards, so it needs train.fsdp: true")
    if train.fsdp and processes > 1:
        _check_fsdp(config)
    attention = model.attn_implementation or ""
    if attention.startswith("flash_attention") and device_type != "cuda":
        raise ConfigError(f"model.attn_implementation: {attention} needs a CUDA GPU; use sdpa or eager here")
    if attention == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ConfigError("model.attn_implementation: flash_attention_2 needs the flash-attn package "
                          "(pip install flash-attn); use sdpa instead")
    needs_bnb = model.quantization != "none" or train.optimizer == "adamw_8bit"
    if needs_bnb and importlib.util.find_spec("bitsandbytes") is None:
        culprit = "model.quantization" if model.quantization != "none" else "train.optimizer"
        raise ConfigError(f"{culprit}: needs the bitsandbytes package (pip install bitsandbytes)")


def ignored_settings(config: LorafitConfig, *, processes: int = 1) -> list[str]:
    """Options set away from their default that have no effect in this run, one line each (the
    run says so at its start instead of ignoring them silently)."""
    model, data, train = config.model, config.data, config.train

    def changed(section: Any, name: str) -> bool:
        return getattr(section, name) != type(section).model_fields[name].default

    found: list[tuple[bool, str, str]] = [
        (train.fsdp and processes == 1, "train.fsdp", "one process holds the whole model; nothing to shard"),
        (changed(train, "checkpoint_every") and not train.gradient_checkpointing, "train.checkpoint_every",
         "train.gradient_checkpointing is off"),
        (changed(train, "loss_chunk_tokens") and train.loss == "full", "train.loss_chunk_tokens",
         "train.loss is full"),
        (changed(train, "max_consecutive_skips") and train.on_nonfinite == "stop", "train.max_consecutive_skips",
         "train.on_nonfinite is stop"),
        (changed(train, "max_skipped_fraction") and train.on_nonfinite == "stop", "train.max_skipped_fraction",
         "train.on_nonfinite is stop"),
        (changed(train, "epochs") and train.max_steps is not None, "train.epochs", "train.max_steps is set"),
        (changed(data, "eval_fraction") and data.eval_path is not None, "data.eval_fraction",
         "data.eval_path names the held-out rows"),
        (changed(data, "overlong") and data.packing == "chunk", "data.overlong",
         "data.packing chunk splits the token stream, so no row is over-long"),
        (data.template is not None and data.format in ("chat", "text"), "data.template",
         f"data.format {data.format} has no prompt template"),
        (data.train_on_prompt and data.format == "text", "data.train_on_prompt",
         "data.format text trains on every token already"),
        (model.revision is not None and Path(model.name_or_path).expanduser().exists(), "model.revision",
         "model.name_or_path is a local folder"),
        (changed(data, "split") and all(Path(p).suffix.lower() in FILE_SUFFIXES
                                        for p in as_list(data.path) + as_list(data.eval_path)), "data.split",
         "data files have no splits (it picks one of a hub or save_to_disk data set)"),
    ]
    objective = train.objective
    found += [(changed(train, name) and objective == "sft", f"train.{name}", "train.objective is sft")
              for name in ("beta", "dpo_loss", "label_smoothing")]
    found += [(changed(train, name) and objective == "orpo", f"train.{name}", "train.objective is orpo")
              for name in ("dpo_loss", "label_smoothing")]
    found.append((changed(train, "label_smoothing") and objective == "dpo" and train.dpo_loss != "sigmoid",
                  "train.label_smoothing", f"train.dpo_loss is {train.dpo_loss} (it smooths the sigmoid loss)"))
    found.append((changed(data, "packing") and objective != "sft", "data.packing",
                  "preference pairs are never packed (each pair is scored per sequence)"))
    no_eval = data.eval_path is None and data.eval_fraction == 0
    found += [(changed(train, name) and no_eval, f"train.{name}", "there is no held-out data (data.eval_fraction 0)")
              for name in ("eval_steps", "eval_batches")]
    return [f"{name}: {why}" for ignored, name, why in found if ignored]


def _check_fsdp(config: LorafitConfig) -> None:
    """FSDP2 needs torch's public ``fully_shard``; a 4-bit base needs bitsandbytes' FSDP support."""
    problem = fsdp_support_problem(config.model.quantization, config.train.optimizer)
    if problem:
        raise ConfigError(problem)
