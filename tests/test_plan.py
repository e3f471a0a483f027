"""lorafit plan: exact parameter counts on the meta device, the seed's bloomz-7b1 verdicts, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, BloomConfig, LlamaConfig

from lorafit.cli import main
from lorafit.config import validate_config
from lorafit.errors import ConfigError, LorafitError
from lorafit.planner import (
    GIB,
    count_parameters,
    estimate,
    model_shape,
    render,
    resolve_device,
    resolve_for,
    warn_if_not_fit,
)

BLOOMZ_TRAINABLE = 3_932_160
BLOOMZ_TOTAL = 7_072_948_224


@pytest.fixture(scope="module")
def bloomz_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """bloomz-7b1's config.json only (30 layers, hidden 4096, 32 heads, vocab 250880): no weights."""
    folder = tmp_path_factory.mktemp("bloomz-7b1")
    BloomConfig(n_layer=30, hidden_size=4096, n_head=32, vocab_size=250880).save_pretrained(folder)
    return str(folder)


def bloomz_config(folder: str, **train: object) -> object:
    quant = train.pop("quantization", "int8")
    dtype = train.pop("dtype", "auto")
    train.setdefault("fused_ops", False)  # BLOOM's own eager attention, as the seed recipe runs it
    settings = {"seq_len": 2048, "batch_size": 1, "gradient_checkpointing": True, "loss": "chunked"}
    settings.update(train)
    return validate_config({"model": {"name_or_path": folder, "quantization": quant, "dtype": dtype},
                            "lora": {"r": 8, "target_modules": ["query_key_value"]}, "train": settings})


def shape_of(config: object) -> object:
    return model_shape(resolve_for(config, resolve_device("a10g")))


@pytest.fixture(scope="module")
def bloomz_shape(bloomz_dir: str) -> object:
    return shape_of(bloomz_config(bloomz_dir))


def test_fused_bloom_attention_keeps_no_per_layer_scores(bloomz_dir: str) -> None:
    """With fused_ops BLOOM attends through SDPA: no heads x seq^2 probabilities per layer, one
    shared bias, so bf16 bloomz-7b1 at 2048 fits 24 GB even without checkpointing."""
    def plan(fused: bool, **train: object) -> object:
        config = bloomz_config(bloomz_dir, quantization="none", dtype="bfloat16", fused_ops=fused, **train)
        return estimate(config, "24GB", shape=shape_of(config))

    eager, fused = plan(False, gradient_checkpointing=False), plan(True, gradient_checkpointing=False)
    assert not eager.fits and fused.fits
    scores = 32 * 2048 * 2048  # one layer's heads x seq^2
    assert eager.part_bytes("activations") - fused.part_bytes("activations") > 30 * scores * 4
    bias = 32 * 2048 * 2048 * 2  # the shared bf16 bias is still counted
    assert plan(True).part_bytes("activations") > bias


def test_checkpoint_every_trades_memory_for_recompute(bloomz_dir: str, bloomz_shape: object) -> None:
    def plan(every: int) -> object:
        return estimate(bloomz_config(bloomz_dir, quantization="nf4", checkpoint_every=every), "24GB",
                        shape=bloomz_shape)

    all_layers, half, every_third = plan(1), plan(2), plan(3)
    assert all_layers.peak_bytes < half.peak_bytes < every_third.peak_bytes  # 0, 15, 20 layers keep theirs
    assert half.settings["checkpoint_every"] == 2
    assert "15 layers' activations kept" in next(p.detail for p in half.parts if p.name == "activations")
    small = estimate(bloomz_config(bloomz_dir, quantization="nf4", checkpoint_every=2), "13GB", shape=bloomz_shape)
    assert not small.fits  # the cheapest fix offered first: checkpoint every layer again
    assert small.suggestions[0].overrides == ["train.checkpoint_every=1"] and small.suggestions[0].fits


def test_bloomz_trainable_and_total_counted_on_meta_device(bloomz_dir: str) -> None:
    trainable, total = count_parameters(bloomz_config(bloomz_dir))
    assert (trainable, total) == (BLOOMZ_TRAINABLE, BLOOMZ_TOTAL)


