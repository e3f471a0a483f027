"""FSDP on this CPU: each rank's memory against ``lorafit plan --nproc``, and the host memory of loading.

    python benchmarks/fsdp_memory.py                 # 2 processes (gloo), none and nf4, replicated and FSDP
    python benchmarks/fsdp_memory.py --only nf4      # one quantization
    python3 benchmarks/fsdp_memory.py --gpu          # 2 GPUs (nccl, bf16), a 1B-parameter Llama shape

A Llama of a few hundred MB in fp32 (many blocks, small vocabulary: the blocks are what FSDP
shards) is saved once. For each quantization (none, nf4) x layout (replicated, train.fsdp), one
fresh ``torchrun`` of 2 processes runs lorafit's recipe (``LoraFinetuneRecipe``) on every rank:

1. warm-up: the same settings on a 1-block model of the same widths, one step, so libraries,
   kernels and gloo's buffers are loaded before anything is measured;
2. baseline: VmRSS;
3. setup (load + adapter + shard, the way ``lorafit train`` does it) with VmHWM reset before it:
   the loading peak above the baseline;
4. one training step with VmHWM reset before it: the step's peak above the baseline, which is
   what ``lorafit plan`` predicts (``estimate(config, "cpu", processes=2)``: weights, adapter
   state, activations, loss buffers; no CUDA context on a CPU).

Big allocations are mmap-ed and freed memory returned at once (as in plan_accuracy.py), so RSS
follows live memory. With ``--gpu`` the step's figures are ``torch.cuda.max_memory_allocated``
(the peak reset before setup and before the step) against the plan without the CUDA context
(``allocated_peak_bytes``); the loading figure stays the host's (VmHWM above the baseline).
Prints a table and a final JSON line.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from machine_info import cpu_name

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20
SHAPES = {  # many blocks, a small vocabulary: the blocks are what FSDP shards
    "cpu": {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 12, "num_attention_heads": 8,
            "num_key_value_heads": 4},
    "gpu": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 16,
            "num_key_value_heads": 4},
}
SEQ_LEN = 256
TARGET = 0.15  # the planner's accuracy on this CPU (benchmarks/plan_accuracy.py)


def save_tokenizer(folder: Path) -> None:
    """A 384-token byte-level BPE trained on lorafit's builtin dialogues (nothing downloaded)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lorafit.builtin.dialogues import generate

    core = Tokenizer(models.BPE(unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator([f"{r['dialogue']}\n{r['summary']}" for r in generate(300, 7)], trainer)
    PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|pad|>",
                            bos_token="<|endoftext|>").save_pretrained(folder)


def save_model(folder: Path, shape: dict[str, Any], layers: int, dtype: str = "float32") -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    folder.mkdir(parents=True, exist_ok=True)
    save_tokenizer(folder)
    config = LlamaConfig(vocab_size=384, max_position_embeddings=1024, bos_token_id=0, eos_token_id=0,
                         pad_token_id=1, tie_word_embeddings=False, **{**shape, "num_hidden_layers": layers})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype)).save_pretrained(folder)


def run_config(model: Path, data: Path, out: Path, quant: str, fsdp: bool, gpu: bool = False) -> dict[str, Any]:
    return {
        "model": {"name_or_path": str(model), "quantization": quant},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        # chunk: every row holds exactly seq_len tokens, the rows the plan counts (``packed`` rows
        # of these ~170-token dialogues hold one each and would measure a part-empty step)
        "data": {"path": str(data), "format": "summarization", "eval_fraction": 0, "packing": "chunk",
                 "cache": False},
        "train": {"max_steps": 1, "seq_len": SEQ_LEN, "batch_size": 1, "grad_accum": 1,
                  "gradient_checkpointing": True, "eval_steps": None, "fsdp": fsdp,
                  "precision": "auto" if gpu else "fp32"},
        "output_dir": str(out),
    }


# ------------------------------------------------------------------------------- the child
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(spec: dict[str, Any]) -> None:
    """One rank: warm-up, baseline, setup peak, step peak (bytes above the baseline)."""
    import torch

    from lorafit.config import validate_config
    from lorafit.training import LoraFinetuneRecipe

    gpu = spec.get("gpu", False)
    torch.set_num_threads(1)
    warm = LoraFinetuneRecipe(validate_config(spec["warmup"]), progress=False, overwrite=True)
    warm.setup()
    warm.fit()
    warm.finish()
    del warm
    gc.collect()

    def reset() -> int:
        """Reset the peak; the level it starts from."""
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")
        if gpu:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            return torch.cuda.memory_allocated()
        return _status_kib("VmRSS") * 1024

    def peak() -> int:
        if gpu:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return _status_kib("VmHWM") * 1024

    baseline = reset()
    host_baseline = _status_kib("VmRSS") * 1024
    recipe = LoraFinetuneRecipe(validate_config(spec["config"]), progress=False, overwrite=True)
    recipe.setup()
    load_peak = _status_kib("VmHWM") * 1024 - host_baseline  # host memory, also on a GPU
    reset()
    recipe.fit()
    step_peak = peak() - baseline
    recipe.finish()
    record = {"rank": recipe.rank, "load_peak_bytes": load_peak, "step_peak_bytes": step_peak}
    Path(spec["out"] + f".rank{recipe.rank}.json").write_text(json.dumps(record))


