"""Options that are each valid but contradict each other or this machine, caught before anything loads.

Why a check of its own: pydantic validates fields one by one, but some combinations only fail
minutes later (after the data is tokenized and the model loaded) deep inside a library. Each error
names the field. (Precision combinations are checked where they are resolved: ``lorafit.resolved``.)
"""

from __future__ import annotations

import importlib.util
import os

import torch

from lorafit.config import LorafitConfig
from lorafit.errors import ConfigError


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


def _check_fsdp(config: LorafitConfig) -> None:
    """FSDP2 needs torch's public ``fully_shard``; a 4-bit base needs bitsandbytes' FSDP support."""
    from lorafit.sharded_loading import fsdp_support_problem

    problem = fsdp_support_problem(config.model.quantization, config.train.optimizer)
    if problem:
        raise ConfigError(problem)