def test_the_adapter_is_counted_never_allocated(bloomz_dir: str) -> None:
    """``lora.r: 1000000`` on BLOOMZ-7b1 is ~2e11 adapter parameters: the planner builds the adapter
    on the meta device too, so the plan answers at once instead of filling the host's memory."""
    from lorafit.planner import build_meta_model, count_parameters
    from lorafit.resolved import resolve

    config = bloomz_config(bloomz_dir)
    config.lora.r = 4
    run = resolve(config, config_file_ok=True)
    model = build_meta_model(config, run.model_config, run.lora_targets)
    assert all(p.is_meta for p in model.parameters())
    config.lora.r = 1_000_000
    trainable, _ = count_parameters(config)
    assert trainable == 30 * 1_000_000 * (4096 + 3 * 4096)  # query_key_value: 4096 -> 12288, 30 layers


def test_bloomz_int8_checkpointing_fits_a10g(bloomz_dir: str, bloomz_shape: object) -> None:
    plan = estimate(bloomz_config(bloomz_dir), "a10g", shape=bloomz_shape)
    assert plan.fits and plan.peak_bytes < plan.memory_bytes
    assert plan.trainable_line.startswith("trainable params: 3,932,160 || all params: 7,072,948,224")
    weights = plan.part_bytes("weights")
    # 6.04B int8 linear weights + the 1.03B embedding/head upcast to fp32 (prepare_model_for_kbit_training)
    assert 9.5e9 < weights < 10.8e9
    assert plan.suggestions == []


def test_bloomz_fp32_unquantized_does_not_fit_a10g(bloomz_dir: str, bloomz_shape: object) -> None:
    config = bloomz_config(bloomz_dir, quantization="none", dtype="float32")
    plan = estimate(config, "a10g", shape=bloomz_shape)
    assert not plan.fits
    assert 27e9 < plan.part_bytes("weights") < 29.5e9  # "its weights alone are about 28 GB"
    assert plan.part_bytes("weights") > plan.memory_bytes
    # suggestions ordered by cost, each lowering the peak; fp32 weights need quantizing to fit
    changes = [s.overrides[0] for s in plan.suggestions]
    assert changes[0] == "model.quantization=int8"
    assert plan.suggestions[-1].fits


def test_bloomz_nf4_fits_t4(bloomz_dir: str, bloomz_shape: object) -> None:
    plan = estimate(bloomz_config(bloomz_dir, quantization="nf4"), "T4", shape=bloomz_shape)
    assert plan.device == "T4 16GB"
    assert plan.fits
    nf4 = plan.part_bytes("weights")
    int8 = estimate(bloomz_config(bloomz_dir), "T4", shape=bloomz_shape).part_bytes("weights")
    assert nf4 < int8 - 2.5e9  # half a byte per weight instead of one


def test_bloomz_bf16_on_24gb_depends_on_checkpointing_and_loss(bloomz_dir: str, bloomz_shape: object) -> None:
    def plan(**train: object) -> object:
        return estimate(bloomz_config(bloomz_dir, quantization="none", dtype="bfloat16", **train), "24GB",
                        shape=bloomz_shape)

    lean = plan()
    assert lean.fits
    no_ckpt = plan(gradient_checkpointing=False)
    assert not no_ckpt.fits
    assert no_ckpt.part_bytes("activations") > 10 * lean.part_bytes("activations")
    assert no_ckpt.suggestions[0].overrides == ["train.gradient_checkpointing=true"]
    assert no_ckpt.suggestions[0].fits
    # at batch 2 the full loss's tokens x vocab fp32 buffers decide it
    full = plan(batch_size=2, loss="full")
    chunked = plan(batch_size=2, loss="chunked")
    assert not full.fits and chunked.fits
    assert full.part_bytes("logits_loss") > 10 * GIB
    assert full.suggestions[0].overrides == ["train.loss=chunked"] and full.suggestions[0].fits
    text = render(full)
    assert "logits_loss" in text and "does NOT fit" in text and "--set train.loss=chunked" in text


