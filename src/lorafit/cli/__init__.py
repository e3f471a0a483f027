"""The ``lorafit`` command: a thin shell over the Python API.

Each subcommand lives in its own module in this package and exposes ``register(subparsers)``;
``main`` discovers them, so adding a command never touches this file. A ``LorafitError`` becomes
one ``error: ...`` line on stderr and exit code 2 (``--debug`` shows the traceback).

A subcommand module imports lorafit's torch-backed modules (training, modeling, generation,
...) inside the function that runs the command, so ``lorafit --help`` and argument parsing load
no ML library and ``main`` quiets the libraries before any of them is imported.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import traceback

from lorafit import quiet
from lorafit.errors import LorafitError

# Order in --help; modules not listed here come after, alphabetically.
_ORDER = ["train", "plan", "data", "merge", "export", "generate", "eval", "push", "sagemaker"]


def _command_modules() -> list[str]:
    found = {m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")}
    return [n for n in _ORDER if n in found] + sorted(found - set(_ORDER))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorafit",
        description="LoRA / QLoRA fine-tuning of Hugging Face causal LMs on one GPU.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors and library warnings")
    parser.add_argument("--version", action="version", version=f"lorafit {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _command_modules():
        importlib.import_module(f"{__name__}.{name}").register(subparsers)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lorafit")
    except PackageNotFoundError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet.configure(debug="--debug" in argv)  # before any library is imported: some talk on import
    debug = quiet.debugging()
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except LorafitError as exc:
        if debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The CONFIG positional and ``--set`` overrides shared by train, plan and data."""
    parser.add_argument("config", nargs="?", help="YAML config (default: the embedded offline default)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set train.max_steps=20 (repeatable)",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
