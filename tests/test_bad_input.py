"""Malformed input, fed through the real CLI: exit code 2, one ``error:`` line naming the culprit.

Each case builds its inputs in its own folder, runs ``lorafit ...`` in-process (a few also as a
subprocess, to prove no traceback reaches the terminal) and checks: exit code 2; stderr is exactly
one line starting ``error: `` that names the field or file; no traceback; and no file of the user
was changed or created (bytes and mtimes of every input, before and after).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import tiny_run_config
from helpers_adapters import peft_adapter
from helpers_data import dialogues, write_jsonl

from lorafit.cli import main


@dataclass
class World:
    """Inputs shared by all cases (built once): a tiny base, an adapter for it, one for another base."""

    llama: Path
    adapter: Path
    other_adapter: Path


@pytest.fixture(scope="module")
def world(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> World:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    root = tmp_path_factory.mktemp("bad-input-world")
    other = root / "narrow-llama"  # hidden size 32 instead of 64
    config = LlamaConfig(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(other)
    return World(llama=tiny_llama, adapter=peft_adapter(tiny_llama, root / "adapter"),
                 other_adapter=peft_adapter(other, root / "other-adapter"))


# ------------------------------------------------------------------------------------ helpers
def _config(tmp: Path, w: World, rows: Path | None = None, **sections: object) -> Path:
    """A tiny run config in ``tmp/run.yaml``; ``sections`` update model/lora/data/train keys."""
    rows = rows or write_jsonl(tmp / "d.jsonl", dialogues(32))
    raw = tiny_run_config(w.llama, rows, tmp / "out", max_steps=1)
    for section, values in sections.items():
        if isinstance(values, dict) and section in raw:
            raw[section].update(values)
        else:
            raw[section] = values
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def _data_lines(tmp: Path, lines: list[bytes], good: int = 0) -> Path:
    rows = [json.dumps(r).encode() for r in dialogues(good, seed=4)] if good else []
    path = tmp / "d.jsonl"
    path.write_bytes(b"".join(line + b"\n" for line in rows + lines))
    return path


def _adapter_copy(src: Path, tmp: Path) -> Path:
    return Path(shutil.copytree(src, tmp / "adapter"))


GOOD = dialogues(1, seed=3)[0]
Build = Callable[[Path, World], tuple[list[str], list[str]]]


# ------------------------------------------------------------------------------------- cases
# Each builder makes the inputs under tmp and returns (argv, substrings the error line must hold).
def missing_config(t: Path, w: World):
    return ["train", str(t / "nope.yaml")], [str(t / "nope.yaml"), "not found"]


def config_is_folder(t: Path, w: World):
    (t / "cfg.yaml").mkdir()
    return ["train", str(t / "cfg.yaml")], [str(t / "cfg.yaml"), "folder"]


def broken_yaml(t: Path, w: World):
    (t / "run.yaml").write_text("model:\n  name_or_path: [unclosed\nlora:\n  r: 8\n", encoding="utf-8")
    return ["train", str(t / "run.yaml")], [str(t / "run.yaml"), "invalid YAML"]


def yaml_list(t: Path, w: World):
    (t / "run.yaml").write_text("- model\n- lora\n", encoding="utf-8")
    return ["train", str(t / "run.yaml")], [str(t / "run.yaml"), "mapping"]


def non_utf8_config(t: Path, w: World):
    (t / "run.yaml").write_bytes("output_dir: caf\u00e9\n".encode("latin-1"))
    return ["train", str(t / "run.yaml")], [str(t / "run.yaml"), "cannot read"]


def unknown_section(t: Path, w: World):
    return ["train", str(_config(t, w, modle={"name_or_path": "x"}))], ["unknown key 'modle'"]


def unknown_nested_key(t: Path, w: World):
    return ["train", str(_config(t, w, lora={"rank": 4}))], ["unknown key 'lora.rank'"]


def wrong_type(t: Path, w: World):
    return ["train", str(_config(t, w, lora={"r": "eight"}))], ["lora.r:", "'eight'"]


def out_of_range(t: Path, w: World):
    return ["train", str(_config(t, w, train={"lr": -1}))], ["train.lr:", "greater than 0"]


def bad_choice(t: Path, w: World):
    return ["train", str(_config(t, w, model={"quantization": "nf8"}))], ["model.quantization:", "'nf8'"]


def section_not_mapping(t: Path, w: World):
    return ["train", str(_config(t, w, train=5))], ["train:", "(got 5)"]


def empty_target_list(t: Path, w: World):
    return ["train", str(_config(t, w, lora={"target_modules": []}))], ["lora.target_modules"]


def target_not_in_model(t: Path, w: World):
    return ["train", str(_config(t, w, lora={"target_modules": ["nope_proj"]}))], ["lora.target_modules", "nope_proj"]


def bad_override_syntax(t: Path, w: World):
    return ["train", str(_config(t, w)), "--set", "lora.r"], ["--set 'lora.r'", "key.sub=value"]


def override_into_value(t: Path, w: World):
    return ["train", str(_config(t, w)), "--set", "train.lr.peak=1"], ["train.lr.peak=1", "'lr' is not a section"]


def fsdp_with_int8(t: Path, w: World):
    path = _config(t, w, model={"quantization": "int8"}, train={"fsdp": True})
    return ["train", str(path), "--nproc", "2"], ["train.fsdp", "int8", "nf4"]


def fsdp_with_adamw_8bit(t: Path, w: World):
    path = _config(t, w, train={"fsdp": True, "optimizer": "adamw_8bit"})
    return ["train", str(path), "--nproc", "2"], ["train.optimizer", "adamw_8bit", "DTensor"]


def cpu_offload_without_fsdp(t: Path, w: World):
    path = _config(t, w, train={"fsdp_cpu_offload": True})
    return ["train", str(path)], ["train.fsdp_cpu_offload", "train.fsdp: true"]


def flash_attention_on_cpu(t: Path, w: World):
    path = _config(t, w, model={"attn_implementation": "flash_attention_2"})
    return ["train", str(path)], ["model.attn_implementation", "flash_attention_2"]


def output_dir_is_file(t: Path, w: World):
    (t / "out").write_text("not a folder\n", encoding="utf-8")
    return ["train", str(_config(t, w))], ["output_dir", str(t / "out"), "is a file"]


def output_dir_under_file(t: Path, w: World):
    (t / "taken").write_text("not a folder\n", encoding="utf-8")
    path = _config(t, w)
    return ["train", str(path), "--set", f"output_dir={t / 'taken' / 'run'}"], ["output_dir", str(t / "taken")]


def model_missing(t: Path, w: World):
    return ["train", str(_config(t, w, model={"name_or_path": str(t / "no-model")}))], [
        "model.name_or_path", str(t / "no-model")]


def model_is_file(t: Path, w: World):
    shutil.copy(w.llama / "config.json", t / "config.json")
    return ["train", str(_config(t, w, model={"name_or_path": str(t / "config.json")}))], [
        "model.name_or_path", str(t / "config.json"), "is a file"]


def model_folder_without_weights(t: Path, w: World):
    folder = Path(shutil.copytree(w.llama, t / "model"))
    (folder / "model.safetensors").unlink()
    return ["train", str(_config(t, w, model={"name_or_path": str(folder)}))], ["model.name_or_path", str(folder)]


def model_hub_id_offline(t: Path, w: World):
    return ["train", str(_config(t, w, model={"name_or_path": "lorafit-tests/no-such-model"}))], [
        "model.name_or_path", "lorafit-tests/no-such-model"]


def column_map_to_missing_column(t: Path, w: World):
    path = _config(t, w, data={"columns": {"summary": "abstract"}})
    return ["train", str(path)], ["data.path: all 32 rows are bad", "d.jsonl line 1 missing 'abstract'"]


def data_missing(t: Path, w: World):
    return ["train", str(_config(t, w, rows=t / "none.jsonl"))], ["data.path", "none.jsonl"]


def data_is_folder(t: Path, w: World):
    (t / "rows.jsonl").mkdir()
    return ["train", str(_config(t, w, rows=t / "rows.jsonl"))], ["data.path", "rows.jsonl"]


def data_unknown_extension(t: Path, w: World):
    (t / "rows.txt").write_text("hello\n", encoding="utf-8")
    return ["train", str(_config(t, w, rows=t / "rows.txt"))], ["data.path", "rows.txt"]


def data_empty_file(t: Path, w: World):
    (t / "d.jsonl").write_bytes(b"")
    return ["train", str(_config(t, w, rows=t / "d.jsonl"))], ["data.path", "d.jsonl"]


def eval_path_missing(t: Path, w: World):
    return ["train", str(_config(t, w, data={"eval_path": str(t / "held.jsonl")}))], ["data.eval_path", "held.jsonl"]


def _all_rows(line: bytes, message: str) -> Build:
    def build(t: Path, w: World):
        path = _data_lines(t, [line] * 3)
        return ["train", str(_config(t, w, rows=path))], ["data.path: all 3 rows are bad", f"d.jsonl line 1 {message}"]
    return build


def too_many_bad_rows(t: Path, w: World):
    path = _data_lines(t, [json.dumps({"dialogue": "A: hi"}).encode()] * 3, good=16)
    return ["train", str(_config(t, w, rows=path))], ["data.path: 3 of 19 rows are bad", "data.max_bad_fraction",
                                                     "d.jsonl line 17 missing 'summary'"]


def adapter_weights_missing(t: Path, w: World):
    folder = _adapter_copy(w.adapter, t)
    (folder / "adapter_model.safetensors").unlink()
    return ["generate", str(folder), "--prompt", "hi"], [str(folder / "adapter_model.safetensors"), "missing"]


def adapter_truncated(t: Path, w: World):
    weights = _adapter_copy(w.adapter, t) / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    return ["generate", str(weights.parent), "--prompt", "hi"], [str(weights), "corrupted"]


def adapter_garbage(t: Path, w: World):
    weights = _adapter_copy(w.adapter, t) / "adapter_model.safetensors"
    weights.write_bytes(b"\x00" * 64)
    return ["eval", str(weights.parent), "--data", str(_data_lines(t, [], good=4))], [str(weights), "corrupted"]


def adapter_config_broken(t: Path, w: World):
    folder = _adapter_copy(w.adapter, t)
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", ', encoding="utf-8")
    return ["generate", str(folder), "--prompt", "hi"], [str(folder / "adapter_config.json")]


def adapter_for_another_base(t: Path, w: World):
    folder = _adapter_copy(w.other_adapter, t)
    return (["generate", str(folder), "--base", str(w.llama), "--prompt", "hi", "--max-new-tokens", "2"],
            [str(folder), "made for", "narrow-llama"])


def adapter_pickle_only(t: Path, w: World):
    import torch
    from safetensors.torch import load_file

    folder = _adapter_copy(w.adapter, t)
    torch.save(load_file(folder / "adapter_model.safetensors"), folder / "adapter_model.bin")
    (folder / "adapter_model.safetensors").unlink()
    return ["merge", str(folder), "--output", str(t / "merged")], [str(folder / "adapter_model.bin"), "--allow-pickle"]


def adapter_path_missing(t: Path, w: World):
    return ["eval", str(t / "no-run"), "--data", str(_data_lines(t, [], good=4))], [str(t / "no-run")]


def merge_onto_non_empty(t: Path, w: World):
    folder = _adapter_copy(w.adapter, t)
    (t / "merged").mkdir()
    (t / "merged" / "keep.txt").write_text("mine\n", encoding="utf-8")
    return ["merge", str(folder), "--output", str(t / "merged")], ["--output", str(t / "merged"), "not empty"]


def merge_output_is_file(t: Path, w: World):
    folder = _adapter_copy(w.adapter, t)
    (t / "merged").write_text("mine\n", encoding="utf-8")
    return ["merge", str(folder), "--output", str(t / "merged")], ["--output", str(t / "merged"), "is a file"]


def generate_input_not_utf8(t: Path, w: World):
    (t / "prompts.jsonl").write_bytes('{"dialogue": "caf\u00e9"}\n'.encode("latin-1"))
    return ["generate", str(_adapter_copy(w.adapter, t)), "--input", str(t / "prompts.jsonl")], [
        "--input", "prompts.jsonl", "not UTF-8"]


# ---- issue 30: inputs that crashed or misled
def model_weights_truncated(t: Path, w: World):
    folder = Path(shutil.copytree(w.llama, t / "model"))
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # an interrupted download
    return ["train", str(_config(t, w, model={"name_or_path": str(folder)}))], [
        "model.name_or_path", str(weights), "damaged", "download it again"]


def model_weights_garbage(t: Path, w: World):
    folder = Path(shutil.copytree(w.llama, t / "model"))
    (folder / "model.safetensors").write_text("<html><body>Rate limited</body></html>\n" * 20, encoding="utf-8")
    return ["generate", str(folder), "--prompt", "hi"], [str(folder / "model.safetensors"), "damaged"]


def _gguf_folder(t: Path, size: int | None) -> Path:
    from lorafit.builtin.models import BUILTIN_MODELS, _gguf_path

    folder = t / "gguf-model"
    folder.mkdir()
    source = _gguf_path(*BUILTIN_MODELS["smollm2-135m-instruct"])
    with source.open("rb") as handle:
        (folder / "m.gguf").write_bytes(handle.read(size or 0))
    return folder


def gguf_truncated(t: Path, w: World):
    folder = _gguf_folder(t, 1_000_000)
    path = _config(t, w, model={"name_or_path": str(folder), "gguf_file": "m.gguf"})
    return ["train", str(path)], ["model.gguf_file", str(folder / "m.gguf"), "truncated or damaged"]


def gguf_file_missing(t: Path, w: World):
    path = _config(t, w, model={"gguf_file": "model-q4.gguf"})
    return ["train", str(path)], ["model.gguf_file", str(w.llama / "model-q4.gguf"), "not found"]


def attention_unknown(t: Path, w: World):
    path = _config(t, w, model={"attn_implementation": "fast"})
    return ["train", str(path)], ["model.attn_implementation", "'fast'", "not supported"]


def target_is_not_a_linear(t: Path, w: World):
    path = _config(t, w, lora={"target_modules": ["model"]})
    return ["train", str(path)], ["lora.target_modules", "Target module LlamaModel is not supported"]


def prompts_fill_seq_len(t: Path, w: World):
    path = _config(t, w, train={"seq_len": 8}, data={"packing": "none"})
    return ["train", str(path)], ["data.path: no usable rows", "the prompt fills train.seq_len 8", "raise train.seq_len"]


def seed_too_large(t: Path, w: World):
    return ["train", str(_config(t, w)), "--set", f"train.seed={2**70}"], ["train.seed", "4294967295"]


def output_dir_of_user_files(t: Path, w: World):
    (t / "out").mkdir()
    (t / "out" / "notes.md").write_text("mine\n", encoding="utf-8")
    return ["train", str(_config(t, w))], ["output_dir", str(t / "out"), "holds no lorafit run", "notes.md"]


def _data_file(name: str, content: bytes, culprits: list[str]) -> Build:
    def build(t: Path, w: World):
        (t / name).write_bytes(content)
        return ["train", str(_config(t, w, rows=t / name))], [name, *culprits]
    return build


_ROWS_JSONL = "".join(json.dumps(r) + "\n" for r in dialogues(4, seed=5))


def eval_limit(value: str) -> Build:
    def build(t: Path, w: World):
        return ["eval", str(_adapter_copy(w.adapter, t)), "--data", str(_data_lines(t, [], good=4)), "--limit",
                value], ["--limit", f"(got {value})"]
    return build


def generate_flag(*flags: str, culprits: list[str]) -> Build:
    def build(t: Path, w: World):
        return ["generate", str(_adapter_copy(w.adapter, t)), "--prompt", "hi", *flags], culprits
    return build


def merge_shard_size(t: Path, w: World):
    return (["merge", str(_adapter_copy(w.adapter, t)), "--output", str(t / "merged"), "--max-shard-size", "abc"],
            ["--max-shard-size", "'abc'", "not a size"])


def adapter_not_lora(t: Path, w: World):
    folder = _adapter_copy(w.adapter, t)
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    (folder / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "PREFIX_TUNING"}), encoding="utf-8")
    return ["merge", str(folder), "--output", str(t / "merged")], [str(folder / "adapter_config.json"),
                                                                   "PREFIX_TUNING", "LoRA adapters"]


def adapter_rank_mismatch(t: Path, w: World):
    folder = _adapter_copy(w.adapter, t)
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    (folder / "adapter_config.json").write_text(json.dumps({**config, "r": config["r"] * 2}), encoding="utf-8")
    return ["generate", str(folder), "--prompt", "hi"], [str(folder), "size mismatch", "shape in current model"]


CASES: dict[str, Build] = {
    # configs
    "config file missing": missing_config,
    "config path is a folder": config_is_folder,
    "broken YAML": broken_yaml,
    "YAML list instead of mapping": yaml_list,
    "config not UTF-8": non_utf8_config,
    "unknown section": unknown_section,
    "unknown nested key": unknown_nested_key,
    "wrong type": wrong_type,
    "out of range": out_of_range,
    "not one of the choices": bad_choice,
    "section is not a mapping": section_not_mapping,
    "empty target_modules": empty_target_list,
    "target module not in the model": target_not_in_model,
    "--set without '='": bad_override_syntax,
    "--set into a value": override_into_value,
    "fsdp with int8 on 2 processes": fsdp_with_int8,
    "fsdp with adamw_8bit on 2 processes": fsdp_with_adamw_8bit,
    "fsdp cpu offload without fsdp": cpu_offload_without_fsdp,
    "flash attention on CPU": flash_attention_on_cpu,
    # paths
    "output_dir is a file": output_dir_is_file,
    "output_dir under a file": output_dir_under_file,
    "model path missing": model_missing,
    "model path is a file": model_is_file,
    "model folder without weights": model_folder_without_weights,
    "model hub id not cached (offline)": model_hub_id_offline,
    "data file missing": data_missing,
    "data path is a folder": data_is_folder,
    "data file of unknown type": data_unknown_extension,
    "data file empty": data_empty_file,
    "eval_path missing": eval_path_missing,
    # data (each row case of the data issue, on every row)
    "rows miss a column": _all_rows(json.dumps({"dialogue": "A: hi"}).encode(), "missing 'summary'"),
    "rows of wrong type": _all_rows(json.dumps({"dialogue": "A: hi", "summary": 42}).encode(),
                                    "'summary' is a number, expected text"),
    "rows with empty response": _all_rows(json.dumps({"dialogue": "A: hi", "summary": " "}).encode(),
                                          "empty 'summary'"),
    "rows not UTF-8": _all_rows('{"dialogue": "A: caf\u00e9", "summary": "ok"}'.encode("latin-1"), "not UTF-8"),
    "rows of truncated JSON": _all_rows(json.dumps(GOOD).encode()[:25], "invalid JSON (truncated?)"),
    "too many bad rows": too_many_bad_rows,
    "columns mapped to a missing column": column_map_to_missing_column,
    # adapters
    "adapter weights missing": adapter_weights_missing,
    "adapter weights truncated": adapter_truncated,
    "adapter weights not safetensors": adapter_garbage,
    "adapter config broken": adapter_config_broken,
    "adapter for another base": adapter_for_another_base,
    "adapter pickle only": adapter_pickle_only,
    "adapter path missing": adapter_path_missing,
    "merge onto a non-empty folder": merge_onto_non_empty,
    "merge onto a file": merge_output_is_file,
    "generate --input not UTF-8": generate_input_not_utf8,
    # issue 30
    "model weights truncated": model_weights_truncated,
    "model weights an HTML page": model_weights_garbage,
    "GGUF truncated": gguf_truncated,
    "gguf_file not in the folder": gguf_file_missing,
    "attn_implementation unknown": attention_unknown,
    "target module is not a layer": target_is_not_a_linear,
    "prompts fill seq_len (truncate)": prompts_fill_seq_len,
    "train.seed 2**70": seed_too_large,
    "output_dir holds the user's files": output_dir_of_user_files,
    "rows with unpaired surrogates": _all_rows(b'{"dialogue": "A: hi \\ud83d", "summary": "ok"}',
                                               "has an unpaired surrogate escape \\ud83d in 'dialogue'"),
    "data .jsonl gzip-compressed": _data_file("d.jsonl", gzip.compress(_ROWS_JSONL.encode()), ["gzip-compressed"]),
    "data .jsonl in UTF-16": _data_file("d.jsonl", _ROWS_JSONL.encode("utf-16"), ["UTF-16 text"]),
    "data .jsonl is one JSON array": _data_file("d.jsonl", json.dumps(dialogues(4, seed=5), indent=2).encode(),
                                                ["one JSON array", "name it .json"]),
    "data .jsonl is CSV": _data_file("d.jsonl", b"dialogue,summary\nhi,ok\n", ["not JSON Lines", "name it .csv"]),
    "data .csv is JSON Lines": _data_file("d.csv", _ROWS_JSONL.encode(), ["is JSON, not CSV", ".jsonl"]),
    "data .json is CSV": _data_file("d.json", b"dialogue,summary\nhi,ok\n", ["is not JSON", "name it .csv"]),
    "data .parquet is CSV": _data_file("d.parquet", b"dialogue,summary\nhi,ok\n", ["is text, not parquet"]),
    "data .xlsx saved as .csv": _data_file("d.csv", b"PK\x03\x04" + b"\x00" * 64, ["zip archive", ".xlsx"]),
    "data an HTML page": _data_file("d.jsonl", b"<!DOCTYPE html><html><body>404</body></html>\n", ["HTML page"]),
    "eval --limit -5": eval_limit("-5"),
    "eval --limit 0": eval_limit("0"),
    "generate --max-new-tokens 0": generate_flag("--max-new-tokens", "0", culprits=["--max-new-tokens", "at least 1"]),
    "generate --batch-size 0": generate_flag("--batch-size", "0", culprits=["--batch-size", "at least 1"]),
    "generate --sample --temperature 0": generate_flag("--sample", "--temperature", "0",
                                                       culprits=["--temperature", "above 0 with --sample"]),
    "merge --max-shard-size abc": merge_shard_size,
    "adapter not LoRA (PREFIX_TUNING)": adapter_not_lora,
    "adapter rank differs from its config": adapter_rank_mismatch,
}


def snapshot(*roots: Path) -> dict[str, object]:
    """Every file's bytes and mtime (and every folder) under ``roots``."""
    seen: dict[str, object] = {}
    for root in roots:
        for path in sorted([root, *root.rglob("*")]):
            if path.is_file():
                seen[str(path)] = (path.read_bytes(), path.stat().st_mtime_ns)
            elif path.is_dir():
                seen[str(path)] = "folder"
    return seen


