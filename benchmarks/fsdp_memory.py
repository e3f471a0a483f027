"""FSDP on this CPU: each rank's memory against ``lorafit plan --nproc``, and the host memory of loading.

    python benchmarks/fsdp_memory.py                 # 2 processes (gloo), none and nf4, replicated and FSDP
    python benchmarks/fsdp_memory.py --only nf4      # one quantization

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
follows live memory. Prints a table and a final JSON line.
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
SHAPE = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 12, "num_attention_heads": 8,
         "num_key_value_heads": 4}
SEQ_LEN = 256
TARGET = 0.15  # the planner's accuracy on this CPU (benchmarks/plan_accuracy.py)


def save_model(folder: Path, layers: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import build_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    build_tokenizer(folder, 384)
    config = LlamaConfig(vocab_size=384, max_position_embeddings=1024, bos_token_id=0, eos_token_id=0,
                         pad_token_id=1, tie_word_embeddings=False, **{**SHAPE, "num_hidden_layers": layers})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)


def run_config(model: Path, data: Path, out: Path, quant: str, fsdp: bool) -> dict[str, Any]:
    return {
        "model": {"name_or_path": str(model), "quantization": quant},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"path": str(data), "format": "summarization", "eval_fraction": 0, "packing": "packed",
                 "cache": False},
        "train": {"max_steps": 1, "seq_len": SEQ_LEN, "batch_size": 1, "grad_accum": 1,
                  "gradient_checkpointing": True, "eval_steps": None, "fsdp": fsdp, "precision": "fp32"},
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

    torch.set_num_threads(1)
    warm = LoraFinetuneRecipe(validate_config(spec["warmup"]), progress=False, overwrite=True)
    warm.setup()
    warm.fit()
    warm.finish()
    del warm
    gc.collect()
    baseline = _status_kib("VmRSS") * 1024
    Path("/proc/self/clear_refs").write_text("5")
    recipe = LoraFinetuneRecipe(validate_config(spec["config"]), progress=False, overwrite=True)
    recipe.setup()
    load_peak = _status_kib("VmHWM") * 1024 - baseline
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    recipe.fit()
    step_peak = _status_kib("VmHWM") * 1024 - baseline
    recipe.finish()
    record = {"rank": recipe.rank, "load_peak_bytes": load_peak, "step_peak_bytes": step_peak}
    Path(spec["out"] + f".rank{recipe.rank}.json").write_text(json.dumps(record))


def measure(spec: dict[str, Any], tmp: Path) -> list[dict[str, Any]]:
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'src'}:{ROOT / 'benchmarks'}", TOKENIZERS_PARALLELISM="false",
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
        model, tiny = tmp / "model", tmp / "tiny"
        save_model(model, SHAPE["num_hidden_layers"])
        save_model(tiny, 1)
        data = tmp / "rows.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in generate(64, 11)), encoding="utf-8")
        model_bytes = sum(p.stat().st_size for p in model.glob("*.safetensors"))
        for quant in [args.only] if args.only else ["none", "nf4"]:
            for fsdp in (False, True):
                label = f"{quant} {'fsdp' if fsdp else 'replicated'}"
                config = run_config(model, data, tmp / label.replace(" ", "-"), quant, fsdp)
                spec = {"config": config, "warmup": run_config(tiny, data, tmp / f"warm-{len(rows)}", quant, fsdp),
                        "out": str(tmp / label.replace(" ", "-"))}
                ranks = measure(spec, tmp)
                plan = estimate(validate_config(config), resolve_device("cpu"), processes=2)
                predicted = plan.peak_bytes
                for rank in ranks:
                    error = predicted / rank["step_peak_bytes"] - 1
                    rows.append({"run": label, "rank": rank["rank"], "predicted_mib": round(predicted / MIB, 1),
                                 "step_peak_mib": round(rank["step_peak_bytes"] / MIB, 1), "error": round(error, 4),
                                 "load_peak_mib": round(rank["load_peak_bytes"] / MIB, 1)})
                    print(f"{label:<16} rank {rank['rank']}: step peak {rank['step_peak_bytes'] / MIB:7.1f} MiB, "
                          f"plan {predicted / MIB:7.1f} MiB ({error:+.1%}); loading peak "
                          f"{rank['load_peak_bytes'] / MIB:7.1f} MiB", flush=True)
    machine = f"CPU {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}"
    print()
    print(f"model: Llama {SHAPE}, vocab 384, fp32 safetensors {model_bytes / MIB:.0f} MiB; seq_len {SEQ_LEN}, "
          "batch 1, checkpointing on, 2 processes (gloo)")
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
