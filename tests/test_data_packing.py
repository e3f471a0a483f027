"""Packed rows never let a token attend to or predict across a sample boundary: the per-sample
loss of a packed batch equals that of each sample run alone (fp32, tiny real Llama), and models
whose attention cannot honour packing (BLOOM) fall back to padding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers_data import data_config, dialogues, load_tokenizer, write_jsonl

from lorafit.data import prepare_data
from lorafit.data.packing import split_packed
from lorafit.loss import compute_loss
from lorafit.probe import architecture_facts
from lorafit.resolved import resolve


def _model(path: Path, attn: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation=attn)
    model.config.use_cache = False  # as lorafit's loader does: a KV cache disables packed masking
    return model.eval()


def _token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-position loss (position t predicts label t+1); 0 where the label is -100."""
    return F.cross_entropy(logits[:-1].float(), labels[1:], ignore_index=-100, reduction="none")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_batch_loss_equals_samples_alone(attn: str, tiny_llama: Path, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", dialogues(16))
    tokenizer = load_tokenizer(tiny_llama)
    prepared = prepare_data(resolve(data_config(tiny_llama, path, packing="packed", eval_fraction=0.0, seq_len=512)),
                            tokenizer)
    rows = sorted(prepared.train, key=lambda r: len(split_packed(r)), reverse=True)[:2]
    assert len(split_packed(rows[0])) >= 2  # a real multi-sample row
    batch = prepared.collate(rows)  # two rows of different length: padding too
    model = _model(tiny_llama, attn)
    with torch.no_grad():
        packed_logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        checked = 0
        for b, row in enumerate(rows):
            for start, end in split_packed(row):
                ids = torch.tensor([row["input_ids"][start:end]])
                labels = torch.tensor(row["labels"][start:end])
                alone = _token_losses(model(input_ids=ids).logits[0], labels)
                packed = _token_losses(packed_logits[b, start:end], batch["labels"][b, start:end])
                assert (alone - packed).abs().max().item() < 1e-5
                assert abs(alone.sum().item() - packed.sum().item()) < 1e-5 * max(1.0, alone.sum().item())
                checked += 1
        # the same through lorafit's training loss (chunked and full): sum over samples alone
        total_alone = sum(
            _token_losses(model(input_ids=torch.tensor([r["input_ids"][s:e]])).logits[0],
                          torch.tensor(r["labels"][s:e])).sum().item()
            for r in rows for s, e in split_packed(r))
        for mode in ("full", "chunked"):
            loss_sum, n_tokens = compute_loss(model, batch, mode=mode)
            assert abs(loss_sum.item() - total_alone) < 1e-5 * total_alone
            assert n_tokens == int((batch["labels"][:, 1:] != -100).sum())
    assert checked >= 3


def test_without_position_ids_samples_would_leak(tiny_llama: Path, tmp_path: Path) -> None:
    """The check above can fail: plain causal attention over a packed row changes the loss."""
    path = write_jsonl(tmp_path / "d.jsonl", dialogues(16))
    prepared = prepare_data(resolve(data_config(tiny_llama, path, packing="packed", eval_fraction=0.0, seq_len=512)),
                            load_tokenizer(tiny_llama))
    row = max(prepared.train, key=lambda r: len(split_packed(r)))
    start, end = split_packed(row)[1]
    model = _model(tiny_llama, "sdpa")
    with torch.no_grad():
        leaky = model(input_ids=torch.tensor([row["input_ids"]])).logits[0, start:end]
        alone = model(input_ids=torch.tensor([row["input_ids"][start:end]])).logits[0]
    assert (leaky - alone).abs().max().item() > 1e-3


def test_packing_follows_what_the_architecture_does(tiny_llama: Path, tiny_bloom: Path, tmp_path: Path) -> None:
    """Decided before tokenizing, by running a small copy of the architecture (lorafit.probe)."""
    path = write_jsonl(tmp_path / "d.jsonl", dialogues(12))
    llama_run = resolve(data_config(tiny_llama, path, packing="packed"))
    assert llama_run.packing == "packed" and not llama_run.notes
    llama = prepare_data(llama_run, load_tokenizer(tiny_llama))
    assert llama.packing == "packed"
    bloom = prepare_data(resolve(data_config(tiny_bloom, path, packing="packed")), load_tokenizer(tiny_bloom))
    assert bloom.packing == "none"
    assert "packed not supported" in bloom.summary and "bloom" in bloom.summary
    assert set(bloom.collate(bloom.train[:2])) == {"input_ids", "labels", "attention_mask"}


@pytest.mark.parametrize(("model_type", "apart", "plain"), [
    ("llama", True, True), ("qwen2", True, True), ("gpt_neox", True, True), ("gpt2", True, True),
    ("falcon", True, True), ("bloom", False, True), ("opt", False, True), ("gemma2", True, False),
    ("cohere", True, False),
])
def test_probe_answers_per_architecture(model_type: str, apart: bool, plain: bool) -> None:
    """OPT takes position ids but builds its mask without them; gemma2 soft-caps and cohere scales
    its logits: the chunked loss must not run for them."""
    from transformers import AutoConfig

    facts = architecture_facts(AutoConfig.for_model(model_type))
    assert (facts.keeps_packed_samples_apart, facts.logits_are_plain_head) == (apart, plain), facts.note


def test_probe_says_unverified_instead_of_crashing() -> None:
    from transformers import LlamaConfig

    broken = LlamaConfig(rope_scaling={"rope_type": "no-such-rope"})
    facts = architecture_facts(broken)
    assert facts.keeps_packed_samples_apart is None and facts.note


def test_flash_attention_batches_are_flattened(tiny_llama: Path, tmp_path: Path) -> None:
    """flash-attention reads packed sequences from position_ids only for one row: one [1, N] row."""
    path = write_jsonl(tmp_path / "d.jsonl", dialogues(12))
    config = data_config(tiny_llama, path, packing="packed", eval_fraction=0.0, seq_len=512)
    config.model.attn_implementation = "flash_attention_2"
    prepared = prepare_data(resolve(config), load_tokenizer(tiny_llama))
    rows = prepared.train[:3]
    batch = prepared.collate(rows)
    total = sum(len(r["input_ids"]) for r in rows)
    assert all(v.shape == (1, total) for v in batch.values())
    assert batch["position_ids"][0].tolist() == [p for r in rows for p in r["position_ids"]]


# ------------------------------------------------------------------ rows padded to a multiple of tokens
def test_padded_width_rounds_up_but_stops_at_seq_len() -> None:
    from lorafit.data.collate import padded_width

    assert [padded_width(n, 64, 512) for n in (1, 64, 65, 449, 500, 512)] == [64, 64, 128, 512, 512, 512]
    assert padded_width(500, 64, 500) == 500  # seq_len 500: positions end there
    assert padded_width(37, 1, 512) == 37 and padded_width(37, 8) == 40


def test_pad_multiple_resolves_per_device(tiny_llama: Path, tmp_path: Path) -> None:
    """auto: 64 on a CPU (oneDNN keeps kernels per shape), 1 on a GPU; a number is taken as given;
    flattened flash-attention rows are never padded; run.json and the start lines say it."""
    from lorafit.resolved import Environment

    path = write_jsonl(tmp_path / "d.jsonl", dialogues(8))
    cpu = resolve(data_config(tiny_llama, path), Environment("cpu", True))
    assert cpu.pad_to_multiple_of == 64 and cpu.to_json()["pad_to_multiple_of"] == 64
    assert any("rows padded to x64" in line for line in cpu.describe())
    assert resolve(data_config(tiny_llama, path), Environment("cuda", True)).pad_to_multiple_of == 1
    assert resolve(data_config(tiny_llama, path, pad_to_multiple_of=8), Environment("cuda", True)).pad_to_multiple_of == 8
    assert resolve(data_config(tiny_llama, path, pad_to_multiple_of=1), Environment("cpu", True)).pad_to_multiple_of == 1
    flash = data_config(tiny_llama, path, packing="packed", pad_to_multiple_of=64)
    flash.model.attn_implementation = "flash_attention_2"
    assert resolve(flash, Environment("cuda", True)).pad_to_multiple_of == 1


def test_bad_pad_multiple_is_a_config_error(tiny_llama: Path, tmp_path: Path) -> None:
    from lorafit.errors import ConfigError

    for bad in (0, "64", 8.0):
        with pytest.raises(ConfigError, match="data.pad_to_multiple_of"):
            data_config(tiny_llama, tmp_path / "d.jsonl", pad_to_multiple_of=bad)


@pytest.mark.parametrize(("model_name", "packing"), [("tiny_llama", "packed"), ("tiny_bloom", "none")])
def test_rows_padded_to_a_multiple_train_exactly_as_unpadded(model_name: str, packing: str, tmp_path: Path,
                                                             request: pytest.FixtureRequest) -> None:
    """The padding is its own segment (packed rows) or masked (padded rows), carries no labels, and so
    changes neither the loss nor the adapter's gradients (fp32)."""
    from lorafit.modeling import attach_adapter

    model_dir = request.getfixturevalue(model_name)
    path = write_jsonl(tmp_path / "d.jsonl", dialogues(16))
    tokenizer = load_tokenizer(model_dir)
    runs = {m: resolve(data_config(model_dir, path, packing=packing, eval_fraction=0.0, seq_len=200,
                                   pad_to_multiple_of=m)) for m in (1, 64)}
    prepared = {m: prepare_data(run, tokenizer) for m, run in runs.items()}
    rows = sorted(prepared[1].train, key=lambda r: len(r["input_ids"]))[:2]  # short rows: padding on both
    plain, padded = prepared[1].collate(rows), prepared[64].collate(rows)
    longest = max(len(r["input_ids"]) for r in rows)
    assert plain["input_ids"].shape[1] == longest and padded["input_ids"].shape[1] == min(200, -(-longest // 64) * 64)
    assert padded["input_ids"].shape[1] > longest
    model, _ = attach_adapter(_model(model_dir, "sdpa" if packing == "packed" else "eager"), runs[1])
    model.train()
    results = []
    for batch in (plain, padded):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        with torch.random.fork_rng():
            for module in model.modules():  # dropout off: the comparison is of the arithmetic
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0
            loss, n_tokens = compute_loss(model, batch, mode="chunked")
            loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.item(), n_tokens, grads))
    (loss_a, n_a, grads_a), (loss_b, n_b, grads_b) = results
    assert n_a == n_b and abs(loss_a - loss_b) < 1e-5 * abs(loss_a)
    for name, grad in grads_a.items():
        assert torch.allclose(grad, grads_b[name], rtol=1e-4, atol=1e-6), name
