"""Helpers for preference-tuning tests: pair files in each shape and configs over tiny real models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TEMPLATE = "Summarize:\n{prompt}\nSummary:\n"


def pairs(n: int, seed: int = 3) -> list[dict[str, str]]:
    """``n`` rows {id, prompt, chosen, rejected} of the builtin preference generator."""
    from lorafit.builtin.preferences import generate

    return generate(n, seed)


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def preference_config(model_dir: Path, data: Path | str, output_dir: Path, *, data_settings: dict | None = None,
                      lora: dict | None = None, model: dict | None = None, **train: Any) -> dict:
    """A raw config mapping for a fast DPO run on a tiny model (templated string prompts)."""
    settings = {"max_steps": 6, "seq_len": 256, "batch_size": 4, "grad_accum": 1, "lr": 5e-3,
                "gradient_checkpointing": False, "eval_steps": 3, "seed": 0, "objective": "dpo"}
    settings.update(train)
    return {
        "model": {"name_or_path": str(model_dir), **(model or {})},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, **(lora or {})},
        "data": {"path": str(data), "eval_fraction": 0.1, "cache": False, "template": TEMPLATE,
                 **(data_settings or {})},
        "train": settings,
        "output_dir": str(output_dir),
    }
