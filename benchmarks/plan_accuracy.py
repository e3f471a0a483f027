"""How close is ``lorafit plan`` to the memory a training step really takes?

    python benchmarks/plan_accuracy.py            # CPU: peak RSS above a warmed-up baseline
    python benchmarks/plan_accuracy.py --gpu      # GPU: torch.cuda.max_memory_allocated
    python benchmarks/plan_accuracy.py --only 0,3 # a subset of the grid
    python benchmarks/plan_accuracy.py --repeat 3 # 3 fresh processes per config: mean and range

On a lent GPU, one short call (bitsandbytes/pydantic wheels as in benchmarks/gpu_check.sh):
    PYTHONPATH=src python3 benchmarks/plan_accuracy.py --gpu --repeat 1 | tee $OUT/plan_accuracy.txt

A grid of small models (Llama and BLOOM shapes; quantization none / int8 / nf4; gradient
checkpointing on / off; two seq_lens; two vocabulary sizes; full and chunked loss). For each, a
fresh subprocess:

1. warms up: one training step of a tiny model of the same architecture and quantization, so
   kernels, libraries and allocator pools that any run needs are already loaded;
2. takes the baseline (CPU: VmRSS; GPU: allocated bytes, i.e. 0 after freeing);
3. loads the model the way ``lorafit train`` does (``lorafit.modeling.load_model``: quantized via
   bitsandbytes, prepared for k-bit training, checkpointing, LoRA attached), builds AdamW;
4. resets the peak (CPU: ``/proc/self/clear_refs`` 5, which resets VmHWM; GPU:
   ``reset_peak_memory_stats``), runs one step and reads the peak. (AdamW creates its states in
   this step: 2 fp32 copies of the adapter, under a MiB here.)

The step is lorafit's: ``lorafit.loss.compute_loss`` (mode and chunk from the config), backward,
gradient clipping, AdamW step, ``zero_grad(set_to_none=True)``. The prediction is
``lorafit.planner.estimate(config, device)`` for the same config and device (CPU: fp32, no CUDA
context; GPU: the config's dtype and the allocator's view, i.e. without the CUDA context).

Printed: a table (predicted, measured, error) and a final JSON line.
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
import time
from pathlib import Path
from typing import Any

from machine_info import cpu_name

MIB = 2**20
ROOT = Path(__file__).resolve().parents[1]

_LLAMA = {"model_type": "llama", "hidden_size": 384, "num_hidden_layers": 4, "num_attention_heads": 6,
          "num_key_value_heads": 6, "intermediate_size": 1024, "tie_word_embeddings": False,
          "max_position_embeddings": 2048}
_BLOOM = {"model_type": "bloom", "hidden_size": 384, "n_layer": 4, "n_head": 6}
# Held out: other widths and depths, not used when the planner's coefficients were fitted.
_LLAMA_B = {"model_type": "llama", "hidden_size": 512, "num_hidden_layers": 3, "num_attention_heads": 8,
            "num_key_value_heads": 8, "intermediate_size": 1408, "tie_word_embeddings": False,
            "max_position_embeddings": 2048}
_BLOOM_B = {"model_type": "bloom", "hidden_size": 512, "n_layer": 3, "n_head": 8}

# (name, shape, vocab, quantization, checkpointing, seq_len, loss)
GRID: list[tuple[str, dict[str, Any], int, str, bool, int, str]] = [
    ("llama none ckpt-off s512 v32k full", _LLAMA, 32000, "none", False, 512, "full"),
    ("llama none ckpt-on  s512 v32k full", _LLAMA, 32000, "none", True, 512, "full"),
    ("llama none ckpt-on  s512 v32k chunked", _LLAMA, 32000, "none", True, 512, "chunked"),
    ("llama none ckpt-off s256 v8k  chunked", _LLAMA, 8192, "none", False, 256, "chunked"),
    ("llama int8 ckpt-on  s512 v32k chunked", _LLAMA, 32000, "int8", True, 512, "chunked"),
    ("llama int8 ckpt-off s256 v8k  full", _LLAMA, 8192, "int8", False, 256, "full"),
    ("llama nf4  ckpt-on  s512 v8k  chunked", _LLAMA, 8192, "nf4", True, 512, "chunked"),
    ("llama nf4  ckpt-off s512 v32k full", _LLAMA, 32000, "nf4", False, 512, "full"),
    ("bloom none ckpt-off s512 v32k chunked", _BLOOM, 32000, "none", False, 512, "chunked"),
    ("bloom int8 ckpt-on  s512 v8k  full", _BLOOM, 8192, "int8", True, 512, "full"),
    ("bloom nf4  ckpt-off s256 v32k full", _BLOOM, 32000, "nf4", False, 256, "full"),
    ("bloom none ckpt-on  s256 v8k  chunked", _BLOOM, 8192, "none", True, 256, "chunked"),
    ("held-out llama-512 nf4 ckpt-off s384 v16k chunked", _LLAMA_B, 16000, "nf4", False, 384, "chunked"),
    ("held-out llama-512 int8 ckpt-on s384 v16k full", _LLAMA_B, 16000, "int8", True, 384, "full"),
    ("held-out bloom-512 none ckpt-on s384 v16k full", _BLOOM_B, 16000, "none", True, 384, "full"),
    ("held-out bloom-512 int8 ckpt-off s384 v16k chunked", _BLOOM_B, 16000, "int8", False, 384, "chunked"),
]
BATCH = 2
CHUNK_TOKENS = 256
TARGET = 0.15


def run_config(model_dir: str, quant: str, ckpt: bool, seq_len: int, loss: str, dtype: str) -> dict[str, Any]:
    """The lorafit config (as a mapping) for one grid point."""
    return {
        "model": {"name_or_path": model_dir, "quantization": quant, "dtype": dtype},
        "lora": {"r": 8, "alpha": 32, "dropout": 0.05},
        "train": {"seq_len": seq_len, "batch_size": BATCH, "grad_accum": 1, "gradient_checkpointing": ckpt,
                  "loss": loss, "loss_chunk_tokens": CHUNK_TOKENS, "optimizer": "adamw",
                  "precision": "bf16" if dtype == "bfloat16" else "fp32"},
    }


def save_model(shape: dict[str, Any], vocab: int, folder: Path, dtype: str) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {k: v for k, v in shape.items() if k != "model_type"}
    config = AutoConfig.for_model(shape["model_type"], vocab_size=vocab, **kwargs)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(folder, safe_serialization=True)


# ------------------------------------------------------------------------------- the child
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _train_steps(config_map: dict[str, Any], device: Any, steps: int, measure: Any = None) -> None:
    """lorafit's training step on random tokens; ``measure`` runs before the last step."""
    import torch

    from lorafit.config import validate_config
    from lorafit.loss import compute_loss
    from lorafit.modeling import load_model
    from lorafit.resolved import resolve

    config = validate_config(config_map)
    run = resolve(config)
    model, _ = load_model(run, device)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=2e-4)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (config.train.batch_size, config.train.seq_len), generator=g).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    precision = run.precision
    for step in range(steps):
        if step == steps - 1 and measure is not None:
            measure()
        with torch.autocast(device.type, dtype=precision.compute_dtype, enabled=precision.autocast):
            loss, n = compute_loss(model, batch, mode=run.loss, chunk_tokens=config.train.loss_chunk_tokens)
        (loss / max(n, 1)).backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    del model, optimizer, trainable, batch


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one grid point in this (fresh) process."""
    import torch

    torch.manual_seed(0)
    gpu = spec["gpu"]
    device = torch.device("cuda" if gpu else "cpu")
    if not gpu:
        torch.set_num_threads(int(os.environ.get("PLAN_BENCH_THREADS", "2")))
    _train_steps(spec["warmup_config"], device, 1)
    gc.collect()
    if gpu:
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = _status_kib("VmRSS") * 1024

    def reset() -> None:
        gc.collect()
        if gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")

    started = time.perf_counter()
    _train_steps(spec["config"], device, 1, measure=reset)
    if gpu:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _status_kib("VmHWM") * 1024
    return {"measured_bytes": peak - baseline, "seconds": time.perf_counter() - started}


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'src'}:{ROOT / 'benchmarks'}", TOKENIZERS_PARALLELISM="false",
               # big blocks always via mmap, so freed memory leaves RSS at once (no heap high-water)
               MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                          text=True, env=env, timeout=1200)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"measurement failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


# ------------------------------------------------------------------------------------ main
def machine() -> str:
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return f"{props.name}, {props.total_memory / 2**30:.1f} GiB, torch {torch.__version__}"
    cpu = cpu_name()
    return f"CPU {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="measure on cuda:0 (bf16) instead of the CPU (fp32)")
    parser.add_argument("--only", default=None, help="comma-separated grid indices")
    parser.add_argument("--repeat", type=int, default=1,
                        help="fresh processes per config; the table shows their mean and range")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    import torch

    from lorafit.config import validate_config
    from lorafit.planner import estimate, resolve_device

    dtype = "bfloat16" if args.gpu else "float32"
    device = resolve_device("local") if args.gpu else resolve_device("cpu")
    indices = [int(i) for i in args.only.split(",")] if args.only else list(range(len(GRID)))
    rows = []
    with tempfile.TemporaryDirectory(prefix="plan-accuracy-") as tmp:
        for index in indices:
            name, shape, vocab, quant, ckpt, seq_len, loss = GRID[index]
            width = shape["hidden_size"]
            model_dir = Path(tmp) / f"{shape['model_type']}-{width}-{vocab}"
            tiny_dir = Path(tmp) / f"{shape['model_type']}-{width}-tiny"
            if not model_dir.exists():
                save_model(shape, vocab, model_dir, dtype)
            if not tiny_dir.exists():
                tiny = dict(shape, **({"num_hidden_layers": 1} if "num_hidden_layers" in shape else {"n_layer": 1}))
                save_model(tiny, 512, tiny_dir, dtype)
            config_map = run_config(str(model_dir), quant, ckpt, seq_len, loss, dtype)
            warm = run_config(str(tiny_dir), quant, ckpt, 64, loss, dtype)
            plan = estimate(validate_config(config_map), device)
            predicted = plan.peak_bytes - plan.part_bytes("overhead")  # what the measurement sees
            results = [measure({"gpu": args.gpu, "config": config_map, "warmup_config": warm})
                       for _ in range(max(1, args.repeat))]
            runs = [r["measured_bytes"] for r in results]
            measured = sum(runs) / len(runs)
            error = predicted / measured - 1
            seconds = sum(r["seconds"] for r in results) / len(results)
            rows.append({"config": name, "predicted_mib": round(predicted / MIB, 1),
                         "measured_mib": round(measured / MIB, 1), "error": round(error, 4),
                         "measured_range_mib": [round(min(runs) / MIB, 1), round(max(runs) / MIB, 1)],
                         "peak_moment": plan.settings["peak_moment"], "seconds": round(seconds, 1)})
            spread = f" [{min(runs) / MIB:.0f}-{max(runs) / MIB:.0f}]" if len(runs) > 1 else ""
            print(f"{index:>2} {name:<40} predicted {predicted / MIB:8.1f} MiB  measured {measured / MIB:8.1f} MiB"
                  f"{spread}  error {error:+6.1%}  ({seconds:.0f} s)", flush=True)
            gc.collect()
    worst = max(abs(r["error"]) for r in rows)
    print()
    print(f"| # | config (batch {BATCH}) | predicted MiB | measured MiB (range) | error | predicted peak at |")
    print("|---|---|---:|---:|---:|---|")
    for index, row in zip(indices, rows, strict=True):
        low, high = row["measured_range_mib"]
        print(f"| {index} | {row['config']} | {row['predicted_mib']:.1f} | {row['measured_mib']:.1f} "
              f"({low:.0f}-{high:.0f}) | {row['error']:+.1%} | {row['peak_moment']} |")
    print(f"\nmachine: {machine()}; worst error {worst:.1%} (target {TARGET:.0%}); "
          f"{sum(abs(r['error']) <= TARGET for r in rows)}/{len(rows)} within target")
    print(json.dumps({"device": "cuda" if args.gpu else "cpu", "machine": machine(), "rows": rows,
                      "worst_abs_error": round(worst, 4), "within_target": worst <= TARGET,
                      "torch": torch.__version__}))


if __name__ == "__main__":
    main()
