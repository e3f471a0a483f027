"""lorafit's DPO beside TRL's DPOTrainer: same SFT adapter, pairs, template, settings; one run.

    lorafit train                                   # the embedded default (SFT): output/lorafit-default
    python benchmarks/dpo_vs_trl.py --sft output/lorafit-default
    pip install -e .[bench]                         # TRL, pinned (the peer; benchmark only)

Both systems continue the SFT run's adapter with DPO, the adapter as it was being the reference
(lorafit: ``model.adapter``, the starting weights swapped in for the reference forward; TRL: given
the adapter as a PeftModel, DPOTrainer copies it into a frozen ``ref`` adapter itself), on
``builtin:dialogue-preferences`` with the SFT run's summarization prompt as template, scored on the
first ``--eval-pairs`` pairs of ``builtin:dialogue-preferences-test``. The same beta (sigmoid loss),
learning rate, cosine schedule with warmup, batch, max length, AdamW, gradient clipping, seed, fp32,
no dropout (TRL's ``disable_dropout``; lorafit ``lora.dropout: 0``), no gradient checkpointing.

The two run in their own subprocesses at the same time, one thread each, so the load of a shared
machine falls on both alike. Printed per system: held-out reward accuracy and margin after
training (lorafit: its last evaluation; TRL: ``trainer.evaluate``), training seconds (lorafit: the
loop's elapsed time; TRL: ``train_runtime``; neither counts evaluation), pairs/s and peak RSS; then
the ratios, and one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TEMPLATE = "Summarize the chat dialogue:\n{prompt}\n---\nSummary:\n"


def _peak_rss_gib() -> float:
    """This process's own peak RSS (VmHWM: ru_maxrss would keep the parent's, as it was at exec)."""
    from lorafit.reporting import peak_memory_gib

    return peak_memory_gib(None)


def run_lorafit(args: argparse.Namespace) -> dict[str, Any]:
    from lorafit.config import load_config
    from lorafit.training import train

    out = Path(args.out) / "lorafit"
    config = load_config("builtin:dpo", [
        f"model.adapter={args.sft}", "model.dtype=float32", "train.precision=fp32",  # as TRL's side runs
        "data.eval_path=builtin:dialogue-preferences-test",
        f"data.max_eval_rows={args.eval_pairs}", f"train.max_steps={args.steps}", f"train.batch_size={args.batch}",
        f"train.lr={args.lr}", f"train.beta={args.beta}", f"train.seq_len={args.seq_len}", "train.eval_steps=null",
        f"train.warmup_steps={args.warmup}", f"output_dir={out}"])
    result = train(config, resume=False, overwrite=True, log_format="quiet")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_loss" in r]
    steps = [r for r in records if r.get("loss") is not None]
    return {"system": "lorafit", "run": str(out), "steps": result.steps,
            "first_eval_loss": evals[0]["eval_loss"], "first_reward_accuracy": evals[0]["eval_reward_accuracy"],
            "reward_accuracy": evals[-1]["eval_reward_accuracy"], "reward_margin": evals[-1]["eval_reward_margin"],
            "eval_loss": evals[-1]["eval_loss"], "train_s": steps[-1]["elapsed_s"], "peak_rss_gib": _peak_rss_gib()}


def run_trl(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from lorafit.builtin import resolve_data
    from lorafit.runs import locate_run

    target = locate_run(args.sft)
    base = target.config.model.name_or_path
    from lorafit.builtin import resolve_model

    model = AutoModelForCausalLM.from_pretrained(resolve_model(base), dtype=torch.float32)
    # a PeftModel with a trained adapter: DPOTrainer copies it as a frozen "ref" adapter, its reference
    model = PeftModel.from_pretrained(model, str(target.adapter_dir), is_trainable=True)
    tokenizer = AutoTokenizer.from_pretrained(str(target.adapter_dir))

    def rows(path: str, limit: int | None = None) -> Dataset:
        lines = Path(resolve_data(path)).read_text().splitlines()[:limit]
        data = [json.loads(line) for line in lines]
        return Dataset.from_list([{"prompt": TEMPLATE.format(prompt=r["prompt"]), "chosen": r["chosen"],
                                   "rejected": r["rejected"]} for r in data])

    config = DPOConfig(output_dir=str(Path(args.out) / "trl"), max_steps=args.steps,
                       per_device_train_batch_size=args.batch, per_device_eval_batch_size=args.batch,
                       gradient_accumulation_steps=1, learning_rate=args.lr, lr_scheduler_type="cosine",
                       warmup_steps=args.warmup, beta=args.beta, max_length=args.seq_len, bf16=False, use_cpu=True,
                       gradient_checkpointing=False, logging_steps=1, report_to=[], save_strategy="no",
                       eval_strategy="no", seed=42, disable_dropout=True, max_grad_norm=1.0, weight_decay=0.0)
    trainer = DPOTrainer(model=model, args=config, train_dataset=rows("builtin:dialogue-preferences"),
                         eval_dataset=rows("builtin:dialogue-preferences-test", args.eval_pairs),
                         processing_class=tokenizer)
    first = trainer.evaluate()
    output = trainer.train()
    final = trainer.evaluate()
    return {"system": "trl", "steps": output.global_step, "first_eval_loss": first["eval_loss"],
            "first_reward_accuracy": first["eval_rewards/accuracies"],
            "reward_accuracy": final["eval_rewards/accuracies"], "reward_margin": final["eval_rewards/margins"],
            "eval_loss": final["eval_loss"], "train_s": round(output.metrics["train_runtime"], 3),
            "peak_rss_gib": _peak_rss_gib()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sft", default="output/lorafit-default", help="the SFT run both continue")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-pairs", type=int, default=32)
    parser.add_argument("--out", default=None, help="where the runs go (default: a temporary folder)")
    parser.add_argument("--child", choices=["lorafit", "trl"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = run_lorafit(args) if args.child == "lorafit" else run_trl(args)
        print(json.dumps(result), flush=True)
        return
    args.out = args.out or tempfile.mkdtemp(prefix="dpo-vs-trl-")
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1")
    started = time.time()
    children = {}
    for system in ("lorafit", "trl"):
        command = [sys.executable, __file__, "--child", system, "--sft", str(args.sft), "--steps", str(args.steps),
                   "--batch", str(args.batch), "--lr", str(args.lr), "--beta", str(args.beta), "--warmup",
                   str(args.warmup), "--seq-len", str(args.seq_len), "--eval-pairs", str(args.eval_pairs),
                   "--out", args.out]
        children[system] = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                            env=env)
    results = {}
    for system, child in children.items():
        out, err = child.communicate()
        if child.returncode != 0:
            sys.exit(f"{system} failed:\n{err[-4000:]}")
        results[system] = json.loads(out.strip().splitlines()[-1])
    pairs = args.steps * args.batch
    for system, r in results.items():
        r["pairs_per_s"] = round(pairs / r["train_s"], 4)
        print(f"{system:>8}: held-out reward accuracy {r['first_reward_accuracy']:.3f} -> {r['reward_accuracy']:.3f}, "
              f"margin {r['reward_margin']:.4f}, eval loss {r['first_eval_loss']:.4f} -> {r['eval_loss']:.4f}; "
              f"{r['train_s']:.0f} s for {r['steps']} steps ({r['pairs_per_s']:.3f} pairs/s); "
              f"peak RSS {r['peak_rss_gib']:.2f} GiB")
    lorafit, trl = results["lorafit"], results["trl"]
    summary = {"steps": args.steps, "batch": args.batch, "lr": args.lr, "beta": args.beta,
               "eval_pairs": args.eval_pairs, "wall_s": round(time.time() - started, 1),
               "reward_accuracy_points": round(100 * (lorafit["reward_accuracy"] - trl["reward_accuracy"]), 2),
               "speed_ratio": round(lorafit["pairs_per_s"] / trl["pairs_per_s"], 3),
               "memory_ratio": round(lorafit["peak_rss_gib"] / trl["peak_rss_gib"], 3), "systems": results}
    print(f"lorafit / trl: reward accuracy {summary['reward_accuracy_points']:+.1f} points, speed x"
          f"{summary['speed_ratio']}, peak memory x{summary['memory_ratio']}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
