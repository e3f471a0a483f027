"""``lorafit export RUN --gguf``: the run as a GGUF file for llama.cpp / Ollama, served as trained.

The steps, each done by the part that knows it best:

1. Check first what can fail fast: llama.cpp's tools are there, the architecture is one the
   converter supports, the output folder is usable, the run's template is known (its
   ``lorafit_template.json``: a run trained with ``data.format: auto`` says what auto chose there);
   the serving plan (``lorafit.llamacpp.serving``) is made from it; all before minutes of merging.
2. Merge the adapter into its base with ``lorafit.export.merge`` (a quantized run's base is
   dequantized, then merged: the weights the adapter was trained against).
3. Give the merged folder the chat template that renders the run's prompt, then convert with llama.cpp's ``convert_hf_to_gguf.py``
   (f32/f16/bf16/q8_0 directly; q4_k_m and the other k-quants through llama.cpp's quantizer
   from the converter's 16-bit output).
4. Read the GGUF back and compare its EOS / BOS / chat template with what training did; write
   the Ollama ``Modelfile``, a README, ``lorafit_export.json`` and the run's
   ``lorafit_template.json`` beside it.

``--adapter-only`` converts the adapter with ``convert_lora_to_gguf.py`` instead, plus the base
(unless ``--base-gguf`` names one), for ``llama-cli -m base.gguf --lora adapter.gguf`` and Ollama's
``ADAPTER``. llama.cpp applies ``alpha / r`` per adapter, so an rsLoRA adapter is written with the
alpha that gives its scale; DoRA has no llama.cpp form and is refused (export merged instead).

The CLI's ``export`` command imports this module to parse arguments: the torch-backed parts
(``lorafit.adapters``, ``lorafit.export``, ``lorafit.modeling``) are imported inside the steps that use them.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import signal
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorafit.config import DataConfig
from lorafit.errors import AdapterError, LorafitError, StoppedBySignal
from lorafit.llamacpp import serving, tools
from lorafit.llamacpp.readme import modelfile, readme
from lorafit.resolved import DEFAULT_TARGETS, resolve
from lorafit.rundir import replace_folder
from lorafit.runs import RunTarget, locate_run

MODELFILE = "Modelfile"
README = "README.md"
RECORD = "lorafit_export.json"
_ADAPTER_TYPES = ("f32", "f16", "bf16")


@dataclass
class GgufExport:
    """What ``export_gguf`` wrote."""

    output_dir: Path
    model: Path  # the GGUF to run (the merged model, or the base with --adapter-only)
    adapter: Path | None
    quant: str
    files: list[str]
    warnings: list[str] = field(default_factory=list)


def export_gguf(path: str | Path, output: str | Path | None = None, *, quant: str = "f16",
                adapter_only: bool = False, base_gguf: str | Path | None = None, overwrite: bool = False,
                base: str | None = None, dtype: str | None = None, base_weights: str = "dequantized",
                allow_pickle: bool = False, trust_remote_code: bool = False, data_format: str | None = None,
                log: Any = print) -> GgufExport:
    """Export the run or adapter at ``path`` as GGUF into ``output`` (default ``RUN/gguf``); prompts
    render as the run trained them (its recorded template) unless ``data_format`` names another format."""
    from lorafit.adapters import base_run_config
    from lorafit.export import check_output_dir, make_staging, stopped_cleanly

    if quant not in tools.QUANT_CHOICES:
        raise LorafitError(f"--quant: '{quant}' is not one of {', '.join(tools.QUANT_CHOICES)}")
    target = locate_run(path)
    if target.adapter_dir is None:
        raise AdapterError(f"{path}: not a run or adapter folder")
    out = Path(output).expanduser() if output else (target.run_dir or target.adapter_dir.parent) / "gguf"
    if base_gguf is not None and not adapter_only:
        raise LorafitError("--base-gguf: only with --adapter-only (a merged export holds its own weights)")
    if base_gguf is not None and not Path(base_gguf).is_file():
        raise LorafitError(f"--base-gguf: {base_gguf} is not a file")

    converter = tools.converter_dir(log=log)
    if quant in tools.QUANTIZER_TYPES:
        tools.import_llama_cpp(f"--quant {quant}")
    run = resolve(base_run_config(target, base=base, allow_pickle=allow_pickle,
                                  trust_remote_code=trust_remote_code, quantization="none"), new_adapter=False)
    check_architecture(run.model_config, converter)
    if adapter_only:
        _check_adapter_convertible(target)
    protected = [target.adapter_dir, *[p for p in (target.run_dir, Path(run.source.location), base_gguf) if p]]
    check_output_dir(out, overwrite, [Path(p) for p in protected if Path(p).exists()])
    plan, template_file = _serving_plan(target, run, data_format)
    dtype = _merge_dtype(dtype)

    staging = make_staging(out)  # written there, then renamed into place: --output is old or new, never a mix
    try:
        with stopped_cleanly(out, "export"):
            result = _export_into(staging, target, run, plan, template_file, converter, quant, adapter_only, base_gguf,
                                  log, base=base, dtype=dtype, base_weights=base_weights, allow_pickle=allow_pickle,
                                  trust_remote_code=trust_remote_code, data_format=data_format)
            replace_folder(staging, out)
    except StoppedBySignal as exc:  # the merge inside names its scratch folder: name the one the user asked for
        signum = exc.exit_code - 128
        raise StoppedBySignal(f"export stopped by {signal.Signals(signum).name}: nothing was written to {out}",
                              signum) from None
    except OSError as exc:
        raise LorafitError(f"--output: could not write the GGUF export to {out} ({exc.strerror or exc}); "
                           "nothing was changed there") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # moved into place on success: nothing left to remove
    result.output_dir = out
    result.model = out / result.model.name if result.model.parent == staging else result.model
    result.adapter = out / result.adapter.name if result.adapter is not None else None
    for warning in result.warnings:
        log(f"lorafit: warning: {warning}")
    log(f"lorafit: wrote {', '.join(result.files)} to {out}")
    return result


def _merge_dtype(dtype: str | None) -> str | None:
    """``auto`` merges in fp32 on a CPU, also where training's ``precision: auto`` picks bf16: the
    converter (``--quant``) then rounds W + BA once, not a bf16 copy of it again. GPUs keep
    ``auto`` (16-bit: their memory is the limit)."""
    from lorafit.modeling import default_device

    if dtype in (None, "auto") and default_device().type == "cpu":
        return "float32"
    return dtype


def _export_into(staging: Path, target: RunTarget, run: Any, plan: serving.ServingPlan, template_file: Path | None,
                 converter: Path, quant: str, adapter_only: bool, base_gguf: str | Path | None, log: Any,
                 **merge_options: Any) -> GgufExport:
    if template_file is not None:  # the record the GGUF's templates and stops were cut from
        shutil.copyfile(template_file, staging / template_file.name)
    stem = _stem(target)
    with tempfile.TemporaryDirectory(prefix=".lorafit-export-", dir=staging) as tmp:
        if adapter_only:
            return _export_adapter(target, run, plan, converter, staging, Path(tmp), stem, quant, base_gguf, log)
        return _export_merged(target, plan, converter, staging, Path(tmp), stem, quant, log, **merge_options)


def check_architecture(model_config: Any, converter: Path) -> str:
    """The model's architecture, or one line naming the families the converter supports."""
    arch = (getattr(model_config, "architectures", None) or [None])[0]
    supported = tools.supported_architectures(converter)
    if arch in supported:
        return arch

    try:
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as CAUSAL,
        )
    except ImportError:
        CAUSAL = {}
    families = [t for t in DEFAULT_TARGETS if CAUSAL.get(t) in supported]
    version = tools.llama_cpp_version() or tools.LLAMA_CPP_PYTHON
    name = arch or f"model type '{getattr(model_config, 'model_type', '?')}'"
    raise LorafitError(f"--gguf: llama.cpp's converter ({version}) does not support {name}; of the families "
                       f"lorafit trains it converts {', '.join(families)} (and {len(supported)} architectures "
                       "in all); export with `lorafit merge` for transformers, vLLM or TGI instead")


