"""Load a base model once and one or more LoRA adapters onto it, safely, and switch between them.

Why a module of its own: merge, generate and eval all need "base + adapter(s)", and every way an
adapter folder can be wrong (missing file, truncated safetensors, pickle-only weights, made for
another base) should stop with one line naming the file, not a traceback from deep inside peft.

- Weights load from ``adapter_model.safetensors`` only; a pickle ``adapter_model.bin`` is refused
  unless the caller allows pickle (unpickling can run code).
- Before peft attaches an adapter, its tensor shapes are checked against the loaded base's modules,
  so an adapter made for another base fails clearly (its ``base_model_name_or_path`` is named).
- ``AdapterSession`` keeps one base in memory and adds adapters with peft's ``load_adapter``;
  ``activate(name)`` switches with ``set_adapter`` and ``activate(None)`` runs the bare base
  (peft's ``disable_adapter``) without reloading anything.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from lorafit import runs
from lorafit.config import DataConfig, LorafitConfig
from lorafit.data.template import apply_template, find_template
from lorafit.errors import AdapterError, DataError, LorafitError, first_line
from lorafit.modeling import default_device, load_base_model, load_tokenizer
from lorafit.resolved import ResolvedRun, resolve
from lorafit.runs import RunTarget, locate_run

PICKLE_WEIGHTS = "adapter_model.bin"
_PEFT_PREFIX = "base_model.model."


def adapter_base_name(adapter_dir: Path) -> str | None:
    """The ``base_model_name_or_path`` recorded in an adapter's config (None if absent)."""
    data = read_adapter_config(adapter_dir)
    base = data.get("base_model_name_or_path")
    return str(base) if base else None


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    path = Path(adapter_dir) / runs.ADAPTER_CONFIG
    if not path.exists():
        raise AdapterError(f"{path}: missing (not an adapter folder)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{path}: unreadable adapter config ({exc.__class__.__name__})") from exc
    if not isinstance(data, dict) or "peft_type" not in data:
        raise AdapterError(f"{path}: not a peft adapter config (no peft_type)")
    if str(data["peft_type"]).upper() != "LORA":  # DoRA and rsLoRA are LORA too
        raise AdapterError(f"{path}: a {data['peft_type']} adapter; lorafit loads, merges and serves LoRA adapters "
                           "(peft_type LORA) only")
    return data


def adapter_tensor_shapes(adapter_dir: Path, *, allow_pickle: bool = False) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the adapter's tensors, read from the safetensors header (no pickle)."""
    folder = Path(adapter_dir)
    weights = folder / runs.ADAPTER_WEIGHTS
    if not weights.exists():
        if (folder / PICKLE_WEIGHTS).exists():
            if allow_pickle:
                return {}  # shapes are checked by peft itself when it loads the pickle file
            raise AdapterError(
                f"{folder / PICKLE_WEIGHTS}: pickle adapter weights can run code when loaded; convert to "
                f"{runs.ADAPTER_WEIGHTS}, or pass --allow-pickle if you trust the file"
            )
        raise AdapterError(f"{weights}: missing (the adapter folder has no weights)")
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as handle:
            names = handle.keys()
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in names}
    except Exception as exc:  # safetensors raises its own error types for bad headers / truncation
        raise AdapterError(f"{weights}: corrupted or not a safetensors file ({first_line(exc)})") from exc
    if not shapes:
        raise AdapterError(f"{weights}: holds no tensors")
    return shapes


def check_adapter_fits(model: Any, adapter_dir: Path, shapes: dict[str, tuple[int, ...]], base_name: str) -> None:
    """Raise ``AdapterError`` when the adapter's tensors don't fit ``model``'s modules (another base)."""
    recorded = adapter_base_name(adapter_dir) or "unknown"
    hint = f"the adapter was made for '{recorded}', loaded base is '{base_name}'"
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    for key, shape in shapes.items():
        name = key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key
        for marker, check in ((".lora_A.", "in"), (".lora_B.", "out"), (".lora_embedding_A", "emb_in"),
                              (".lora_embedding_B", "emb_out"), (".lora_magnitude_vector", "out")):
            if marker in name:
                module_name = name.split(marker)[0]
                module = modules.get(module_name)
                if module is None:
                    raise AdapterError(f"{adapter_dir}: targets '{module_name}', which this base lacks ({hint})")
                expected = _module_features(module, check)
                actual = shape[-1] if check in ("in", "emb_in") else shape[0]
                if expected is not None and actual != expected:
                    raise AdapterError(
                        f"{adapter_dir}: '{key}' has shape {list(shape)} but '{module_name}' has {expected} "
                        f"{'input' if check in ('in', 'emb_in') else 'output'} features ({hint})"
                    )
                break
        else:  # modules_to_save / trainable tokens: full tensors named like the base's parameters
            base_key = name.replace(".modules_to_save", "").replace(".original_module", "")
            if base_key in params and tuple(params[base_key].shape) != shape:
                raise AdapterError(
                    f"{adapter_dir}: '{key}' has shape {list(shape)}, the base's '{base_key}' has "
                    f"{list(params[base_key].shape)} ({hint})"
                )


