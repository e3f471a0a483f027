"""Profile one training step of lorafit or the recipe (torch.profiler), for benchmarks/RESULTS.md.

    python benchmarks/profile_step.py --system lorafit --shape bloom-560m
    python benchmarks/profile_step.py --system recipe --shape llama-0.5b --precision fp32

Prints the top operators by self CPU time of the profiled steps after the warm-up.
"""

from __future__ import annotations

import argparse
import time

import torch
from train_speed import (
    RECIPE_TARGETS,
    SHAPES,
    build_model,
    lorafit_batches,
    make_samples,
    recipe_blocks,
    shape_run,
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--system", choices=["lorafit", "baseline", "recipe"], required=True)
    parser.add_argument("--shape", default="bloom-560m")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--loss", default="chunked", help="lorafit's train.loss (chunked/full)")
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--steps", type=int, default=1, help="profiled steps (after the warm-up steps)")
    parser.add_argument("--compile", action="store_true", help="lorafit's train.compile: true (two warm-up steps)")
    parser.add_argument("--lora-dropout", type=float, default=0.05, help="lorafit's lora.dropout")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    shape = SHAPES[args.shape]
    samples = make_samples(200, shape["vocab_size"])
    model = build_model(shape, dtype)
    if args.system == "lorafit":
        from lorafit.loss import compute_loss
        from lorafit.modeling import attach_adapter

        run = shape_run(shape, {"train": {"compile": args.compile}, "lora": {"dropout": args.lora_dropout}})
        if args.compile and not run.compiled:
            raise SystemExit("train.compile: this run would not compile: " + "; ".join(run.notes))
        config = run.config
        model, _ = attach_adapter(model, run)
        args.samples = 200
        batches, _ = lorafit_batches(args, shape, config, pad_to_multiple_of=run.pad_to_multiple_of)  # as lorafit.data

        def loss_of(batch: dict) -> torch.Tensor:
            loss, n = compute_loss(model, batch, mode=args.loss, chunk_tokens=config.train.loss_chunk_tokens)
            return loss / max(n, 1)
    else:
        from peft import LoraConfig, get_peft_model

        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.enable_input_require_grads()
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM",
                                                 target_modules=RECIPE_TARGETS[shape["model_type"]]))
        batches = [{k: torch.tensor([v]) for k, v in b.items()} for b in recipe_blocks(samples, args.seq_len)]

        def loss_of(batch: dict) -> torch.Tensor:
            return model(**batch).loss
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)

    def step(batch: dict) -> None:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype == torch.bfloat16):
            loss = loss_of(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    warmup = 2 if args.compile else 1  # the second step checks the compiled graph is reused
    for batch in batches[:warmup]:
        step(batch)
    batches = batches[warmup - 1:]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=False) as prof:
        started = time.perf_counter()
        for batch in batches[1:1 + args.steps]:
            step(batch)
        elapsed = time.perf_counter() - started
    tokens = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
                 for b in batches[1:1 + args.steps])
    print(f"{args.system} {args.shape}: {args.steps} step(s) {elapsed:.2f} s, {tokens} tokens ({tokens / elapsed:.1f} tokens/s, "
          "profiled: slower than unprofiled)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
