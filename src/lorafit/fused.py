"""Faster, numerically equivalent stand-ins for slow pieces of some architectures.

Each swap computes the same function as the model's own code, in fewer passes over memory,
and each was measured before and after (benchmarks/RESULTS.md):

- tanh-approximated GELU written as ~10 elementwise ops in Python (BLOOM's ``BloomGelu`` with a
  hand-written backward, GPT-2's ``NewGELUActivation``, ``FastGELUActivation``) -> PyTorch's fused
  ``nn.GELU(approximate="tanh")``: one kernel forward, one backward, same formula.
- BLOOM's eager attention (scores, an fp32 softmax copy and the probabilities, each
  heads x seq_len^2, kept for backward) -> ``scaled_dot_product_attention`` with ALiBi + the
  causal mask as its additive mask: the fused kernel keeps no seq_len^2 tensors for backward.
  Only the training / scoring path is swapped: with a KV cache, attention outputs or BLOOM's
  ``slow_but_exact`` tensor-parallel mode the model's own forward runs.

Both read transformers internals (module classes, BLOOM's private ``_reshape``), so each is used
only with the transformers versions ``lorafit.compat`` lists as checked, and each has an equality
test against the model's own code (tests/test_fused.py). ``apply_fused_ops(model, allowed)`` swaps
in place and returns what it changed, for the run's log.

One swap is equal in distribution rather than in values: on the CPU, peft's LoRA dropout
(``nn.Dropout``) -> ``CpuDropout``, which draws the gaps between dropped elements (p <= 0.15)
or an integer mask, ``random int < threshold``, instead of torch's ``bernoulli_`` per element. The
CPU generator draws serially; ``bernoulli_`` costs ~2.5x ``random_`` per element, and LoRA dropout
draws a mask per adapted layer, forward and again in the checkpoint recompute. Same drop
probability, same scaling, a different random stream. In compiled layers the same draw is one
custom op (``lorafit::dropout_keep_mask``) making a keep mask the compiler multiplies in.
``apply_adapter_fused_ops(peft_model, allowed)`` makes it once the adapter is attached.
"""

from __future__ import annotations

import math
import types
import weakref
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

# The last ALiBi + mask bias, reused by every layer of one forward (and its recompute): (weak
# refs to the alibi and mask it was made from, dtype, the bias). Dropped when those tensors die.
_bias_cache: list[Any] = []

# Modules whose forward is exactly 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), in Python.
_PYTHON_TANH_GELUS = {"BloomGelu", "NewGELUActivation", "FastGELUActivation"}
_BLOOM_ATTRIBUTES = ("_reshape", "query_key_value", "dense", "attention_dropout", "hidden_dropout",
                     "inv_norm_factor", "num_heads", "hidden_size", "pretraining_tp", "slow_but_exact")


def apply_fused_ops(model: torch.nn.Module, allowed: Sequence[str]) -> list[str]:
    """Swap the slow pieces of ``model`` named in ``allowed`` (``tanh_gelu_swap``,
    ``bloom_sdpa_attention``: the run's ``fused``) for fused equivalents; one line per kind swapped."""
    gelus = attentions = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if "tanh_gelu_swap" in allowed and _is_python_tanh_gelu(child):
                setattr(parent, name, torch.nn.GELU(approximate="tanh"))
                gelus += 1
        if "bloom_sdpa_attention" in allowed and _is_bloom_attention(parent):
            parent.forward = types.MethodType(_bloom_sdpa_forward, parent)
            attentions += 1
    done = []
    if gelus:
        done.append(f"{gelus} tanh-GELUs -> fused GELU")
    if attentions:
        done.append(f"{attentions} BLOOM attentions -> scaled_dot_product_attention with ALiBi")
    return done


