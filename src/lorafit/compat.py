"""The library internals lorafit touches, each checked by running it, not by its version number.

lorafit prefers public APIs (FSDP's rank-0 loading is torch's ``set_model_state_dict``; peft's
``disable_input_dtype_casting``). A few speed-ups and CPU fixes need a library's internals:
BLOOM's attention attributes, transformers' tanh-GELU classes, bitsandbytes' CPU layout flag and
int8 kernel, and bitsandbytes' 4-bit statistics on layers whose weights FSDP replaced. For each,
a probe runs the real library code on a tiny module (milliseconds, CPU, fp32) and compares it with
what lorafit needs, so any release that behaves the same is used, and one that does not takes the
library's own path (``lorafit.resolved`` decides, and says so in the run's log and ``run.json``).
The same idea as ``lorafit.probe`` (ask the architecture, don't allowlist it).
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch
import torch.nn.functional as F

from lorafit.errors import first_line
from lorafit.fused import apply_fused_ops


@dataclass(frozen=True)
class Check:
    """The outcome of one probe: whether lorafit's path may run, and a note naming what ran."""

    name: str
    ok: bool
    note: str


# What each internal is, and its package (for the note). Probes below, one per name.
INTERNALS: dict[str, tuple[str, str]] = {
    "tanh_gelu_swap": ("transformers", "BloomGelu / NewGELUActivation / FastGELUActivation compute the "
                                       "tanh-approximated GELU (swapped for torch's fused one)"),
    "bloom_sdpa_attention": ("transformers", "BloomAttention's _reshape / query_key_value / dense / dropout "
                                             "attributes (its forward rewritten on scaled_dot_product_attention)"),
    "bnb_cpu_training_layout": ("bitsandbytes", "Linear4bit.support_avx512bf16_for_cpu off keeps 4-bit CPU "
                                                "weights in the layout whose matmul has a backward"),
    "bnb_int8_cpu_autocast": ("bitsandbytes", "the CPU int8 matmul run with autocast off (fp16 autocast "
                                              "overflows its int32-sized sums)"),
    "nf4_sharded_weights": ("bitsandbytes", "Linear4bit.quant_state restores the 4-bit statistics when FSDP "
                                            "hands the layer a plain tensor"),
}

TOLERANCE = 1e-5  # relative: each probe compares fp32 results of the same math


@cache
def installed(package: str) -> str | None:
    """The installed version of ``package``, or None."""
    try:
        return version(package)
    except PackageNotFoundError:
        return None


@cache
def check(name: str) -> Check:
    """Run the probe for ``name`` once per process (see the module docstring)."""
    package = INTERNALS[name][0]
    where = f"{package} {installed(package)}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the libraries' own advice, printed by the real run if at all
            problem = _PROBES[name]()
    except Exception as exc:  # noqa: BLE001 - any failure means "does not behave as needed"
        problem = f"the probe failed: {type(exc).__name__}: {first_line(exc)[:160]}"
    if problem is None:
        return Check(name, True, f"{where}: probe passed")
    return Check(name, False, f"{where}: {problem}")


def versions() -> dict[str, str | None]:
    """The versions that decide a run's numerics, for result.json and the run description."""
    import platform

    names = ("lorafit", "torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets",
             "safetensors")
    return {"python": platform.python_version(), **{n: installed(n) for n in names}}


def _differs(got: torch.Tensor, want: torch.Tensor) -> bool:
    scale = want.abs().max().clamp(min=1.0)
    return not bool(((got.float() - want.float()).abs().max() / scale) <= TOLERANCE)


# --------------------------------------------------------------------------------- transformers
def _probe_tanh_gelu() -> str | None:
    from transformers import activations
    from transformers.models.bloom import modeling_bloom

    found = {"NewGELUActivation": getattr(activations, "NewGELUActivation", None),
             "FastGELUActivation": getattr(activations, "FastGELUActivation", None),
             "BloomGelu": getattr(modeling_bloom, "BloomGelu", None)}
    x = torch.linspace(-6, 6, 97, dtype=torch.float32)
    for cls_name, cls in found.items():
        if cls is None:
            continue  # a release without the class has nothing to swap
        ours = x.clone().requires_grad_()
        theirs = x.clone().requires_grad_()
        F.gelu(ours, approximate="tanh").sum().backward()
        out = cls()(theirs)
        out.sum().backward()
        if _differs(out, F.gelu(x, approximate="tanh")) or _differs(theirs.grad, ours.grad):
            return f"{cls_name} no longer computes the tanh-approximated GELU"
    return None


