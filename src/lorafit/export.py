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

import contextlib
import json
import os
import shutil
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafit.adapters import (
    AdapterSession,
    adapter_tensor_shapes,
    base_run_config,
    read_adapter_config,
)
from lorafit.errors import AdapterError, LorafitError, StoppedBySignal, first_line
from lorafit.resolved import resolve
from lorafit.rundir import replace_folder
from lorafit.runs import locate_run
from lorafit.storage import narrow_back


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


STAGING_MARK = ".merging-"  # .NAME.merging-PID beside --output NAME: the merge in progress


def make_staging(out: Path) -> Path:
    """The folder the merge is written into before it moves to ``out`` in one rename, beside it
    (same file system). Made before the model loads, so a read-only or missing destination fails
    at once; staging folders of merges whose process is gone are removed."""
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        for stale in parent.glob(f".{out.name}{STAGING_MARK}*"):
            pid = stale.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(stale, ignore_errors=True)
        staging = parent / f".{out.name}{STAGING_MARK}{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    except OSError as exc:
        raise LorafitError(f"--output: cannot write into {parent} ({exc.strerror or exc})") from exc
    return staging


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def stopped_cleanly(out: Path, what: str = "merge") -> Iterator[None]:
    """SIGTERM (a container stopping, ``kill``) ends the ``what`` with an exception, so the staging
    folder is removed on the way out and ``out`` stays as it was."""
    def stop(signum: int, frame: Any) -> None:
        del frame
        raise StoppedBySignal(f"{what} stopped by {signal.Signals(signum).name}: nothing was written to {out}",
                              signum)

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: no handlers
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def check_shard_size(value: str) -> None:
    """``--max-shard-size`` checked before the model loads, by the parser that saving uses
    (huggingface_hub's sharding: ``2GB``, ``500MB``), and more than zero."""
    from huggingface_hub import split_torch_state_dict_into_shards

    try:
        split_torch_state_dict_into_shards({}, max_shard_size=value)
    except ValueError as exc:
        raise LorafitError(f"--max-shard-size: '{value}' is not a size ({first_line(exc)}); use e.g. 2GB or "
                           "500MB") from exc
    if value.strip().startswith(("-", "0")) and not value.strip().startswith("0."):
        raise LorafitError(f"--max-shard-size: '{value}' must be more than zero; use e.g. 2GB or 500MB")


def merge(path: str | Path, output: str | Path, *, overwrite: bool = False, base: str | None = None,
          dtype: str | None = None, max_shard_size: str = "2GB", allow_pickle: bool = False,
          trust_remote_code: bool = False, device: Any = None, log: Any = print,
          base_weights: str = "original", data_format: str | None = None) -> MergeResult:
    """Merge the adapter behind ``path`` (run or adapter folder) into its base; save to ``output``.

    The base loads unquantized in ``dtype`` (default ``auto``: 16-bit on GPUs, fp32 on the CPU),
    whatever the run trained with. For a quantized run, ``base_weights`` picks which weights:
    ``original`` (the checkpoint's) or ``dequantized`` (the run's int8/nf4 weights expanded back to
    ``dtype``: exactly what the adapter was trained against). ``data_format`` renders prompts (the
    tokenizer's chat template) as that format instead of the run's recorded one."""

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
    read_adapter_config(target.adapter_dir)  # a bad adapter fails before the base loads
    adapter_tensor_shapes(target.adapter_dir, allow_pickle=allow_pickle)
    if isinstance(max_shard_size, str):
        check_shard_size(max_shard_size)
    staging = make_staging(out)
    try:
        with stopped_cleanly(out):
            return _merge_into(staging, out, target, base=base, dtype=dtype, max_shard_size=max_shard_size,
                               allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, device=device,
                               base_weights=base_weights, data_format=data_format, log=log)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # moved into place on success: nothing left to remove


def _merge_into(staging: Path, out: Path, target: Any, *, base: str | None, dtype: str | None,
                max_shard_size: str | int, allow_pickle: bool, trust_remote_code: bool, device: Any,
                base_weights: str, data_format: str | None, log: Any) -> MergeResult:
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
    session = AdapterSession(run, target, device=device, data_format=data_format)
    if dequantize:
        session.model = session.model.dequantize(dtype=run.precision.weights_dtype)
    session.add(target.adapter_dir)
    try:
        merged = session.model.merge_and_unload(safe_merge=True)
    except ValueError as exc:  # safe_merge found NaNs: the adapter is broken
        raise AdapterError(f"{target.adapter_dir}: merging produced non-finite weights ({exc})") from exc
    if run.stores_16bit:  # norms and biases were widened to fp32 in memory only
        narrow_back(merged)
    merged.config.use_cache = True
    if getattr(merged.config, "quantization_config", None) is not None:
        del merged.config.quantization_config
    try:
        merged.save_pretrained(staging, safe_serialization=True, max_shard_size=max_shard_size)
        session.tokenizer.save_pretrained(staging)  # with the chat template the run trained with (when it had one)
        if session.template_file is not None:  # so `lorafit generate` on the merged model prompts as trained
            shutil.copyfile(session.template_file, staging / session.template_file.name)
        (staging / "lorafit_merge.json").write_text(json.dumps({
            "base_model": session.base_name, "adapter": str(target.adapter_dir), "dtype": chosen,
            "trained_quantization": trained_quant,
            "base_weights": "dequantized" if dequantize else "original"}, indent=2) + "\n", encoding="utf-8")
        replace_folder(staging, out)  # --output is the old folder or the whole new one, never a mix
    except OSError as exc:
        raise LorafitError(f"--output: could not write the merged model to {out} ({exc.strerror or exc}); "
                           "nothing was changed there") from exc
    files = sorted(p.name for p in out.iterdir())
    log(f"lorafit: merged {target.adapter_dir} into {session.base_name} ({chosen}); saved to {out}")
    return MergeResult(out, session.base_name, chosen, trained_quant, files)
