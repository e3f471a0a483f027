"""Where lorafit's CPU peak memory goes, step by step (glibc/Linux only), for benchmarks/RESULTS.md.

    python benchmarks/memory_timeline.py [--shape bloom-560m] [--steps 8] [--repeat-shapes] [--bucket N]

A thread samples glibc's ``mallinfo2`` (bytes in live malloc blocks, mmapped ones included)
and the process RSS every 0.5 ms while lorafit's training step runs on the rows lorafit.data
makes. Per step it prints the live heap at the start, its peak and where in the step it was
(forward of a block / the loss's softmax / backward of a block), and the RSS. RSS minus live
heap is memory outside malloc (libraries, Python's object arenas) plus freed blocks glibc keeps; the
latter (``mallinfo2().fordblks``) is printed at the RSS peak.
``--repeat-shapes`` alternates two rows: caches keyed by shape stop growing. ``--bucket 1`` trains
unpadded rows (every row length a new shape), ``--bucket N`` pads to a multiple of N; by default the
rows are padded as lorafit pads them (``data.pad_to_multiple_of``). Step times here are inflated by
the sampling thread, which takes a core.
"""

from __future__ import annotations

import argparse
import ctypes
import resource
import threading
import time

import torch
from train_speed import SHAPES, build_model, lorafit_batches, shape_run


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ["arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost"]]


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _MallInfo2
GIB = 2**30


def live_heap() -> float:
    info = _libc.mallinfo2()
    return (info.uordblks + info.hblkhd) / GIB


def heap_free() -> float:
    """Bytes glibc holds in its heaps for reuse: freed blocks it has not given back (resident once touched)."""
    return _libc.mallinfo2().fordblks / GIB


def rss() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() / GIB


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="bloom-560m")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeat-shapes", action="store_true")
    parser.add_argument("--bucket", type=int, default=0,
                        help="pad rows to a multiple of this many tokens (default: lorafit's, 64 on a CPU; 1: unpadded)")
    args = parser.parse_args()
    torch.set_num_threads(2)

    from peft.helpers import disable_input_dtype_casting

    import lorafit.loss as loss_module
    from lorafit.loss import compute_loss
    from lorafit.modeling import attach_adapter

    shape = SHAPES[args.shape]
    run = shape_run(shape, {"train": {"seq_len": 512, "batch_size": 1, "precision": "bf16"}})
    config = run.config
    model, _ = attach_adapter(build_model(shape, torch.bfloat16), run)
    print(f"model + adapter: live heap {live_heap():.3f} GiB, freed and kept {heap_free():.3f} GiB, RSS {rss():.3f} GiB")

    state = {"phase": "", "peak": 0.0, "at": "", "rss_peak": 0.0, "rss_at": "", "on": True, "at_rss_peak": (0.0, 0.0)}

    def sample() -> None:
        while state["on"]:
            live, resident = live_heap(), rss()
            if live > state["peak"]:
                state["peak"], state["at"] = live, state["phase"]
            if resident > state["rss_peak"]:
                state["rss_peak"], state["rss_at"] = resident, state["phase"]
                state["at_rss_peak"] = (live, heap_free())
            time.sleep(0.0005)

    threading.Thread(target=sample, daemon=True).start()
    for name, module in model.named_modules():
        if name.endswith(("self_attention", "self_attn", "mlp")):
            label = name.split("layers.")[-1].split("h.")[-1]
            module.register_forward_pre_hook(
                lambda mod, inputs, label=label: state.update(
                    phase=("backward " if state["phase"].startswith(("backward", "optimizer")) else "forward ")
                    + label))
    softmax = loss_module._softmax_xent_grad_

    def traced_softmax(*a: object, **k: object) -> torch.Tensor:
        state["phase"] = "loss softmax"
        return softmax(*a, **k)

    loss_module._softmax_xent_grad_ = traced_softmax
    rows, _ = lorafit_batches(argparse.Namespace(samples=200, seq_len=512), shape, config,
                              pad_to_multiple_of=args.bucket or run.pad_to_multiple_of)
    rows = [rows[2], rows[3]] * (args.steps // 2) if args.repeat_shapes else rows[: args.steps]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    model.train()
    for step, batch in enumerate(rows):
        start_live, start_rss, started = live_heap(), rss(), time.perf_counter()
        state.update(peak=0.0, rss_peak=0.0, phase="forward")
        with disable_input_dtype_casting(model):  # LoRA in bf16, as the recipe's step runs it
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss, n = compute_loss(model, batch, mode=run.loss, chunk_tokens=config.train.loss_chunk_tokens)
            state["phase"] = "backward"
            (loss / max(n, 1)).backward()
        state["phase"] = "optimizer"
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - started
        time.sleep(0.01)
        print(f"step {step}: {batch['input_ids'].shape[1]} tokens, {n} labels, {elapsed:.2f} s | live heap start {start_live:.3f}, "
              f"peak {state['peak']:.3f} GiB ({state['at']}) | RSS start {start_rss:.3f}, peak "
              f"{state['rss_peak']:.3f} GiB ({state['rss_at']}; live {state['at_rss_peak'][0]:.3f}, "
              f"freed and kept {state['at_rss_peak'][1]:.3f}) | ru_maxrss "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.3f} GiB", flush=True)
    state["on"] = False


if __name__ == "__main__":
    main()
