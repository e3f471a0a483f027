"""Shared fixtures: tiny real models (random weights, built from configs) with a real tokenizer.

Nothing is downloaded: the tokenizer is a byte-level BPE trained in-process on lorafit's builtin
dialogues, the models are transformers classes built from small configs and saved as safetensors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# precision: auto follows the CPU (bf16 where it has bf16 matrix units): pin "no bf16 units" so a
# run resolves the same on every machine kind; tests of the bf16 choice set it themselves
os.environ.setdefault("LORAFIT_CPU_BF16", "0")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test session gets its own lorafit cache, so tests never see a user's cached data."""
    monkeypatch.setenv("LORAFIT_CACHE", str(tmp_path_factory.getbasetemp() / "lorafit-cache"))


@pytest.fixture(scope="session")
def embedded_default_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded default trained once per session as `lorafit train` runs it (SmolLM2-135M,
    minutes on 2 cores): the heavy tests that serve, export or continue it share this run."""
    import subprocess
    import sys

    run = tmp_path_factory.mktemp("embedded-default") / "lorafit-default"
    env = {**os.environ, "LORAFIT_CACHE": str(tmp_path_factory.getbasetemp() / "lorafit-cache")}
    done = subprocess.run([sys.executable, "-m", "lorafit", "train", "--set", f"output_dir={run}", "--no-progress"],
                          capture_output=True, text=True, timeout=3600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return run


def build_tokenizer(folder: Path, vocab_size: int = 384) -> None:
    """Train a small byte-level BPE on builtin dialogues and save it as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lorafit.builtin.dialogues import generate

    texts = [f"{r['dialogue']}\n{r['summary']}" for r in generate(300, 7)]
    texts += ["Summarize the chat dialogue:", "---", "Summary:", "### Instruction:", "### Response:"]
    core = Tokenizer(models.BPE(unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                        bos_token="<|endoftext|>")
    tokenizer.save_pretrained(folder)


def build_model(folder: Path, arch: str = "llama", vocab_size: int = 384, seed: int = 0) -> Path:
    """A tiny random model of ``arch`` (llama, bloom, qwen2, gpt_neox, olmo2) plus tokenizer, saved to ``folder``."""
    import torch
    from transformers import (
        AutoModelForCausalLM,
        BloomConfig,
        GPTNeoXConfig,
        LlamaConfig,
        Olmo2Config,
        Qwen2Config,
    )

    folder.mkdir(parents=True, exist_ok=True)
    build_tokenizer(folder, vocab_size)
    if arch == "llama":
        config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                             bos_token_id=0, eos_token_id=0, pad_token_id=1, tie_word_embeddings=False)
    elif arch == "bloom":
        config = BloomConfig(vocab_size=vocab_size, hidden_size=64, n_layer=2, n_head=4,
                             bos_token_id=0, eos_token_id=0, pad_token_id=1)
    elif arch == "qwen2":
        config = Qwen2Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                             bos_token_id=0, eos_token_id=0, pad_token_id=1, tie_word_embeddings=True)
    elif arch == "gpt_neox":
        config = GPTNeoXConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, max_position_embeddings=512, bos_token_id=0,
                               eos_token_id=0, pad_token_id=1)
    elif arch == "olmo2":  # an architecture with no default LoRA targets in lorafit or peft
        config = Olmo2Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                             bos_token_id=0, eos_token_id=0, pad_token_id=1, tie_word_embeddings=False)
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2")


@pytest.fixture(scope="session")
def tiny_bloom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model(tmp_path_factory.mktemp("tiny-bloom"), "bloom")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def dialogue_file(tmp_path: Path) -> Path:
    """64 samsum-style rows (dialogue, summary) in a .jsonl file."""
    from lorafit.builtin.dialogues import generate

    return write_jsonl(tmp_path / "dialogues.jsonl", generate(64, 11))


def tiny_run_config(model_dir: Path, data_file: Path, output_dir: Path, **train: object) -> dict:
    """A raw config mapping for a fast run on a tiny model."""
    settings = {"max_steps": 8, "seq_len": 128, "batch_size": 4, "grad_accum": 1, "lr": 5e-3,
                "gradient_checkpointing": False, "eval_steps": 4, "seed": 0}
    settings.update(train)
    return {
        "model": {"name_or_path": str(model_dir)},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"path": str(data_file), "format": "summarization", "eval_fraction": 0.1, "cache": False},
        "train": settings,
        "output_dir": str(output_dir),
    }
