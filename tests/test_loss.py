"""The chunked loss equals the plain path (loss and LoRA gradients) and holds far less for backward."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, BloomConfig, Gemma2Config, LlamaConfig

from lorafit.config import validate_config
from lorafit.loss import IGNORE_INDEX, _LinearCrossEntropy, compute_loss
from lorafit.probe import backbone_and_head
from lorafit.resolved import resolve

REL = 1e-5


def _llama(vocab: int = 300, tie: bool = False) -> torch.nn.Module:
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tie)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def _bloom(vocab: int = 300) -> torch.nn.Module:
    cfg = BloomConfig(vocab_size=vocab, hidden_size=32, n_layer=2, n_head=4)  # lm_head tied to embeddings
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def _lora(model: torch.nn.Module, targets: list[str]) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM",
                        init_lora_weights=False)  # random B: every LoRA weight gets a non-zero gradient
    return get_peft_model(model, config)


def _batch(vocab: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """Two rows: right padding, a masked prompt, and a packed row (second sample's first label masked)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 24), generator=g)
    attention = torch.ones_like(ids)
    attention[0, 17:] = 0
    labels = ids.clone()
    labels[0, :6] = IGNORE_INDEX  # prompt
    labels[0, 17:] = IGNORE_INDEX  # padding
    labels[1, 0] = IGNORE_INDEX
    labels[1, 10] = IGNORE_INDEX  # first label of the second packed sample
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


def _loss_and_grads(model: torch.nn.Module, batch: dict, **kw) -> tuple[float, int, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss, n = compute_loss(model, batch, **kw)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return loss.item(), n, grads


def _assert_same(model: torch.nn.Module, batch: dict, chunk: int = 5) -> None:
    assert backbone_and_head(model) is not None  # the chunked path really runs, no silent fallback
    full, n_full, g_full = _loss_and_grads(model, batch, mode="full")
    chunked, n_chunked, g_chunked = _loss_and_grads(model, batch, mode="chunked", chunk_tokens=chunk)
    assert n_full == n_chunked == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert abs(chunked - full) / abs(full) < REL
    assert g_full and g_full.keys() == g_chunked.keys()
    for name, grad in g_full.items():
        assert grad.abs().sum() > 0, name
        rel = (g_chunked[name] - grad).norm() / grad.norm()
        assert rel < REL, (name, float(rel))


@pytest.mark.parametrize("build,targets", [
    (_llama, ["q_proj", "k_proj", "v_proj", "o_proj"]),
    (lambda: _llama(tie=True), ["q_proj", "v_proj"]),
    (_bloom, ["query_key_value"]),
])
def test_chunked_matches_full_with_lora(build, targets):
    torch.manual_seed(0)
    model = _lora(build(), targets)
    _assert_same(model, _batch(300))


def test_chunked_matches_full_with_gradient_checkpointing():
    torch.manual_seed(0)
    base = _bloom()
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.enable_input_require_grads()
    _assert_same(_lora(base, ["query_key_value"]), _batch(300))


def test_lora_on_lm_head_uses_checkpointed_slices_and_matches():
    torch.manual_seed(0)
    model = _lora(_llama(), ["q_proj", "lm_head"])
    _assert_same(model, _batch(300), chunk=7)
    assert any("lm_head" in name for name, p in model.named_parameters() if p.requires_grad)


def test_trainable_tied_head_gets_same_gradient():
    torch.manual_seed(0)
    model = _llama(tie=True)  # every weight trains, the tied embedding/head included
    _assert_same(model, _batch(300), chunk=9)


def test_fused_head_with_bias_matches_plain():
    torch.manual_seed(0)
    hidden = torch.randn(13, 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=True)
    bias = torch.randn(50, requires_grad=True)
    targets = torch.randint(0, 50, (13,))
    plain = torch.nn.functional.cross_entropy(hidden @ weight.t() + bias, targets, reduction="sum")
    expected = torch.autograd.grad(plain, (hidden, weight, bias))
    fused = _LinearCrossEntropy.apply(hidden, weight, bias, targets, 4)
    got = torch.autograd.grad(fused * 2.0, (hidden, weight, bias))
    assert abs(fused.item() - plain.item()) / plain.item() < REL
    for e, g in zip(expected, got, strict=True):
        assert ((g - 2.0 * e).norm() / e.norm()) < REL


def test_all_labels_masked_gives_zero_and_no_error():
    model = _lora(_llama(), ["q_proj"])
    batch = _batch(300)
    batch["labels"][:] = IGNORE_INDEX
    loss, n = compute_loss(model, batch, mode="chunked", chunk_tokens=4)
    loss.backward()
    assert n == 0 and loss.item() == 0.0


def test_softcapped_model_is_resolved_to_the_full_loss(tmp_path):
    """gemma2 soft-caps its logits: the run resolves to the plain loss, and says so."""
    cfg = Gemma2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, final_logit_softcapping=5.0)
    cfg.save_pretrained(tmp_path)
    run = resolve(validate_config({"model": {"name_or_path": str(tmp_path)}}))
    assert run.loss == "full" and not run.head_is_plain
    assert any(note.startswith("train.loss: chunked not used") for note in run.notes)
    cfg.final_logit_softcapping = None
    cfg.save_pretrained(tmp_path)
    assert resolve(validate_config({"model": {"name_or_path": str(tmp_path)}})).loss == "chunked"


def _saved_bytes(model: torch.nn.Module, batch: dict, **kw) -> int:
    """Bytes of all tensors autograd keeps for backward during one loss computation."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = compute_loss(model, batch, **kw)
    loss.backward()
    return total


def test_chunked_keeps_far_less_for_backward_on_large_vocab():
    torch.manual_seed(0)
    vocab = 32_000
    model = _lora(_llama(vocab=vocab), ["q_proj", "v_proj"])
    batch = _batch(vocab)
    full = _saved_bytes(model, batch, mode="full")
    chunked = _saved_bytes(model, batch, mode="chunked", chunk_tokens=8)
    logits_fp32 = batch["input_ids"].numel() * vocab * 4
    assert full > logits_fp32  # the plain path keeps at least one full fp32 logits tensor
    assert chunked < logits_fp32 / 10
    assert chunked < full / 5


def test_chunked_peak_allocation_is_lower_on_large_vocab():
    """Largest single allocation seen by the profiler's allocator events: a slice, not all logits."""
    torch.manual_seed(0)
    vocab = 32_000
    model = _lora(_llama(vocab=vocab), ["q_proj"])
    batch = _batch(vocab)

    def largest(**kw) -> int:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            loss, _ = compute_loss(model, batch, **kw)
            loss.backward()
        return max(e.cpu_memory_usage for e in prof.events())

    full, chunked = largest(mode="full"), largest(mode="chunked", chunk_tokens=8)
    one_logits_fp32 = batch["input_ids"].numel() * vocab * 4
    assert full >= one_logits_fp32 * 0.9
    assert chunked <= 8 * vocab * 4 * 2


def test_slices_are_capped_for_huge_vocabularies():
    from lorafit.loss import SLICE_BYTES, slice_tokens

    assert slice_tokens(256, 32_000) == 256  # under the cap: chunk_tokens as asked
    assert slice_tokens(1024, 250_880) * 250_880 * 4 <= SLICE_BYTES
    assert slice_tokens(1024, 250_880) >= 64  # still a GEMM-sized slice
    assert slice_tokens(3, 250_880) == 3
    assert slice_tokens(1024, 250_880) == 64 and slice_tokens(100, 32_000) == 96  # whole 16-row tiles


def test_bf16_slice_matches_upcast_logits_and_never_holds_fp32_slice(monkeypatch):
    """Under bf16 autocast the slice's logits stay bf16 and the fp32 softmax runs a few rows at a
    time: same loss and hidden-state gradient as the plain path's upcast bf16 logits, and no
    allocation as large as the slice in fp32."""
    import lorafit.loss as loss_module

    torch.manual_seed(0)
    vocab, rows, hidden = 32_000, 16, 32  # rows: a multiple of SLICE_ROW_MULTIPLE (no padding rows)
    monkeypatch.setattr(loss_module, "BLOCK_BYTES", 2 * vocab * 4)  # 2 rows per fp32 block
    h = (torch.randn(rows, hidden) * 0.5).to(torch.bfloat16).requires_grad_(True)
    w = (torch.randn(vocab, hidden) * 0.2).to(torch.bfloat16)
    t = torch.randint(0, vocab, (rows,))

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            chunked = _LinearCrossEntropy.apply(h, w, None, t, rows)
        chunked.backward()
    largest = max(e.cpu_memory_usage for e in prof.events())
    assert largest < rows * vocab * 4  # the whole slice in fp32 was never allocated

    h_ref = h.detach().clone().requires_grad_(True)
    reference = torch.nn.functional.cross_entropy((h_ref @ w.t()).float(), t, reduction="sum")
    reference.backward()
    assert abs(chunked.item() - reference.item()) / reference.item() < 1e-5
    rel = (h.grad.float() - h_ref.grad.float()).norm() / h_ref.grad.float().norm()
    assert rel < 1e-2  # bf16 gradients: rounding differs in where the cast happens


def test_slices_meet_a_few_shapes_whatever_the_label_count(monkeypatch):
    """A slice's rows are padded to a multiple of SLICE_ROW_MULTIPLE: the CPU's matmul library keeps
    compiled kernels per shape, so a run meets a handful of head-matmul shapes, not one per label
    count (the padding's exactness: test_fused_head_with_bias_matches_plain, 13 rows in slices of 4)."""
    import types

    import lorafit.loss as loss_module

    rows_seen: set[int] = set()

    def recording_linear(x, *args, **kwargs):
        rows_seen.add(x.shape[0])
        return torch.nn.functional.linear(x, *args, **kwargs)

    monkeypatch.setattr(loss_module, "F", types.SimpleNamespace(linear=recording_linear,
                                                                cross_entropy=torch.nn.functional.cross_entropy))
    torch.manual_seed(0)
    hidden = torch.randn(70, 8, requires_grad=True)
    weight = torch.randn(50, 8)
    targets = torch.randint(0, 50, (70,))
    for n in range(1, 71):
        loss = _LinearCrossEntropy.apply(hidden[:n], weight, None, targets[:n], 32)
        loss.backward()
    assert rows_seen == {16, 32}
