"""Fused stand-ins compute what the models' own code computes, and the training path uses them."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, BloomConfig, GPT2Config

from lorafit.config import validate_config
from lorafit.fused import apply_fused_ops
from lorafit.modeling import attach_adapter
from lorafit.resolved import resolve

REL = 1e-5
ALL = ("tanh_gelu_swap", "bloom_sdpa_attention")


def _bloom() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = BloomConfig(vocab_size=128, hidden_size=64, n_layer=2, n_head=4)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def _run_for(model: torch.nn.Module, folder, **settings: dict):
    """The resolved run of a config naming ``model``'s architecture (only its config.json is read)."""
    model.config.save_pretrained(folder)
    return resolve(validate_config({"model": {"name_or_path": str(folder)}, **settings}))


def _batch(vocab: int = 128) -> dict[str, torch.Tensor]:
    """Two rows, the second right-padded (its padded queries still get a loss: worst case)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.clone()}


def _forward_backward(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(plain: torch.nn.Module, fused: torch.nn.Module, batch: dict) -> None:
    logits_a, grads_a = _forward_backward(plain, batch)
    logits_b, grads_b = _forward_backward(fused, batch)
    keep = batch["attention_mask"].bool()
    assert (logits_a[keep] - logits_b[keep]).abs().max() < REL * logits_a.abs().max()
    assert grads_a and grads_a.keys() == grads_b.keys()
    for name, grad in grads_a.items():
        assert (grads_b[name] - grad).norm() <= REL * grad.norm() + 1e-12, name


def test_bloom_gelu_and_attention_are_swapped_and_match_eager():
    plain = _bloom()
    fused = copy.deepcopy(plain)
    done = apply_fused_ops(fused, ALL)
    assert done == ["2 tanh-GELUs -> fused GELU", "2 BLOOM attentions -> scaled_dot_product_attention with ALiBi"]
    assert all(type(block.mlp.gelu_impl) is torch.nn.GELU for block in fused.transformer.h)
    _assert_same(plain, fused, _batch())
    assert apply_fused_ops(fused, ALL) == []  # idempotent: nothing left to swap


def test_gpt2_python_gelu_is_swapped_and_matches():
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # no dropout: deterministic
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    fused = copy.deepcopy(plain)
    assert apply_fused_ops(fused, ALL) == ["2 tanh-GELUs -> fused GELU"]
    _assert_same(plain, fused, _batch())


def test_bloom_generation_with_kv_cache_is_unchanged():
    """Decoding with a cache goes through BLOOM's own attention: same tokens as the plain model."""
    plain = _bloom().eval()
    fused = copy.deepcopy(plain)
    apply_fused_ops(fused, ALL)
    prompt = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(3))
    kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(plain.generate(prompt, **kwargs), fused.generate(prompt, **kwargs))


@pytest.mark.parametrize("fused_ops", [True, False])
def test_attach_adapter_applies_fused_ops_per_config(fused_ops, tmp_path):
    run = _run_for(_bloom(), tmp_path, train={"fused_ops": fused_ops})
    assert set(run.fused) == (set(ALL) | {"lora_dropout_int_mask"} if fused_ops else set())
    model, done = attach_adapter(_bloom(), run)
    gelus = [m for m in model.modules() if type(m).__name__ in ("BloomGelu", "GELU")]
    assert {type(m).__name__ for m in gelus} == ({"GELU"} if fused_ops else {"BloomGelu"})
    assert bool(done) is fused_ops


@pytest.fixture
def fresh_probes():
    """lorafit.compat runs each probe once per process: forget the answers around a test."""
    from lorafit import compat

    compat.check.cache_clear()
    yield
    compat.check.cache_clear()


