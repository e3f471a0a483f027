"""Cache of tokenized rows under ``cache_root()/data/<key>/``, so a second run skips tokenization.

The key hashes the data's bytes, the tokenizer (vocabulary, special tokens, chat template) and
every setting that changes the rows. Stored as safetensors (flat int32 arrays + offsets) and a
JSON file, never pickle; the user's data files are only read. A cache that fails to load is
ignored and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from lorafit.paths import cache_root

FORMAT_VERSION = "data-v3"  # bumped whenever what a cache entry holds changes
KEYS = ("input_ids", "labels", "position_ids", "rejected_input_ids", "rejected_labels")
SECOND = "rejected"  # a preference pair's second sequence: its own lengths


def cache_key(parts: dict[str, Any]) -> str:
    blob = json.dumps({"version": FORMAT_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def cache_dir(key: str) -> Path:
    return cache_root() / "data" / key


def _flatten(rows: list[dict[str, list[int]]], prefix: str) -> dict[str, Any]:
    import torch

    tensors: dict[str, Any] = {}
    lengths = [len(r["input_ids"]) for r in rows]
    tensors[f"{prefix}.lengths"] = torch.tensor(lengths, dtype=torch.int64)
    if rows and f"{SECOND}_input_ids" in rows[0]:
        second = [len(r[f"{SECOND}_input_ids"]) for r in rows]
        tensors[f"{prefix}.{SECOND}.lengths"] = torch.tensor(second, dtype=torch.int64)
    for key in KEYS:
        if rows and key in rows[0]:
            flat = [t for r in rows for t in r[key]]
            tensors[f"{prefix}.{key}"] = torch.tensor(flat, dtype=torch.int32)
    return tensors


def _unflatten(tensors: dict[str, Any], prefix: str) -> list[dict[str, list[int]]]:
    columns = {k: tensors[f"{prefix}.{k}"].tolist() for k in KEYS if f"{prefix}.{k}" in tensors}
    rows: list[dict[str, list[int]]] = [{} for _ in tensors[f"{prefix}.lengths"].tolist()]
    for key, values in columns.items():
        which = f"{prefix}.{SECOND}.lengths" if key.startswith(SECOND + "_") else f"{prefix}.lengths"
        start = 0
        for row, n in zip(rows, tensors[which].tolist(), strict=True):
            row[key] = values[start : start + n]
            start += n
    return rows


def save(key: str, train: list[dict], eval_rows: list[dict] | None, meta: dict[str, Any]) -> None:
    """Write atomically (temp folder, then rename) so a crash never leaves a half cache."""
    from safetensors.torch import save_file

    target = cache_dir(key)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{key}-"))
    try:
        tensors = _flatten(train, "train")
        if eval_rows is not None:
            tensors.update(_flatten(eval_rows, "eval"))
        save_file(tensors, str(tmp / "rows.safetensors"))
        (tmp / "meta.json").write_text(json.dumps({**meta, "has_eval": eval_rows is not None}, default=str), encoding="utf-8")
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # a cache is an optimisation; never fail the run for it


def load(key: str) -> tuple[list[dict], list[dict] | None, dict[str, Any]] | None:
    from safetensors.torch import load_file

    folder = cache_dir(key)
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        tensors = load_file(str(folder / "rows.safetensors"))
        train = _unflatten(tensors, "train")
        eval_rows = _unflatten(tensors, "eval") if meta.get("has_eval") else None
    except (OSError, ValueError, KeyError):
        return None
    return train, eval_rows, meta
