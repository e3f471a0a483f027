"""The data pipeline: user files -> rendered prompts/responses -> masked token rows -> batches.

Modules, one job each: ``sources`` (read files, folders, hub), ``formats`` (templates, ``render``),
``encode`` (tokenize + prompt masking), ``packing`` (none / chunk / packed rows and which models
support packed attention), ``batching`` (per-epoch batches), ``cache`` (tokenized-data cache),
``report`` (the one-line summary), ``prepare`` (``prepare_data`` ties them together).
"""

from __future__ import annotations

from lorafit.data.formats import Rendered, render
from lorafit.data.prepare import PreparedData, prepare_data

__all__ = ["PreparedData", "Rendered", "prepare_data", "render"]
