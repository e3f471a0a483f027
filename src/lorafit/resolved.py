"""A run resolved once: the config plus the environment -> every decision the run depends on.

Training, the planner, data preparation, merge / generate / eval and the SageMaker launcher all
read a ``ResolvedRun``; none of them re-derives where the model comes from, which dtype the
weights load in, whether autocast runs, how rows are packed, which loss runs or which fused paths
apply. It is printed when a run starts and saved as ``run.json`` in the run folder, so what ran
is on record.

- Model source: ``builtin:`` names, local folders, a ``config.json`` (planner only), ``s3://``
  (SageMaker launcher only) or a hub id.
- Precision: the unquantized weights' dtype and the autocast dtype, from ``model.dtype`` /
  ``train.precision`` and the device (bf16 on GPUs that support it, fp16 on older ones, fp32 on
  the CPU unless asked). bf16 and fp16 autocast both run on the CPU too, which is how the GPU
  paths are tested here.
- Packing and loss: decided from what the architecture does (``lorafit.probe``), before any data
  is tokenized or weights load.
- Fused paths and library workarounds: only where ``lorafit.compat``'s probe of the library
  internal passed (``library_checks`` in ``run.json``; a failed one leaves a note).
- LoRA targets: the config's, else the architecture's default (``DEFAULT_TARGETS``, then peft's).
- Starting adapter (``model.adapter``): its base and LoRA settings become the run's
  (``lorafit.start_adapter``); preference pairs are never packed.

Importing this module loads no ML library (the CLI imports it to parse arguments):
``lorafit.compat`` (torch) is imported where library versions and probes are read, and
``lorafit.start_adapter`` inside ``resolve`` (it imports this module).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from lorafit.builtin import is_builtin, resolve_model
from lorafit.config import LorafitConfig
from lorafit.errors import ConfigError, LorafitError, load_reason
from lorafit.paths import looks_like_path
from lorafit.probe import architecture_facts

RUN_FILE = "run.json"

# ------------------------------------------------------------------------------ model source


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: the name as given and what ``from_pretrained`` receives."""

    name: str
    location: str
    kind: str  # builtin | local | config-file | hub | s3
    revision: str | None = None
    gguf_file: str | None = None


def resolve_model_source(name: str, *, revision: str | None = None, gguf_file: str | None = None,
                         field_name: str = "model.name_or_path", config_file_ok: bool = False,
                         s3_ok: bool = False) -> ModelSource:
    """The one rule for model locations; a missing local path fails here, naming the field."""
    if name.startswith("s3://"):
        if not s3_ok:
            raise ConfigError(f"{field_name}: '{name}' is an S3 location; only `lorafit sagemaker launch` reads those")
        return ModelSource(name, name, "s3", revision, gguf_file)
    if is_builtin(name):
        return ModelSource(name, resolve_model(name), "builtin", revision, gguf_file)
    local = Path(name).expanduser()
    if local.is_file():
        if config_file_ok and local.suffix == ".json":
            return ModelSource(name, str(local), "config-file", revision, gguf_file)
        raise ConfigError(f"{field_name}: '{name}' is a file; expected a model folder or a hub id")
    if local.exists():
        return ModelSource(name, str(local), "local", revision, gguf_file)
    if looks_like_path(name):
        raise ConfigError(f"{field_name}: '{name}' does not exist")
    return ModelSource(name, name, "hub", revision, gguf_file)


def pretrained_kwargs(config: LorafitConfig) -> dict[str, Any]:
    """Keyword arguments every ``from_pretrained`` of this run's model, tokenizer and config gets."""
    kwargs: dict[str, Any] = {"trust_remote_code": config.model.trust_remote_code}
    if config.model.revision:
        kwargs["revision"] = config.model.revision
    if config.model.gguf_file:
        kwargs["gguf_file"] = config.model.gguf_file
    return kwargs


