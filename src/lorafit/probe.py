"""What an architecture does, learned by running it: a tiny random copy built from its config.

Two questions decide how a run is set up, and neither can be read off a config reliably:

- Does the model keep packed samples apart? transformers builds a block-diagonal causal mask
  from restarting ``position_ids`` for most architectures and attention backends, not for all
  (BLOOM's ALiBi ignores position ids). Packing a model that does not would silently train on
  attention across samples.
- Are its logits exactly ``lm_head(backbone hidden states)``? lorafit's chunked loss applies the
  head itself, slice by slice; a model that soft-caps, scales or otherwise post-processes its
  logits needs the plain loss.

Both are answered behaviourally, on a copy of the architecture with 2 layers and hidden size 64
(random weights, fp32, CPU, a few milliseconds): the same modeling code and attention backend
as the real run, so no source reading and no version list. A model whose config cannot be
shrunk or built answers ``None`` ("not verified"), and the run takes the safe path.
"""

from __future__ import annotations

import contextlib
import copy
import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from lorafit.errors import first_line

HIDDEN, HEADS, HEAD_DIM, INTERMEDIATE, LAYERS, EXPERTS = 64, 4, 16, 128, 2, 4
_HIDDEN_NAMED = ("dim", "size", "embd", "hidden")  # attributes that track the hidden size
_NOT_HIDDEN = ("max_position", "vocab", "window", "intermediate", "chunk")


@dataclass(frozen=True)
class ArchitectureFacts:
    """Answers about one architecture + attention backend (None: could not be verified)."""

    keeps_packed_samples_apart: bool | None
    logits_are_plain_head: bool | None
    note: str | None = None  # why a question stayed unanswered
    build_error: str | None = None  # why the small copy could not be built (the library's reason)


def architecture_facts(model_config: Any, attn_implementation: str | None = None,
                       trust_remote_code: bool = False) -> ArchitectureFacts:
    """Probe ``model_config``'s architecture (see the module docstring); cached per config."""
    key = json.dumps(model_config.to_dict(), sort_keys=True, default=str)
    return _probe(key, type(model_config), attn_implementation, trust_remote_code)


