"""``train.compile``: compiled decoder layers train as the eager ones do, in fp32 and in bf16, with
checkpointing, on a Llama and on BLOOM (lorafit's ALiBi attention); the run says where it cannot."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_run_config
from transformers import AutoModelForCausalLM, BloomConfig, LlamaConfig

from lorafit.compiling import checkpointed_dropout_compiles
from lorafit.config import validate_config
from lorafit.errors import ConfigError
from lorafit.modeling import attach_adapter
from lorafit.resolved import Environment, resolve
from lorafit.training import train


def _base(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if arch == "llama":
        config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2)
    else:
        config = BloomConfig(vocab_size=128, hidden_size=64, n_layer=2, n_head=4)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def _run_for(model: torch.nn.Module, folder: Path, environment: Environment | None = None, **settings: dict):
    model.config.save_pretrained(folder)
    return resolve(validate_config({"model": {"name_or_path": str(folder)}, **settings}), environment)


def _batches() -> list[dict[str, torch.Tensor]]:
    """Two row lengths (the last row right-padded): a compiled layer meets more than one length."""
    g = torch.Generator().manual_seed(1)
    out = []
    for rows, length in ((2, 12), (2, 20)):
        ids = torch.randint(0, 128, (rows, length), generator=g)
        mask = torch.ones_like(ids)
        mask[-1, length - 3:] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.clone()})
    return out


def _steps(model: torch.nn.Module, dtype: torch.dtype) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    model.train()
    results = []
    for batch in _batches():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            out = model(**batch)
        out.loss.backward()
        results.append((out.loss.detach().float(),
                        {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}))
    return results


def _trained(base: torch.nn.Module, folder: Path, precision: str, compiled: bool,
             **train: object) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """Two steps of ``base`` with a fresh adapter whose weights are all non-zero (every LoRA weight
    gets a gradient), as the run of these settings builds it."""
    run = _run_for(copy.deepcopy(base), folder, lora={"dropout": 0.0},
                   train={"compile": compiled, "precision": precision, **train})
    assert run.compiled is compiled
    model, swapped = attach_adapter(copy.deepcopy(base), run)
    assert any("torch.compile" in line for line in swapped) is compiled
    torch.manual_seed(3)
    for param in model.parameters():
        if param.requires_grad:
            torch.nn.init.normal_(param, std=0.1)
    return _steps(model, torch.bfloat16 if precision == "bf16" else torch.float32)


def _gradient_error(steps: list, reference: list) -> list[float]:
    """Per step: the norm of the difference of all adapter gradients over the reference's norm."""
    errors = []
    for (_, grads), (_, expected) in zip(steps, reference, strict=True):
        assert expected and grads.keys() == expected.keys()
        diff = sum(float((grads[n] - g).norm()) ** 2 for n, g in expected.items()) ** 0.5
        errors.append(diff / sum(float(g.norm()) ** 2 for g in expected.values()) ** 0.5)
    return errors


