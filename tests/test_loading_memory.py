"""Loading a 16-bit checkpoint in its own dtype holds no fp32 copy of it (measured in a fresh process).

What users with a big model hit first is the loading peak: a bf16 model that passed through fp32
on its way in needs three times its size for a moment. ``lorafit.modeling.load_base_model`` reads
safetensors straight into the run's dtype; this measures the process's own peak (VmHWM) around it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

CHILD = r"""
import json, sys, torch
from lorafit.config import validate_config
from lorafit.modeling import load_base_model
from lorafit.resolved import resolve

def kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

run = resolve(validate_config({"model": {"name_or_path": sys.argv[1], "dtype": sys.argv[2]},
                               "train": {"precision": "bf16"}}))
before = kib("VmRSS")
model = load_base_model(run, torch.device("cpu"))
for p in model.parameters():  # touch every weight: mapped file pages count once read
    p.data.view(-1)[:: 1 << 12].float().sum()
print(json.dumps({"added": kib("VmHWM") - before, "dtypes": sorted({str(p.dtype) for p in model.parameters()})}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux /proc only")
def test_a_bf16_checkpoint_loads_without_an_fp32_copy(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    size = sum(p.numel() * 2 for p in model.parameters())  # ~90 MB in bf16
    model.save_pretrained(tmp_path, safe_serialization=True)
    del model
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), "bfloat16"], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found["dtypes"] == ["torch.bfloat16"]
    # the weights once (file pages or copies), never the 2x of an fp32 copy on top of them
    assert found["added"] < 1.6 * size, (found["added"] / 2**20, size / 2**20)
