"""LoRA vs full fine-tuning of the same small model, same data, same batches, same steps: ROUGE-L.

The LoRA paper (Hu et al. 2021) reports LoRA matching full fine-tuning while training ~0.01-1% of
the weights; this checks that claim at CPU scale on the embedded default: SmolLM2-135M-Instruct on
``builtin:dialogues``, scored on ``builtin:dialogues-test`` with greedy decoding and ROUGE
(rouge_score, F x 100). Both systems run through one loop (lorafit's data rows, chunked loss,
AdamW, warmup + cosine, grad clip 1.0); only what trains differs:

- lora: the default config's adapter (r=8, alpha=32 on q,k,v,o), lr 1e-3 (the default run's);
- full: every weight of the model trains, lr 1e-4 (full fine-tuning needs a far smaller lr).

Usage (a few minutes on an idle 2-core CPU; the numbers go to stdout and --json-out):
    python benchmarks/lora_vs_full.py [--steps 24] [--eval-rows 24] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=24, help="optimizer steps for each system")
    parser.add_argument("--batch-size", type=int, default=4, help="rows per step (no packing)")
    parser.add_argument("--lora-lr", type=float, default=1e-3)
    parser.add_argument("--full-lr", type=float, default=1e-4)
    parser.add_argument("--eval-rows", type=int, default=24, help="rows of builtin:dialogues-test scored")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--no-baseline", action="store_true", help="skip scoring the untrained model")
    parser.add_argument("--systems", default="lora,full", help="comma-separated: lora, full")
    parser.add_argument("--json-out", type=Path, default=None, help="also write the results here")
    return parser.parse_args()


def build(kind: str, run: Any) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
    from lorafit.modeling import load_base_model, load_model

    torch.manual_seed(run.config.train.seed)
    if kind == "lora":
        model, _ = load_model(run, torch.device("cpu"))
    else:
        model = load_base_model(run, torch.device("cpu"))
        for param in model.parameters():
            param.requires_grad_(True)
    return model, [p for p in model.parameters() if p.requires_grad]


def train(model: torch.nn.Module, params: list[torch.nn.Parameter], data: Any, lr: float, args: argparse.Namespace
          ) -> list[float]:
    from transformers import get_scheduler

    from lorafit.loss import compute_loss

    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=max(1, args.steps // 10),
                              num_training_steps=args.steps)
    batches = data.epoch_batches(0, args.batch_size, args.seed)[: args.steps]
    losses = []
    model.train()
    for step, rows in enumerate(batches, start=1):
        batch = data.collate([data.train[i] for i in rows])
        loss_sum, tokens = compute_loss(model, batch, mode="chunked")
        loss = loss_sum / max(tokens, 1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))
        print(f"  step {step}/{len(batches)} loss {losses[-1]:.4f}", flush=True)
    return losses


def score(model: torch.nn.Module, tokenizer: Any, rows: list[dict[str, Any]], config: Any,
          args: argparse.Namespace) -> dict[str, Any]:
    from lorafit.evaluation import score as score_rows
    from lorafit.generation import GenerationSettings

    model.eval()
    model.config.use_cache = True
    predictions: list[str] = []
    metrics = score_rows(model, tokenizer, rows, config.data, settings=GenerationSettings(
        max_new_tokens=args.max_new_tokens), batch_size=8, seq_len=config.train.seq_len, predictions_out=predictions)
    model.config.use_cache = False
    return {**metrics, "example": predictions[0] if predictions else ""}


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    from lorafit.config import load_config
    from lorafit.data import prepare_data
    from lorafit.data.sources import load_rows
    from lorafit.modeling import load_tokenizer
    from lorafit.resolved import resolve

    config = load_config(None, [f"train.max_steps={args.steps}", f"train.batch_size={args.batch_size}",
                                "data.packing=none", "data.eval_fraction=0", f"train.seed={args.seed}"])
    run = resolve(config)
    tokenizer = load_tokenizer(run)
    data = prepare_data(run, tokenizer)
    rows = [r.data for r in load_rows(["builtin:dialogues-test"], "train") if r.data][: args.eval_rows]
    print(f"data: {data.summary}\neval: {len(rows)} rows of builtin:dialogues-test", flush=True)
    results: dict[str, Any] = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    for kind in [s.strip() for s in args.systems.split(",") if s.strip()]:
        model, params = build(kind, run)
        if kind == "lora" and not args.no_baseline:  # B = 0 at init: the adapter model is the base
            started = time.perf_counter()
            results["base"] = score(model, tokenizer, rows, config, args)
            results["base"]["eval_s"] = round(time.perf_counter() - started, 1)
            print(f"base: rougeL {results['base']['rougeL']:.2f}", flush=True)
        total = sum(p.numel() for p in model.parameters())
        print(f"{kind}: training {sum(p.numel() for p in params):,d} of {total:,d} parameters", flush=True)
        started = time.perf_counter()
        losses = train(model, params, data, args.lora_lr if kind == "lora" else args.full_lr, args)
        train_s = time.perf_counter() - started
        started = time.perf_counter()
        metrics = score(model, tokenizer, rows, config, args)
        results[kind] = {**metrics, "trainable_params": sum(p.numel() for p in params), "total_params": total,
                         "first_loss": losses[0], "last_loss": losses[-1], "train_s": round(train_s, 1),
                         "eval_s": round(time.perf_counter() - started, 1)}
        print(f"{kind}: rougeL {metrics['rougeL']:.2f} (rouge1 {metrics['rouge1']:.2f}, perplexity "
              f"{metrics['perplexity']}) in {train_s:.0f}s of training", flush=True)
        del model, params
    if "lora" in results and "full" in results:
        gap = results["full"]["rougeL"] - results["lora"]["rougeL"]
        results["full_minus_lora_rougeL"] = round(gap, 2)
        print(f"ROUGE-L: lora {results['lora']['rougeL']:.2f}, full {results['full']['rougeL']:.2f} "
              f"(full - lora = {gap:+.2f}); trainable: {results['lora']['trainable_params']:,d} vs "
              f"{results['full']['trainable_params']:,d}", flush=True)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(text + "\n", encoding="utf-8")
    assert all(math.isfinite(results[k]["last_loss"]) for k in ("lora", "full") if k in results)


if __name__ == "__main__":
    main()