def measure(spec: dict[str, Any], tmp: Path) -> list[dict[str, Any]]:
    paths = [str(ROOT / "src"), str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH", "")]  # keep wheels' site
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, paths)), TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    spec_file = tmp / f"{Path(spec['out']).name}.json"
    spec_file.write_text(json.dumps(spec))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               __file__, "--child", str(spec_file)]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=3000)
    if proc.returncode != 0:
        raise RuntimeError(f"measurement failed:\n{proc.stderr[-3000:]}")
    return [json.loads(Path(spec["out"] + f".rank{r}.json").read_text()) for r in range(2)]


# ------------------------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["none", "nf4"], default=None)
    parser.add_argument("--gpu", action="store_true", help="2 GPUs (nccl, bf16) and a 1B-parameter shape")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(Path(args.child).read_text()))
        return

    import torch

    from lorafit.builtin.dialogues import generate
    from lorafit.config import validate_config
    from lorafit.planner import estimate, resolve_device

    rows = []
    with tempfile.TemporaryDirectory(prefix="fsdp-memory-") as name:
        tmp = Path(name)
        shape = SHAPES["gpu" if args.gpu else "cpu"]
        model, tiny = tmp / "model", tmp / "tiny"
        dtype = "bfloat16" if args.gpu else "float32"
        save_model(model, shape, shape["num_hidden_layers"], dtype)
        save_model(tiny, shape, 1, dtype)
        data = tmp / "rows.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in generate(64, 11)), encoding="utf-8")
        model_bytes = sum(p.stat().st_size for p in model.glob("*.safetensors"))
        for quant in [args.only] if args.only else ["none", "nf4"]:
            for fsdp in (False, True):
                label = f"{quant} {'fsdp' if fsdp else 'replicated'}"
                config = run_config(model, data, tmp / label.replace(" ", "-"), quant, fsdp, args.gpu)
                warm = run_config(tiny, data, tmp / f"warm-{len(rows)}", quant, fsdp, args.gpu)
                spec = {"config": config, "warmup": warm, "out": str(tmp / label.replace(" ", "-")), "gpu": args.gpu}
                ranks = measure(spec, tmp)
                plan = estimate(validate_config(config), resolve_device("local" if args.gpu else "cpu"), processes=2)
                predicted = plan.peak_bytes - plan.part_bytes("overhead")  # what the measurement sees
                for rank in ranks:
                    error = predicted / rank["step_peak_bytes"] - 1
                    rows.append({"run": label, "rank": rank["rank"], "predicted_mib": round(predicted / MIB, 1),
                                 "step_peak_mib": round(rank["step_peak_bytes"] / MIB, 1), "error": round(error, 4),
                                 "load_peak_mib": round(rank["load_peak_bytes"] / MIB, 1)})
                    print(f"{label:<16} rank {rank['rank']}: step peak {rank['step_peak_bytes'] / MIB:7.1f} MiB, "
                          f"plan {predicted / MIB:7.1f} MiB ({error:+.1%}); loading peak "
                          f"{rank['load_peak_bytes'] / MIB:7.1f} MiB", flush=True)
    machine = f"CPU {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}"
    if args.gpu:
        machine = f"2 x {torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    print()
    print(f"model: Llama {shape}, vocab 384, {dtype} safetensors {model_bytes / MIB:.0f} MiB; seq_len {SEQ_LEN}, "
          f"batch 1 (full rows: chunk packing), checkpointing on, 2 processes ({'nccl, bf16' if args.gpu else 'gloo, fp32'})")
    print("| run | rank | plan MiB | step peak MiB | error | loading peak MiB |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['run']} | {row['rank']} | {row['predicted_mib']:.1f} | {row['step_peak_mib']:.1f} "
              f"| {row['error']:+.1%} | {row['load_peak_mib']:.1f} |")
    worst = max(abs(r["error"]) for r in rows)
    print(f"\nmachine: {machine}; worst error {worst:.1%} (target {TARGET:.0%})")
    print(json.dumps({"machine": machine, "model_bytes": model_bytes, "rows": rows, "worst_abs_error": worst}))


if __name__ == "__main__":
    main()