@lru_cache(maxsize=16)
def _probe(config_json: str, config_class: type, attn_implementation: str | None,
           trust_remote_code: bool) -> ArchitectureFacts:
    import torch

    try:
        model = _tiny_model(config_class.from_dict(json.loads(config_json)), attn_implementation,
                            trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - any failure means "not verified", never a crash
        return ArchitectureFacts(None, None, f"a small copy could not be built ({first_line(exc)[:160]})",
                                 build_error=first_line(exc))
    vocab = int(model.get_input_embeddings().num_embeddings)
    generator = torch.Generator().manual_seed(0)
    first = torch.randint(3, vocab, (1, 11), generator=generator)
    second = torch.randint(3, vocab, (1, 7), generator=generator)
    both = torch.cat([first, second], 1)
    positions = torch.cat([torch.arange(11), torch.arange(7)])[None]
    try:
        with torch.no_grad():
            alone = model(input_ids=second, use_cache=False).logits
            packed = model(input_ids=both, position_ids=positions, use_cache=False).logits[:, 11:]
            leaky = model(input_ids=both, use_cache=False).logits[:, 11:]
            plain = _plain_head_logits(model, both)
            full = model(input_ids=both, use_cache=False).logits
    except Exception as exc:  # noqa: BLE001
        return ArchitectureFacts(None, None, f"a small copy could not run ({first_line(exc)[:160]})")
    scale = alone.abs().max().clamp(min=1.0)
    error = ((packed - alone).abs().max() / scale).item()
    leak = ((leaky - alone).abs().max() / scale).item()
    apart = error <= 1e-5 or error <= 0.02 * leak
    head = plain is not None and ((plain - full).abs().max() / full.abs().max().clamp(min=1.0)).item() <= 1e-5
    note = None if plain is not None else "no backbone / lm_head pair found"
    return ArchitectureFacts(apart, head, note)


def backbone_of(causal_lm: Any) -> Any | None:
    """The transformer under a causal LM's head (through a peft wrapper): the module named by
    ``base_model_prefix``, else ``get_decoder()``; None when the model names neither."""
    import torch

    getter = getattr(causal_lm, "get_base_model", None)
    if callable(getter) and getattr(causal_lm, "peft_config", None) is not None:
        causal_lm = getter()
    prefix = getattr(causal_lm, "base_model_prefix", "")
    backbone = getattr(causal_lm, prefix, None) if prefix else None
    if not isinstance(backbone, torch.nn.Module) or backbone is causal_lm:
        decoder = getattr(causal_lm, "get_decoder", None)
        backbone = decoder() if callable(decoder) else None
    return backbone if isinstance(backbone, torch.nn.Module) else None


def backbone_and_head(causal_lm: Any) -> tuple[Any, Any] | None:
    """The (backbone, lm_head) modules of a causal LM (through a peft wrapper), or None."""
    import torch

    backbone = backbone_of(causal_lm)
    getter = getattr(causal_lm, "get_base_model", None)
    if callable(getter) and getattr(causal_lm, "peft_config", None) is not None:
        causal_lm = getter()
    head = causal_lm.get_output_embeddings() if hasattr(causal_lm, "get_output_embeddings") else None
    if backbone is not None and isinstance(head, torch.nn.Module):
        return backbone, head
    return None


def _plain_head_logits(model: Any, input_ids: Any) -> Any:
    parts = backbone_and_head(model)
    if parts is None:
        return None
    backbone, head = parts
    out = backbone(input_ids=input_ids, use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return head(hidden)


def _tiny_model(config: Any, attn_implementation: str | None, trust_remote_code: bool) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    shrink_config(config)
    kwargs: dict[str, Any] = {"dtype": torch.float32, "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, **kwargs)
    return model.eval()


def shrink_config(config: Any) -> Any:
    """Shrink ``config`` in place to the probe's size; the architecture's switches stay as they are."""
    text = config.get_text_config() if callable(getattr(config, "get_text_config", None)) else config
    hidden = getattr(text, "hidden_size", None)
    intermediate = getattr(text, "intermediate_size", None)
    heads = getattr(text, "num_attention_heads", None) or HEADS
    kv_heads = getattr(text, "num_key_value_heads", None)
    updates: dict[str, Any] = {"num_hidden_layers": LAYERS, "hidden_size": HIDDEN, "num_attention_heads": HEADS}
    if isinstance(kv_heads, int):
        updates["num_key_value_heads"] = HEADS if kv_heads >= heads else HEADS // 2
    if isinstance(getattr(text, "num_kv_heads", None), int):  # falcon
        updates["num_kv_heads"] = HEADS if text.num_kv_heads >= heads else HEADS // 2
    if getattr(text, "head_dim", None) is not None:
        updates["head_dim"] = HEAD_DIM
    for name in ("intermediate_size", "ffn_dim", "moe_intermediate_size", "shared_expert_intermediate_size"):
        if isinstance(getattr(text, name, None), int):
            updates[name] = INTERMEDIATE
    for name in ("num_local_experts", "num_experts"):
        if isinstance(getattr(text, name, None), int) and getattr(text, name) > EXPERTS:
            updates[name] = EXPERTS
    if isinstance(getattr(text, "num_experts_per_tok", None), int):
        updates["num_experts_per_tok"] = min(text.num_experts_per_tok, 2)
    for name, value in vars(text).items():  # e.g. OPT's word_embed_proj_dim tracks hidden_size
        if name in updates or not isinstance(value, int) or isinstance(value, bool):
            continue
        lowered = name.lower()
        if any(w in lowered for w in _HIDDEN_NAMED) and not any(w in lowered for w in _NOT_HIDDEN):
            if value == hidden:
                updates[name] = HIDDEN
            elif value == intermediate:
                updates[name] = INTERMEDIATE
    layer_types = getattr(text, "layer_types", None)
    if isinstance(layer_types, list):
        updates["layer_types"] = copy.copy(layer_types[:LAYERS])
    ids = [getattr(text, n, None) for n in ("pad_token_id", "bos_token_id", "eos_token_id")]
    flat = [i for v in ids for i in (v if isinstance(v, list) else [v]) if isinstance(i, int)]
    updates["vocab_size"] = max(512, max(flat, default=0) + 1)
    for name, value in updates.items():
        with contextlib.suppress(AttributeError):  # a derived property (falcon's head_dim) follows the rest
            setattr(text, name, value)
    return config