def _probe_bloom_attention() -> str | None:
    from transformers import AutoModelForCausalLM, BloomConfig

    torch.manual_seed(0)
    config = BloomConfig(vocab_size=64, hidden_size=32, n_layer=1, n_head=4, attention_dropout=0.0,
                         hidden_dropout=0.0)
    eager = AutoModelForCausalLM.from_config(config, dtype=torch.float32).train()
    fused = AutoModelForCausalLM.from_config(config, dtype=torch.float32).train()
    fused.load_state_dict(eager.state_dict())
    if not apply_fused_ops(fused, ["bloom_sdpa_attention"]):
        return "BloomAttention lacks the attributes the fused forward reads"
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding: the mask reaches the attention
    outputs = []
    for model in (eager, fused):
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        logits[mask.bool()].square().sum().backward()
        grad = model.transformer.h[0].self_attention.query_key_value.weight.grad
        outputs.append((logits[mask.bool()], grad))
    (want, want_grad), (got, got_grad) = outputs
    if _differs(got, want) or _differs(got_grad, want_grad):
        return "BloomAttention's forward computes something else than the fused one"
    return None


# --------------------------------------------------------------------------------- bitsandbytes
def _linear4bit(quant_storage: torch.dtype = torch.uint8) -> Any:
    """A tiny nf4 layer quantized on the CPU, as transformers loads one, in train mode."""
    from bitsandbytes.nn import Linear4bit

    torch.manual_seed(0)
    layer = Linear4bit(64, 32, bias=False, compute_dtype=torch.float32, quant_type="nf4",
                       quant_storage=quant_storage)
    return layer.to("cpu").train()


def _dequantized(layer: Any) -> torch.Tensor:
    from bitsandbytes.functional import dequantize_4bit

    return dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()


def keep_4bit_training_layout(model: torch.nn.Module) -> None:
    """bitsandbytes repacks 4-bit weights into a CPU inference layout the first time a layer runs
    in eval mode (on AVX512-BF16 CPUs) and never back; that layout's matmul has no backward, so
    training after an evaluation would get wrong gradients. Its flag keeps the training layout."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _probe_bnb_training_layout() -> str | None:
    layer = _linear4bit()
    keep_4bit_training_layout(layer)
    weight = _dequantized(layer)
    x = torch.randn(3, 64)
    with torch.no_grad():
        layer.eval()(x)  # an evaluation during training
    layer.train()
    trained = x.clone().requires_grad_()
    layer(trained).sum().backward()
    if trained.grad is None or _differs(trained.grad, torch.ones(3, 32) @ weight):
        return "a 4-bit CPU layer gives wrong input gradients after an evaluation"
    return None


def int8_outside_autocast(model: torch.nn.Module) -> None:
    """Run bitsandbytes' int8 layers with CPU autocast off (they cast their inputs themselves): its
    CPU int8 matmul multiplies the int8 values as floats through ``torch.matmul``, which fp16
    autocast turns into an fp16 matmul whose int32-sized sums overflow (wrong eval losses)."""
    for module in model.modules():
        if type(module).__module__.startswith("bitsandbytes.") and type(module).__name__ == "Linear8bitLt" \
                and "forward" not in module.__dict__:
            module.forward = types.MethodType(_without_autocast(type(module).forward), module)


def _without_autocast(forward: Callable[..., Any]) -> Callable[..., Any]:
    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        with torch.autocast("cpu", enabled=False):
            return forward(self, *args, **kwargs)

    return run


def _probe_bnb_int8_autocast() -> str | None:
    from bitsandbytes.nn import Linear8bitLt

    torch.manual_seed(0)
    layer = Linear8bitLt(256, 8, bias=False, has_fp16_weights=False, threshold=0.0)
    layer.weight.data = torch.full((8, 256), 0.5)  # int8 sums of 127 x 127 x 256: past fp16's range
    layer = layer.to("cpu").eval()
    int8_outside_autocast(layer)
    x = torch.full((2, 256), 100.0)
    with torch.no_grad():
        want = layer(x)
        with torch.autocast("cpu", dtype=torch.float16):
            got = layer(x)
    if not torch.isfinite(got).all() or _differs(got, want):
        return "the int8 CPU layer still overflows under fp16 autocast"
    return None


def _probe_nf4_sharded() -> str | None:
    from bitsandbytes.functional import QuantState

    layer = _linear4bit(quant_storage=torch.float32)  # under FSDP: 4-bit bits viewed as the compute dtype
    x = torch.randn(3, 64)
    want = layer(x)
    state = QuantState.from_dict(layer.weight.quant_state.as_dict(), device=torch.device("cpu"))
    layer.weight = torch.nn.Parameter(layer.weight.data.clone(), requires_grad=False)  # what FSDP hands it
    layer.quant_state = state
    if _differs(layer(x), want):
        return "a 4-bit layer does not recover its statistics from Linear4bit.quant_state"
    return None


_PROBES: dict[str, Callable[[], str | None]] = {
    "tanh_gelu_swap": _probe_tanh_gelu,
    "bloom_sdpa_attention": _probe_bloom_attention,
    "bnb_cpu_training_layout": _probe_bnb_training_layout,
    "bnb_int8_cpu_autocast": _probe_bnb_int8_autocast,
    "nf4_sharded_weights": _probe_nf4_sharded,
}