def _check_adapter_convertible(target: RunTarget) -> None:
    from lorafit.adapters import read_adapter_config

    data = read_adapter_config(target.adapter_dir)
    if data.get("use_dora"):
        raise LorafitError("--adapter-only: llama.cpp has no DoRA adapters (the magnitude vector has no "
                           "GGUF form); export the merged model instead (without --adapter-only)")
    if data.get("alpha_pattern") or data.get("rank_pattern"):
        raise LorafitError("--adapter-only: llama.cpp gives an adapter one alpha, this one has per-module "
                           "rank/alpha patterns; export the merged model instead")
    if data.get("modules_to_save"):
        raise LorafitError("--adapter-only: the adapter trains whole modules (modules_to_save), which "
                           "llama.cpp adapters cannot hold; export the merged model instead")


def _stem(target: RunTarget) -> str:
    folder = target.run_dir or target.adapter_dir
    name = folder.name if folder.name != "adapter" else folder.parent.name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model"


def _convert(converter: Path, model_dir: Path, target: Path, quant: str, work: Path, log: Any) -> None:
    """A model folder to ``target`` at ``quant``: the converter, then the quantizer if needed."""
    if quant in tools.CONVERTER_TYPES:
        tools.run_converter(converter, tools.HF_SCRIPT, [str(model_dir), "--outfile", str(target),
                                                         "--outtype", quant], log=log)
        return
    wide = work / "model-16bit.gguf"
    tools.run_converter(converter, tools.HF_SCRIPT, [str(model_dir), "--outfile", str(wide), "--outtype", "auto"],
                        log=log)
    log(f"lorafit: quantizing to {quant} with llama.cpp's quantizer")
    tools.quantize(wide, target, quant)
    wide.unlink()


