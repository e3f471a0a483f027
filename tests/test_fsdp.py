"""FSDP that shards (train.fsdp): measured under torchrun with gloo on this CPU, 2 processes.

tests/helpers_fsdp_probe.py runs lorafit's own recipe and records, per rank, the block weights held
at the step's peak (the local shards plus any block gathered at that moment) and the RSS.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import build_tokenizer, tiny_run_config
from safetensors.torch import load_file

from lorafit.training import eval_shard

PROBE = Path(__file__).with_name("helpers_fsdp_probe.py")
# nf4, fp32 compute, 4 AdamW steps at lr 5e-3: 1 process x batch 2 vs 2 x batch 1 measured 2.1e-6
# (max abs over the adapter, whose largest weight is 0.13); bf16: see benchmarks/RESULTS.md
NF4_TOLERANCE = 1e-5
# big allocations by mmap, freed ones returned at once: RSS follows live memory (as in
# benchmarks/plan_accuracy.py), for the replicated and the sharded run alike
ENV = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")


def deep_llama(folder: Path, layers: int, hidden: int, intermediate: int) -> Path:
    """A Llama with many narrow blocks: most of its bytes are block weights, and one gathered
    block is a small share of them (the shard is what the test looks for)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    folder.mkdir(parents=True, exist_ok=True)
    build_tokenizer(folder, 384)
    config = LlamaConfig(vocab_size=384, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, bos_token_id=0, eos_token_id=0, pad_token_id=1,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    return folder


def write_config(tmp_path: Path, model: Path, data: Path, name: str, **train: object) -> Path:
    settings = {"max_steps": 1, "batch_size": 1, "eval_steps": None, "save_steps": None}
    settings.update(train)
    quantization = settings.pop("quantization", "none")
    eval_fraction = settings.pop("eval_fraction", 0.1)
    raw = tiny_run_config(model, data, tmp_path / name, **settings)
    raw["data"]["packing"] = "none"
    raw["data"]["eval_fraction"] = eval_fraction
    raw["model"]["quantization"] = quantization
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def probe(tmp_path: Path, config: Path, **env: str) -> tuple[list[dict], str]:
    """Run the recipe on 2 processes with the probe: its record for each rank, and the output."""
    prefix = tmp_path / f"probe-{config.stem}"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(PROBE), str(prefix), str(config)]
    done = subprocess.run(command, capture_output=True, text=True, env={**ENV, **env}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(Path(f"{prefix}.rank{r}.json").read_text())[0] for r in range(2)], done.stdout


def train(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "lorafit", "train", *args, "--no-progress"],
                          capture_output=True, text=True, env=ENV, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_evaluation_gives_every_rank_the_same_number_of_forwards() -> None:
    starts = [0, 1, 2, 3, 4]
    shards = [eval_shard(starts, rank, 2) for rank in range(2)]
    assert [len(s) for s in shards] == [3, 3]
    counted = sorted(start for shard in shards for start, used in shard if used)
    assert counted == starts  # each batch counted once, the padding forward not at all
    assert eval_shard([], 1, 2) == []


