"""``lorafit eval RUN_OR_ADAPTER [--data FILE] [--json] [--baseline]``: ROUGE and perplexity; for a
preference run also the held-out reward accuracy and margin (and the starting adapter, as ``starting_adapter``).

Writes ``eval.json`` into the run folder (or the adapter folder; ``--output`` elsewhere). With
``--json`` stdout is one JSON object: ``adapter`` (and ``baseline``) map metric names to values.
``lorafit eval --endpoint NAME --data FILE`` scores a SageMaker endpoint's model the same way
(``endpoint`` instead of ``adapter``; written only with ``--output``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from lorafit.card import update_card_eval
from lorafit.cli.generate import (
    add_generation_arguments,
    add_model_arguments,
    check_arguments,
    open_session,
    settings_from,
)
from lorafit.data.sources import load_rows, resolve
from lorafit.errors import LorafitError
from lorafit.runs import EVAL_FILE, locate_run
from lorafit.sagemaker.aws import session
from lorafit.sagemaker.endpoints import invoke
from lorafit.tracking import check_trackers, log_eval


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="score an adapter: ROUGE (summaries) and perplexity")
    parser.add_argument("path", metavar="RUN_OR_ADAPTER", nargs="?", help="run folder or adapter folder")
    parser.add_argument("--endpoint", metavar="NAME", help="score a SageMaker endpoint's model instead (with --data)")
    parser.add_argument("--region", help="AWS region of --endpoint (default: boto3's configuration)")
    parser.add_argument("--profile", help="AWS profile for --endpoint (default: boto3's configuration)")
    parser.add_argument("--data", metavar="FILE", help="held-out data (default: the run's eval split)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--baseline", action="store_true", help="also score the base model without the adapter")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="score only the first N rows")
    parser.add_argument("--output", metavar="FILE", help="write eval.json here and leave the run untouched, its "
                        "model card and trackers included (default: into the run/adapter folder)")
    parser.add_argument("--no-report", action="store_true",
                        help="don't log the scores to the run's trackers (train.report_to)")
    add_model_arguments(parser)
    add_generation_arguments(parser, max_new_tokens=64)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lorafit.evaluation import eval_rows, evaluate_session, write_eval

    say = (lambda m: print(m, file=sys.stderr, flush=True)) if args.json else (lambda m: print(m, flush=True))
    started = time.perf_counter()
    if args.endpoint is not None or args.path is None:
        return _run_endpoint(args, say, started)
    from lorafit.evaluation import held_out_rows

    check_arguments(args)
    if args.limit is not None and args.limit < 1:
        raise LorafitError(f"--limit: must be at least 1 row (got {args.limit}); leave it out to score every row")
    target = locate_run(args.path)
    if not args.output:  # a read-only run fails now, not after scoring every row
        _check_writable(target.run_dir or target.adapter_dir, target.adapter_dir)
    if args.data:  # a wrong path or a run without held-out rows fails before the model loads
        resolve(args.data, "--data")
    else:
        held_out_rows(target)
    report_to = target.config.train.report_to if target.config is not None and target.run_dir is not None \
        and not args.no_report else []
    check_trackers(report_to)  # a missing tracker package fails before the model loads
    session = open_session(args, allow_model=False)
    say(f"lorafit: {session.describe_base()}")
    target = session.target
    rows, source = eval_rows(target, session.data_config, session.tokenizer, args.data, args.limit)
    say(f"lorafit: scoring {len(rows)} rows: {source} ({session.data_config.format})")
    result = evaluate_session(session, rows, baseline=args.baseline, settings=settings_from(args),
                              batch_size=args.batch_size)
    result["meta"] = {"base_model": session.base_name, "adapters": {k: str(v) for k, v in session.adapters.items()},
                      "data": source, "rows": len(rows), "format": session.data_config.format,
                      "max_new_tokens": args.max_new_tokens, "quantization": session.run.quantization,
                      "dtype": session.run.precision.weights,
                      "elapsed_s": round(time.perf_counter() - started, 2)}
    folder = target.run_dir or target.adapter_dir
    path = Path(args.output) if args.output else folder / EVAL_FILE
    try:
        write_eval(result, path)
        if not args.output:  # --output: the run, its card and its trackers stay as they are
            _publish(session.target, result, source, report_to)
    except OSError as exc:
        raise LorafitError(f"{exc.filename or path}: cannot write the scores ({exc.strerror or exc})") from exc
    if args.json:
        print(json.dumps(result))
        return 0
    names = [("adapter", result.get("adapter"))] + [(key, result[key]) for key in ("starting_adapter", "baseline")
                                                     if key in result]
    for extra, metrics in result.get("adapters", {}).items():
        if extra != next(iter(session.adapters)):
            names.append((extra, metrics))
    for label, metrics in names:
        if metrics:
            shown = "  ".join(f"{k} {v:.2f}" for k, v in metrics.items() if v is not None)
            say(f"{label:>10}: {shown}")
    say(f"lorafit: wrote {path}")
    return 0


def _check_writable(*folders: Path | None) -> None:
    """eval writes eval.json and the model card into the run unless told --output."""
    for folder in folders:
        if folder is not None and not os.access(folder, os.W_OK):
            raise LorafitError(f"{folder}: not writable (a read-only run); pass --output FILE to write the scores "
                               "elsewhere and leave the run as it is")


def _publish(target: object, result: dict, source: str, report_to: list[str]) -> None:
    """The scores into the adapter's model card and, for a run, into its trackers."""
    update_card_eval(target.adapter_dir, result, source=source, run_dir=target.run_dir, config=target.config)
    if report_to:
        log_eval(target.run_dir, report_to, result, target.config)


def _run_endpoint(args: argparse.Namespace, say: object, started: float) -> int:
    """``--endpoint``: the same rows, batches and metrics as a local eval, computed by the endpoint."""
    from lorafit.evaluation import evaluate_endpoint, write_eval

    if args.endpoint is None or args.path is not None:
        raise LorafitError("eval: give RUN_OR_ADAPTER or --endpoint NAME (one of them)")
    if not args.data:
        raise LorafitError("--data: required with --endpoint (the held-out rows live in the run folder)")
    if args.baseline or args.adapter:
        raise LorafitError("--baseline / --adapter: not with --endpoint (it serves one model)")
    rows = [r.data for r in load_rows([args.data], "train", "--data") if r.data is not None]
    boto_session = session(args.profile, args.region)
    metrics, count, data_format = evaluate_endpoint(
        lambda payload: invoke(args.endpoint, payload, boto_session=boto_session), rows,
        settings=settings_from(args), batch_size=args.batch_size, limit=args.limit, echo=say)
    result = {"endpoint": metrics, "meta": {"endpoint": args.endpoint, "data": args.data, "rows": count,
                                            "format": data_format, "max_new_tokens": args.max_new_tokens,
                                            "elapsed_s": round(time.perf_counter() - started, 2)}}
    if args.output:
        write_eval(result, Path(args.output))
    if args.json:
        print(json.dumps(result))
        return 0
    say(f"lorafit: scored {count} rows of {args.data} on endpoint {args.endpoint} ({data_format})")
    say(f"{'endpoint':>10}: " + "  ".join(f"{k} {v:.2f}" for k, v in metrics.items() if v is not None))
    return 0