def _serving_plan(target: RunTarget, run: Any, data_format: str | None) -> tuple[serving.ServingPlan, Path | None]:
    """The serving plan from the tokenizer the run saved (else its base's) and the template the run
    trained with (``trained_data_config``: its recorded one, or ``data_format``), and the record to
    ship beside the GGUF (none when ``data_format`` renders another format); the same tokenizer and
    template ``AdapterSession`` (generate, merge) uses."""
    from lorafit.adapters import load_tokenizer_for, trained_data_config

    tokenizer = load_tokenizer_for(run, target.adapter_dir)
    data_config = target.config.data if target.config is not None else DataConfig()
    data_config, template_file = trained_data_config(target, data_config, tokenizer, data_format=data_format)
    context = _context_length(target, run.model_config)
    return serving.plan(data_config, tokenizer, context_length=context), template_file


def _context_length(target: RunTarget, model_config: Any) -> int:
    """The run's training length (what the adapter saw), within the model's context."""
    model_ctx = next((getattr(model_config, k) for k in ("max_position_embeddings", "n_positions", "seq_length")
                      if isinstance(getattr(model_config, k, None), int)), None)
    trained = target.config.train.seq_len if target.config is not None else 4096
    return min(trained, model_ctx) if model_ctx else trained


def _prepare_tokenizer_files(folder: Path, plan: serving.ServingPlan) -> None:
    """Tell the converter what training did: the chat template that renders the run's prompt (the
    run's recorded one for chat runs, whatever the base's files say now; the converter reads
    tokenizer_config.json's key first, then chat_template.jinja) and whether BOS starts a prompt
    (written explicitly: llama.cpp's default for a missing flag depends on the pre-type)."""
    config_file = folder / "tokenizer_config.json"
    data = json.loads(config_file.read_text(encoding="utf-8")) if config_file.exists() else {}
    if plan.bos is not None:
        data["add_bos_token"] = plan.bos
    if plan.chat_template is not None:
        data.pop("chat_template", None)
        (folder / "chat_template.json").unlink(missing_ok=True)
        shutil.rmtree(folder / "additional_chat_templates", ignore_errors=True)
        (folder / "chat_template.jinja").write_text(plan.chat_template, encoding="utf-8")
    config_file.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _export_merged(target: RunTarget, plan: serving.ServingPlan, converter: Path, out: Path, work: Path, stem: str,
                   quant: str, log: Any, **merge_options: Any) -> GgufExport:
    from lorafit.export import merge

    merged = work / "merged"
    merge(target.adapter_dir, merged, log=lambda line: log(line.split("; saved to")[0]), **merge_options)
    _prepare_tokenizer_files(merged, plan)
    model = out / f"{stem}-{quant}.gguf"
    _convert(converter, merged, model, quant, work, log)
    warnings = plan.warnings + serving.check_gguf(plan, serving.gguf_metadata(model))
    return _finish(target, out, plan, model, None, quant, warnings, base_note=None)