PROGRESS = re.compile(r"\r|\d+/\d+ \[[\d:<?]+")  # a progress bar (transformers' "Loading weights")


def check_error(err: str, culprits: list[str]) -> None:
    """One ``error:`` line naming every culprit; progress bars aside, nothing else on stderr."""
    lines = [line for line in err.split("\n") if line.strip() and not PROGRESS.search(line)]
    assert len(lines) == 1, f"expected one stderr line, got:\n{err}"
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in err
    for part in culprits:
        assert part in lines[0], f"{part!r} not named in: {lines[0]}"


def test_at_least_25_cases() -> None:
    assert len(CASES) >= 25


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_one_line(case: str, world: World, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    argv, culprits = CASES[case](tmp_path, world)
    before = snapshot(tmp_path, world.llama, world.adapter, world.other_adapter)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    check_error(err, culprits)
    assert snapshot(tmp_path, world.llama, world.adapter, world.other_adapter) == before


@pytest.mark.parametrize("case", ["broken YAML", "rows not UTF-8", "adapter weights truncated"])
def test_no_traceback_reaches_the_terminal(case: str, world: World, tmp_path: Path) -> None:
    """The same cases as a user runs them: a fresh ``python -m lorafit`` process."""
    argv, culprits = CASES[case](tmp_path, world)
    before = snapshot(tmp_path, world.llama, world.adapter)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-m", "lorafit", *argv], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 2, done.stderr
    check_error(done.stderr, culprits)
    assert snapshot(tmp_path, world.llama, world.adapter) == before
