"""The embedded default's run (SmolLM2-135M-Instruct, a real pretrained model) exported as GGUF and
served by llama.cpp: what it was trained on is what llama.cpp serves, and it stops where it learned to.

Heavy: a short training run of the real model, two exports and generation (minutes on 2 cores).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers_gguf import (
    STRINGS,
    agreement,
    hf_greedy,
    llama_greedy,
    llama_ids,
    load_llama,
    need_llama_cpp,
)

from lorafit.cli import main


@pytest.mark.heavy
@pytest.mark.gguf
def test_default_run_served_by_llama_cpp_as_trained(tmp_path: Path) -> None:
    need_llama_cpp()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorafit.adapters import trained_data_config
    from lorafit.builtin.models import materialize_model
    from lorafit.evaluation import held_out_rows
    from lorafit.generation import prompt_from_row
    from lorafit.modeling import NO_HUB_KERNELS
    from lorafit.runs import locate_run

    run = tmp_path / "default"
    assert main(["train", "--set", "train.max_steps=8", "--set", f"output_dir={run}", "--no-progress"]) == 0
    assert main(["export", str(run), "--gguf"]) == 0
    assert main(["export", str(run), "--gguf", "--quant", "q8_0", "--output", str(tmp_path / "q8")]) == 0
    f16, q8 = run / "gguf" / "default-f16.gguf", tmp_path / "q8" / "default-q8_0.gguf"

    target = locate_run(run)
    assert target.config.data.format == "auto"  # the default: the export renders what auto chose
    tokenizer = AutoTokenizer.from_pretrained(str(target.adapter_dir))
    data_config, _ = trained_data_config(target, target.config.data, tokenizer)
    assert data_config.format == "summarization"
    assert 'TEMPLATE """Summarize the chat dialogue:\n{{ .Prompt }}' in (run / "gguf" / "Modelfile").read_text()
    base = AutoModelForCausalLM.from_pretrained(str(materialize_model("smollm2-135m-instruct")), dtype=torch.float32,
                                                **NO_HUB_KERNELS)
    reference = PeftModel.from_pretrained(base, str(target.adapter_dir)).merge_and_unload().eval()
    rows, _ = held_out_rows(target)
    prompts = [prompt_from_row(row, data_config, tokenizer) for row in rows[:4]]

    llm = load_llama(f16)
    assert llm.metadata["tokenizer.ggml.pre"] == "smollm"  # llama.cpp knows SmolLM2's tokenizer by its hash
    for text in STRINGS + prompts + ["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"]:
        assert llama_ids(llm, text) == tokenizer(text)["input_ids"], text

    eos = tokenizer.eos_token_id
    assert tokenizer.eos_token == "<|im_end|>"
    sequences, starts = [], []
    for prompt in prompts:
        ids = tokenizer(prompt)["input_ids"]
        theirs = hf_greedy(reference, tokenizer, ids, 64)
        assert llama_greedy(llm, ids, 64) == theirs, prompt
        assert theirs[-1] == eos and len(theirs) < 64  # a summary, then EOS: as training taught
        sequences.append(ids + theirs)
        starts.append(len(ids))
    share = agreement(load_llama(q8, logits_all=True), reference, sequences, starts)
    assert share >= 0.95, share  # benchmarks/RESULTS.md: the measured share on 32 held-out prompts

    loaded = AutoModelForCausalLM.from_pretrained(str(f16.parent), gguf_file=f16.name, dtype=torch.float32,
                                                  **NO_HUB_KERNELS)
    ids = torch.tensor([sequences[0]])
    with torch.no_grad():
        same = (loaded(ids).logits.argmax(-1) == reference(ids).logits.argmax(-1)).float().mean().item()
    assert same > 0.95
