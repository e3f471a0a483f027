"""``lorafit merge RUN_OR_ADAPTER --output DIR``: fold the adapter into its base, save a plain model."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "merge", help="merge an adapter into its base and save a full model (safetensors)",
        description="Merge the adapter into the base model and save safetensors shards, config and tokenizer "
        "that AutoModelForCausalLM.from_pretrained loads. Adapters trained on an int8/nf4 base are merged into "
        "the unquantized base (16-bit on GPU, fp32 on CPU).")
    parser.add_argument("path", metavar="RUN_OR_ADAPTER", help="run folder or adapter folder")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for the merged model")
    parser.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty --output")
    parser.add_argument("--base", metavar="MODEL", help="base model to merge into (default: the adapter's)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                        help="precision to merge and save in (auto: 16-bit on GPU, fp32 on CPU)")
    parser.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard (default 2GB)")
    parser.add_argument("--allow-pickle", action="store_true", help="allow pickle .bin weights (base or adapter)")
    parser.add_argument("--trust-remote-code", action="store_true", help="run the model repository's own code")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lorafit.export import merge

    result = merge(args.path, args.output, overwrite=args.overwrite, base=args.base, dtype=args.dtype,
                   max_shard_size=args.max_shard_size, allow_pickle=args.allow_pickle,
                   trust_remote_code=args.trust_remote_code)
    print(f"lorafit: files: {', '.join(result.files)}")
    return 0