@pytest.mark.heavy  # ~45 s cold (the first compile in a process starts inductor)
@pytest.mark.newest  # what found transformers 5.25 + kernels making every layer eager (no dropout: compiles there)
@pytest.mark.parametrize("arch", ["llama", "bloom"])
def test_compiled_layers_train_as_eager_ones_in_fp32(tmp_path: Path, arch: str) -> None:
    """Checkpointed, two row lengths, a padded row: the same losses and gradients as eager."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    base = _base(arch)
    eager = _trained(base, tmp_path / "eager", "fp32", False, gradient_checkpointing=True)
    compiled = _trained(base, tmp_path / "compiled", "fp32", True, gradient_checkpointing=True)
    # the layers really ran compiled, nothing fell back to eager mid-layer, and one graph served every
    # layer and both row lengths (dynamo gives up compiling after 8 recompiles of the same code)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert all(abs(float(c[0]) - float(e[0])) <= 1e-5 * abs(float(e[0])) for c, e in zip(compiled, eager, strict=True))
    assert max(_gradient_error(compiled, eager)) <= 1e-5  # measured ~5e-7: the same arithmetic reordered


@pytest.mark.heavy  # the end-to-end compiled run (heavy too) trains in bf16 where the CPU has it
@pytest.mark.parametrize("arch", ["llama", "bloom"])
def test_compiled_layers_in_bf16_are_as_close_to_fp32_as_eager_ones(tmp_path: Path, arch: str) -> None:
    """bf16 (autocast, as GPUs and bf16 CPUs run): eager rounds every op's output to bf16, a fused
    kernel keeps its intermediates in fp32, so the two differ; each is held to the fp32 step, and the
    compiled one may not be further from it than eager (measured: 0.7-1.4% each)."""
    torch._dynamo.reset()
    base = _base(arch)
    reference = _trained(base, tmp_path / "fp32", "fp32", False, gradient_checkpointing=True)
    eager = _gradient_error(_trained(base, tmp_path / "eager", "bf16", False, gradient_checkpointing=True), reference)
    compiled = _gradient_error(_trained(base, tmp_path / "compiled", "bf16", True, gradient_checkpointing=True),
                               reference)
    for error_compiled, error_eager in zip(compiled, eager, strict=True):
        assert error_compiled <= 1.5 * error_eager + 2e-3, (compiled, eager)


NEEDS_DROPOUT_COMPILE = pytest.mark.skipif(not checkpointed_dropout_compiles(),
                                           reason=f"torch {torch.__version__}: runs eagerly (see the gate's test)")


def test_dropout_in_checkpointed_layers_compiles_only_on_the_torch_versions_checked(tmp_path: Path) -> None:
    """Only on the torch releases checked (2.13): elsewhere the run says so and trains eagerly."""
    run = _run_for(_base("llama"), tmp_path, lora={"dropout": 0.05},
                   train={"compile": True, "gradient_checkpointing": True})
    assert run.compiled is checkpointed_dropout_compiles()
    assert any("dropout in checkpointed layers" in n for n in run.notes) is not run.compiled
    assert "lora_dropout_int_mask" in run.fused  # lorafit's CPU dropout, compiled or not
    # the model's own dropout counts too (GPT-2 draws it in attention and the residuals)
    from transformers import GPT2Config

    from lorafit.compiling import model_dropout

    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))
    assert model_dropout(gpt2.config) == 0.1
    run = _run_for(gpt2, tmp_path / "gpt2", lora={"dropout": 0.0}, train={"compile": True})
    assert run.compiled is checkpointed_dropout_compiles()


@pytest.mark.heavy
@NEEDS_DROPOUT_COMPILE
@pytest.mark.parametrize("p", [0.05, 0.3])  # lorafit's two draws: the gaps between drops, an integer mask
def test_compiled_dropout_replays_its_masks_under_checkpointing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                p: float) -> None:
    """In compiled layers LoRA dropout's keep mask is one opaque op (lorafit's CPU draw), one draw
    per adapted module (q, k and v share an input, not a mask), replayed from the saved generator
    state in the checkpoint's recompute; the compiled, checkpointed gradients equal an eager
    uncheckpointed step's that drops exactly the same elements."""
    from torch._dynamo.utils import counters

    import lorafit.fused as fused

    draws: list[tuple[int, torch.Tensor]] = []  # (which module's key, its mask), in draw order
    draw = fused.keep_mask
    monkeypatch.setattr(fused, "_keep_mask_for",
                        lambda x, key, p: draws.append((key.data_ptr(), draw(x.shape, p))) or draws[-1][1])
    torch._dynamo.reset()
    counters.clear()
    base = _base("llama")
    run = _run_for(copy.deepcopy(base), tmp_path / "compiled", lora={"dropout": p},
                   train={"compile": True, "precision": "fp32", "gradient_checkpointing": True})
    assert "lora_dropout_int_mask" in run.fused
    model, _ = attach_adapter(copy.deepcopy(base), run)
    torch.manual_seed(3)
    for param in model.parameters():
        if param.requires_grad:
            torch.nn.init.normal_(param, std=0.1)
    eager = copy.deepcopy(model)  # before the first compiled call: plain modules, the same weights
    batch = _batches()[0]
    model.train()
    out = model(**batch)
    forward = dict(draws)
    draws.clear()
    out.loss.backward()
    assert not counters["graph_break"], dict(counters["graph_break"])
    names = {m.draw_key.data_ptr(): n for n, m in model.named_modules() if isinstance(m, fused.CpuDropout)}
    assert len(names) == 16 and forward.keys() == names.keys()  # 4 layers x q, k, v, o: a draw each
    assert all(not mask.all() for mask in forward.values())  # each dropped something
    assert {key for key, _ in draws} == forward.keys()  # the recompute drew them again...
    for key, mask in draws:
        assert torch.equal(mask, forward[key]), names[key]  # ...the same ones
    compiled = {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}

    masks = {names[key]: mask for key, mask in forward.items()}
    for name, module in eager.named_modules():
        if isinstance(module, fused.CpuDropout):
            module.forward = lambda x, m=masks[name]: x * m.to(x.dtype) * fused.keep_scale(p)
    eager.base_model.model.gradient_checkpointing_disable()
    eager.train()
    eager(**batch).loss.backward()
    for name, grad in compiled.items():
        expected = dict(eager.named_parameters())[name].grad
        assert torch.allclose(grad, expected, rtol=1e-4, atol=1e-6), name


