"""``lorafit train [CONFIG]``: fine-tune per a YAML config (default: the embedded offline run)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from lorafit.cli import add_config_arguments
from lorafit.config import load_config
from lorafit.reporting import LOG_FORMATS
from lorafit.rundir import held_for_ranks


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="fine-tune a model with LoRA from a YAML config")
    add_config_arguments(parser)
    parser.add_argument("--no-resume", action="store_true", help="start over even if checkpoints exist")
    parser.add_argument("--resume-anyway", action="store_true",
                        help="resume although the config changed in fields that change the result (recorded)")
    parser.add_argument("--overwrite", action="store_true", help="replace a finished run in output_dir")
    parser.add_argument("--allow-pickle", action="store_true", help="allow pickle-based .bin/.pt model weights")
    parser.add_argument("--trust-remote-code", action="store_true", help="run the model repository's own code")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar: plain lines (--log-format plain)")
    parser.add_argument("--log-format", choices=LOG_FORMATS, default="auto",
                        help="auto: a progress bar on a terminal, plain lines otherwise; plain: one line per "
                        "logging step and eval; json: one metrics.jsonl record per line on stdout")
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors")
    parser.add_argument("--nproc", type=int, default=1, metavar="N",
                        help="data-parallel processes on this machine (launched through torchrun)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.allow_pickle:
        overrides.append("model.allow_pickle=true")
    if args.trust_remote_code:
        overrides.append("model.trust_remote_code=true")
    config = load_config(args.config, overrides)  # a bad config fails once, before any process starts
    for flag, given, why in (("--resume-anyway", args.resume_anyway and args.no_resume, "--no-resume starts over"),
                             ("--no-progress", args.no_progress and (args.quiet or args.log_format != "auto"),
                              "--quiet or --log-format decides the output"),
                             ("--log-format", args.quiet and args.log_format != "auto", "--quiet prints nothing")):
        if given and "LOCAL_RANK" not in os.environ:  # said once, by the launching process
            print(f"lorafit: note: ignored {flag}: {why}", file=sys.stderr, flush=True)
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        from lorafit.preflight import check_settings

        check_settings(config, processes=args.nproc)

        with held_for_ranks(Path(config.output_dir).expanduser()):  # refused here if another run holds it
            return _launch_distributed(args.nproc, args.argv)
    from lorafit.training import train

    log_format = "quiet" if args.quiet else "plain" if args.no_progress and args.log_format == "auto" else args.log_format
    result = train(config, resume=not args.no_resume, overwrite=args.overwrite, log_format=log_format,
                   resume_anyway=args.resume_anyway)
    # stdout carries only records in json mode; the summary goes to stderr there, nowhere when quiet
    out = sys.stderr if log_format in ("json", "quiet") else sys.stdout
    reports = os.environ.get("RANK", "0") == "0"  # under a launcher, rank 0 speaks for the run
    if result.stopped_by:
        if reports:
            print(f"lorafit: stopped by {result.stopped_by} at step {result.steps} of {result.max_steps}; "
                  f"checkpoint saved under {result.output_dir}/checkpoints. Run the same command again to resume.",
                  file=out, flush=True)
        return 128 + int(getattr(signal, result.stopped_by))
    if log_format == "quiet" or not reports:
        return 0
    first, last = result.first_eval_loss, result.final_eval_loss
    if first is not None and last is not None:
        print(f"lorafit: eval loss {first:.4f} -> {last:.4f} over {result.steps} steps", file=out)
    skipped = f"; {result.skipped_nonfinite} non-finite steps skipped" if result.skipped_nonfinite else ""
    print(f"lorafit: done in {result.elapsed_s:.0f} s{skipped}. adapter: {result.adapter_dir}", file=out)
    return 0


def _launch_distributed(nproc: int, argv: list[str]) -> int:
    """Re-run this same command under torchrun with ``nproc`` processes (gloo on CPU, nccl on GPU)."""
    cleaned: list[str] = []
    skip = False
    for item in argv:
        if skip:
            skip = False
        elif item == "--nproc":
            skip = True
        elif not item.startswith("--nproc="):
            cleaned.append(item)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "lorafit", *cleaned]
    from lorafit.distributed import run_launcher

    return run_launcher(command)
