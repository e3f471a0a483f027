"""``lorafit export RUN --gguf [--quant Q] [--output DIR]``: the run as a GGUF for llama.cpp and Ollama."""

from __future__ import annotations

import argparse

from lorafit.data.formats import format_names
from lorafit.llamacpp.export import export_gguf
from lorafit.llamacpp.tools import INSTALL_HINT, QUANT_CHOICES


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export", help="export a run as GGUF for llama.cpp / Ollama (Modelfile + README beside it)",
        description="Merge the adapter into its base (a quantized run's base dequantized first), convert it with "
        "llama.cpp's own converter, quantize it if asked, and write an Ollama Modelfile whose TEMPLATE renders the "
        f"prompt the run trained on, plus a README. Needs llama.cpp's tools: {INSTALL_HINT}.")
    parser.add_argument("path", metavar="RUN_OR_ADAPTER", help="run folder or adapter folder")
    parser.add_argument("--gguf", action="store_true", required=True,
                        help="write GGUF (llama.cpp, Ollama, LM Studio); the only export format so far")
    parser.add_argument("--quant", choices=QUANT_CHOICES, default="f16", metavar="TYPE",
                        help=f"weight type: {', '.join(QUANT_CHOICES)} (default f16; the k-quants such as "
                        "q4_k_m go through llama.cpp's quantizer)")
    parser.add_argument("--output", metavar="DIR", help="folder for the files (default: RUN/gguf)")
    parser.add_argument("--adapter-only", action="store_true",
                        help="write the LoRA adapter in llama.cpp's format (llama-cli --lora, Ollama ADAPTER) "
                        "and the base as GGUF, instead of a merged model")
    parser.add_argument("--base-gguf", metavar="FILE",
                        help="with --adapter-only: an existing GGUF of the base to point the Modelfile at "
                        "(then no base is written)")
    parser.add_argument("--base-weights", choices=["dequantized", "original"], default="dequantized",
                        help="for an int8/nf4 run: merge into the quantized base dequantized (what the adapter "
                        "trained against; default) or into the checkpoint's original weights")
    parser.add_argument("--format", choices=format_names(),
                        help="prompt format the Modelfile TEMPLATE and the GGUF's chat template render (default: "
                        "the one the run trained with, recorded in its folder)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                        help="precision to merge in before converting (auto: 16-bit on GPU, fp32 on a CPU, also "
                        "one with bf16 units, so the converter rounds once)")
    parser.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty --output")
    parser.add_argument("--base", metavar="MODEL", help="base model (default: the run's or the adapter's)")
    parser.add_argument("--allow-pickle", action="store_true", help="allow pickle .bin weights (base or adapter)")
    parser.add_argument("--trust-remote-code", action="store_true", help="run the model repository's own code")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and llama.cpp's converter log")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    export_gguf(args.path, args.output, quant=args.quant, adapter_only=args.adapter_only, base_gguf=args.base_gguf,
                overwrite=args.overwrite, base=args.base, dtype=args.dtype, base_weights=args.base_weights,
                allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code, data_format=args.format)
    return 0