def _is_python_tanh_gelu(module: torch.nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ in _PYTHON_TANH_GELUS and cls.__module__.startswith("transformers.")


def _is_bloom_attention(module: torch.nn.Module) -> bool:
    """transformers' BloomAttention with the attributes the SDPA forward reads, not yet swapped."""
    return (type(module).__name__ == "BloomAttention" and type(module).__module__.startswith("transformers.")
            and all(hasattr(module, a) for a in _BLOOM_ATTRIBUTES)
            and not isinstance(module.__dict__.get("forward"), types.MethodType))


def _bloom_sdpa_forward(self: Any, hidden_states: torch.Tensor, residual: torch.Tensor, alibi: torch.Tensor,
                        attention_mask: torch.Tensor | None, layer_past: Any = None, use_cache: bool = False,
                        output_attentions: bool = False, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """``BloomAttention.forward`` through SDPA: softmax(q k^T / sqrt(d) + alibi + mask) v."""
    if layer_past is not None or output_attentions or (self.pretraining_tp > 1 and self.slow_but_exact):
        return type(self).forward(self, hidden_states, residual, alibi, attention_mask, layer_past=layer_past,
                                  use_cache=use_cache, output_attentions=output_attentions, **kwargs)
    from transformers.models.bloom.modeling_bloom import dropout_add

    batch, q_len, _ = hidden_states.shape
    query, key, value = self._reshape(self.query_key_value(hidden_states))  # (batch, heads, len, head_dim)
    bias = _alibi_causal_bias(alibi, attention_mask, batch, self.num_heads, q_len, key.size(2), query.dtype)
    dropout = self.attention_dropout.p if self.training else 0.0
    context = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, dropout_p=dropout,
                                             scale=self.inv_norm_factor)
    context = context.transpose(1, 2).reshape(batch, q_len, self.hidden_size)
    output = dropout_add(self.dense(context), residual, self.hidden_dropout, self.training)
    return output, None


def _alibi_causal_bias(alibi: torch.Tensor, attention_mask: torch.Tensor | None, batch: int, heads: int,
                       q_len: int, kv_len: int, dtype: torch.dtype) -> torch.Tensor:
    """ALiBi + the additive mask as one (batch, heads, q, kv) tensor in ``dtype``.

    Every layer of a forward gets the same alibi and mask tensors, so the bias is made once and
    reused (and, under checkpointing, again by the recompute) while they are alive: one copy, not
    one per layer, and no per-layer passes over heads x q x kv values.
    """
    caching = not torch.compiler.is_compiling()  # inside a compiled layer the compiler fuses it instead
    if caching and attention_mask is not None and _bias_cache:
        alibi_ref, mask_ref, cached_dtype, bias = _bias_cache[0]
        if alibi_ref() is alibi and mask_ref() is attention_mask and cached_dtype == dtype:
            return bias
    given = attention_mask
    if attention_mask is None:
        attention_mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=alibi.device).tril()
    if attention_mask.dtype == torch.bool:  # True = may attend
        attention_mask = torch.zeros(attention_mask.shape, device=alibi.device).masked_fill(
            ~attention_mask, torch.finfo(torch.float32).min)
    # summed in fp32, clamped so a fully masked (padding) row stays finite in bf16, as in eager
    bias = alibi.view(batch, heads, 1, -1).float() + attention_mask.float()
    bias = bias.clamp_(min=torch.finfo(dtype).min).to(dtype)
    if not caching:
        return bias
    _bias_cache.clear()
    if given is not None:
        _bias_cache.append((weakref.ref(alibi), weakref.ref(given), dtype, bias))
        weakref.finalize(given, _drop_dead_bias)
    return bias


def _drop_dead_bias() -> None:
    """Free the cached bias once the tensors it was made from are gone (end of a step)."""
    if _bias_cache and (_bias_cache[0][0]() is None or _bias_cache[0][1]() is None):
        _bias_cache.clear()


# ------------------------------------------------------------------------------ LoRA dropout
_MASK_BITS = 31  # int32 random_() draws uniformly from [0, 2^31)
# Below this rate, drawing the gaps between dropped elements beats a draw per element (a 480 x 4096
# bf16 input on this CPU: 2.4 vs 8.0 ms at p = 0.05, 5.6 vs 9.2 at 0.1, 9.7 vs 8.6 at 0.2)
GAPS_MAX_P = 0.15