def test_suggestions_checkpointing_then_nf4_then_shorter_seq(bloomz_dir: str, bloomz_shape: object) -> None:
    config = bloomz_config(bloomz_dir, gradient_checkpointing=False, seq_len=4096, batch_size=2)
    plan = estimate(config, "t4", shape=bloomz_shape)
    changes = [s.overrides for s in plan.suggestions]
    assert changes[0] == ["train.gradient_checkpointing=true"]
    assert changes[1] == ["model.quantization=nf4"]
    peaks = [plan.peak_bytes] + [s.peak_bytes for s in plan.suggestions]
    assert peaks == sorted(peaks, reverse=True)
    assert any(o[0].startswith("train.seq_len=") or o[0] == "train.batch_size=1" for o in changes[2:])
    assert plan.suggestions[-1].fits


def test_resolve_device_names_and_sizes() -> None:
    assert resolve_device("a10g").name == "A10G 24GB"
    assert resolve_device("RTX 4090").memory_bytes == 24564 * 2**20
    assert resolve_device("a100-80gb").memory_bytes > resolve_device("a100").memory_bytes
    assert resolve_device("h200").memory_bytes > 140 * 10**9
    assert resolve_device("H100 80GB").name == resolve_device("h100").name == "H100 80GB"
    assert resolve_device("NVIDIA L4").name == "L4 24GB"
    assert resolve_device("24GB").memory_bytes == 24 * 10**9
    assert resolve_device("80GiB").memory_bytes == 80 * 2**30
    assert resolve_device("cpu").kind == "cpu"
    with pytest.raises(ConfigError, match="unknown GPU"):
        resolve_device("v100x")


def test_counts_match_the_real_peft_model(tmp_path: object) -> None:
    """The meta-device count equals what training sees on a real (tiny) model."""
    from lorafit.modeling import load_model, trainable_line
    from lorafit.resolved import resolve

    folder = tmp_path / "tiny-llama"
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    config = validate_config({"model": {"name_or_path": str(folder)}, "lora": {"r": 4}})
    _, trainable, total = trainable_line(load_model(resolve(config), torch.device("cpu"))[0])
    assert count_parameters(config) == (trainable, total)
    # a config.json file path works as well as the folder
    file_config = validate_config({"model": {"name_or_path": str(folder / "config.json")}, "lora": {"r": 4}})
    assert count_parameters(file_config) == (trainable, total)
    plan = estimate(config, "cpu")
    assert plan.device_kind == "cpu" and plan.part_bytes("overhead") == 0 and plan.fits


def test_warn_if_not_fit(bloomz_dir: str) -> None:
    a10g = resolve_device("a10g")
    over = warn_if_not_fit(resolve_for(bloomz_config(bloomz_dir, quantization="none", dtype="float32"), a10g), "a10g")
    assert over is not None and "A10G" in over and "lorafit plan" in over
    assert warn_if_not_fit(resolve_for(bloomz_config(bloomz_dir), a10g), "a10g") is None


def test_missing_model_is_one_line_error(tmp_path: object) -> None:
    config = validate_config({"model": {"name_or_path": str(tmp_path / "nope")}})
    with pytest.raises(LorafitError, match="model.name_or_path"):
        count_parameters(config)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LorafitError, match="no config.json"):
        count_parameters(validate_config({"model": {"name_or_path": str(empty)}}))


