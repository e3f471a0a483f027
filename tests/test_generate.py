"""lorafit generate: the training template, batched = one by one, streaming, several adapters, int8/nf4."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers_adapters import peft_adapter

from lorafit.adapters import AdapterSession
from lorafit.cli import main
from lorafit.config import DataConfig
from lorafit.generation import GenerationSettings, generate, prompt_from_row, prompt_from_text

DIALOGUES = ["Anna: Hi Tom!\nTom: Hey, cinema at 7 pm?\nAnna: Sure",
             "Mia: I'm late, traffic.\nBen: OK, see you at the cafe.",
             "Leo: Can I borrow your bike tomorrow?\nZoe: Yes, pick it up at noon, it's at the station."]


@pytest.fixture(scope="module")
def adapter(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return peft_adapter(tiny_llama, tmp_path_factory.mktemp("gen") / "adapter", seed=7)


@pytest.fixture(scope="module")
def session(adapter: Path) -> AdapterSession:
    return AdapterSession.open(adapter, device=torch.device("cpu"))


def test_prompt_uses_training_template(session: AdapterSession) -> None:
    prompt = prompt_from_text(DIALOGUES[0], DataConfig(), session.tokenizer)
    assert prompt == f"Summarize the chat dialogue:\n{DIALOGUES[0]}\n---\nSummary:\n"
    row_prompt = prompt_from_row({"dialogue": DIALOGUES[0]}, DataConfig(), session.tokenizer)
    assert row_prompt == prompt
    instruction = prompt_from_text("Name a fruit.", DataConfig(format="instruction"), session.tokenizer)
    assert "### Instruction:\nName a fruit.\n\n### Response:\n" in instruction
    assert prompt_from_row({"prompt": "raw text"}, DataConfig(), session.tokenizer) == "raw text"


def test_batched_left_padded_equals_one_by_one(session: AdapterSession) -> None:
    prompts = [prompt_from_text(d, DataConfig(), session.tokenizer) for d in DIALOGUES]
    settings = GenerationSettings(max_new_tokens=8)
    batched = generate(session.model, session.tokenizer, prompts, settings, batch_size=3)
    single = [generate(session.model, session.tokenizer, [p], settings)[0] for p in prompts]
    assert batched == single
    assert any(batched)
    with session.activate(None) as base:  # the adapter changes what is generated
        assert generate(base, session.tokenizer, prompts, settings) != batched


def test_sampling_is_seeded(session: AdapterSession) -> None:
    prompt = [prompt_from_text(DIALOGUES[1], DataConfig(), session.tokenizer)]
    sample = GenerationSettings(max_new_tokens=12, do_sample=True, temperature=1.5, top_k=0, seed=3)
    first = generate(session.model, session.tokenizer, prompt, sample)
    assert generate(session.model, session.tokenizer, prompt, sample) == first
    others = {generate(session.model, session.tokenizer, prompt, GenerationSettings(
        max_new_tokens=12, do_sample=True, temperature=1.5, top_k=0, seed=s))[0] for s in range(4, 8)}
    assert len(others | set(first)) > 1


def test_cli_single_prompt_streams(adapter: Path, session: AdapterSession,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", str(adapter), "--prompt", DIALOGUES[0], "--max-new-tokens", "8"]) == 0
    streamed = capsys.readouterr().out.strip()
    prompt = prompt_from_text(DIALOGUES[0], DataConfig(), session.tokenizer)
    expected = generate(session.model, session.tokenizer, [prompt], GenerationSettings(max_new_tokens=8))[0]
    assert streamed == expected


def test_cli_input_file_with_two_adapters(tiny_llama: Path, adapter: Path, tmp_path: Path) -> None:
    other = peft_adapter(tiny_llama, tmp_path / "other", seed=8)
    rows = tmp_path / "in.jsonl"
    rows.write_text("".join(json.dumps({"id": f"r{i}", "dialogue": d}) + "\n" for i, d in enumerate(DIALOGUES)))
    out = tmp_path / "out.jsonl"
    assert main(["generate", str(adapter), "--adapter", str(other), "--input", str(rows), "--output", str(out),
                 "--max-new-tokens", "6", "--batch-size", "2"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in records] == ["r0", "r1", "r2"]
    assert set(records[0]["generated"]) == {"default", "other"}
    assert any(r["generated"]["default"] != r["generated"]["other"] for r in records)


@pytest.mark.parametrize(("quantization", "layer"), [("int8", "Linear8bitLt"), ("nf4", "Linear4bit")])
def test_quantized_base_for_inference(adapter: Path, quantization: str, layer: str) -> None:
    quantized = AdapterSession.open(adapter, quantization=quantization, device=torch.device("cpu"))
    kinds = {type(m).__name__ for m in quantized.model.modules()}
    assert layer in kinds
    prompt = [prompt_from_text(DIALOGUES[0], DataConfig(), quantized.tokenizer)]
    out = generate(quantized.model, quantized.tokenizer, prompt, GenerationSettings(max_new_tokens=4))
    assert isinstance(out[0], str)


def test_cli_generate_from_a_bare_model(tiny_llama: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", str(tiny_llama), "--prompt", "Hi", "--raw", "--max-new-tokens", "3", "--no-stream"]) == 0
    assert capsys.readouterr().out.endswith("\n")