def check_gguf_file(source: ModelSource) -> None:
    """``model.gguf_file`` in a local folder: there, and a whole GGUF file, read by the ``gguf``
    package's reader as transformers reads it (header and tensor table; the data is memory-mapped,
    not read). A truncated file is named here instead of failing as a "model config" problem."""
    folder = Path(source.location)
    if source.gguf_file is None or source.kind not in ("local", "builtin") or not folder.is_dir():
        return
    file = folder / source.gguf_file
    if not file.is_file():
        found = ", ".join(sorted(p.name for p in folder.glob("*.gguf"))) or "none"
        raise ConfigError(f"model.gguf_file: {file} not found (GGUF files in {folder}: {found})")
    with file.open("rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise ConfigError(f"model.gguf_file: {file} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    try:
        from gguf import GGUFReader
    except ImportError:
        return  # transformers names the missing package itself
    try:
        reader = GGUFReader(str(file))
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception as exc:  # noqa: BLE001 - any failure to parse means a damaged file
        raise ConfigError(f"model.gguf_file: {file} is truncated or damaged (the GGUF reader: {load_reason(exc)}); "
                          "download it again") from exc
    if end > file.stat().st_size:
        raise ConfigError(f"model.gguf_file: {file} is truncated ({file.stat().st_size:,d} of {end:,d} bytes); "
                          "download it again")


def load_model_config(source: ModelSource, config: LorafitConfig) -> Any:
    """The transformers config behind ``source`` (only config.json is read, never weights)."""
    import json

    from transformers import AutoConfig

    check_gguf_file(source)
    try:
        if source.kind == "config-file":
            data = json.loads(Path(source.location).read_text(encoding="utf-8"))
            if not isinstance(data, dict) or "model_type" not in data:
                raise ConfigError(f"model.name_or_path: {source.location} is not a transformers config.json "
                                  "(no model_type)")
            model_type = data.pop("model_type")
            return AutoConfig.for_model(model_type, **data)
        if source.kind in ("local", "builtin") and not (Path(source.location) / "config.json").exists() \
                and not config.model.gguf_file:
            raise ConfigError(f"model.name_or_path: {source.location} has no config.json")
        return AutoConfig.from_pretrained(source.location, **pretrained_kwargs(config))
    except (OSError, ValueError, KeyError) as exc:
        if isinstance(exc, LorafitError):
            raise
        if config.model.gguf_file and config.model.gguf_file in str(exc):
            raise LorafitError(f"model.gguf_file: cannot read '{config.model.gguf_file}' of '{source.name}' "
                               f"({load_reason(exc)})") from exc
        raise LorafitError(f"model.name_or_path: cannot read the model config of '{source.name}' "
                           f"({load_reason(exc)})") from exc


# ----------------------------------------------------------------------------- LoRA targets
# Per-architecture LoRA targets when the config names none. Attention projections everywhere:
# the recipe's choice for BLOOM, and the common one for Llama-family models.
_ATTENTION_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
DEFAULT_TARGETS: dict[str, list[str]] = {
    "bloom": ["query_key_value"],
    "llama": _ATTENTION_TARGETS,
    "mistral": _ATTENTION_TARGETS,
    "mixtral": _ATTENTION_TARGETS,
    "qwen2": _ATTENTION_TARGETS,
    "qwen3": _ATTENTION_TARGETS,
    "gemma": _ATTENTION_TARGETS,
    "gemma2": _ATTENTION_TARGETS,
    "phi3": ["qkv_proj", "o_proj"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "falcon": ["query_key_value"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj"],
}


def default_target_modules(model_type: str) -> list[str]:
    """LoRA targets for an architecture: ours, else peft's table, else a clear error."""
    if model_type in DEFAULT_TARGETS:
        return list(DEFAULT_TARGETS[model_type])
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_TARGETS,
    )

    if model_type in PEFT_TARGETS:
        return list(PEFT_TARGETS[model_type])
    raise ConfigError(
        f"lora.target_modules: no default for model type '{model_type}'; list module names or use 'all-linear'"
    )


def lora_targets(config: LorafitConfig, model_type: str) -> list[str] | str:
    """The adapter's target modules: the config's, else the architecture's default."""
    return config.lora.target_modules or default_target_modules(model_type)


# -------------------------------------------------------------------------------- precision
_DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Precision:
    """The unquantized weights' dtype and the autocast dtype (``float32`` = no autocast)."""

    weights: str  # float32 | bfloat16 | float16
    compute: str  # float32 | bfloat16 | float16: autocast's dtype, float32 = none
    quantization: str = "none"  # none | int8 | nf4: int8 / nf4 matrices are never kept 16-bit

    @property
    def weights_dtype(self) -> Any:
        import torch

        return getattr(torch, self.weights)

    @property
    def compute_dtype(self) -> Any:
        import torch

        return getattr(torch, self.compute)

    @property
    def autocast(self) -> bool:
        return self.compute != "float32"

    @property
    def upcasts_storage(self) -> bool:
        """An unquantized 16-bit base computed in fp32: its matrices stay 16-bit and are upcast per
        matmul (``lorafit.storage``). The one rule; a quantized base's matrices are int8 / nf4."""
        return self.quantization == "none" and self.weights != "float32" and self.compute == "float32"

    @property
    def needs_scaler(self) -> bool:
        """fp16 gradients underflow without loss scaling; bf16 and fp32 need none."""
        return self.compute == "float16"

    @property
    def weight_bytes(self) -> int:
        return _DTYPE_BYTES[self.weights]

    @property
    def activation_bytes(self) -> int:
        return _DTYPE_BYTES[self.compute]

    def label(self) -> str:
        compute = f"{_DTYPE_NAMES[self.compute]} autocast" if self.autocast else "fp32 (no autocast)"
        stored = " (stored; upcast per matmul)" if self.upcasts_storage else ""
        return f"weights {_DTYPE_NAMES[self.weights]}{stored}, compute {compute}"


def resolve_precision(model_dtype: str, train_precision: str, *, device_kind: str,
                      bf16_supported: bool, cpu_bf16_units: bool = False) -> Precision:
    """The one place ``model.dtype`` and ``train.precision`` become dtypes.

    ``auto``: bf16 on GPUs that support it, fp16 on older GPUs. On a CPU, bf16 where it has bf16
    matrix units (``cpu_bf16_units``: AMX or AVX-512 BF16, which multiply bf16 2-6x faster than
    fp32), else fp32: without them bf16 is emulated, 10-100x slower than fp32 (ask for bf16 /
    fp16 explicitly to use it anyway, as the tests of the GPU paths do).
    """
    gpu_auto = "bfloat16" if bf16_supported else "float16"
    if device_kind == "cuda" and not bf16_supported and "bfloat16" in (model_dtype, _to_dtype(train_precision)):
        culprit = "model.dtype" if model_dtype == "bfloat16" else "train.precision"
        raise ConfigError(f"{culprit}: bf16 is not supported by this GPU; use float16 / fp16 or auto")
    auto = gpu_auto if device_kind == "cuda" else ("bfloat16" if cpu_bf16_units else "float32")
    weights = model_dtype if model_dtype != "auto" else auto
    compute = _to_dtype(train_precision) if train_precision != "auto" else auto
    return Precision(weights, compute)


CPU_PAD_MULTIPLE = 64  # data.pad_to_multiple_of auto on a CPU: at most seq_len / 64 row lengths
CPU_BF16_ENV = "LORAFIT_CPU_BF16"  # 1 / 0: say whether this CPU has bf16 units instead of asking it
_CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of x86 bf16 matrix/dot-product units


def cpu_bf16_units(cpuinfo: str | None = None) -> str:
    """The CPU's bf16 matrix unit as /proc/cpuinfo names it (``amx_bf16``, ``avx512_bf16``), or ""
    when it has none (or is not an x86 Linux machine, where lorafit does not know how to ask).

    ``LORAFIT_CPU_BF16=1`` / ``0`` overrides the answer (tests pin it, so runs resolve the same on
    every machine kind)."""
    forced = os.environ.get(CPU_BF16_ENV, "").strip().lower()
    if forced in ("1", "true", "yes"):
        return f"{CPU_BF16_ENV}=1"
    if forced in ("0", "false", "no"):
        return ""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[-1].split())
            return next((flag for flag in _CPU_BF16_FLAGS if flag in flags), "")
    return ""


def _fsdp_precision_problem(precision: Precision) -> str | None:
    """Why FSDP cannot run a 16-bit base computed in fp32 (one line), or None."""
    if precision.weights == "float32" or precision.autocast:
        return None
    short = _DTYPE_NAMES[precision.weights]
    fix = f"use train.precision {short} or model.dtype float32 with train.fsdp"
    if precision.upcasts_storage:
        return (f"model.dtype: {precision.weights} weights with train.precision fp32 keep the matrices 16-bit "
                f"and the rest fp32, which FSDP cannot shard together; {fix}")
    if precision.quantization == "nf4":  # sharded nf4 skips k-bit preparation's fp32 upcast of the rest
        return (f"model.dtype: {precision.weights} with nf4 under train.fsdp keeps the unquantized rest "
                f"(embeddings, norms, head) in {short}, which train.precision fp32 would run without "
                f"autocast; {fix}")
    return None


def _to_dtype(precision: str) -> str:
    return {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(precision, precision)


# ------------------------------------------------------------------------------ environment


@dataclass(frozen=True)
class Environment:
    """Where the run happens: device kind, whether it computes in bf16, and how many processes."""

    device_kind: str  # cuda | cpu
    bf16_supported: bool
    world_size: int = 1
    device_name: str = ""
    cpu_bf16_units: str = ""  # a CPU's bf16 matrix unit (amx_bf16, avx512_bf16): auto precision is bf16

    @classmethod
    def local(cls) -> Environment:
        """This process: its GPU (if any) and the launcher's WORLD_SIZE."""
        import torch

        world = int(os.environ.get("WORLD_SIZE", "1"))
        if torch.cuda.is_available():
            index = int(os.environ.get("LOCAL_RANK", 0))
            return cls("cuda", bool(torch.cuda.is_bf16_supported()), world, torch.cuda.get_device_name(index))
        return cls("cpu", True, world, "cpu", cpu_bf16_units())


# ---------------------------------------------------------------------------- the resolved run


@dataclass(frozen=True)
class ResolvedRun:
    """Every decision a run depends on (see the module docstring); built by ``resolve``."""

    config: LorafitConfig
    source: ModelSource
    model_config: Any
    model_type: str
    environment: Environment
    precision: Precision
    quantization: str
    attn_implementation: str | None
    packing: str
    flatten_packed: bool  # flash attention takes packed rows as one flattened row per batch
    loss: str
    head_is_plain: bool  # logits == lm_head(hidden states): the chunked loss may run
    lora_targets: list[str] | str | None  # None: a run that attaches no new adapter (merge/generate/eval)
    fused: tuple[str, ...]  # lorafit.fused swaps that may apply (their lorafit.compat probes passed)
    lora_in_compute_dtype: bool
    gradient_checkpointing: bool
    checkpoint_every: int
    fsdp: bool
    notes: tuple[str, ...] = field(default=())  # why a decision differs from what the config asked
    workarounds: tuple[str, ...] = field(default=())  # lorafit.compat fixes applied to the library's layers
    library_checks: dict[str, str] = field(default_factory=dict)  # lorafit.compat probe -> what it found
    start_adapter: str | None = None  # the adapter folder a run continues from (model.adapter)
    pad_to_multiple_of: int = 1  # rows padded to a multiple of this many tokens (data.pad_to_multiple_of)
    compiled: bool = False  # decoder layers run under torch.compile (train.compile, lorafit.compiling)

    @property
    def device_kind(self) -> str:
        return self.environment.device_kind

    @property
    def stores_16bit(self) -> bool:
        """An unquantized 16-bit base computed in fp32: ``lorafit.storage`` keeps its matrices 16-bit."""
        return self.precision.upcasts_storage

    @property
    def prepares_kbit(self) -> bool:
        """Whether peft's k-bit preparation runs on the base (``prepares_kbit``)."""
        return prepares_kbit(self.quantization, self.fsdp)

    def describe(self) -> list[str]:
        """The lines a run prints at its start."""
        env = self.environment
        where = f"{env.device_name or env.device_kind}" + (f" x {env.world_size} processes" if env.world_size > 1 else "")
        lines = [
            f"model: {self.source.name} ({self.model_type}, {self.source.kind})",
            f"device: {where}; {self.precision.label()}; quantization {self.quantization}",
            f"data: packing {self.packing}{' (flattened)' if self.flatten_packed else ''}"
            + (f", rows padded to x{self.pad_to_multiple_of}" if self.pad_to_multiple_of > 1 else "")
            + f"; loss {self.loss}; "
            f"checkpointing {'every ' + str(self.checkpoint_every) + ' layer(s)' if self.gradient_checkpointing else 'off'}"
            + ("; FSDP" if self.fsdp else "") + ("; compiled layers" if self.compiled else ""),
        ]
        if self.start_adapter:
            lines.append(f"adapter: continuing from {self.start_adapter}")
        if self.fused or self.lora_in_compute_dtype:
            lines.append("fused: " + ", ".join([*self.fused] + (["lora-in-compute-dtype"]
                                                                if self.lora_in_compute_dtype else [])))
        lines.extend(f"note: {note}" for note in self.notes)
        return lines

    def to_json(self) -> dict[str, Any]:
        """``run.json``: the decisions, the environment and library versions (no weights, no secrets)."""
        from lorafit.compat import versions

        return {
            "model": asdict(self.source),
            "model_type": self.model_type,
            "environment": asdict(self.environment),
            "precision": {"weights": self.precision.weights, "compute": self.precision.compute},
            "quantization": self.quantization,
            "attn_implementation": self.attn_implementation,
            "packing": self.packing,
            "flatten_packed": self.flatten_packed,
            "pad_to_multiple_of": self.pad_to_multiple_of,
            "loss": self.loss,
            "head_is_plain": self.head_is_plain,
            "lora_targets": self.lora_targets,
            "fused": list(self.fused),
            "lora_in_compute_dtype": self.lora_in_compute_dtype,
            "gradient_checkpointing": self.gradient_checkpointing,
            "compile": self.compiled,
            "checkpoint_every": self.checkpoint_every,
            "fsdp": self.fsdp,
            "objective": self.config.train.objective,
            "start_adapter": self.start_adapter,
            "notes": list(self.notes),
            "workarounds": list(self.workarounds),
            "library_checks": dict(self.library_checks),
            "versions": versions(),
        }


def prepares_kbit(quantization: str, sharded: bool) -> bool:
    """Whether peft's k-bit preparation runs (it upcasts the unquantized rest to fp32): for int8 and
    nf4 bases, except nf4 under FSDP, whose rest is whole on every GPU and stays in ``model.dtype``."""
    return quantization != "none" and not (sharded and quantization == "nf4")


_PYTHON_TANH_GELU_ACTS = ("gelu_new", "gelu_fast")  # transformers' NewGELUActivation, FastGELUActivation


def fused_candidates(model_config: Any) -> list[str]:
    """The ``lorafit.fused`` swaps that concern this architecture (whether allowed or not)."""
    text = model_config.get_text_config() if callable(getattr(model_config, "get_text_config", None)) else model_config
    activation = getattr(text, "hidden_act", None) or getattr(text, "activation_function", None)
    found = []
    if model_config.model_type == "bloom" or activation in _PYTHON_TANH_GELU_ACTS:
        found.append("tanh_gelu_swap")
    if model_config.model_type == "bloom":
        found.append("bloom_sdpa_attention")
    return found


def resolve(config: LorafitConfig, environment: Environment | None = None, *,
            config_file_ok: bool = False, new_adapter: bool = True) -> ResolvedRun:
    """Resolve ``config`` for ``environment`` (default: this process's device and launcher).

    ``new_adapter=False`` (merge, generate, eval: the adapter on disk names its own targets) skips
    the LoRA targets, so an architecture without a default target list still loads."""
    env = environment or Environment.local()
    start_adapter = None
    if new_adapter:
        from lorafit.start_adapter import adopt

        config, start_adapter = adopt(config)
    model = config.model
    source = resolve_model_source(model.name_or_path, revision=model.revision, gguf_file=model.gguf_file,
                                  config_file_ok=config_file_ok)
    model_config = load_model_config(source, config)
    model_type = str(model_config.model_type)
    precision = replace(resolve_precision(model.dtype, config.train.precision, device_kind=env.device_kind,
                                          bf16_supported=env.bf16_supported,
                                          cpu_bf16_units=bool(env.cpu_bf16_units)),
                        quantization=model.quantization)
    if config.train.fsdp and env.world_size > 1:
        problem = _fsdp_precision_problem(precision)
        if problem:
            raise ConfigError(problem)
    if (precision.upcasts_storage and model_type == "bloom"
            and getattr(model_config, "slow_but_exact", False) and getattr(model_config, "pretraining_tp", 1) > 1):
        raise ConfigError("model.dtype: BLOOM's slow_but_exact path multiplies its raw weight slices, which stay "
                          f"{precision.weights} with train.precision fp32; use train.precision "
                          f"{_DTYPE_NAMES[precision.weights]} or model.dtype float32")
    notes: list[str] = []
    if env.device_kind == "cpu" and env.cpu_bf16_units and "auto" in (model.dtype, config.train.precision):
        notes.append(f"precision auto: bf16 on this CPU ({env.cpu_bf16_units}: bf16 matrix units); "
                     "train.precision fp32 with model.dtype float32 computes in fp32")
    attn = model.attn_implementation
    flash = bool(attn and attn.startswith("flash_attention"))
    facts = architecture_facts(model_config, None if flash else attn, model.trust_remote_code)
    # the architecture builds without the chosen attention: the backend is the problem, not the model
    if attn and not flash and facts.build_error \
            and architecture_facts(model_config, None, model.trust_remote_code).build_error is None:
        raise ConfigError(f"model.attn_implementation: '{attn}' does not work with {model_type} "
                          f"({facts.build_error})")

    packing, flatten = config.data.packing, False
    if config.train.objective != "sft":  # pairs are scored per sequence (a set packing is named as ignored)
        packing = "none"
    if packing == "packed":
        if flash:
            flatten = True  # transformers reads packed samples from position_ids of one flat row
        elif facts.keeps_packed_samples_apart is not True:
            why = facts.note or f"{model_type} attention does not keep packed samples apart"
            notes.append(f"data.packing: packed not supported ({why}): using none (padding, length-grouped)")
            packing = "none"

    pad_multiple = config.data.pad_to_multiple_of
    if pad_multiple == "auto":
        # CPU: oneDNN keeps compiled kernels per matmul shape for the whole run, so memory grows with every
        # new row length (benchmarks/RESULTS.md); GPUs keep nothing per shape: padding would only cost compute.
        pad_multiple = CPU_PAD_MULTIPLE if env.device_kind == "cpu" else 1
    if flatten:
        pad_multiple = 1  # one flat row of every sample: its length is the batch's token count

    loss = config.train.loss
    if loss == "chunked" and facts.logits_are_plain_head is not True:
        why = facts.note or f"{model_type} post-processes its logits (soft-capping or scaling)"
        notes.append(f"train.loss: chunked not used ({why}): using full")
        loss = "full"

    # only a run that trains a new adapter compiles; merge / generate / eval read the same config
    compiled = new_adapter and _compiles(config, model_config, env, notes, flatten=flatten,
                                         check_tools=environment is None)
    fused, workarounds, checks = _library_paths(config, model_config, env, precision, notes, compiled)
    return ResolvedRun(
        config=config, source=source, model_config=model_config, model_type=model_type, environment=env,
        precision=precision, quantization=model.quantization, attn_implementation=attn, packing=packing,
        flatten_packed=flatten, loss=loss, head_is_plain=facts.logits_are_plain_head is True,
        lora_targets=lora_targets(config, model_type) if new_adapter else None, fused=tuple(fused),
        lora_in_compute_dtype=config.train.fused_ops and precision.autocast,
        gradient_checkpointing=config.train.gradient_checkpointing,
        checkpoint_every=config.train.checkpoint_every, fsdp=config.train.fsdp and env.world_size > 1,
        notes=tuple(notes), workarounds=tuple(workarounds), library_checks=checks,
        start_adapter=str(start_adapter) if start_adapter else None, pad_to_multiple_of=pad_multiple,
        compiled=compiled,
    )


def _compiles(config: LorafitConfig, model_config: Any, env: Environment, notes: list[str], *,
              flatten: bool, check_tools: bool) -> bool:
    """Whether the decoder layers run compiled: asked for, and a path tested here. A run shape
    compiled layers are not tested on runs eagerly, with a note; then a machine without the
    compiler is refused in one line (``check_tools``: only where the run happens, not when
    planning for another device)."""
    if not config.train.compile:
        return False
    import torch

    from lorafit.compiling import (
        CHECKPOINTED_DROPOUT_CHECKED,
        checkpointed_dropout_compiles,
        compile_problem,
        model_dropout,
    )

    dropout = max(config.lora.dropout, model_dropout(model_config))
    why = None
    if env.world_size > 1:
        why = f"{env.world_size} processes (DDP / FSDP with compiled layers is not tested)"
    elif config.model.quantization != "none":
        why = f"a {config.model.quantization} base (bitsandbytes' layers break the compiled graph)"
    elif config.train.objective != "sft":
        why = f"train.objective {config.train.objective} (its reference passes are not tested compiled)"
    elif flatten:
        why = "flash attention on packed rows (per-sample lengths read on the host break the compiled graph)"
    elif dropout > 0 and config.train.gradient_checkpointing and not checkpointed_dropout_compiles():
        why = (f"dropout in checkpointed layers with torch {torch.__version__} (checked on torch "
               f"{', '.join(CHECKPOINTED_DROPOUT_CHECKED)} only: 2.8 fails to compile it)")
    if why:
        notes.append(f"train.compile: off for {why}; the layers run eagerly")
        return False
    problem = compile_problem(env.device_kind) if check_tools else None
    if problem:
        raise ConfigError(problem)
    return True


def _library_paths(config: LorafitConfig, model_config: Any, env: Environment, precision: Precision,
                   notes: list[str], compiled: bool) -> tuple[list[str], list[str], dict[str, str]]:
    """Which ``lorafit.fused`` swaps and ``lorafit.compat`` workarounds this run takes, decided by
    running each one's probe; a failed probe adds a note (the library's own code runs), except
    for FSDP's 4-bit layers, which have no other path: refused in one line."""
    from lorafit.compat import check

    quantization = config.model.quantization
    cpu = env.device_kind == "cpu"
    fused: list[str] = []
    workarounds: list[str] = []
    checks: dict[str, str] = {}
    wanted = [name for name in fused_candidates(model_config) if config.train.fused_ops]
    wanted += ["bnb_cpu_training_layout"] if quantization == "nf4" and cpu else []
    wanted += ["bnb_int8_cpu_autocast"] if quantization == "int8" and cpu and precision.autocast else []
    wanted += ["nf4_sharded_weights"] if quantization == "nf4" and config.train.fsdp and env.world_size > 1 else []
    for name in wanted:
        found = check(name)
        checks[name] = found.note
        if found.ok:
            (fused if name in _FUSED else workarounds).append(name)
        elif name == "nf4_sharded_weights":
            raise ConfigError(f"train.fsdp: nf4 layers cannot be sharded with this bitsandbytes ({found.note}); "
                              "use train.fsdp: false or model.quantization: none")
        else:
            notes.append(f"{_FALLBACK_NOTES[name]} ({found.note}; the library's own code runs)")
    if config.train.fused_ops and config.lora.dropout > 0 and cpu:
        fused.append("lora_dropout_int_mask")  # lorafit's own module in peft's lora_dropout slot: no probe
    return fused, workarounds, checks


_FUSED = ("tanh_gelu_swap", "bloom_sdpa_attention")
_FALLBACK_NOTES = {
    "tanh_gelu_swap": "train.fused_ops: tanh_gelu_swap off",
    "bloom_sdpa_attention": "train.fused_ops: bloom_sdpa_attention off",
    "bnb_cpu_training_layout": "nf4 on CPU: bitsandbytes' layout switch left alone, so an evaluation during "
                               "training may change gradients",
    "bnb_int8_cpu_autocast": "int8 on CPU: bitsandbytes' int8 layers run under autocast, so fp16 evaluation "
                             "losses may overflow",
}
