"""The embedded default's run exported as GGUF and served by llama.cpp, against transformers.

Trains the embedded default (SmolLM2-135M-Instruct on builtin:dialogues; or takes a finished run
folder), exports it with ``lorafit export --gguf`` in f16, q8_0 and q4_k_m, and scores each GGUF on
the run's held-out prompts (the training template) against transformers on the merged model (fp32):

- greedy: share of prompts whose llama.cpp greedy tokens equal transformers' token for token, and
  share of generations that end with EOS (``<|im_end|>``) before the length limit, in both;
- agreement: share of positions where llama.cpp's next-token argmax equals transformers' on the
  same tokens (transformers' greedy continuation, teacher-forced; one early flip does not decide
  the rest);
- file size, and the export's wall time (merge + convert + quantize).

Usage (minutes on 2 CPU cores; llama-cpp-python needed: ``pip install 'lorafit[gguf]'``):
    python benchmarks/gguf_agreement.py [--run output/lorafit-default] [--quants f16,q8_0,q4_k_m]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers_gguf import agreement, hf_greedy, llama_greedy, load_llama  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=None, help="a finished run (default: train the default)")
    parser.add_argument("--work", type=Path, default=Path("output/gguf-bench"), help="where runs and exports go")
    parser.add_argument("--quants", default="f16,q8_0,q4_k_m")
    parser.add_argument("--rows", type=int, default=32, help="held-out prompts scored")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--json-out", type=Path, default=None)
    return parser.parse_args()


def main() -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorafit.adapters import trained_data_config
    from lorafit.cli import main as lorafit
    from lorafit.evaluation import held_out_rows
    from lorafit.generation import prompt_from_row
    from lorafit.modeling import NO_HUB_KERNELS
    from lorafit.runs import locate_run

    args = parse_args()
    run = args.run
    if run is None:
        run = args.work / "run"
        if not (run / "result.json").exists():
            assert lorafit(["train", "--set", f"output_dir={run}", "--no-progress"]) == 0
    target = locate_run(run)
    tokenizer = AutoTokenizer.from_pretrained(str(target.adapter_dir))
    data_config, _ = trained_data_config(target, target.config.data, tokenizer)  # the recorded template
    from lorafit.builtin.models import materialize_model

    base_dir = materialize_model(target.base_model.removeprefix("builtin:")) \
        if target.base_model.startswith("builtin:") else Path(target.base_model)
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32, **NO_HUB_KERNELS)
    reference = PeftModel.from_pretrained(base, str(target.adapter_dir)).merge_and_unload().eval()
    rows, _ = held_out_rows(target)
    prompts = [prompt_from_row(row, data_config, tokenizer) for row in rows[: args.rows]]
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    theirs = [hf_greedy(reference, tokenizer, ids, args.max_new_tokens) for ids in encoded]
    eos = tokenizer.eos_token_id
    results: dict = {"run": str(run), "prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
                     "transformers_ends_with_eos": sum(t[-1] == eos for t in theirs) / len(theirs), "quants": {}}
    sequences = [ids + t for ids, t in zip(encoded, theirs, strict=True)]
    starts = [len(ids) for ids in encoded]
    for quant in args.quants.split(","):
        out = args.work / f"gguf-{quant}"
        began = time.perf_counter()
        assert lorafit(["export", str(run), "--gguf", "--quant", quant, "--output", str(out), "--overwrite"]) == 0
        seconds = time.perf_counter() - began
        gguf = next(out.glob("*.gguf"))
        llm = load_llama(gguf, n_ctx=1024)
        ours = [llama_greedy(llm, ids, args.max_new_tokens) for ids in encoded]
        scored = load_llama(gguf, n_ctx=1024, logits_all=True)
        results["quants"][quant] = {
            "file_mb": round(gguf.stat().st_size / 2**20, 1),
            "export_s": round(seconds, 1),
            "greedy_identical": sum(a == b for a, b in zip(ours, theirs, strict=True)) / len(ours),
            "ends_with_eos": sum(bool(o) and o[-1] == eos for o in ours) / len(ours),
            "argmax_agreement": round(agreement(scored, reference, sequences, starts), 4),
        }
        print(quant, results["quants"][quant], flush=True)
    print(json.dumps(results, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