def _module_features(module: Any, which: str) -> int | None:
    if which == "emb_in":
        return getattr(module, "num_embeddings", None)
    if which == "emb_out":
        return getattr(module, "embedding_dim", None)
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return module.in_features if which == "in" else module.out_features
    if type(module).__name__ == "Conv1D":  # GPT-2 style: weight is [in, out]
        weight = module.weight
        return weight.shape[0] if which == "in" else weight.shape[1]
    return None


def base_run_config(target: RunTarget, *, base: str | None = None, allow_pickle: bool = False,
                    trust_remote_code: bool = False, dtype: str | None = None,
                    quantization: str | None = None) -> LorafitConfig:
    """The config to load the base with: the run's (so the base loads the way the run trained it:
    its dtype and quantization), with the caller's overrides applied."""
    config = target.config.model_copy(deep=True) if target.config is not None else LorafitConfig()
    model = config.model
    model.name_or_path = base or target.base_model
    if allow_pickle:
        model.allow_pickle = True
    if trust_remote_code:
        model.trust_remote_code = True
    if dtype:
        model.dtype = dtype
    if quantization:
        model.quantization = quantization
    return config


def load_tokenizer_for(run: ResolvedRun, adapter_dir: Path | None) -> Any:
    """The adapter's own tokenizer when it ships one (lorafit saves it), else the base's."""
    if adapter_dir is not None and (Path(adapter_dir) / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
        except (OSError, ValueError) as exc:
            raise AdapterError(f"{adapter_dir}: cannot load its tokenizer ({first_line(exc)})") from exc
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer
    return load_tokenizer(run)


def trained_data_config(target: RunTarget, data_config: DataConfig, tokenizer: Any, *,
                        data_format: str | None = None) -> tuple[DataConfig, Path | None]:
    """``data_config`` rendering as the run trained (its ``lorafit_template.json`` in the adapter, run
    or model folder, which also sets ``tokenizer``'s chat template), and where the record was (None
    when ``data_format``, ``--format``, renders another format: the record no longer says how prompts
    render, so nothing copies it on). Without a record: the run's own format; a run whose format is
    auto cannot say which, unless ``data_format`` names one; a bare model or foreign adapter renders
    as lorafit's default task."""
    model_dir = Path(target.base_model) if target.adapter_dir is None else None
    record, where = find_template(target.adapter_dir, target.run_dir, model_dir)
    if record is not None:
        data_config = apply_template(record, data_config, tokenizer, where)
    if data_format is not None:
        if data_format != data_config.format:
            data_config = data_config.model_copy(update={"format": data_format, "template": None})
            where = None
    elif record is None and data_config.format == "auto":
        if target.config is not None:
            raise DataError(f"{target.run_dir or target.adapter_dir}: the run's data.format is auto and its "
                            "lorafit_template.json is missing; pass --format")
        data_config = data_config.model_copy(update={"format": "summarization"})
    return data_config, where


class AdapterSession:
    """One loaded base model with any number of adapters; switch without reloading the base.

    >>> session = AdapterSession.open("output/run-a")          # base + run-a's adapter
    >>> session.add("output/run-b", name="b")                   # same base, second adapter
    >>> with session.activate("b"): ...                          # generate / score with b
    >>> with session.activate(None): ...                         # the bare base (baseline)
    """

    def __init__(self, run: ResolvedRun, target: RunTarget, *, device: torch.device | None = None,
                 data_format: str | None = None) -> None:
        self.run = run
        self.config = run.config
        self.target = target
        self.device = device or default_device()
        self.allow_pickle = run.config.model.allow_pickle
        self.tokenizer = load_tokenizer_for(run, target.adapter_dir)
        self.template_file = self._apply_trained_template(data_format)
        self.model = load_base_model(run, self.device)
        self.model.config.use_cache = True
        self.model.eval()
        self.adapters: dict[str, Path] = {}
        self.active: str | None = None

    @classmethod
    def open(cls, path: str | Path, *, base: str | None = None, quantization: str | None = None,
             allow_pickle: bool = False, trust_remote_code: bool = False, dtype: str | None = None,
             device: torch.device | None = None, allow_model: bool = True, name: str | None = None,
             data_format: str | None = None) -> AdapterSession:
        """Load the base behind ``path`` (run, adapter or, with ``allow_model``, a model) and its
        adapter. The base loads as the run trained it (quantization, dtype) unless overridden;
        prompts render as the run trained them unless ``data_format`` names another format."""
        target = locate_run(path, allow_model=allow_model)
        config = base_run_config(target, base=base, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                                 dtype=dtype, quantization=quantization)
        if target.adapter_dir is not None:  # fail on a bad adapter before spending time on the base
            read_adapter_config(target.adapter_dir)
            adapter_tensor_shapes(target.adapter_dir, allow_pickle=allow_pickle)
        session = cls(resolve(config, new_adapter=False), target, device=device, data_format=data_format)
        if target.adapter_dir is not None:
            session.add(target.adapter_dir, name=name)
        return session

    def describe_base(self) -> str:
        """How the base was loaded, and whether that is the run's own setting."""
        trained = self.target.config.model if self.target.config is not None else None
        quant = self.run.quantization
        how = f"quantization {quant}, {self.run.precision.label()}"
        if trained is None:
            return f"base {self.base_name}: {how}"
        same = trained.quantization == quant and trained.dtype == self.config.model.dtype
        origin = "as the run trained it" if same else (
            f"the run trained with quantization {trained.quantization}, dtype {trained.dtype}")
        return f"base {self.base_name}: {how} ({origin})"

    @property
    def data_config(self) -> DataConfig:
        """How prompts are rendered: as the run trained (its recorded template, else its config's data
        settings), else the summarization default."""
        return self.config.data

    def _apply_trained_template(self, data_format: str | None) -> Path | None:
        """Set the data config and tokenizer to the template the run trained with (``lorafit_template.json``
        in the adapter, run or model folder; ``data_format`` overrides its format); returns where it was."""
        self.config.data, where = trained_data_config(self.target, self.config.data, self.tokenizer,
                                                      data_format=data_format)
        return where

    @property
    def base_name(self) -> str:
        return self.config.model.name_or_path

    def add(self, path: str | Path, name: str | None = None) -> str:
        """Load another adapter (run or adapter folder) onto the same base; returns its name."""
        adapter_dir = locate_run(path).adapter_dir
        assert adapter_dir is not None
        name = name or self._unique_name(adapter_dir)
        if name in self.adapters:
            raise AdapterError(f"{adapter_dir}: an adapter named '{name}' is already loaded")
        read_adapter_config(adapter_dir)
        shapes = adapter_tensor_shapes(adapter_dir, allow_pickle=self.allow_pickle)
        inner = self.model.get_base_model() if self.adapters else self.model
        check_adapter_fits(inner, adapter_dir, shapes, self.base_name)
        try:
            if not self.adapters:
                from peft import PeftModel

                self.model = PeftModel.from_pretrained(self.model, str(adapter_dir), adapter_name=name,
                                                       is_trainable=False)
            else:
                self.model.load_adapter(str(adapter_dir), adapter_name=name, is_trainable=False)
        except (RuntimeError, ValueError, KeyError, OSError, SafetensorError) as exc:
            raise AdapterError(f"{adapter_dir}: cannot load adapter ({first_line(exc)})") from exc
        self.model.eval()
        self.adapters[name] = adapter_dir
        self.model.set_adapter(name)
        self.active = name
        return name

    def _unique_name(self, adapter_dir: Path) -> str:
        if not self.adapters:
            return "default"
        stem = adapter_dir.parent.name if adapter_dir.name == runs.ADAPTER_DIR else adapter_dir.name
        name, n = stem or "adapter", 2
        while name in self.adapters:
            name, n = f"{stem}-{n}", n + 1
        return name

    @contextlib.contextmanager
    def activate(self, name: str | None) -> Iterator[Any]:
        """Use adapter ``name`` (or the bare base for ``None``) inside the block; yields the model."""
        if name is None:
            if not self.adapters:
                yield self.model
                return
            with self.model.disable_adapter():
                yield self.model
            return
        if name not in self.adapters:
            raise LorafitError(f"no adapter named '{name}' (loaded: {', '.join(self.adapters) or 'none'})")
        previous = self.active
        self.model.set_adapter(name)
        self.active = name
        try:
            yield self.model
        finally:
            if previous is not None:
                self.model.set_adapter(previous)
                self.active = previous

