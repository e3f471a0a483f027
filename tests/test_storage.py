"""16-bit weights with fp32 compute (``model.dtype: bfloat16``, ``train.precision: fp32``).

The base's matrices must stay 16-bit in memory, every matmul must run in fp32, and the losses must
be those of the same 16-bit values held in fp32. The head's blockwise loss must match
cross-entropy over the full fp32 logits, gradient included.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import build_model, tiny_run_config, write_jsonl

from lorafit import loss as lorafit_loss
from lorafit.config import validate_config
from lorafit.errors import ConfigError
from lorafit.resolved import Environment, resolve
from lorafit.training import train


def _half_copy(source: Path, folder: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """The tiny model saved in 16 bits, as most Hub checkpoints are."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype).save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(source)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bf16_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bf16-models")
    models = {arch: _half_copy(build_model(root / f"{arch}-fp32", arch), root / arch) for arch in ("llama", "bloom")}
    models["llama-fp16"] = _half_copy(root / "llama-fp32", root / "llama-fp16", torch.float16)
    return models


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lorafit.builtin.dialogues import generate

    return write_jsonl(tmp_path_factory.mktemp("storage-data") / "d.jsonl", generate(48, 5))


def _config(model: Path, data: Path, out: Path, dtype: str, **train: object) -> dict:
    raw = tiny_run_config(model, data, out, max_steps=4, eval_steps=None, seq_len=128, precision="fp32",
                          gradient_checkpointing=True, **train)
    raw["model"]["dtype"] = dtype
    return raw


