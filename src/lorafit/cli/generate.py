"""``lorafit generate RUN_OR_ADAPTER_OR_MODEL (--prompt TEXT | --input FILE.jsonl)``.

The prompt goes through the run's training template (summarization by default), so TEXT is the
dialogue / instruction / user message. One prompt streams its tokens; a file is generated in
batches and written as JSON lines (``--output`` or stdout). ``--adapter`` adds more adapters on the
same loaded base; each prompt is then answered by every adapter.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from lorafit.data.formats import format_names, uses_chat_template
from lorafit.data.sources import load_rows
from lorafit.errors import DataError, LorafitError

if TYPE_CHECKING:
    from lorafit.generation import GenerationSettings


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("generate", help="generate text with a run, adapter or model")
    parser.add_argument("path", metavar="RUN_OR_ADAPTER_OR_MODEL", help="run folder, adapter folder or base model")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", metavar="TEXT", help="one input (the dialogue, instruction or message)")
    source.add_argument("--input", metavar="FILE.jsonl", help="rows in the run's data format (or with 'prompt')")
    add_model_arguments(parser)
    add_generation_arguments(parser)
    parser.add_argument("--raw", action="store_true", help="use --prompt as is, without the training template")
    parser.add_argument("--output", metavar="FILE.jsonl", help="write --input results here (default: stdout)")
    parser.add_argument("--no-stream", action="store_true", help="print a single prompt's output at the end")
    parser.set_defaults(func=run)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by generate and eval: base, extra adapters, quantization, safety."""
    parser.add_argument("--adapter", action="append", default=[], metavar="RUN_OR_ADAPTER",
                        help="another adapter on the same loaded base (repeatable)")
    parser.add_argument("--base", metavar="MODEL", help="base model (default: the run's or the adapter's)")
    parser.add_argument("--quantization", choices=["none", "int8", "nf4"], default=None,
                        help="how to hold the base (default: as the run trained it; else none)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default=None,
                        help="dtype of the unquantized base (default: the run's model.dtype, else auto)")

    parser.add_argument("--format", choices=format_names(),
                        help="prompt format (default: the one the run trained with, recorded in its folder; "
                        "else summarization)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per generation batch")
    parser.add_argument("--allow-pickle", action="store_true", help="allow pickle .bin weights")
    parser.add_argument("--trust-remote-code", action="store_true", help="run the model repository's own code")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")


