"""lorafit plan --nproc N with train.fsdp: a Llama-3-70B-shaped nf4 base on 24 GB and 40 GB GPUs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lorafit.config import validate_config
from lorafit.planner import (
    GATHERED_BLOCKS,
    GIB,
    estimate,
    model_shape,
    render,
    resolve_device,
    resolve_for,
)

LLAMA_70B = {"model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
             "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256,
             "max_position_embeddings": 8192, "tie_word_embeddings": False}


@pytest.fixture(scope="module")
def llama70b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("llama-70b") / "config.json"
    path.write_text(json.dumps(LLAMA_70B), encoding="utf-8")
    return path


def config70(path: Path, **train: object) -> object:
    settings = {"fsdp": True, "seq_len": 1024, "batch_size": 1, "gradient_checkpointing": True}
    settings.update(train)
    return validate_config({"model": {"name_or_path": str(path), "quantization": "nf4"}, "train": settings})


@pytest.fixture(scope="module")
def shape70(llama70b: Path) -> object:
    return model_shape(resolve_for(config70(llama70b), resolve_device("rtx4090")))


def test_70b_nf4_needs_four_24gb_gpus_or_two_with_cpu_offload(llama70b: Path, shape70: object) -> None:
    config = config70(llama70b)
    one, two, four = (estimate(config, "rtx4090", shape=shape70, processes=n) for n in (1, 2, 4))
    assert not one.fits and one.settings["fsdp_fits"] == {"processes": 4, "cpu_offload": False,
                                                         "peak_bytes": four.peak_bytes}
    assert not two.fits
    first = two.suggestions[0]
    assert first.overrides == ["train.fsdp_cpu_offload=true"] and first.fits
    assert four.fits and four.memory_bytes - four.peak_bytes > 4 * GIB
    eight = estimate(config, "a100-40gb", shape=shape70, processes=8)
    assert eight.fits and eight.peak_bytes < 16 * GIB

    # each rank keeps 1/N of the packed 4-bit blocks (+ the blocks in flight), the rest whole and in
    # bf16 (one process prepares the base for k-bit training: the rest upcast to fp32)
    packed = math.ceil(shape70.quantizable_params / 2)
    in_flight = GATHERED_BLOCKS * (packed // shape70.layers)
    rest = shape70.base_params - shape70.quantizable_params
    dropped = one.part_bytes("weights") - two.part_bytes("weights")
    assert dropped == pytest.approx(packed - packed // 2 - in_flight + rest * (4 - 2), abs=1)
    assert two.part_bytes("optimizer") * 2 == pytest.approx(one.part_bytes("optimizer"), rel=1e-6)
    text = render(two)
    assert "fsdp: blocks sharded over 2 processes; figures are per GPU" in text
    assert "does NOT fit" in text and "train.fsdp_cpu_offload=true" in text
    assert "or shard it: with train.fsdp over 4 x RTX 4090 24GB" in render(one)


def test_cpu_offload_keeps_the_shards_in_host_memory(llama70b: Path, shape70: object) -> None:
    plain = estimate(config70(llama70b), "rtx4090", shape=shape70, processes=2)
    offload = estimate(config70(llama70b, fsdp_cpu_offload=True), "rtx4090", shape=shape70, processes=2)
    packed = math.ceil(shape70.quantizable_params / 2)
    assert plain.part_bytes("weights") - offload.part_bytes("weights") == packed // 2
    assert offload.part_bytes("optimizer") == 0 and offload.fits
    assert offload.settings["host_bytes_per_rank"] >= packed // 2
    assert "each rank's shards in host memory" in render(offload)


def test_an_int8_base_is_not_sharded(llama70b: Path, shape70: object) -> None:
    config = config70(llama70b)
    config.model.quantization = "int8"
    one = estimate(config, "a100-80gb", shape=shape70, processes=1, suggest=False)
    assert estimate(config, "a100-80gb", shape=shape70, processes=4, suggest=False).peak_bytes == one.peak_bytes