@pytest.mark.parametrize("arch", ["llama", "bloom"])
def test_matrices_stay_16bit_and_every_matmul_runs_in_fp32(arch: str, bf16_models: dict[str, Path], data: Path,
                                                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lorafit.loss import compute_loss
    from lorafit.modeling import load_model

    run = resolve(validate_config(_config(bf16_models[arch], data, tmp_path / "out", "bfloat16")))
    assert run.precision.upcasts_storage
    assert "stored; upcast per matmul" in run.precision.label()
    model, _ = load_model(run, torch.device("cpu"))
    base = model.get_base_model()
    matrices = [m for name, m in base.named_modules()
                if type(m) in (torch.nn.Linear, torch.nn.Embedding) and ".lora_" not in name]
    assert matrices and all(m.weight.dtype == torch.bfloat16 for m in matrices)
    rest = [p for p in model.parameters() if not any(p is m.weight for m in matrices)]
    assert rest and all(p.dtype == torch.float32 for p in rest)  # norms, biases, the adapter

    seen: set[tuple[torch.dtype, torch.dtype]] = set()
    linear = F.linear

    def spy(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        seen.add((x.dtype, w.dtype))
        return linear(x, w, b)

    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    batch = {"input_ids": torch.randint(3, 300, (2, 40))}
    batch["labels"] = batch["input_ids"].clone()
    batch["labels"][:, :20] = -100
    total, _ = compute_loss(model, batch, mode=run.loss)
    total.backward()
    assert seen == {(torch.float32, torch.float32)}
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize(("arch", "dtype"), [("llama", "bfloat16"), ("bloom", "bfloat16"), ("llama-fp16", "float16")])
def test_losses_match_the_same_values_held_in_fp32(arch: str, dtype: str, bf16_models: dict[str, Path], data: Path,
                                                   tmp_path: Path) -> None:
    stored = train(validate_config(_config(bf16_models[arch], data, tmp_path / "stored", dtype)), progress=False)
    wide = train(validate_config(_config(bf16_models[arch], data, tmp_path / "wide", "float32")), progress=False)
    run = json.loads((Path(stored.output_dir) / "run.json").read_text())
    assert run["precision"] == {"weights": dtype, "compute": "float32"}
    # same fp32 math on the same values: only the adapter's bf16-rounded init differs afterwards
    assert math.isclose(stored.first_eval_loss, wide.first_eval_loss, rel_tol=1e-5)
    assert math.isclose(stored.final_eval_loss, wide.final_eval_loss, rel_tol=2e-3)
    assert stored.final_eval_loss < stored.first_eval_loss


def test_merge_writes_one_dtype(bf16_models: dict[str, Path], data: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    from lorafit.export import merge

    result = train(validate_config(_config(bf16_models["llama"], data, tmp_path / "run", "bfloat16")), progress=False)
    merged = merge(result.output_dir, tmp_path / "merged", dtype="bfloat16", log=lambda *_: None)
    dtypes = set()
    for file in merged.output_dir.glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            dtypes |= {handle.get_slice(k).get_dtype() for k in handle.keys()}  # noqa: SIM118
    assert dtypes == {"BF16"}


def test_fsdp_is_refused_in_one_line(bf16_models: dict[str, Path], data: Path, tmp_path: Path) -> None:
    raw = _config(bf16_models["llama"], data, tmp_path / "out", "bfloat16", fsdp=True)
    with pytest.raises(ConfigError, match=r"^model\.dtype: bfloat16 weights with train\.precision fp32"):
        resolve(validate_config(raw), Environment(device_kind="cpu", bf16_supported=True, world_size=2))


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_a_quantized_base_is_not_called_16bit_storage(quantization: str, bf16_models: dict[str, Path], data: Path,
                                                       tmp_path: Path) -> None:
    """model.dtype bfloat16 with train.precision fp32 on an nf4 / int8 base: its matrices are 4 / 8
    bit, so the run neither says nor does "stored 16-bit, upcast per matmul"."""
    raw = _config(bf16_models["llama"], data, tmp_path / "out", "bfloat16")
    raw["model"]["quantization"] = quantization
    run = resolve(validate_config(raw), Environment(device_kind="cpu", bf16_supported=True))
    assert not run.precision.upcasts_storage and not run.stores_16bit
    assert run.precision.label() == "weights bf16, compute fp32 (no autocast)"


def test_nf4_fsdp_with_a_16bit_model_dtype_is_refused_for_its_own_reason(bf16_models: dict[str, Path], data: Path,
                                                                        tmp_path: Path) -> None:
    raw = _config(bf16_models["llama"], data, tmp_path / "out", "bfloat16", fsdp=True)
    raw["model"]["quantization"] = "nf4"
    with pytest.raises(ConfigError, match=r"^model\.dtype: bfloat16 with nf4 under train\.fsdp keeps the "
                                          r"unquantized rest .* in bf16, which train\.precision fp32 would run "
                                          r"without autocast; use train\.precision bf16"):
        resolve(validate_config(raw), Environment(device_kind="cpu", bf16_supported=True, world_size=2))


def test_the_fp32_scratch_copy_is_one_buffer_per_shape_and_refuses_autograd() -> None:
    from lorafit.storage import fp32_scratch_copy

    a, b = torch.randn(8, 4).bfloat16(), torch.randn(8, 4).bfloat16()
    with torch.no_grad():
        first = fp32_scratch_copy(a)
        assert torch.equal(first, a.float())
        assert fp32_scratch_copy(b) is first and torch.equal(first, b.float())  # a's copy is gone: use at once
    with pytest.raises(AssertionError, match="autograd"):
        fp32_scratch_copy(a)


@pytest.mark.parametrize(("vocab", "tokens", "width", "bias"), [(1000, 37, 64, False), (777, 300, 32, True)])
def test_blockwise_head_loss_matches_full_logits(vocab: int, tokens: int, width: int, bias: bool,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lorafit_loss, "HEAD_BLOCK_BYTES", 4 * width * 97)  # uneven blocks, many of them
    monkeypatch.setattr(lorafit_loss, "SLICE_BYTES", 4 * 97 * 64)  # token slices too
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(vocab, width, generator=generator) * 2).bfloat16()
    b = torch.randn(vocab, generator=generator).bfloat16() if bias else None
    targets = torch.randint(0, vocab, (tokens,), generator=generator)
    hidden = torch.randn(tokens, width, generator=generator, requires_grad=True)

    head = torch.nn.Linear(width, vocab, bias=bias).requires_grad_(False)
    head.weight.data, head.bias = weight, (torch.nn.Parameter(b, requires_grad=False) if bias else None)
    assert lorafit_loss._narrow_frozen_head(head, hidden)
    blockwise = lorafit_loss._NarrowHeadCrossEntropy.apply(hidden, weight, b, targets)
    blockwise.backward()
    grad = hidden.grad.clone()
    hidden.grad = None
    reference = F.cross_entropy(F.linear(hidden, weight.float(), b.float() if bias else None), targets,
                                reduction="sum")
    reference.backward()
    assert torch.allclose(blockwise, reference, rtol=1e-5)
    assert torch.allclose(grad, hidden.grad, atol=1e-5)


def test_upcast_buffers_are_per_thread_and_survive_inference_mode() -> None:
    import threading

    from lorafit.storage import keep_16bit_compute_fp32

    layers = [torch.nn.Linear(256, 256, bias=False).bfloat16().requires_grad_(False) for _ in range(2)]
    for layer in layers:
        keep_16bit_compute_fp32(layer)
    x = torch.randn(8, 256)
    expected = [x @ layer.weight.float().T for layer in layers]
    wrong: list[int] = []

    def work(i: int) -> None:
        for _ in range(300):
            if not torch.equal(layers[i](x), expected[i]):
                wrong.append(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not wrong

    fresh = torch.nn.Linear(48, 80).bfloat16().requires_grad_(False)  # a shape no buffer exists for yet
    keep_16bit_compute_fp32(fresh)
    with torch.inference_mode():
        fresh(torch.randn(2, 48))
    inputs = torch.randn(2, 48, requires_grad=True)
    fresh(inputs).sum().backward()  # the buffer made under inference mode is still writable
    assert inputs.grad is not None


def test_a_trained_bias_gets_its_gradient_without_an_fp32_weight_copy() -> None:
    from lorafit.storage import keep_16bit_compute_fp32

    layer = torch.nn.Linear(32, 16).bfloat16()
    keep_16bit_compute_fp32(layer)
    layer.weight.requires_grad_(False)
    assert layer.bias.dtype == torch.float32 and layer.bias.requires_grad  # lora.bias: all trains it
    x = torch.randn(3, 5, 32, requires_grad=True)
    out = layer(x)
    assert out.grad_fn.name().startswith("_UpcastLinear")
    out.square().sum().backward()
    reference_x = x.detach().clone().requires_grad_(True)
    reference_b = layer.bias.detach().clone().requires_grad_(True)
    F.linear(reference_x, layer.weight.float(), reference_b).square().sum().backward()
    assert torch.allclose(layer.bias.grad, reference_b.grad, atol=1e-5)
    assert torch.allclose(x.grad, reference_x.grad, atol=1e-5)


def test_blockwise_head_loss_with_a_fully_masked_first_block(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lorafit_loss, "HEAD_BLOCK_BYTES", 4 * 16 * 300)
    weight = torch.randn(1000, 16).bfloat16()
    bias = torch.randn(1000)
    bias[:600] = float("-inf")  # the first two blocks can never be predicted
    hidden = torch.randn(5, 16, requires_grad=True)
    targets = torch.randint(600, 1000, (5,))
    blockwise = lorafit_loss._NarrowHeadCrossEntropy.apply(hidden, weight, bias, targets)
    reference = F.cross_entropy(F.linear(hidden, weight.float(), bias), targets, reduction="sum")
    assert torch.isfinite(blockwise) and torch.allclose(blockwise, reference, rtol=1e-5)


def test_two_processes_match_one_process_with_twice_the_batch(bf16_models: dict[str, Path], data: Path,
                                                              tmp_path: Path) -> None:
    """Data-parallel (gloo), as ``--nproc 2`` on GPUs runs it: the 16-bit storage on every rank."""
    import os
    import subprocess
    import sys

    import yaml
    from safetensors.torch import load_file

    adapters = {}
    for name, batch, extra in (("single", 2, []), ("double", 1, ["--nproc", "2"])):
        raw = _config(bf16_models["llama"], data, tmp_path / name, "bfloat16", batch_size=batch)
        raw["data"]["packing"] = "none"
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw), encoding="utf-8")
        done = subprocess.run([sys.executable, "-m", "lorafit", "train", str(path), "--no-progress", *extra],
                              capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert done.returncode == 0, done.stderr[-3000:]
        assert "weights bf16 (stored; upcast per matmul), compute fp32" in done.stdout
        adapters[name] = load_file(str(tmp_path / name / "adapter" / "adapter_model.safetensors"))
    a, b = adapters["single"], adapters["double"]
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
