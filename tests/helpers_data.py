"""Helpers for data tests: configs over tiny real tokenizers, data files in every format.

The tokenizer comes from conftest's ``tiny_llama`` fixture (a byte-level BPE trained in-process);
``CHAT_TEMPLATE`` gives it a ChatML-style chat template when a test needs one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lorafit.config import LorafitConfig, validate_config

CHAT_TEMPLATE = (
    "{% for m in messages %}<|endoftext|>{{ m['role'] }}\n{{ m['content'] }}<|pad|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|endoftext|>assistant\n{% endif %}"
)


def data_config(model_dir: Path, path: Any, *, seq_len: int = 256, batch_size: int = 4, seed: int = 0,
                **data: Any) -> LorafitConfig:
    """A validated config reading ``path`` with the tiny model's tokenizer; cache off unless asked."""
    settings = {"path": str(path) if isinstance(path, Path) else path, "cache": False, **data}
    return validate_config({
        "model": {"name_or_path": str(model_dir)},
        "data": settings,
        "train": {"seq_len": seq_len, "batch_size": batch_size, "seed": seed},
    })


def load_tokenizer(model_dir: Path, chat_template: str | None = None) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def dialogues(n: int, seed: int = 5) -> list[dict[str, Any]]:
    from lorafit.builtin.dialogues import generate

    return [{"dialogue": r["dialogue"], "summary": r["summary"]} for r in generate(n, seed)]


def write_config_yaml(path: Path, config: LorafitConfig) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(config.model_dump(mode="json")), encoding="utf-8")
    return path
