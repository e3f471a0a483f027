"""Start a run from an existing adapter (``model.adapter``): SFT then DPO, or more SFT.

``model.adapter`` names a lorafit run (its ``adapter/``), a checkpoint folder or any peft LoRA
adapter folder. The adapter decides what it was made for: the base model (the run's
``model.name_or_path`` for a lorafit run, else the adapter's ``base_model_name_or_path``), the rank,
alpha, targets, variant and bias. The config may repeat them; a value that differs is one line
naming the field and both values, since training a rank-16 adapter "from" a rank-8 one is not
continuing it. ``lora.dropout`` is a training choice and may differ.

``adopt`` runs once, inside ``lorafit.resolved.resolve``, and the run's config (and so its
``config.yaml``) holds the adopted values, so a resumed run and ``lorafit eval`` see the same base.
The weights are read from ``adapter_model.safetensors`` (never a pickle) after the shapes are
checked against the base, in ``load_start_weights``.

``lorafit.adapters`` (torch) is imported inside ``adopt``: the SageMaker launcher imports this
module, and the CLI imports the launcher to parse arguments.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorafit.config import LorafitConfig
from lorafit.errors import AdapterError, ConfigError, first_line
from lorafit.paths import looks_like_path
from lorafit.resolved import resolve_model_source
from lorafit.runs import ADAPTER_WEIGHTS, locate_run


def _same_model(a: str, b: str) -> bool:
    """Whether two model names mean the same model (builtin names and local paths resolved). A
    recorded local path that does not exist here (the adapter was made on another machine, or
    reached a SageMaker job as a channel) cannot be compared: the shapes are checked instead."""
    if looks_like_path(b) and not Path(b).expanduser().exists():
        return True

    def where(name: str) -> str:
        try:
            location = resolve_model_source(name).location
        except ConfigError:
            return name
        local = Path(location).expanduser()
        return str(local.resolve()) if local.exists() else location

    return a == b or where(a) == where(b)


def _adapter_lora(settings: dict[str, Any]) -> dict[str, Any]:
    """The adapter's LoRA settings as lorafit's ``lora.*`` fields."""
    targets = settings.get("target_modules")
    if isinstance(targets, (list, tuple, set)):
        targets = sorted(targets)
    variant = "dora" if settings.get("use_dora") else "rslora" if settings.get("use_rslora") else "lora"
    return {"r": int(settings["r"]), "alpha": float(settings.get("lora_alpha", settings["r"])),
            "target_modules": targets, "variant": variant, "bias": settings.get("bias") or "none"}


def _differs(field: str, mine: Any, theirs: Any) -> bool:
    if field == "target_modules" and isinstance(mine, list) and isinstance(theirs, list):
        return sorted(mine) != sorted(theirs)
    if field == "alpha":
        return float(mine) != float(theirs)
    return mine != theirs


def adopt(config: LorafitConfig) -> tuple[LorafitConfig, Path | None]:
    """``config`` with the base and LoRA settings of ``model.adapter`` (and that adapter's folder);
    unchanged (and None) without one. A mismatch with what the config sets is a ``ConfigError``."""
    given = config.model.adapter
    if not given:
        return config, None
    from lorafit.adapters import adapter_tensor_shapes, read_adapter_config

    try:
        target = locate_run(given)
    except AdapterError as exc:
        raise ConfigError(f"model.adapter: {exc}") from exc
    adapter_dir = target.adapter_dir
    assert adapter_dir is not None
    settings = read_adapter_config(adapter_dir)
    kind = settings.get("peft_type")
    if kind != "LORA" or "r" not in settings:
        raise ConfigError(f"model.adapter: {adapter_dir} is a {kind} adapter; lorafit continues LoRA adapters")
    adapter_tensor_shapes(adapter_dir, allow_pickle=False)  # a missing, truncated or pickle-only file fails here
    base = target.config.model.name_or_path if target.config is not None else settings.get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"model.adapter: {adapter_dir} does not record its base model "
                          "(no base_model_name_or_path); set model.name_or_path")
    named = config.model.name_or_path
    if "name_or_path" in config.model.model_fields_set and not _same_model(named, str(base)):
        raise ConfigError(f"model.name_or_path: '{named}' is not the base the adapter in model.adapter was trained "
                          f"on ('{base}'); leave model.name_or_path out to use that base")
    lora = _adapter_lora(settings)
    explicit = config.lora.model_fields_set
    for field, theirs in lora.items():
        mine = getattr(config.lora, field)
        if field in explicit and mine is not None and _differs(field, mine, theirs):
            raise ConfigError(f"lora.{field}: {mine!r} differs from the adapter's {theirs!r} (model.adapter "
                              f"{given}); leave lora.{field} out to take it from the adapter")
    if "dropout" not in explicit:
        lora["dropout"] = float(settings.get("lora_dropout", config.lora.dropout))
    adopted = config.model_copy(deep=True)
    adopted.model.name_or_path = str(base)
    for field, value in lora.items():
        setattr(adopted.lora, field, value)
    return adopted, adapter_dir


def load_start_weights(peft_model: Any, adapter_dir: Path) -> int:
    """Copy the starting adapter's weights into the freshly attached adapter; returns how many
    tensors were loaded. Shapes were checked against the base before it was wrapped."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    try:
        state = load_file(str(path))
        result = set_peft_model_state_dict(peft_model, state)
    except (OSError, RuntimeError, ValueError) as exc:
        raise AdapterError(f"{path}: cannot load the starting adapter ({first_line(exc)})") from exc
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise AdapterError(f"{path}: '{unexpected[0]}' has no place in this model "
                           f"({len(unexpected)} tensors unmatched); was the adapter made for another base?")
    return len(state)