def test_a_transformers_release_that_behaves_differently_takes_the_library_path(tmp_path, monkeypatch,
                                                                                 fresh_probes):
    """A release whose BLOOM attention computes something lorafit's rewrite does not (here: its
    output halved), and whose BloomGelu computes the exact (erf) GELU: the probes see it, BLOOM's
    own attention and GELU run, and the run's description and run.json say why."""
    from transformers.models.bloom import modeling_bloom

    own = modeling_bloom.BloomAttention.forward

    def changed(self, *args, **kwargs):
        output, *rest = own(self, *args, **kwargs)
        return (output * 0.5, *rest)

    monkeypatch.setattr(modeling_bloom.BloomAttention, "forward", changed)
    monkeypatch.setattr(modeling_bloom.BloomGelu, "forward", lambda self, x: torch.nn.functional.gelu(x))
    run = _run_for(_bloom(), tmp_path)
    assert run.fused == ("lora_dropout_int_mask",)  # lorafit's own module: reads no transformers internal
    assert any("bloom_sdpa_attention off" in note and "computes something else" in note
               and "the library's own code runs" in note for note in run.notes), run.notes
    assert any("tanh_gelu_swap off" in note and "BloomGelu no longer computes" in note for note in run.notes)
    assert run.to_json()["library_checks"]["tanh_gelu_swap"].startswith("transformers ")
    model, done = attach_adapter(_bloom(), run)
    assert [line for line in done if "LoRA dropouts" not in line] == []
    assert not any(type(m).__name__ == "GELU" for m in model.modules())
    loss = model(**_batch()).loss
    loss.backward()
    assert torch.isfinite(loss)


def test_probes_pass_on_the_installed_libraries(tmp_path, fresh_probes):
    run = _run_for(_bloom(), tmp_path)
    assert set(run.fused) == set(ALL) | {"lora_dropout_int_mask"}
    assert all(note.endswith("probe passed") for note in run.library_checks.values()), run.library_checks


def test_lora_runs_in_autocast_dtype_with_fp32_master_weights(tmp_path):
    """bf16 autocast + gradient checkpointing, with peft's input cast switched off for the whole
    step (forward and backward): LoRA's input stays bf16 (no upcast copy), also in the recompute,
    and the adapter's weights and gradients stay fp32."""
    from peft.helpers import disable_input_dtype_casting

    run = _run_for(_bloom(), tmp_path, lora={"dropout": 0.1}, train={"precision": "bf16"})
    assert run.lora_in_compute_dtype
    model, _ = attach_adapter(_bloom().to(torch.bfloat16), run)
    seen: list[torch.dtype] = []
    for name, module in model.named_modules():
        if name.endswith("lora_A.default"):
            module.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    model.train()
    with disable_input_dtype_casting(model):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**_batch()).loss
        loss.backward()  # recomputes the checkpointed layers outside the autocast block above
    assert len(seen) == 2 * 2 and set(seen) == {torch.bfloat16}  # forward + recompute, 2 layers
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 and p.grad is not None for p in trained)
    assert all(p.grad.dtype == torch.float32 for p in trained)
    assert any(p.grad.abs().sum() > 0 for p in trained)
    # and outside the step peft's cast is back: a plain forward works (the reported bf16 crash)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=_batch()["input_ids"]).logits).all()


def test_bloom_bias_is_made_once_per_forward_and_freed_after(monkeypatch):
    """All layers (and the checkpoint recompute) share one ALiBi + mask bias; none outlives the step."""
    import gc

    from lorafit import fused

    model = _bloom()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    apply_fused_ops(model, ALL)
    made = []
    original = fused._alibi_causal_bias

    def counting(*args, **kwargs):
        bias = original(*args, **kwargs)
        made.append(id(bias))
        return bias

    monkeypatch.setattr(fused, "_alibi_causal_bias", counting)
    _forward_backward(model, _batch())
    assert len(made) == 2 * 2  # 2 layers, forward + recompute
    assert len(set(made)) == 1  # one tensor for all of them
    gc.collect()
    assert fused._bias_cache == []