@pytest.mark.heavy  # ~50 s of two torchrun processes: the heavy step (the main suite keeps the other FSDP tests)
@pytest.mark.newest
def test_fsdp_holds_half_the_block_weights_at_the_peak(dialogue_file: Path, tmp_path: Path) -> None:
    # 32 blocks: FSDP's own buffers during a step (about three gathered blocks) are a fixed cost,
    # so the half of the blocks not held stands well clear of them and of the runtime's RSS noise
    layers = 32
    model = deep_llama(tmp_path / "deep", layers=layers, hidden=256, intermediate=1536)
    # separate processes: nothing left over from one run inflates the other's RSS
    replicated, _ = probe(tmp_path, write_config(tmp_path, model, dialogue_file, "replicated", eval_fraction=0))
    sharded, out = probe(tmp_path, write_config(tmp_path, model, dialogue_file, "sharded", fsdp=True, eval_fraction=0))
    assert "FSDP: transformer blocks sharded over 2 processes; rank 0 read the weights" in out
    blocks = replicated[0]["block_weight_bytes"]
    one_block = blocks / layers
    for rep, fsdp in zip(replicated, sharded, strict=True):
        assert rep["peak_held_bytes"] == blocks  # replicated: every block, all the time
        assert fsdp["shard_bytes"] == pytest.approx(blocks / 2, rel=0.01)
        # at the peak: the shard plus the one block that runs (the old per-block roots kept every
        # block gathered from its forward to its backward: 1.5x the blocks)
        assert fsdp["gathered_at_peak"] <= 2
        assert blocks / 2 < fsdp["peak_held_bytes"] <= blocks / 2 + 2 * one_block, fsdp
        # the RSS during the steps, counted from each process's start (the runtime's own RSS varies
        # by several MB between launches): lower by the half not held (0.5), less FSDP's gather
        # buffers and the allocator's slack (quiet: 0.35 left; a loaded machine eats more; the held
        # bytes above are exact)
        replicated_rise, sharded_rise = (run["rss_steps_peak"] - run["rss_start"] for run in (rep, fsdp))
        assert sharded_rise < replicated_rise - 0.15 * blocks, (fsdp, rep)
    # loading: rank 1 never holds the model (rank 0 reads it and sends each rank its shard)
    rise = [run[1]["rss_setup_peak"] - run[1]["rss_start"] for run in (replicated, sharded)]
    assert rise[1] < rise[0] - 0.5 * blocks, rise
    # the same global batch: the sharded run trains the same adapter
    assert max_diff(adapter(tmp_path / "replicated"), adapter(tmp_path / "sharded")) < 1e-5
    state = load_file(str(tmp_path / "sharded" / "checkpoints" / "step-0000001" / "trainable.safetensors"))
    assert state and all(t.dim() == 2 for t in state.values())  # full tensors: any number of processes can resume


@pytest.mark.heavy  # ~60 s of two torchrun processes: the heavy step (the main suite keeps the other FSDP tests)
@pytest.mark.newest
def test_nf4_fsdp_matches_one_process_and_resumes(dialogue_file: Path, tmp_path: Path) -> None:
    model = deep_llama(tmp_path / "deep8", layers=8, hidden=64, intermediate=128)
    common = {"quantization": "nf4", "fsdp": True, "max_steps": 4, "save_steps": 2, "eval_steps": 2}
    single = write_config(tmp_path, model, dialogue_file, "single", **{**common, "batch_size": 2})
    sharded = write_config(tmp_path, model, dialogue_file, "nf4sharded", **common)
    train(str(single))
    ranks, out = probe(tmp_path, sharded)
    assert "rank 0 read the weights and sent each rank its shard" in out
    for rank in ranks:  # each rank holds about half of the packed 4-bit block weights at the peak
        assert rank["block_weight_dtypes"] == ["torch.float32"]  # 4-bit storage in the compute dtype
        assert rank["shard_bytes"] == pytest.approx(rank["block_weight_bytes"] / 2, rel=0.02)
        assert rank["peak_held_bytes"] <= rank["block_weight_bytes"] * (1 / 2 + 2 / 8)
    diff = max_diff(adapter(tmp_path / "single"), adapter(tmp_path / "nf4sharded"))
    assert diff < NF4_TOLERANCE, diff

    # resume: drop the last checkpoint and the outputs, run again from step 2, this time with the
    # shards in host memory: the same base weights, statistics and adapter state, so the same
    # adapter, bit for bit
    run = tmp_path / "nf4sharded"
    first = adapter(run)
    shutil.rmtree(run / "checkpoints" / "step-0000004")
    shutil.rmtree(run / "adapter")
    (run / "result.json").unlink()
    raw = yaml.safe_load(sharded.read_text(encoding="utf-8"))
    raw["train"]["fsdp_cpu_offload"] = True
    again = tmp_path / "nf4again.yaml"
    again.write_text(yaml.safe_dump(raw), encoding="utf-8")
    _, out = probe(tmp_path, again)
    assert "rank 0 read the weights" in out and "CPU offload" in out
    assert "resuming from" in out and "step 2 of 4" in out
    assert max_diff(first, adapter(run)) == 0.0


