"""Merged weights vs the adapter on its base, as an endpoint serves them (lorafit.sagemaker.handler.load).

    python benchmarks/serving_modes.py RUN [--tokens 64] [--repeats 3]

Packages RUN both ways (``lorafit sagemaker deploy RUN --package-only``, CPU instance: fp32), then
for each, in a fresh process (``--rounds`` times, in the order merged, adapter, adapter, merged, ...
so that a drift in the machine's load falls on both): the worker's resident memory before loading (the runtime the fit
check's CPU overhead stands for), load time, resident memory after loading and after generating, the
peak, and greedy tokens/s
generating ``--tokens`` tokens for one prompt (best of ``--repeats``). Prints one JSON line per mode.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

PROBE = r"""
import json, sys, time
from pathlib import Path

def status(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0

def rss():
    return status("VmRSS")

import torch, transformers, peft  # the runtime a worker has before the model
import sagemaker_huggingface_inference_toolkit.handler_service  # noqa: F401
before = rss()
from lorafit.sagemaker.handler import load, read_settings
folder = Path(sys.argv[1])
started = time.perf_counter()
served = load(folder, read_settings(folder))
load_s = time.perf_counter() - started
loaded = rss()
from lorafit.generation import GenerationSettings, generate, prompt_from_text
session = served.session
prompt = prompt_from_text("Anna: are we still on for lunch?\nBen: yes, 12:30 at the usual place.",
                          session.data_config, session.tokenizer)
tokens = int(sys.argv[2])
best = None
for _ in range(int(sys.argv[3])):
    with session.activate(next(iter(session.adapters), None)) as model:
        t = time.perf_counter()
        ids = model.generate(**session.tokenizer(prompt, return_tensors="pt"), max_new_tokens=tokens,
                             min_new_tokens=tokens, do_sample=False, pad_token_id=session.tokenizer.pad_token_id)
        elapsed = time.perf_counter() - t
    best = elapsed if best is None else min(best, elapsed)
# After loading, a memory-mapped checkpoint is resident only where it was read; after generating,
# every weight has been touched, so that figure (and the peak) is what the instance must hold.
print(json.dumps({"runtime_rss_mib": round(before / 2**20), "load_s": round(load_s, 2),
                  "model_rss_mib": round((loaded - before) / 2**20),
                  "rss_after_generate_mib": round((rss() - before) / 2**20),
                  "peak_mib": round((status("VmHWM") - before) / 2**20), "tokens_per_s": round(tokens / best, 1)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        for weights in ("merged", "adapter"):
            folder = Path(scratch) / weights
            subprocess.run([sys.executable, "-m", "lorafit", "sagemaker", "deploy", args.run, "--instance-type",
                            "ml.m5.xlarge", "--weights", weights, "--package-only", str(folder)],
                           check=True, capture_output=True)
        order = [("merged", "adapter") if r % 2 == 0 else ("adapter", "merged") for r in range(args.rounds)]
        for weights in [w for pair in order for w in pair]:
            folder = Path(scratch) / weights
            env_code = str(folder / "code")
            out = subprocess.run([sys.executable, "-c", PROBE, str(folder), str(args.tokens), str(args.repeats)],
                                 check=True, capture_output=True, text=True, env={**__import__("os").environ,
                                                                                   "PYTHONPATH": env_code})
            print(json.dumps({"weights": weights, **json.loads(out.stdout.strip().splitlines()[-1])}), flush=True)


if __name__ == "__main__":
    main()
