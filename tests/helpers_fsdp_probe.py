"""Run lorafit's recipe under torchrun and record what each rank holds of the block weights.

    torchrun --nproc_per_node 2 tests/helpers_fsdp_probe.py OUT_PREFIX CONFIG.yaml [CONFIG.yaml ...]

Runs the configs one after another in the same processes (one start-up) and writes
OUT_PREFIX.rank<R>.json per rank: one record per config, in order. Block weights held at a
moment = every block's local
shard (FSDP keeps it throughout) + the full weights of each block that is gathered at that moment
(FSDP registers the gathered tensors on the module in place of the DTensor shards; a replicated
model holds everything, always). Moments: each block's forward (start and end), the end of the
backbone's forward (where the loss runs) and the start of each block's backward, during training
steps only. Peak RSS covers the training steps only: VmHWM is reset before setup and again before the steps (RSS at each start and each
peak recorded).
"""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path

import torch

TRACE = bool(os.environ.get("LORAFIT_PROBE_TRACE"))


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _weight_params(block: torch.nn.Module) -> list[torch.Tensor]:
    return [p for name, p in block.named_parameters() if "lora_" not in name]


def measure(config_path: str) -> dict:
    """One run of the recipe with the probe's hooks; this rank's record."""
    from torch.distributed.tensor import DTensor

    from lorafit.config import load_config
    from lorafit.distributed import _unwrap
    from lorafit.probe import backbone_of
    from lorafit.training import LoraFinetuneRecipe

    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    rss_start = _status_kib("VmRSS") * 1024
    config = load_config(config_path, [])
    recipe = LoraFinetuneRecipe(config, progress=False)
    recipe.setup()
    rss_setup_peak = _status_kib("VmHWM") * 1024  # loading and sharding
    model = recipe.model
    base = _unwrap(model)
    backbone = backbone_of(base)
    names = set(base._no_split_modules)  # FSDP2 subclasses each block's class: match the MRO
    blocks = [m for m in backbone.modules() if names & {c.__name__ for c in type(m).__mro__} and m is not backbone]

    def nbytes(t: torch.Tensor) -> int:
        local = t.to_local() if isinstance(t, DTensor) else t
        return local.numel() * local.element_size()

    def full_bytes(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    shard = sum(nbytes(p) for b in blocks for p in _weight_params(b) if isinstance(p, DTensor))
    total = sum(full_bytes(p) for b in blocks for p in _weight_params(b))
    state = {"peak": 0, "at": "", "gathered_blocks": 0}

    def sample(at: str) -> None:
        if not model.training:
            return
        gathered = [b for b in blocks if any(not isinstance(p, DTensor) for p in _weight_params(b))]
        held = shard + sum(full_bytes(p) for b in gathered for p in _weight_params(b))
        if held > state["peak"]:
            state.update(peak=held, at=at, gathered_blocks=len(gathered))
        if TRACE:
            print(f"rank {recipe.rank} {at}: held {held / 2**20:.1f} MiB, gathered {len(gathered)}, "
                  f"RSS {_status_kib('VmRSS') / 1024:.0f} MiB", flush=True)

    handles = []
    for index, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(lambda m, a, i=index: sample(f"forward {i} start")))

        def after(module: torch.nn.Module, args: object, output: object, i: int = index) -> None:
            sample(f"forward {i} end")
            first = output[0] if isinstance(output, tuple) else output
            if isinstance(first, torch.Tensor) and first.requires_grad:
                first.register_hook(lambda grad: sample(f"backward {i} start"))

        handles.append(block.register_forward_hook(after))
    handles.append(backbone.register_forward_hook(lambda m, a, o: sample("end of forward (loss)")))

    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    rss_before = _status_kib("VmRSS") * 1024
    recipe.fit()
    rss_steps_peak = _status_kib("VmHWM") * 1024
    recipe.finish()
    for handle in handles:
        handle.remove()
    return {
        "config": config_path, "rank": recipe.rank, "world": recipe.world, "blocks": len(blocks),
        "block_weight_bytes": total, "shard_bytes": shard,
        "block_weight_dtypes": sorted({str(p.dtype) for b in blocks for n, p in b.named_parameters()
                                       if "lora_" not in n and p.dim() == 2 and p.shape[1] == 1}),
        "peak_held_bytes": state["peak"], "peak_at": state["at"], "gathered_at_peak": state["gathered_blocks"],
        "rss_start": rss_start, "rss_setup_peak": rss_setup_peak,
        "rss_before_steps": rss_before, "rss_steps_peak": rss_steps_peak,
    }


def main(out_prefix: str, configs: list[str]) -> None:
    records = [measure(path) for path in configs]
    rank = records[0]["rank"]
    Path(f"{out_prefix}.rank{rank}.json").write_text(json.dumps(records), encoding="utf-8")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