def test_where_compiled_layers_are_not_tested_the_run_says_so_and_runs_eagerly(tmp_path: Path) -> None:
    base = _base("llama")
    cases = {
        "processes": ({}, Environment("cpu", True, world_size=2)),
        "int8": ({"model": {"quantization": "int8"}}, None),
        "dpo": ({"train": {"objective": "dpo"}, "data": {"format": "preference"}}, None),
    }
    for name, (extra, environment) in cases.items():
        settings = copy.deepcopy(extra)
        settings.setdefault("train", {})["compile"] = True
        folder = tmp_path / name
        base.config.save_pretrained(folder)
        raw = {**settings, "model": {"name_or_path": str(folder), **settings.get("model", {})}}
        run = resolve(validate_config(raw), environment)
        assert run.compiled is False, name
        assert any(note.startswith("train.compile: off for") for note in run.notes), (name, run.notes)


def test_compile_without_a_cpu_compiler_is_refused_naming_the_field(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no g++ to be found
    monkeypatch.delenv("CXX", raising=False)
    base = _base("llama")
    with pytest.raises(ConfigError, match=r"^train\.compile: .*C\+\+ compiler"):  # no dropout: compiles anywhere
        _run_for(base, tmp_path / "model", lora={"dropout": 0.0}, train={"compile": True})
    # what does not compile here is not refused: merge / generate / eval reading the run's config,
    # and a plan for another device (its tools are not this machine's)
    assert resolve(validate_config({"model": {"name_or_path": str(tmp_path / "model")}, "train": {"compile": True}}),
                   new_adapter=False).compiled is False
    planned = resolve(validate_config({"model": {"name_or_path": str(tmp_path / "model")}, "train": {"compile": True}}),
                      Environment("cuda", True, device_name="H100"))
    assert planned.compiled is checkpointed_dropout_compiles()  # LoRA dropout 0.05 under checkpointing


@pytest.mark.heavy  # ~50-80 s cold (the first compile in a process starts inductor)
@NEEDS_DROPOUT_COMPILE
def test_a_compiled_run_trains_and_records_it(tiny_llama: Path, dialogue_file: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """``lorafit train`` with train.compile (LoRA dropout, checkpointing, evaluations; bf16 where the
    CPU has bf16 units): the loss falls, run.json says the layers were compiled, and the adapter's
    tensors carry peft's names (nothing of the compiled wrapper)."""
    torch._dynamo.reset()
    raw = tiny_run_config(tiny_llama, dialogue_file, tmp_path / "run", max_steps=10, eval_steps=5,
                          compile=True, gradient_checkpointing=True)
    raw["lora"]["dropout"] = 0.05
    result = train(validate_config(raw), progress=False)
    # the layers really ran compiled (a graph break would make them eager and the run say so): with
    # the kernels package installed, transformers 5.25 sets a context variable inside attention
    assert "train.compile: the decoder layers ran compiled (no graph breaks)" in capsys.readouterr().out
    assert result.final_eval_loss < result.first_eval_loss - 0.05, (result.first_eval_loss, result.final_eval_loss)
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["compile"] is True
    from safetensors import safe_open

    with safe_open(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"), "pt") as handle:
        names = list(handle.keys())
    assert names and all(n.startswith("base_model.model.model.layers.") and ".lora_" in n for n in names), names
    assert not any("_orig_mod" in n for n in names)


def test_a_model_without_decoder_layers_is_reported_as_trained_eagerly() -> None:
    from lorafit.compiling import compile_layers, fallback_report

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4))
    assert "nothing compiled" in compile_layers(model)
    assert fallback_report(model) == "train.compile: no decoder layers found in this model; it trains eagerly"
    assert fallback_report(_base("llama")) is None  # decoder layers, and no graph break counted
