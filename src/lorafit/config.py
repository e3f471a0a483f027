"""The typed run config: every option lorafit has, its default, and one line on why.

A run is described by one YAML file validated into ``LorafitConfig``. Unknown keys, wrong types
and keys given twice are errors that name the field (``lora.r``), never silently ignored: types are
strict (``8.0``, ``"8"`` or ``true`` is not an integer, ``1`` or ``"yes"`` not a boolean), and YAML
numbers are read as YAML 1.2 reads them, so ``lr: 2e-4`` is a number, not a string to coerce. Defaults follow the
seed recipe (Hugging Face / SageMaker "train an LLM on a single GPU with LoRA"): r=8, alpha=32,
dropout=0.05, lr 2e-4, batch 1 with gradient accumulation 2, gradient checkpointing on.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lorafit.data.formats import PREFERENCE_FORMATS, format_names
from lorafit.errors import ConfigError

Quantization = Literal["none", "int8", "nf4"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
Precision = Literal["auto", "bf16", "fp16", "fp32"]
Objective = Literal["sft", "dpo", "orpo"]
Packing = Literal["none", "chunk", "packed"]
Tracker = Literal["tensorboard", "wandb", "mlflow", "trackio"]


class _Section(BaseModel):
    """Base for config sections: unknown keys are errors, types are strict (no silent coercion),
    assignments are re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True)


class ModelConfig(_Section):
    """Which base model to load and how to hold its frozen weights."""

    name_or_path: str = Field(
        "builtin:smollm2-135m-instruct",
        description="Hub id, local folder, or 'builtin:smollm2-135m-instruct' (offline default).",
    )
    gguf_file: str | None = Field(None, description="GGUF file inside name_or_path to load from.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    dtype: DType = Field(
        "auto", description="dtype of the unquantized weights; auto = bf16 on GPUs that support it and on CPUs "
        "with bf16 matrix units (AMX, AVX-512 BF16), fp16 on older GPUs, else fp32."
    )
    quantization: Quantization = Field(
        "none", description="Frozen-weight format: none, int8 (LLM.int8()) or nf4 (QLoRA, double-quantized)."
    )
    trust_remote_code: bool = Field(
        False, description="Run model code from the hub repo. Off: it executes arbitrary Python."
    )
    attn_implementation: str | None = Field(
        None, description="transformers attention backend (sdpa, eager, flash_attention_2); None = default."
    )
    allow_pickle: bool = Field(
        False, description="Allow pickle-based .bin/.pt weights; they can run code when loaded."
    )
    adapter: str | None = Field(
        None, description="Start from this lorafit run or peft adapter folder (SFT then DPO, or more SFT): "
        "its base, rank and targets are used; None = a fresh adapter."
    )


