"""Measures what one lorafit training step really takes, in a fresh process (run as a script).

    python tests/helpers_plan.py '{"config": {...}, "warmup_config": {...}}'

The way benchmarks/plan_accuracy.py measures, so the planner's tests compare like with like: a
warm-up step of a one-layer model of the same architecture (libraries, kernels and allocator
pools any run needs), the RSS as baseline, the model loaded the way ``lorafit train`` loads it,
VmHWM reset (``/proc/self/clear_refs``), one step (loss, backward, clipping, AdamW), and the peak
RSS above the baseline. Run it with ``MALLOC_MMAP_THRESHOLD_`` low so freed blocks leave RSS.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path
from typing import Any


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def train_step(config_map: dict[str, Any], before_step: Any = None) -> None:
    import torch

    from lorafit.config import validate_config
    from lorafit.modeling import load_model
    from lorafit.objectives import build_objective
    from lorafit.resolved import resolve

    config = validate_config(config_map)
    run = resolve(config)
    model, _ = load_model(run, torch.device("cpu"))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=2e-4)
    objective = build_objective(run, model)
    g = torch.Generator().manual_seed(0)
    sequences = 2 if config.train.objective != "sft" else 1  # a preference pair: chosen and rejected
    shape = (config.train.batch_size * sequences, config.train.seq_len)
    ids = torch.randint(0, model.config.vocab_size, shape, generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    if before_step is not None:
        before_step()
    loss, n, _ = objective.loss(model, batch)
    (loss / max(n, 1)).backward()
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    import torch

    spec = json.loads(sys.argv[1])
    torch.set_num_threads(1)
    train_step(spec["warmup_config"])
    gc.collect()
    baseline = _kib("VmRSS")

    def reset() -> None:
        gc.collect()
        Path("/proc/self/clear_refs").write_text("5")

    train_step(spec["config"], before_step=reset)
    print(json.dumps({"measured_bytes": _kib("VmHWM") - baseline}))


if __name__ == "__main__":
    main()
