"""``lorafit plan``: will the run fit the GPU, and what to change if not (from the config alone)."""

from __future__ import annotations

import argparse
import json

from lorafit.cli import add_config_arguments
from lorafit.config import load_config


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="predict peak GPU memory of a run from the model config (no weights loaded)",
        description="Predict the run's peak GPU memory part by part from the model's config "
        "(built on the meta device) and the run config, and say whether it fits the GPU.",
    )
    add_config_arguments(parser)
    parser.add_argument(
        "--gpu",
        default=None,
        metavar="NAME|SIZE",
        help="t4, a10g, l4, rtx3090, rtx4090, a100-40gb, a100-80gb, h100, h200, or a size like 24GB "
        "(default: this machine's GPU, else a10g)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--nproc", type=int, default=1, metavar="N",
                        help="processes (GPUs) the run will use; with train.fsdp the blocks are sharded N ways")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lorafit.planner import DEFAULT_GPU, estimate, render, resolve_device

    config = load_config(args.config, args.overrides)
    device = resolve_device(args.gpu)
    plan = estimate(config, device, processes=args.nproc)
    if args.json:
        print(json.dumps(plan.to_json()))
    else:
        if args.gpu is None and plan.device == resolve_device(DEFAULT_GPU).name:
            print(f"gpu: {plan.device} (no local GPU: the default; choose with --gpu)")
        print(render(plan))
    return 0