def test_cli_json_and_table(bloomz_dir: str, tmp_path: object, capsys: pytest.CaptureFixture[str]) -> None:
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(
        f"model:\n  name_or_path: {bloomz_dir}\n  quantization: int8\n"
        "lora:\n  r: 8\ntrain:\n  seq_len: 2048\n  batch_size: 1\n  gradient_checkpointing: true\n"
    )
    assert main(["plan", str(run_yaml), "--gpu", "a10g", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    for key in ("trainable_params", "total_params", "peak_bytes", "fits", "parts", "suggestions"):
        assert key in data
    assert data["trainable_params"] == BLOOMZ_TRAINABLE and data["total_params"] == BLOOMZ_TOTAL
    assert data["fits"] is True and data["suggestions"] == []
    assert {p["name"] for p in data["parts"]} >= {"weights", "lora", "gradients", "optimizer", "activations",
                                                  "logits_loss", "overhead"}
    assert sum(p["at_peak_bytes"] for p in data["parts"]) == data["peak_bytes"]
    assert 0 < data["allocated_peak_bytes"] < data["peak_bytes"]

    code = main(["plan", str(run_yaml), "--gpu", "16GB", "--set", "model.quantization=none",
                 "--set", "train.gradient_checkpointing=false"])
    out = capsys.readouterr().out
    assert code == 0
    assert "trainable params: 3,932,160 || all params: 7,072,948,224 || trainable%: 0.0556" in out
    assert "does NOT fit on 16GB GPU" in out
    assert "turn on gradient checkpointing" in out

    assert main(["plan", str(run_yaml), "--gpu", "tpu9"]) == 2
    assert "error: --gpu: unknown GPU" in capsys.readouterr().err


def test_optimizer_states_by_optimizer(bloomz_dir: str, bloomz_shape: object) -> None:
    def optimizer_bytes(name: str) -> int:
        return estimate(bloomz_config(bloomz_dir, optimizer=name), "a10g", shape=bloomz_shape).part_bytes("optimizer")

    adamw, eight_bit, adafactor = optimizer_bytes("adamw"), optimizer_bytes("adamw_8bit"), optimizer_bytes("adafactor")
    assert adamw == 8 * BLOOMZ_TRAINABLE  # two fp32 states per adapter weight
    assert 2 * BLOOMZ_TRAINABLE <= eight_bit < adamw / 3
    assert adafactor < eight_bit  # factored: rows + columns only


def test_fsdp_shards_the_blocks_across_processes(bloomz_dir: str, bloomz_shape: object) -> None:
    # fp32 bloomz-7b1 (~28 GB of weights) does not fit one A10G; sharded over 4 it does.
    config = bloomz_config(bloomz_dir, gradient_checkpointing=True, fsdp=True)
    config.model.quantization = "none"
    config.model.dtype = "float32"
    one = estimate(config, "a10g", shape=bloomz_shape, processes=1)
    four = estimate(config, "a10g", shape=bloomz_shape, processes=4)
    assert not one.fits
    weights_one, weights_four = one.part_bytes("weights"), four.part_bytes("weights")
    blocks = bloomz_shape.quantizable_params * 4
    assert weights_four < weights_one - 0.6 * blocks  # 3/4 of the blocks gone, 2 gathered ones back
    assert four.part_bytes("optimizer") * 4 == pytest.approx(one.part_bytes("optimizer"), rel=1e-6)
    assert four.fits and four.settings["fsdp_processes"] == 4
    # without train.fsdp, processes replicate the model: nothing changes
    config.train.fsdp = False
    assert estimate(config, "a10g", shape=bloomz_shape, processes=4).peak_bytes == one.peak_bytes


# ------------------------------------------------------------------ longest context / batch
def test_capacity_is_the_largest_that_fits(bloomz_dir: str, bloomz_shape: object) -> None:
    """max_seq_len / max_batch_size are the plan's own boundary: n fits, n + 1 does not."""
    from lorafit.planner import _with

    config = bloomz_config(bloomz_dir)
    plan = estimate(config, "a10g", shape=bloomz_shape)
    assert plan.fits and plan.max_seq_len > config.train.seq_len and plan.max_batch_size >= 1
    at = estimate(_with(config, seq_len=plan.max_seq_len, batch_size=1), "a10g", shape=bloomz_shape, capacity=False)
    over = estimate(_with(config, seq_len=plan.max_seq_len + 1, batch_size=1), "a10g", shape=bloomz_shape,
                    capacity=False)
    assert at.fits and not over.fits
    batch = plan.max_batch_size
    assert estimate(_with(config, batch_size=batch), "a10g", shape=bloomz_shape, capacity=False).fits
    assert not estimate(_with(config, batch_size=batch + 1), "a10g", shape=bloomz_shape, capacity=False).fits
    # a fitting run lists what the memory-saving changes would allow: nf4 trains a longer context
    assert [o.overrides for o in plan.capacity_options] == [["model.quantization=nf4"]]
    assert plan.capacity_options[0].max_seq_len > plan.max_seq_len
    assert plan.capacity_options[0].max_batch_size > plan.max_batch_size
    # a GPU too small for even one token says so (0), and each suggestion carries its own figures
    tiny = estimate(config, "8GB", shape=bloomz_shape)
    assert tiny.max_seq_len == 0 and tiny.max_batch_size == 0 and tiny.suggestions
    nf4 = next(s for s in tiny.suggestions if s.overrides == ["model.quantization=nf4"])
    assert nf4.max_seq_len is not None and nf4.max_seq_len >= (nf4.max_batch_size or 0)
    assert "not even seq_len 1" in render(tiny)


def test_cli_prints_and_reports_capacity(bloomz_dir: str, tmp_path: object,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(f"model:\n  name_or_path: {bloomz_dir}\n  quantization: int8\n"
                        "train:\n  seq_len: 2048\n  batch_size: 1\n")
    assert main(["plan", str(run_yaml), "--gpu", "t4", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fits"] is False and 0 < data["max_seq_len"] < 2048 and data["max_batch_size"] == 0
    assert all({"max_seq_len", "max_batch_size"} <= set(s) for s in data["suggestions"])
    assert data["suggestions"][-1]["max_seq_len"] >= 2048 and data["suggestions"][-1]["max_batch_size"] >= 1
    assert "changes" not in data["suggestions"][0]
    assert main(["plan", str(run_yaml), "--gpu", "a10g"]) == 0
    out = capsys.readouterr().out
    assert f"fits on A10G 24GB: seq_len up to {estimate_cli_max(run_yaml)} at batch 1" in out
    assert "nf4 base (QLoRA): seq_len up to" in out


def estimate_cli_max(run_yaml: object) -> str:
    from lorafit.config import load_config

    return f"{estimate(load_config(str(run_yaml), []), 'a10g').max_seq_len:,d}"


@pytest.mark.parametrize("objective", ["sft", pytest.param("dpo", marks=pytest.mark.heavy)])  # ~20 s each
def test_predicted_longest_context_matches_a_measured_step(objective: str, tmp_path: object) -> None:
    """On the CPU: give the planner a memory size, take the longest context it predicts fits,
    train one real step at that length in a fresh process, and compare the measured peak (RSS
    above a warmed-up baseline, as benchmarks/plan_accuracy.py measures it) with the memory the
    planner allotted: within the planner's accuracy (15%). A DPO step holds two sequences per row
    and runs the reference forward first."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from lorafit.planner import DeviceSpec, _with

    layers = {"hidden_size": 384, "intermediate_size": 1024, "num_attention_heads": 6, "num_key_value_heads": 6,
              "tie_word_embeddings": False, "max_position_embeddings": 4096}
    model_dir, warm_dir = tmp_path / "model", tmp_path / "warm"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=8192, num_hidden_layers=4, **layers)).save_pretrained(
        model_dir)
    AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=512, num_hidden_layers=1, **layers)).save_pretrained(
        warm_dir)

    def config_map(folder: Path, seq_len: int) -> dict:
        return {"model": {"name_or_path": str(folder)}, "lora": {"r": 8, "dropout": 0.05},
                "train": {"seq_len": seq_len, "batch_size": 1, "gradient_checkpointing": False,
                          "loss": "chunked", "loss_chunk_tokens": 256, "precision": "fp32", "objective": objective}}

    config = validate_config(config_map(model_dir, 512))
    shape = shape_of(config)
    budget = estimate(_with(config, seq_len=640), "cpu", shape=shape, capacity=False).peak_bytes + 2**20
    device = DeviceSpec("test CPU", budget, "cpu", False)
    longest = estimate(config, device, shape=shape).max_seq_len
    assert 640 <= longest < 700  # the plan grows with every token: about what the budget was made from
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                           os.environ.get("PYTHONPATH", "")]))
    spec = {"config": config_map(model_dir, longest), "warmup_config": config_map(warm_dir, 64)}
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("helpers_plan.py")), json.dumps(spec)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    measured = json.loads(proc.stdout.strip().splitlines()[-1])["measured_bytes"]
    print(f"budget {budget / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB at seq_len {longest}")
    # within the planner's accuracy: never under by more than 15% (a plan that says "fits" must
    # hold), over by up to 20%: the backward working set (C_BACKWARD) was fitted on an AVX2 CPU,
    # and an AMX CPU's step measures less (+15.5% over-prediction there). A DPO step's tokens are
    # doubled (two sequences per pair), so that per-token excess is a larger share: up to 25% (+21.6%)
    over = 0.25 if objective == "dpo" else 0.20
    assert -0.15 * measured <= budget - measured <= over * measured, (budget / 2**20, measured / 2**20)
