"""Loading adapters safely onto one base: peft-made files, switching, and every way a folder is bad."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers_adapters import logits, peft_adapter, sample_ids

from lorafit.adapters import AdapterSession
from lorafit.errors import AdapterError


@pytest.fixture(scope="module")
def adapters(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("peft-adapters")
    return (peft_adapter(tiny_llama, root / "a", seed=1),
            peft_adapter(tiny_llama, root / "b", seed=2, targets=("k_proj", "o_proj")))


def test_peft_adapter_loads_and_matches_plain_peft(tiny_llama: Path, adapters: tuple[Path, Path]) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = sample_ids()
    session = AdapterSession.open(adapters[0], device=torch.device("cpu"))
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), str(adapters[0]))
    plain = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with session.activate("default") as model:
        assert torch.allclose(logits(model, ids), logits(reference.eval(), ids), atol=1e-5)
    with session.activate(None) as model:
        bare = logits(model, ids)
    assert torch.allclose(bare, logits(plain.eval(), ids), atol=1e-5)
    assert not torch.allclose(bare, logits(reference, ids), atol=1e-3)  # the adapter does change outputs


def test_switching_adapters_keeps_one_base(tiny_llama: Path, adapters: tuple[Path, Path]) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = sample_ids()
    session = AdapterSession.open(adapters[0], device=torch.device("cpu"))
    base_before = session.model.get_base_model()
    name_b = session.add(adapters[1])
    assert session.model.get_base_model() is base_before
    assert set(session.adapters) == {"default", name_b}
    only_b = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), str(adapters[1])).eval()
    only_a = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), str(adapters[0])).eval()
    with session.activate(name_b) as model:
        assert torch.allclose(logits(model, ids), logits(only_b, ids), atol=1e-5)
    with session.activate("default") as model:
        assert torch.allclose(logits(model, ids), logits(only_a, ids), atol=1e-5)
    with pytest.raises(Exception, match="no adapter named 'nope'"), session.activate("nope"):
        pass


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_missing_weights_file(adapters: tuple[Path, Path], tmp_path: Path) -> None:
    folder = _copy(adapters[0], tmp_path / "x")
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="adapter_model.safetensors: missing"):
        AdapterSession.open(folder, device=torch.device("cpu"))


def test_missing_config_file(adapters: tuple[Path, Path], tmp_path: Path) -> None:
    folder = _copy(adapters[0], tmp_path / "x")
    (folder / "adapter_config.json").unlink()
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        AdapterSession.open(folder, device=torch.device("cpu"))


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupted_weights(adapters: tuple[Path, Path], tmp_path: Path, damage: str) -> None:
    folder = _copy(adapters[0], tmp_path / "x")
    weights = folder / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100] if damage == "truncate" else b"not a safetensors file at all")
    with pytest.raises(AdapterError, match="adapter_model.safetensors: (corrupted|truncated)"):
        AdapterSession.open(folder, device=torch.device("cpu"))


def test_pickle_adapter_refused_unless_allowed(adapters: tuple[Path, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    folder = _copy(adapters[0], tmp_path / "x")
    state = load_file(folder / "adapter_model.safetensors")
    (folder / "adapter_model.safetensors").unlink()
    torch.save(state, folder / "adapter_model.bin")
    with pytest.raises(AdapterError, match="pickle .*--allow-pickle"):
        AdapterSession.open(folder, device=torch.device("cpu"))
    session = AdapterSession.open(folder, device=torch.device("cpu"), allow_pickle=True)
    assert "default" in session.adapters


def test_adapter_for_another_base(tmp_path: Path, tiny_llama: Path) -> None:
    """An adapter made on a wider model fails with a line naming the base it was made for."""
    import shutil

    from transformers import AutoModelForCausalLM, LlamaConfig

    other = tmp_path / "other-base"
    shutil.copytree(tiny_llama, other)
    config = LlamaConfig(vocab_size=384, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=0, eos_token_id=0, pad_token_id=1)
    AutoModelForCausalLM.from_config(config).save_pretrained(other)
    adapter = peft_adapter(other, tmp_path / "wide-adapter")
    with pytest.raises(AdapterError, match=r"made for '.*other-base'.*loaded base is '.*tiny-llama"):
        AdapterSession.open(adapter, base=str(tiny_llama), device=torch.device("cpu"))


def test_bad_adapter_config_json(adapters: tuple[Path, Path], tmp_path: Path) -> None:
    folder = _copy(adapters[0], tmp_path / "x")
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="adapter_config.json"):
        AdapterSession.open(folder, device=torch.device("cpu"))
