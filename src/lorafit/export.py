"""Merge an adapter into its base and save a plain model that ``AutoModelForCausalLM`` loads.

W' = W + (alpha / r) * B @ A for every adapted layer (peft's ``merge_and_unload``), then
``save_pretrained`` writes safetensors shards, ``config.json`` and the tokenizer, so the result
needs neither peft nor lorafit.

Quantized training (int8 / nf4): the adapter learned corrections on top of the *quantized*
weights, but a quantized layer cannot absorb B @ A without re-quantizing and losing most of the
update. As in the recipe, the base is reloaded unquantized in 16-bit (bf16, fp16 where bf16 is
unsupported; fp32 on CPU) and the adapter merged there. The trade-off: the merged model's frozen
weights are the original full-precision ones, not the quantized ones the adapter was trained
against, so its outputs differ slightly from "quantized base + adapter" (usually for the better,
since the quantization error is gone); it is also 2x (int8) to 4x (nf4) larger on disk. Merging
into a 16-bit base rounds W + BA to 16 bits; with ``--dtype float32`` it is exact to fp32.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafit.adapters import AdapterSession, base_run_config
from lorafit.errors import AdapterError, LorafitError
from lorafit.runs import locate_run


@dataclass
class MergeResult:
    """Where the merged model went and how it was made."""

    output_dir: Path
    base_model: str
    dtype: str
    trained_quantization: str
    files: list[str]


def check_output_dir(output: Path, overwrite: bool, protected: list[Path]) -> None:
    """Refuse a non-empty folder (unless ``overwrite``) and any folder holding the inputs."""
    out = output.expanduser().resolve()
    for path in protected:
        path = path.resolve()
        if out == path or out in path.parents:
            raise LorafitError(f"--output: {output} contains the input {path}; choose another folder")
    if out.exists() and not out.is_dir():
        raise LorafitError(f"--output: {output} is a file, expected a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise LorafitError(f"--output: {output} is not empty; pass --overwrite to replace its contents")


def _clear(folder: Path) -> None:
    """Empty ``folder`` (only its own contents: never anything outside it)."""
    for child in folder.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def merge(path: str | Path, output: str | Path, *, overwrite: bool = False, base: str | None = None,
          dtype: str | None = None, max_shard_size: str = "2GB", allow_pickle: bool = False,
          trust_remote_code: bool = False, device: Any = None, log: Any = print,
          base_weights: str = "original") -> MergeResult:
    """Merge the adapter behind ``path`` (run or adapter folder) into its base; save to ``output``.

    The base loads unquantized in ``dtype`` (default ``auto``: 16-bit on GPUs, fp32 on the CPU),
    whatever the run trained with. For a quantized run, ``base_weights`` picks which weights:
    ``original`` (the checkpoint's) or ``dequantized`` (the run's int8/nf4 weights expanded back to
    ``dtype``: exactly what the adapter was trained against)."""
    from lorafit.resolved import resolve

    target = locate_run(path)
    if target.adapter_dir is None:
        raise AdapterError(f"{path}: not a run or adapter folder")
    out = Path(output).expanduser()
    protected = [target.adapter_dir] + ([target.run_dir] if target.run_dir else [])
    base_dir = Path(base or target.base_model)
    if base_dir.exists():
        protected.append(base_dir)
    check_output_dir(out, overwrite, protected)

    if base_weights not in ("original", "dequantized"):
        raise LorafitError(f"--base-weights: '{base_weights}' is not one of original, dequantized")
    trained_quant = target.config.model.quantization if target.config is not None else "none"
    dequantize = trained_quant != "none" and base_weights == "dequantized"
    config = base_run_config(target, base=base, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                             dtype=dtype or "auto", quantization=trained_quant if dequantize else "none")
    run = resolve(config, new_adapter=False)
    chosen = run.precision.weights
    if dequantize:
        log(f"lorafit: the adapter was trained on a {trained_quant} base; merging into that base dequantized "
            f"to {chosen} (the weights the adapter was trained against)")
    elif trained_quant != "none":
        log(f"lorafit: the adapter was trained on a {trained_quant} base; merging into the unquantized base "
            f"in {chosen} (the recipe's way; see docs/merge.md for the precision trade-off)")
    session = AdapterSession(run, target, device=device)
    if dequantize:
        session.model = session.model.dequantize(dtype=run.precision.weights_dtype)
    session.add(target.adapter_dir)
    try:
        merged = session.model.merge_and_unload(safe_merge=True)
    except ValueError as exc:  # safe_merge found NaNs: the adapter is broken
        raise AdapterError(f"{target.adapter_dir}: merging produced non-finite weights ({exc})") from exc
    if run.stores_16bit:  # norms and biases were widened to fp32 in memory only
        from lorafit.storage import narrow_back

        narrow_back(merged)
    merged.config.use_cache = True
    if getattr(merged.config, "quantization_config", None) is not None:
        del merged.config.quantization_config
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    if overwrite and not created:
        _clear(out)
    try:
        merged.save_pretrained(out, safe_serialization=True, max_shard_size=max_shard_size)
        session.tokenizer.save_pretrained(out)
        (out / "lorafit_merge.json").write_text(json.dumps({
            "base_model": session.base_name, "adapter": str(target.adapter_dir), "dtype": chosen,
            "trained_quantization": trained_quant,
            "base_weights": "dequantized" if dequantize else "original"}, indent=2) + "\n", encoding="utf-8")
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    files = sorted(p.name for p in out.iterdir())
    log(f"lorafit: merged {target.adapter_dir} into {session.base_name} ({chosen}); saved to {out}")
    return MergeResult(out, session.base_name, chosen, trained_quant, files)