def test_nf4_under_fsdp_stores_4bit_weights_in_the_compute_dtype(tiny_llama: Path, dialogue_file: Path,
                                                                    tmp_path: Path) -> None:
    from bitsandbytes.nn import Params4bit

    from lorafit.config import load_config
    from lorafit.modeling import load_model
    from lorafit.resolved import Environment, resolve

    def dtypes(fsdp: bool, processes: int = 2) -> tuple[set[torch.dtype], set[torch.dtype]]:
        path = write_config(tmp_path, tiny_llama, dialogue_file, f"bf16-{fsdp}", quantization="nf4", fsdp=fsdp)
        config = load_config(str(path), ["model.dtype=bfloat16", "train.precision=bf16"])
        # resolved as rank 0 of a 2-process run would (this process loads; nothing is sharded here)
        model, _ = load_model(resolve(config, Environment("cpu", True, processes)), torch.device("cpu"))
        packed = {p.dtype for p in model.parameters() if isinstance(p, Params4bit)}
        norms = {p.dtype for n, p in model.named_parameters() if "norm" in n}
        return packed, norms

    # FSDP shards floating-point tensors: the packed 4-bit data is viewed as bf16, and the
    # unquantized rest stays bf16 (not upcast to fp32 as k-bit preparation does for one GPU)
    assert dtypes(True) == ({torch.bfloat16}, {torch.bfloat16})
    assert dtypes(False) == ({torch.uint8}, {torch.float32})
    assert dtypes(True, processes=1) == ({torch.uint8}, {torch.float32})  # one process: nothing to shard


def test_one_four_gpu_sagemaker_instance_runs_the_same_path(tmp_path: Path) -> None:
    """ml.g5.12xlarge (4 GPUs, one host): the entry point relaunches itself through torchrun with 4
    processes, and the hyperparameters that turn FSDP on reach every rank's config."""
    from lorafit.sagemaker import entry

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"model": {"quantization": "nf4"}}), encoding="utf-8")
    environ = {"SM_MODEL_DIR": str(tmp_path / "model"), "SM_CHECKPOINT_DIR": str(tmp_path / "ckpt"),
               "SM_HOSTS": '["algo-1"]', "SM_CURRENT_HOST": "algo-1", "SM_NUM_GPUS": "4"}
    parser = entry.argparse.ArgumentParser()
    entry.add_entry_arguments(parser)
    args, extra = parser.parse_known_args(["--config", str(config), "--train.fsdp", "true",
                                           "--train.fsdp_cpu_offload", "true"])
    env = entry.SageMakerEnv.read(args, environ)
    command = entry._torchrun_command(env, entry._argv(args, extra, str(config)))
    assert {"--standalone", "--nproc_per_node=4"} <= set(command)
    child_args, child_extra = parser.parse_known_args(command[command.index("lorafit.sagemaker.entry") + 1:])
    built, _ = entry.build_config(child_args, child_extra, entry.SageMakerEnv.read(child_args, environ))
    assert built.train.fsdp and built.train.fsdp_cpu_offload and built.model.quantization == "nf4"


def test_a_meta_model_unlike_rank_0s_is_refused_in_one_line(tiny_llama: Path) -> None:
    """Building the meta model is transformers' work; if it ever builds something other than what
    rank 0 loaded, or leaves a tensor unloaded, the run stops naming it (no fallback loads the
    whole base per process)."""
    from transformers import AutoModelForCausalLM

    from lorafit.errors import LorafitError
    from lorafit.sharded_loading import _check_loaded, _match_shapes, _shapes

    loaded = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(loaded.config)
    _match_shapes(meta, _shapes(loaded))  # same architecture: accepted
    with pytest.raises(LorafitError, match="differs from the one rank 0 loaded"):
        _match_shapes(meta, {**_shapes(loaded), "model.extra.weight": ((2, 2), torch.float32)})
    with pytest.raises(LorafitError, match=r"tensors were not loaded \(e\.g\. model\.embed_tokens\.weight\)"):
        _check_loaded(meta)