class CpuDropout(torch.nn.Dropout):
    """``nn.Dropout`` whose CPU draws cost less than ``bernoulli_``'s per element.

    At LoRA's usual rates (p <= 0.15) it draws only where the dropped elements are: the gaps
    between them, which for independent Bernoulli(p) drops are independent Geometric(p), so the
    drops are distributed exactly as ``nn.Dropout``'s (about p x n draws instead of n). Above
    that, the keep mask is ``random int32 < round((1 - p) * 2^31)``, kept with probability (1 - p)
    to within 2^-31 and scaled by the inverse of the probability used. Either way the output's
    expectation is the input. Off the CPU (CUDA's fused dropout is already fast) and in eval mode
    it is ``nn.Dropout``. Draws from torch's default CPU generator, so a seed reproduces it and
    activation checkpointing's saved RNG state replays the same drops in the recompute.
    """

    def __init__(self, p: float = 0.5, inplace: bool = False) -> None:
        super().__init__(p, inplace)
        # One per module, never read: a compiled graph would merge the mask draws of dropouts that
        # share an input (LoRA on q, k and v) into one, and this input keeps them apart.
        self.register_buffer("draw_key", torch.zeros(()), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or x.device.type != "cpu" or self.inplace:
            return super().forward(x)
        if self.p == 1.0:
            return torch.zeros_like(x)
        if torch.compiler.is_compiling():
            if _KEEP_MASK_OP is None:
                return super().forward(x)
            # one opaque op draws the keep mask; the compiler fuses the multiply around it
            return x * _KEEP_MASK_OP(x, self.draw_key, self.p).to(x.dtype) * keep_scale(self.p)
        if self.p <= GAPS_MAX_P:
            return _ZeroAt.apply(x, dropped_positions(x.numel(), self.p), 1.0 / (1.0 - self.p))
        # the mask in x's dtype, already scaled: backward is one multiply by it
        return x * keep_mask(x.shape, self.p).to(x.dtype).mul_(keep_scale(self.p))


def keep_scale(p: float) -> float:
    """What kept elements are multiplied by: the inverse of the keep probability each draw uses."""
    return 1.0 / (1.0 - p) if p <= GAPS_MAX_P else 2**_MASK_BITS / _int_threshold(p)


def _int_threshold(p: float) -> int:
    return max(1, round((1.0 - p) * 2**_MASK_BITS))


def keep_mask(shape: Sequence[int], p: float) -> torch.Tensor:
    """Bool mask, False (dropped) independently with probability ``p``, drawn as ``CpuDropout``
    draws (the gaps, or an integer mask) from torch's default CPU generator."""
    if p <= GAPS_MAX_P:
        mask = torch.ones(shape, dtype=torch.bool)
        mask.view(-1).index_fill_(0, dropped_positions(mask.numel(), p), False)
        return mask
    return torch.empty(shape, dtype=torch.int32).random_() < _int_threshold(p)


def _keep_mask_for(x: torch.Tensor, key: torch.Tensor, p: float) -> torch.Tensor:
    """The custom op's body: ``x`` gives the shape; ``key`` is not read, it tells one module's draw
    from another's on the same ``x``."""
    return keep_mask(x.shape, p)


def _register_keep_mask_op() -> Any:
    """``keep_mask`` as a custom op for compiled layers: opaque to the compiler (the gaps' count is
    data-dependent, which would break the graph) and tagged random, so activation checkpointing
    replays it from the saved generator state in the recompute instead of saving the mask.
    Registered at import: dynamo cannot trace a registration. torch's compile caches do not key
    on an op's tags: if they change, so must the op's name."""
    try:
        # the body looks _keep_mask_for up at each call, so a test can watch the draws
        op = torch.library.custom_op("lorafit::dropout_keep_mask", lambda x, key, p: _keep_mask_for(x, key, p),
                                     mutates_args=(), device_types="cpu", schema="(Tensor x, Tensor key, float p) -> Tensor",
                                     tags=(torch.Tag.nondeterministic_seeded,))
    except (TypeError, AttributeError):  # a torch without tagged custom ops: compiled layers use nn.Dropout
        return None
    op.register_fake(lambda x, key, p: torch.empty(x.shape, dtype=torch.bool, device=x.device))
    return op


_KEEP_MASK_OP = _register_keep_mask_op()


class _ZeroAt(torch.autograd.Function):
    """``x * scale`` with the flat ``positions`` zeroed, and the same for its gradient: one pass
    each way, saving only the positions (p x n int64 where a mask would be n elements; autograd's
    own in-place fill would clone the gradient first)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, positions: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(positions)
        ctx.scale = scale
        return _scaled_with_zeros(x, positions, scale)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (positions,) = ctx.saved_tensors
        return _scaled_with_zeros(grad, positions, ctx.scale), None, None


def _scaled_with_zeros(x: torch.Tensor, positions: torch.Tensor, scale: float) -> torch.Tensor:
    out = (x * scale).contiguous()  # a new tensor: filling it in place touches nothing else
    out.view(-1).index_fill_(0, positions, 0)
    return out


def dropped_positions(n: int, p: float, first_draws: int | None = None) -> torch.Tensor:
    """Flat indices below ``n``, each present independently with probability ``p``: the running
    sums of Geometric(p) gaps. ``first_draws`` (default: the mean count plus six standard
    deviations) is how many gaps to draw before checking whether they reached ``n``."""
    mean = n * p
    batch = first_draws or int(mean + 6 * math.sqrt(mean * (1 - p)) + 16)
    # float64 holds every running sum exactly (below 2^53)
    ends = torch.empty(batch, dtype=torch.float64).geometric_(p).cumsum_(0)
    while ends[-1].item() < n:
        more = torch.empty(batch, dtype=torch.float64).geometric_(p).cumsum_(0).add_(ends[-1])
        ends = torch.cat([ends, more])
    kept = int(torch.searchsorted(ends, float(n), right=True))  # ends rise: a view, not a boolean index
    return ends[:kept].long().sub_(1)


def apply_adapter_fused_ops(model: torch.nn.Module, allowed: Sequence[str]) -> list[str]:
    """Swaps that concern the adapter's own modules (after ``get_peft_model``): peft's LoRA dropout
    (exactly ``nn.Dropout`` in a layer's ``lora_dropout`` ModuleDict) -> ``CpuDropout``."""
    if "lora_dropout_int_mask" not in allowed:
        return []
    swapped = 0
    for module in model.modules():
        table = getattr(module, "lora_dropout", None)
        if not isinstance(table, torch.nn.ModuleDict):
            continue
        for name, dropout in list(table.items()):
            if type(dropout) is torch.nn.Dropout and not dropout.inplace:
                table[name] = CpuDropout(dropout.p)
                swapped += 1
    return [f"{swapped} LoRA dropouts -> lorafit's CPU dropout (draws the drops, not every element)"] if swapped else []
