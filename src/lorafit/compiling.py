"""``train.compile``: torch.compile on each decoder layer.

Why per layer and not the whole model: the decoder layers are the same code with different weights,
so one compiled graph serves all of them (compiled once, ~15-60 s), and the parts around them (the
embedding, lorafit's chunked loss, the optimizer) stay eager and readable. Each layer compiles with
dynamic shapes, so a run's many row lengths do not each trigger a recompile.

Gradient checkpointing stays correct under it: transformers checkpoints inside the layer's
``forward`` (non-reentrant), which torch.compile traces as activation checkpointing; the compiled
backward recomputes the layer and replays the forward's dropout masks (the same random state). What it gains is
fusion: a step's many small elementwise ops (norms, rotary, the activation, LoRA's scale and add,
dropout's multiply) become a few passes over memory. The matmuls and attention call the same kernels
as eager. On a CPU LoRA dropout's mask is still lorafit's own draw (``fused.CpuDropout``, one opaque
op per module): a compiled step with it is ~1.05x as fast as with the compiler's per-element random
numbers.

Side effects inside a checkpointed layer (the ``kernels`` package, which transformers 5.25 uses
to wrap attention, sets a context variable there) would make dynamo give the layer up: every layer
then runs eagerly. Where torch has the switch (2.13 and later) lorafit lets such side effects run
once in the forward instead of again in the recompute (they only pick kernels or collect outputs);
older torch keeps its own behaviour. Either way, after the first step the run says whether anything
fell back to eager (``fallback_report``).

When a run cannot compile it says so before any work (``compile_problem``), naming the field.
Dropout inside checkpointed compiled layers (LoRA's, or the model's own) is gated on the torch
versions checked: torch 2.8 (the SageMaker image's) fails to compile it ("Node ... was invalid, but
is output" in the partitioner); 2.13 compiles it and replays the masks exactly (tests/test_compile.py);
2.15 failed that test's earlier form (two compiled graphs compared, whose random draws a compiler may
order differently) and passed the current one once, outside CI: until CI runs it, such runs train
eagerly there too.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from typing import Any

import torch

# torch releases checked to compile dropout in checkpointed layers with the masks replayed exactly
CHECKPOINTED_DROPOUT_CHECKED = ("2.13",)


def checkpointed_dropout_compiles() -> bool:
    """Whether this torch is one checked to compile layers that draw dropout under checkpointing."""
    return ".".join(torch.__version__.split("+")[0].split(".")[:2]) in CHECKPOINTED_DROPOUT_CHECKED


def compile_problem(device_kind: str) -> str | None:
    """Why this machine cannot compile a training step for ``device_kind``, or None if it can:
    inductor writes C++ for CPUs, built with ``$CXX`` or else g++ (clang++ on macOS), the names
    it tries itself, and triton kernels for GPUs."""
    if device_kind == "cpu":
        compiler = os.environ.get("CXX") or ("clang++" if sys.platform == "darwin" else "g++")
        if shutil.which(compiler):
            return None
        return (f"train.compile: torch.compile needs a C++ compiler on a CPU and {compiler} is not on PATH "
                "(or set $CXX); install one (apt-get install g++) or set train.compile: false")
    if device_kind == "cuda":
        if importlib.util.find_spec("triton") is not None:
            return None
        return "train.compile: torch.compile needs triton on a GPU (pip install triton) or set train.compile: false"
    return f"train.compile: torch.compile is not supported on {device_kind} here; set train.compile: false"


def model_dropout(model_config: Any) -> float:
    """The largest dropout rate the model's own config sets (attention, hidden, residual...): it is
    drawn inside the layers too."""
    text = model_config.get_text_config() if callable(getattr(model_config, "get_text_config", None)) else model_config
    rates = [value for name, value in vars(text).items()
             if ("dropout" in name or name.endswith("pdrop")) and isinstance(value, float)]
    return max(rates, default=0.0)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated decoder layers: transformers' checkpointable layers, or the classes the
    model names as unsplittable (``_no_split_modules``) for architectures that predate those."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if layers:
        return layers
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


_SIDE_EFFECTS_SWITCH = "skip_fwd_side_effects_in_bwd_under_checkpoint"


def compile_layers(model: Any) -> str:
    """Compile each decoder layer in place (lazily: the first step compiles); the run log's line."""
    from torch._dynamo import config as dynamo_config
    from torch._dynamo.utils import counters

    layers = decoder_layers(model)
    if hasattr(dynamo_config, _SIDE_EFFECTS_SWITCH):
        setattr(dynamo_config, _SIDE_EFFECTS_SWITCH, True)
    counters["graph_break"].clear()  # fallback_report counts this run's
    for layer in layers:
        layer.compile(dynamic=True)
    if not layers:
        return "train.compile: no decoder layers found; nothing compiled"
    return f"{len(layers)} {type(layers[0]).__name__}s -> torch.compile (dynamic shapes, compiled at the first step)"


def fallback_report(model: torch.nn.Module) -> str | None:
    """After a compiled step: None if every compiled layer ran as one graph, else the line that says
    they (partly) ran eagerly and dynamo's first reason."""
    from torch._dynamo.utils import counters

    if not decoder_layers(model):
        return "train.compile: no decoder layers found in this model; it trains eagerly"
    breaks = counters["graph_break"]
    if not breaks:
        return None
    reason = next(iter(breaks)).strip().splitlines()
    first = " ".join(line.strip() for line in reason[:3])
    return (f"train.compile: {sum(breaks.values())} graph break(s) in the compiled layers, which run partly "
            f"or wholly eagerly (no speed-up there): {first}")