def add_generation_arguments(parser: argparse.ArgumentParser, max_new_tokens: int = 128) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="tokens to generate per row")
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --sample)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --sample)")
    parser.add_argument("--top-k", type=int, default=50, help="top-k sampling (with --sample)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="penalty for repeated tokens")
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling")


def check_arguments(args: argparse.Namespace) -> None:
    """Values the model would choke on, refused in one line before it loads; options that do not
    apply to this command line named on stderr (they are ignored, not silently)."""
    for flag, value in (("--max-new-tokens", args.max_new_tokens), ("--batch-size", args.batch_size)):
        if value < 1:
            raise LorafitError(f"{flag}: must be at least 1 (got {value})")
    if args.repetition_penalty <= 0:
        raise LorafitError(f"--repetition-penalty: must be above 0 (got {args.repetition_penalty:g}); 1 = none")
    if args.seed is not None and not 0 <= args.seed < 2**32:
        raise LorafitError(f"--seed: must be between 0 and {2**32 - 1} (got {args.seed})")
    ignored = []
    if args.sample:
        if not args.temperature > 0:
            raise LorafitError(f"--temperature: must be above 0 with --sample (got {args.temperature:g}); for the "
                               "single most likely continuation leave out --sample (greedy decoding)")
        if not 0 < args.top_p <= 1:
            raise LorafitError(f"--top-p: must be above 0 and at most 1 (got {args.top_p:g})")
        if args.top_k < 0:
            raise LorafitError(f"--top-k: must be 0 (off) or more (got {args.top_k})")
    else:
        ignored += [flag for flag, value, default in (("--temperature", args.temperature, 1.0),
                                                      ("--top-p", args.top_p, 1.0), ("--top-k", args.top_k, 50),
                                                      ("--seed", args.seed, None)) if value != default]
        if ignored:
            ignored = [f"{', '.join(ignored)}: no effect without --sample (decoding is greedy)"]
    prompt = getattr(args, "prompt", None) is not None
    for flag, given, why in (("--output", prompt and getattr(args, "output", None), "applies to --input"),
                             ("--no-stream", not prompt and getattr(args, "no_stream", False), "applies to --prompt"),
                             ("--raw", not prompt and getattr(args, "raw", False), "applies to --prompt"),
                             ("--batch-size", prompt and args.batch_size != 8, "one --prompt is one row")):
        if given:
            ignored.append(f"{flag}: {why}")
    for note in ignored:
        print(f"lorafit: note: ignored {note}", file=sys.stderr, flush=True)


def open_session(args: argparse.Namespace, allow_model: bool) -> object:
    """The base + adapters the arguments name, loaded once."""
    from lorafit.adapters import AdapterSession

    session = AdapterSession.open(args.path, base=args.base, quantization=args.quantization,
                                  allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code,
                                  dtype=args.dtype, allow_model=allow_model, data_format=args.format)
    for extra in args.adapter:
        session.add(extra)
    return session


def settings_from(args: argparse.Namespace) -> GenerationSettings:
    from lorafit.generation import GenerationSettings

    return GenerationSettings(max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                              temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                              repetition_penalty=args.repetition_penalty, seed=args.seed)


def _input_rows(path: str) -> list[dict]:
    raw = load_rows([path], "train", "--input")
    bad = [f"{r.label} {r.error}" for r in raw if r.data is None]
    if bad:
        raise DataError(f"--input: {bad[0]}")
    return [r.data for r in raw]


def run(args: argparse.Namespace) -> int:
    from lorafit.generation import (
        generate,
        prompt_from_row,
        prompt_from_text,
        stop_token_ids,
        text_streamer,
    )

    check_arguments(args)
    rows = _input_rows(args.input) if args.input is not None else []  # bad input fails before the model loads
    session = open_session(args, allow_model=True)
    print(f"lorafit: {session.describe_base()}", file=sys.stderr, flush=True)
    settings = settings_from(args)
    data_config, tokenizer = session.data_config, session.tokenizer
    special = not uses_chat_template(data_config, tokenizer)
    stops = stop_token_ids(data_config, tokenizer)
    names = list(session.adapters) or [None]
    if args.prompt is not None:
        prompt = args.prompt if args.raw else prompt_from_text(args.prompt, data_config, tokenizer)
        for name in names:
            if len(names) > 1:
                print(f"--- {name}", flush=True)
            with session.activate(name) as model:
                streamer = None if args.no_stream else text_streamer(tokenizer)
                text = generate(model, tokenizer, [prompt], settings, add_special_tokens=special,
                                streamer=streamer, stop_ids=stops)[0]
            if streamer is None:
                print(text, flush=True)
        return 0
    prompts = [prompt_from_row(row, data_config, tokenizer) for row in rows]
    results: dict[str | None, list[str]] = {}
    for name in names:
        with session.activate(name) as model:
            results[name] = generate(model, tokenizer, prompts, settings, batch_size=args.batch_size,
                                     add_special_tokens=special, stop_ids=stops)
    lines = []
    for i, row in enumerate(rows):
        record = {"id": row.get("id", i), "prompt": prompts[i]}
        if len(names) == 1:
            record["generated"] = results[names[0]][i]
        else:
            record["generated"] = {str(name): results[name][i] for name in names}
        lines.append(json.dumps(record) + "\n")
    if args.output:
        try:
            Path(args.output).write_text("".join(lines), encoding="utf-8")
        except OSError as exc:
            raise LorafitError(f"--output: cannot write {args.output} ({exc.strerror or exc})") from exc
    else:
        sys.stdout.write("".join(lines))
    return 0