def _export_adapter(target: RunTarget, run: Any, plan: serving.ServingPlan, converter: Path, out: Path, work: Path,
                    stem: str, quant: str, base_gguf: str | Path | None, log: Any) -> GgufExport:
    from lorafit.adapters import read_adapter_config

    base_dir = Path(run.source.location)
    adapter_dir = _llama_cpp_adapter_dir(target.adapter_dir, read_adapter_config(target.adapter_dir), work)
    adapter_type = quant if quant in _ADAPTER_TYPES else "f16"
    adapter = out / f"{stem}-lora-{adapter_type}.gguf"
    tools.run_converter(converter, tools.LORA_SCRIPT, ["--base", str(base_dir), "--outfile", str(adapter),
                                                      "--outtype", adapter_type, str(adapter_dir)], log=log)
    warnings = list(plan.warnings)
    trained_quant = target.config.model.quantization if target.config is not None else "none"
    if trained_quant != "none":
        warnings.append(f"the adapter was trained on a {trained_quant} base; llama.cpp applies it to the base "
                        "GGUF's weights (the unquantized base), not to the ones it was trained against")
    if base_gguf is not None:
        model = Path(base_gguf).expanduser().resolve()
        base_note = f"the base GGUF you named ({model}); it must be {run.source.name} for the adapter to fit"
        metadata = serving.gguf_metadata(model)
    else:
        model = out / f"{_stem_of(run.source.name)}-{quant}.gguf"
        base_folder = work / "base"
        _link_model_folder(base_dir, base_folder)
        _prepare_tokenizer_files(base_folder, plan)
        _convert(converter, base_folder, model, quant, work, log)
        base_note = None
        metadata = serving.gguf_metadata(model)
    warnings += serving.check_gguf(plan, metadata)
    return _finish(target, out, plan, model, adapter, quant, warnings, base_note=base_note)


def _stem_of(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", Path(name).name if "/" in name else name).strip("-.") or "base"


def _link_model_folder(source: Path, folder: Path) -> None:
    """A view of ``source`` whose tokenizer files can change: weights linked, the rest copied."""
    folder.mkdir()
    for item in source.iterdir():
        if item.is_file() and item.suffix in (".safetensors", ".bin", ".gguf"):
            (folder / item.name).symlink_to(item.resolve())
        elif item.is_file():
            shutil.copy2(item, folder / item.name)


def _llama_cpp_adapter_dir(adapter_dir: Path, config: dict[str, Any], work: Path) -> Path:
    """The adapter as llama.cpp reads it: scale alpha / r. rsLoRA scales alpha / sqrt(r), so its
    alpha is rewritten to alpha * sqrt(r) (in a copy: the run's adapter is never touched)."""
    if not config.get("use_rslora"):
        return adapter_dir
    copy = work / "adapter"
    copy.mkdir()
    for item in adapter_dir.iterdir():
        if item.is_file() and item.name != "adapter_config.json":
            (copy / item.name).symlink_to(item.resolve())
    config = dict(config, lora_alpha=float(config["lora_alpha"]) * math.sqrt(float(config["r"])), use_rslora=False)
    (copy / "adapter_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return copy


def _finish(target: RunTarget, out: Path, plan: serving.ServingPlan, model: Path, adapter: Path | None,
            quant: str, warnings: list[str], *, base_note: str | None) -> GgufExport:
    model_ref = model.name if model.parent == out else str(model)
    (out / MODELFILE).write_text(modelfile(plan, model_ref, adapter.name if adapter else None, target), encoding="utf-8")
    (out / README).write_text(readme(plan, model_ref, adapter.name if adapter else None, target, quant, warnings,
                                     base_note), encoding="utf-8")
    record = {
        "run": str(target.run_dir or target.adapter_dir), "model": model_ref,
        "adapter": adapter.name if adapter else None, "quant": quant, "format": plan.format,
        "template": plan.template.pieces if plan.template.carried else None,
        "chat_template_replaced": plan.replaces_chat_template, "stop": plan.stops, "num_ctx": plan.num_ctx,
        "llama_cpp_python": tools.llama_cpp_version() or tools.LLAMA_CPP_PYTHON, "warnings": warnings,
    }
    (out / RECORD).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    files = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    return GgufExport(out, model, adapter, quant, files, warnings)
