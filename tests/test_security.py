"""Unsafe files never load by default; remote code runs only when asked (and says so); a run writes
only into its output_dir and lorafit's cache.

Real files throughout: pickle weights saved with ``torch.save``, a model folder whose config asks
for its own Python code (which, when it runs, leaves a marker file), and a full training run in a
fresh process whose whole temporary tree is compared before and after.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_run_config
from helpers_adapters import peft_adapter
from helpers_data import dialogues, write_jsonl
from test_bad_input import check_error, snapshot

from lorafit.cli import main


def _pickle_only(src: Path, dst: Path, safetensors: str, pickle_name: str) -> Path:
    """Copy ``src`` to ``dst`` and replace its safetensors weights with a pickle file of the same tensors."""
    from safetensors.torch import load_file

    folder = Path(shutil.copytree(src, dst))
    torch.save(load_file(folder / safetensors), folder / pickle_name)
    (folder / safetensors).unlink()
    return folder


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.update(extra)
    return env


def test_pickle_model_refused_without_allow_pickle(tiny_llama: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from lorafit.config import validate_config
    from lorafit.modeling import load_base_model
    from lorafit.resolved import resolve

    model = _pickle_only(tiny_llama, tmp_path / "model", "model.safetensors", "pytorch_model.bin")
    data = write_jsonl(tmp_path / "d.jsonl", dialogues(24))
    raw = tiny_run_config(model, data, tmp_path / "out", max_steps=1)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    before = snapshot(tmp_path)
    for argv in (["train", str(tmp_path / "run.yaml")], ["generate", str(model), "--prompt", "hi"]):
        code, _, err = _run(argv, capsys)
        assert code == 2, err
        check_error(err, ["model.name_or_path", str(model), "pickle", "can run code", "--allow-pickle"])
    assert snapshot(tmp_path) == before

    # allowed: the pickle weights load, and they are the same weights as the safetensors original
    config = validate_config(raw)
    config.model.allow_pickle = True
    loaded = load_base_model(resolve(config), torch.device("cpu"))
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(tiny_llama)
    for (name, a), (_, b) in zip(loaded.state_dict().items(), original.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    code, out, err = _run(["generate", str(model), "--prompt", "hi", "--max-new-tokens", "3", "--no-stream",
                           "--allow-pickle"], capsys)
    assert code == 0, err
    assert out.strip()


def test_pickle_adapter_refused_without_allow_pickle(tiny_llama: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    safe = peft_adapter(tiny_llama, tmp_path / "safe")
    pickled = _pickle_only(safe, tmp_path / "pickled", "adapter_model.safetensors", "adapter_model.bin")
    before = snapshot(tmp_path)
    prompt = ["--prompt", "hi", "--raw", "--max-new-tokens", "8", "--no-stream"]
    code, _, err = _run(["generate", str(pickled), *prompt], capsys)
    assert code == 2
    check_error(err, [str(pickled / "adapter_model.bin"), "pickle", "can run code", "--allow-pickle"])
    assert snapshot(tmp_path) == before

    code, from_pickle, err = _run(["generate", str(pickled), *prompt, "--allow-pickle"], capsys)
    assert code == 0, err
    code, from_safe, err = _run(["generate", str(safe), *prompt], capsys)
    assert code == 0, err
    assert from_pickle == from_safe and from_safe.strip()  # the same adapter, loaded from either file
    code, bare, err = _run(["generate", str(tiny_llama), *prompt], capsys)
    assert code == 0, err
    assert bare != from_pickle  # and the adapter really was applied


CUSTOM_CODE = '''
from pathlib import Path

from transformers import LlamaConfig, LlamaForCausalLM

Path({marker!r}).write_text("the model repository's code ran\\n")


class CustomConfig(LlamaConfig):
    model_type = "lorafit-custom-llama"


class CustomForCausalLM(LlamaForCausalLM):
    config_class = CustomConfig
'''


def _custom_code_model(tiny_llama: Path, folder: Path, marker: Path) -> Path:
    """A model folder whose config.json asks for its own Python code (an unknown model_type + auto_map)."""
    import json

    shutil.copytree(tiny_llama, folder)
    (folder / "custom_llama.py").write_text(CUSTOM_CODE.format(marker=str(marker)), encoding="utf-8")
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config["model_type"] = "lorafit-custom-llama"
    config["auto_map"] = {"AutoConfig": "custom_llama.CustomConfig",
                          "AutoModelForCausalLM": "custom_llama.CustomForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def test_trust_remote_code_off_by_default_and_announced_when_on(tiny_llama: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    from lorafit.config import LorafitConfig, load_config

    assert LorafitConfig().model.trust_remote_code is False
    assert load_config().model.trust_remote_code is False  # the embedded default run

    marker = tmp_path / "ran.txt"
    model = _custom_code_model(tiny_llama, tmp_path / "custom", marker)
    data = write_jsonl(tmp_path / "d.jsonl", dialogues(24))
    raw = tiny_run_config(model, data, tmp_path / "out", max_steps=1, eval_steps=1)
    raw["lora"]["target_modules"] = ["q_proj", "v_proj"]  # an unknown model type has no default targets
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")

    code, out, err = _run(["train", str(tmp_path / "run.yaml")], capsys)
    assert code == 2, err
    check_error(err, ["model.name_or_path", str(model), "its own Python code", "--trust-remote-code"])
    assert not marker.exists()  # the repository's code never ran
    assert "trust_remote_code is ON" not in out

    env = _env(HF_MODULES_CACHE=str(tmp_path / "hf-modules"))
    done = subprocess.run([sys.executable, "-m", "lorafit", "train", str(tmp_path / "run.yaml"), "--no-progress",
                           "--trust-remote-code"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "lorafit: trust_remote_code is ON" in done.stdout
    assert marker.exists()  # it did run, as asked
    assert yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())["model"]["trust_remote_code"] is True


def test_training_writes_only_output_dir_and_cache(tiny_llama: Path, tmp_path: Path) -> None:
    """A whole run in a fresh process: HOME, TMPDIR and the working folder are inside tmp_path too."""
    inputs, work, home, temp = (tmp_path / n for n in ("inputs", "work", "home", "temp"))
    for folder in (work, home, temp):
        folder.mkdir()
    model = Path(shutil.copytree(tiny_llama, inputs / "model"))
    data = write_jsonl(inputs / "d.jsonl", dialogues(32))
    out, cache = tmp_path / "out", tmp_path / "cache"
    raw = tiny_run_config(model, data, out, max_steps=2, eval_steps=1, save_steps=1)
    raw["data"]["cache"] = True  # the tokenized-data cache must land in LORAFIT_CACHE
    (inputs / "run.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")

    env = _env(HOME=str(home), TMPDIR=str(temp), LORAFIT_CACHE=str(cache))
    for name in ("XDG_CACHE_HOME", "XDG_CONFIG_HOME", "MPLCONFIGDIR", "HF_HOME", "HF_DATASETS_CACHE"):
        env.pop(name, None)
    outside = [inputs, work, home, temp]
    before = snapshot(*outside)
    done = subprocess.run([sys.executable, "-m", "lorafit", "train", str(inputs / "run.yaml"), "--no-progress"],
                          cwd=work, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    after = snapshot(*outside)
    added = sorted(set(after) - set(before))
    changed = sorted(k for k in before if after.get(k) != before[k])
    assert not added and not changed, f"written outside output_dir and the cache: {added + changed}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "home", "inputs", "out", "temp", "work"]
    assert (out / "adapter" / "adapter_model.safetensors").exists() and (out / "result.json").exists()
    assert any(p.is_file() for p in cache.rglob("*"))  # the data cache went where it was told