# ---------------------------------------------------------------------------------- LoRA dropout
@pytest.mark.parametrize("p", [0.05, 0.5])  # the drops' gaps drawn; an integer mask
def test_cpu_dropout_keeps_the_probability_and_the_expectation(p):
    from lorafit.fused import CpuDropout

    x = torch.ones(400, 1000, dtype=torch.bfloat16)
    torch.manual_seed(3)
    layer = CpuDropout(p).train()
    y = layer(x)
    kept = y != 0
    # 400k draws: sd of the mean 3.4e-4 (p = 0.05) and 7.9e-4 (p = 0.5)
    assert abs(kept.float().mean().item() - (1 - p)) < 4e-3
    assert torch.allclose(y[kept].float(), torch.full((int(kept.sum()),), 1 / (1 - p)), rtol=1e-2)
    # no place favoured: each tenth of the flat tensor drops its share
    tenths = (~kept).flatten().float().view(10, -1).mean(dim=1)
    assert ((tenths - p).abs() < 10 * (p * (1 - p) / 40_000) ** 0.5).all(), tenths
    torch.manual_seed(3)
    assert torch.equal(layer(x), y)  # a seed reproduces the mask (the recompute relies on it)
    assert torch.equal(layer.eval()(x), x)
    grad = torch.randn(8, 8)
    z = torch.ones(8, 8, requires_grad=True)
    out = CpuDropout(p).train()(z)
    out.backward(grad)
    assert torch.equal(z.grad, grad * out.detach())  # d(x * mask)/dx = mask, the scaled keep mask
    strided = torch.arange(1.0, 25.0).view(6, 4).t()  # a transposed input: same drops, its own values
    torch.manual_seed(5)
    dropped = CpuDropout(p).train()(strided)
    torch.manual_seed(5)
    assert torch.equal(dropped, CpuDropout(p).train()(strided.contiguous()))


def test_cpu_dropout_draws_gaps_at_low_rates_and_a_mask_above(monkeypatch):
    import lorafit.fused as fused

    calls = []
    drawn = fused.dropped_positions
    monkeypatch.setattr(fused, "dropped_positions", lambda *a, **k: calls.append(a) or drawn(*a, **k))
    x = torch.ones(64, 64)
    fused.CpuDropout(0.05).train()(x)
    assert calls == [(4096, 0.05)]
    fused.CpuDropout(0.3).train()(x)
    assert len(calls) == 1


def test_dropped_positions_keeps_drawing_until_the_gaps_reach_the_end():
    from lorafit.fused import dropped_positions

    torch.manual_seed(0)
    positions = dropped_positions(100_000, 0.05, first_draws=1)  # one gap at a time
    assert positions.dtype == torch.int64 and positions.numel() > 4000
    assert bool((positions[1:] > positions[:-1]).all()) and positions[0] >= 0 and positions[-1] < 100_000
    assert abs(positions.numel() / 100_000 - 0.05) < 0.004
    torch.manual_seed(0)
    assert dropped_positions(100_000, 0.05).numel() > 4000
    # every position of a short tensor, the first and the last too, drops at the rate p
    counts = torch.zeros(3)
    for _ in range(4000):
        counts[dropped_positions(3, 0.1)] += 1
    assert ((counts / 4000 - 0.1).abs() < 0.025).all(), counts  # sd of each rate 0.005


@pytest.mark.parametrize("p", [0.05, 0.3])  # the drops' gaps drawn; an integer mask
def test_lora_dropout_swap_is_used_and_replayed_under_checkpointing(tmp_path, p):
    """On the CPU with dropout > 0 the run swaps peft's LoRA dropouts; activation checkpointing's
    recompute draws the same masks as the forward, so gradients equal an uncheckpointed step's."""
    from peft.tuners.lora import LoraLayer
    from transformers import LlamaConfig

    from lorafit.fused import CpuDropout

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2), dtype=torch.float32)
    grads = {}
    for checkpointing in (False, True):
        run = _run_for(copy.deepcopy(base), tmp_path / str(checkpointing), lora={"dropout": p},
                       train={"gradient_checkpointing": checkpointing})
        assert "lora_dropout_int_mask" in run.fused
        model, swapped = attach_adapter(copy.deepcopy(base), run)
        assert any("LoRA dropouts" in line for line in swapped)
        layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        assert layers and all(isinstance(m.lora_dropout["default"], CpuDropout) for m in layers)
        for param in model.parameters():  # a non-zero B: the dropout mask reaches the gradients of A
            if param.requires_grad:
                torch.nn.init.normal_(param, std=0.5)
        torch.manual_seed(7)
        _, grads[checkpointing] = _forward_backward(model, _batch())
    assert grads[False].keys() == grads[True].keys() and grads[False]
    for name, grad in grads[False].items():
        assert torch.equal(grads[True][name], grad), name