class LoraSettings(_Section):
    """The adapter: what to attach and where. Fields map one-to-one onto peft's LoraConfig."""

    r: int = Field(8, gt=0, description="Adapter rank; the recipe's 8 trains ~0.06% of bloomz-7b1.")
    alpha: float = Field(32, gt=0, description="Scale numerator: updates are scaled by alpha/r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] | Literal["all-linear"] | None = Field(
        None,
        description="Module names to adapt, or 'all-linear'; None = per-architecture default "
        "(BLOOM query_key_value; Llama/Mistral/Qwen q,k,v,o_proj).",
    )
    variant: Literal["lora", "dora", "rslora"] = Field(
        "lora", description="lora; dora (weight-decomposed, slower, often better); rslora (alpha/sqrt(r) scaling)."
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases train.")

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("must name at least one module, or be 'all-linear'")
        return value


class DataConfig(_Section):
    """Where the training data comes from and how rows become token sequences."""

    path: str | list[str] = Field(
        "builtin:dialogues",
        description="File (.jsonl/.json/.csv/.parquet), save_to_disk folder, hub data-set name, or a list.",
    )
    format: str = Field(
        "auto", description="How a row is rendered: auto (detected from the columns, printed and recorded) or a "
        "format of lorafit.data.formats (summarization, instruction, chat, sharegpt, prompt_completion, "
        "prompt_completion_chat, text, preference, preference_chat); see docs/data.md and docs/preference.md.",
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Map lorafit's column names (dialogue, summary, instruction, input, output, messages, "
        "conversations, system, prompt, completion, text, chosen, rejected) to the data's own.",
    )
    template: str | None = Field(
        None, description="Prompt template with {placeholders}; None = the format's default (the recipe's)."
    )
    train_on_prompt: bool = Field(
        False, description="Count loss on prompt tokens too (the recipe did); default trains on responses only."
    )
    packing: Packing = Field(
        "packed",
        description="none: pad per batch (length-grouped); chunk: the recipe's concat-and-split; "
        "packed: several samples per row, no attention across them.",
    )
    pad_to_multiple_of: int | Literal["auto"] = Field(
        "auto",
        description="Pad each batch's rows to a multiple of this many tokens (never past train.seq_len); 1 pads "
        "to the longest row only. auto: 64 on a CPU, 1 on GPUs. A CPU's matmul library compiles and keeps kernels "
        "per shape, so every new row length costs memory for the rest of the run; a few lengths keep it flat.",
    )
    split: str = Field("train", description="Split to read from a hub or save_to_disk data set.")
    subset: str | None = Field(
        None, description="Subset (configuration) of a hub data set or data-set repository folder; None = its default."
    )
    eval_path: str | list[str] | None = Field(None, description="Held-out data file; None = eval_fraction.")
    eval_fraction: float = Field(0.05, ge=0, lt=1, description="Share held out for eval loss (by seed).")
    max_eval_rows: int = Field(256, gt=0, description="Cap on held-out rows so eval stays cheap.")
    overlong: Literal["truncate", "drop"] = Field("truncate", description="What to do with rows over seq_len.")
    max_bad_fraction: float = Field(
        0.1, ge=0, le=1, description="Stop before loading the model if more than this share of rows is bad."
    )
    cache: bool = Field(True, description="Cache tokenized data keyed by data, tokenizer and settings.")

    @field_validator("pad_to_multiple_of")
    @classmethod
    def _positive_multiple(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError("must be auto or an integer of at least 1")
        return value

    @field_validator("format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        if value != "auto" and value not in format_names():
            raise ValueError(f"unknown format; use auto or one of {', '.join(format_names())}")
        return value


class TrainConfig(_Section):
    """The optimisation: steps, batch, schedule and the memory savers."""

    max_steps: int | None = Field(None, gt=0, description="Optimizer steps; overrides epochs when set.")
    epochs: float = Field(3, gt=0, description="Passes over the data (the recipe: 3).")
    seq_len: int = Field(1024, gt=0, description="Tokens per row (the recipe chunks at 1536).")
    batch_size: int = Field(1, gt=0, description="Rows per device per micro-batch (the recipe: 1).")
    grad_accum: int = Field(2, gt=0, description="Micro-batches per optimizer step (the recipe: 2).")
    lr: float = Field(2e-4, gt=0, description="Peak learning rate (the recipe: 2e-4).")
    optimizer: Literal["adamw", "adafactor", "adamw_8bit"] = Field(
        "adamw", description="adamw (torch); adafactor (the recipe's, less state); adamw_8bit (bitsandbytes)."
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay on adapter weights.")
    schedule: Literal["linear", "cosine", "constant"] = Field("linear", description="LR decay after warmup.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip gradients to this norm; None = off.")
    gradient_checkpointing: bool = Field(
        True, description="Recompute activations in backward: far less memory, ~30% more compute."
    )
    checkpoint_every: int = Field(
        1, ge=1, description="With gradient_checkpointing, checkpoint every Nth layer only; the others keep "
        "their activations: less recompute, more memory (lorafit plan shows how much)."
    )
    precision: Precision = Field(
        "auto", description="Autocast: auto = bf16 on GPUs that support it and on CPUs with bf16 matrix units "
        "(2-6x their fp32 matmul speed), fp16 on older GPUs, fp32 on other CPUs (bf16 emulated: far slower)."
    )
    fused_ops: bool = Field(
        True, description="Swap slow pieces for fused, numerically equivalent ones (BLOOM's GELU and "
        "attention, Python tanh-GELUs) and run LoRA in the autocast dtype (fp32 master weights)."
    )
    compile: bool = Field(
        False, description="torch.compile each decoder layer (dynamic shapes, compiled once): fuses the step's "
        "small elementwise ops, ~1.2x a Llama step on a bf16 CPU, after a one-time compile of 15-60 s; needs a "
        "C++ compiler on CPUs, triton on GPUs. Single-process sft runs on unquantized bases (elsewhere the run "
        "says so and runs eagerly)."
    )
    loss: Literal["chunked", "full"] = Field(
        "chunked",
        description="chunked: loss from hidden states in slices, never the full fp32 logits; full: HF's.",
    )
    loss_chunk_tokens: int = Field(1024, gt=0, description="Tokens per slice for the chunked loss "
                                   "(capped at 64 MiB of logits counted in fp32: 64 tokens for a 250k "
                                   "vocabulary; rounded down to a multiple of 16 from 16 up).")
    seed: int = Field(42, ge=0, le=2**32 - 1,
                      description="Seeds data order, held-out split, adapter init and dropout (0 to 2**32-1: "
                      "what every RNG involved accepts).")
    eval_steps: int | None = Field(50, gt=0, description="Eval loss every N steps (and at start and end).")
    eval_batches: int | None = Field(None, gt=0, description="Cap on eval batches per evaluation.")
    logging_steps: int = Field(1, gt=0, description="Write a metrics.jsonl line every N steps.")
    save_steps: int | None = Field(None, gt=0, description="Checkpoint every N steps (and at the end).")
    save_minutes: float | None = Field(
        None, ge=0, description="Also checkpoint when this many minutes have passed since the last save "
        "(checked between steps), so a run ended without warning loses at most that; 0 or None = off "
        "(None becomes 10 in a SageMaker job)."
    )
    save_total_limit: int = Field(2, gt=0, description="Checkpoints kept (oldest removed first).")
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="A NaN/inf loss or gradient stops the run (keeping the last checkpoint) or skips "
        "the step (no update, not counted as a step)."
    )
    max_consecutive_skips: int = Field(
        5, gt=0, description="With on_nonfinite: skip, stop after this many skipped steps in a row: a diverged run."
    )
    max_skipped_fraction: float = Field(
        0.1, ge=0, le=1, description="With on_nonfinite: skip, stop when more than this share of max_steps "
        "was skipped."
    )
    fsdp: bool = Field(
        False, description="With several processes, shard the base's blocks (bf16/fp32 or nf4) with FSDP2 "
        "instead of replicating it: for bases that don't fit one GPU."
    )
    fsdp_cpu_offload: bool = Field(
        False, description="With train.fsdp: keep the sharded blocks, adapter and optimizer in host memory "
        "(FSDP2's CPUOffloadPolicy); a block is copied to the GPU only while it runs. Slower; for a base whose "
        "shard still does not fit (e.g. a 70B nf4 base on two 24 GB GPUs)."
    )
    report_to: list[Tracker] = Field(
        default_factory=list, description="Experiment trackers to log to (tensorboard, wandb, mlflow, "
        "trackio; pip install 'lorafit[tracking]'); empty = metrics.jsonl and loss.png only."
    )
    objective: Objective = Field(
        "sft", description="sft: next-token loss on the responses; dpo / orpo: preference pairs "
        "(data.format preference), chosen over rejected."
    )
    beta: float = Field(
        0.1, gt=0, description="DPO: how far the policy may move from the reference (higher = less); "
        "ORPO: the odds-ratio term's weight (lambda). The peers' default, 0.1."
    )
    dpo_loss: Literal["sigmoid", "ipo", "hinge"] = Field(
        "sigmoid", description="sigmoid: DPO; ipo: squared loss on length-averaged log-ratios, less prone to "
        "overfit pairs; hinge: SLiC's margin loss."
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="Conservative DPO (sigmoid loss): the share of pairs assumed to be "
        "mislabelled; 0 = plain DPO."
    )
    precompute_reference: bool = Field(
        False, description="DPO: compute the reference log-probabilities once before training (one pass over "
        "the data) instead of a forward without grad in every step: less compute per step when epochs >= 1."
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        if value is None or value == "none":
            return []
        return [value] if isinstance(value, str) else value


class LorafitConfig(_Section):
    """A whole run: model, adapter, data, training, and where the outputs go."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    output_dir: str = Field("output/lorafit-run", description="Run folder: adapter, checkpoints, metrics.")

    @field_validator("output_dir")
    @classmethod
    def _names_a_folder(cls, value: str) -> str:
        # an unset shell variable (--set output_dir=$OUT) would otherwise put the run in the current folder
        if not value.strip():
            raise ValueError("must name a folder (it is empty)")
        return value

    @model_validator(mode="after")
    def _objective_fits_the_data(self) -> LorafitConfig:
        """A preference objective reads preference pairs (``data.format`` auto finds them among the
        preference formats), and a format set to anything else is a mistake worth naming before any
        data is read; so is a preference format under sft."""
        preference = self.train.objective != "sft"
        if preference and self.data.format not in ("auto", *PREFERENCE_FORMATS):
            raise ValueError(f"data.format: train.objective {self.train.objective} trains on preference "
                             f"pairs; set data.format: preference or auto (got {self.data.format})")
        if not preference and self.data.format in PREFERENCE_FORMATS:
            raise ValueError(f"train.objective: preference pairs (data.format {self.data.format}) train with "
                             "train.objective dpo or orpo, not sft")
        if self.train.precompute_reference and self.train.objective != "dpo":
            raise ValueError(f"train.precompute_reference: only DPO has a reference model (train.objective "
                             f"{self.train.objective})")
        return self


DEFAULT_CONFIG_NAME = "default.yaml"

# Fields that don't change what a run produces: a resumed run may change them freely.
RESULT_NEUTRAL_FIELDS = frozenset({
    "train.eval_steps", "train.eval_batches", "train.logging_steps", "train.save_steps",
    "train.save_total_limit", "train.on_nonfinite", "train.max_consecutive_skips",
    "train.max_skipped_fraction", "train.save_minutes", "train.report_to", "train.fsdp_cpu_offload", "data.cache",
    "model.trust_remote_code",
    "model.allow_pickle",
    "output_dir",
})


def _validation_message(error: ValidationError, source: str) -> str:
    """One line naming the first bad field, e.g. ``config.yaml: lora.r: Input should be > 0 (got 0)``."""
    first = error.errors()[0]
    field = ".".join(str(p) for p in first["loc"] if not str(p).startswith(("literal[", "list[")))
    if first["type"] == "extra_forbidden":
        message = f"unknown key '{field}'"
    elif not field and first["type"] == "value_error":  # a check across sections names its own fields
        message = str(first["msg"]).removeprefix("Value error, ")
    else:
        got = first.get("input")
        shown = repr(got) if not isinstance(got, dict) else "a mapping"
        message = f"{field}: {first['msg'].removeprefix('Value error, ')} (got {shown})"
    more = len(error.errors()) - 1
    suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return f"{source}: {message}{suffix}"


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, with two changes. A key given twice in one mapping is an error (PyYAML
    keeps the last one silently). Floats follow YAML 1.2: ``2e-4`` is a number (YAML 1.1 wants a dot,
    ``2.0e-4``, and PyYAML reads ``2e-4`` as a string that a strict float field refuses)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # '<<' merges may be overridden by the mapping's own keys
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, str | int | float | bool):
                continue  # an unhashable key fails in PyYAML's own check below
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' given twice (remove one)", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def parse_yaml(text: str) -> Any:
    """YAML text as lorafit reads every config and ``--set`` value (see ``_StrictLoader``)."""
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key.sub=value")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        value = parse_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to a raw config mapping."""
    for item in overrides:
        parts, value = _parse_override(item)
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: '{part}' is not a section")
            node = child
        node[parts[-1]] = value
    return data


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping, with one-line errors for a missing, unreadable or malformed file."""
    if not path.exists():
        raise ConfigError(f"{path}: config file not found")
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, expected a YAML config file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.__class__.__name__}: {exc})") from exc
    try:
        data = parse_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}:{where} invalid YAML ({problem})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (model, lora, data, train), got {type(data).__name__}")
    return data


def default_config_path() -> Path:
    """The embedded default config shipped inside the package."""
    return Path(str(resources.files("lorafit") / "defaults" / DEFAULT_CONFIG_NAME))


def config_path(path: str | Path | None) -> Path:
    """A config file, or an embedded one by name: ``builtin:dpo`` is ``lorafit/defaults/dpo.yaml``
    (DPO from the embedded default's adapter); None is the embedded default."""
    if path is None:
        return default_config_path()
    text = str(path)
    if text.startswith("builtin:"):
        name = text[len("builtin:"):]
        found = Path(str(resources.files("lorafit") / "defaults" / f"{name}.yaml"))
        if not name or not found.is_file():
            known = sorted(f"builtin:{p.stem}" for p in found.parent.glob("*.yaml"))
            raise ConfigError(f"{text}: no such embedded config (known: {', '.join(known)})")
        return found
    return Path(path)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> LorafitConfig:
    """Load a YAML config (or the embedded default), apply ``--set`` overrides, validate.

    An invalid value is blamed on where it came from: the ``--set`` that gave it, else the file."""
    source = config_path(path)
    data = read_yaml(source)
    overrides = list(overrides or [])
    data = apply_overrides(data, overrides)
    try:
        return LorafitConfig.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        named = [".".join(str(p) for p in error["loc"])] if error["loc"] else \
            re.findall(r"\b(?:model|lora|data|train)\.[a-z_]+", str(error["msg"]))  # a check across sections
        keys = {item: item.split("=", 1)[0].strip() for item in overrides}
        given = [item for item, key in keys.items() if any(f == key or f.startswith(key + ".") for f in named)]
        origin = f"--set {given[-1]}" if given else str(source)
        raise ConfigError(_validation_message(exc, origin)) from exc


def validate_config(data: dict[str, Any], source: str = "config") -> LorafitConfig:
    """Validate a raw mapping into a ``LorafitConfig``; errors become one-line ``ConfigError``."""
    try:
        return LorafitConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_validation_message(exc, source)) from exc


def dump_config(config: LorafitConfig, path: Path) -> None:
    """Write the resolved config, so a run folder says exactly what produced it."""
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
