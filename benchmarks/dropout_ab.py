"""lorafit's CPU LoRA dropout, A/B in one process: the drops' gaps drawn vs an integer mask per element.

    python benchmarks/dropout_ab.py --shape llama-0.5b --steps 16

Trains lorafit's bf16 run of a benchmark shape and alternates the two draws step by step (ABBA),
so both see the same rows and the same machine state; prints each one's total and the ratio.
"""

from __future__ import annotations

import argparse
import time

import torch
from train_speed import SHAPES, build_model, lorafit_batches, shape_run

import lorafit.fused as fused
from lorafit.loss import compute_loss
from lorafit.modeling import attach_adapter


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="llama-0.5b", choices=sorted(SHAPES))
    parser.add_argument("--steps", type=int, default=16)
    args = parser.parse_args()
    shape = SHAPES[args.shape]
    run = shape_run(shape)
    config = run.config
    model, swapped = attach_adapter(build_model(shape, torch.bfloat16), run)
    print("\n".join(swapped))
    batches, _ = lorafit_batches(argparse.Namespace(samples=200, seq_len=512, shape=args.shape), shape, config,
                                 pad_to_multiple_of=run.pad_to_multiple_of)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)

    def step(batch: dict) -> float:
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, labels = compute_loss(model, batch, mode="chunked", chunk_tokens=config.train.loss_chunk_tokens)
        (loss / max(labels, 1)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    gaps_max_p = fused.GAPS_MAX_P
    for draw_max_p in (gaps_max_p, 0.0):  # warm up both draws
        fused.GAPS_MAX_P = draw_max_p
        step(batches[0])
    seconds = {"gaps": 0.0, "int mask": 0.0}
    measured = batches[1:1 + args.steps]
    for i, batch in enumerate(measured):
        for draw in ("gaps", "int mask") if i % 2 == 0 else ("int mask", "gaps"):
            fused.GAPS_MAX_P = gaps_max_p if draw == "gaps" else 0.0
            seconds[draw] += step(batch)
    for draw, total in seconds.items():
        print(f"{draw}: {total:.2f} s over {len(measured)} steps")
    print(f"int mask / gaps time: {seconds['int mask'] / seconds['gaps']:.3f}")


if __name__ == "__main__":
    main()
