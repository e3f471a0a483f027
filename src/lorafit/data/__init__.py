"""The data pipeline: user files -> rendered prompts/responses -> masked token rows -> batches.

Modules, one job each: ``sources`` (read files, folders, hub), ``formats`` (the registry of row
shapes and their templates, ``render``), ``chat`` (chat templates and the assistant-turn mask),
``detect`` (``data.format: auto``), ``pairs`` (preference pairs as rows) and ``preference`` (their
encoding, collation and preparation), ``template`` (the template a run trained with, recorded in the
run folder), ``encode`` (tokenize + prompt masking), ``packing`` (none / chunk / packed rows and
which models support packed attention), ``batching`` (per-epoch batches), ``cache`` (tokenized-data
cache), ``report`` (the one-line summary), ``prepare`` (``prepare_data`` ties them together).
Imports are lazy so that reading the format registry (config validation) does not load torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PreparedData", "Rendered", "prepare_data", "render"]


def __getattr__(name: str) -> Any:
    if name in ("Rendered", "render"):
        from lorafit.data import formats

        return getattr(formats, name)
    if name in ("PreparedData", "prepare_data"):
        from lorafit.data import prepare

        return getattr(prepare, name)
    raise AttributeError(f"module 'lorafit.data' has no attribute {name!r}")
