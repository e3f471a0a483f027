"""The adapter's model card: ``README.md`` with the Hub's YAML metadata, written into every adapter.

Built with ``huggingface_hub``'s ``ModelCard`` / ``ModelCardData``: ``base_model`` (when it is a hub
id: a local base is named in the text only, since the Hub accepts only ids there),
``library_name: peft``, ``pipeline_tag``, ``tags``, ``datasets`` (hub data sets only), and the
eval metrics as ``model-index`` (the held-out loss from training; ROUGE / perplexity once
``lorafit eval`` has scored the run). The text says how the adapter was trained (config, steps,
data size, hardware, versions) and how to load it with peft and with ``lorafit generate``.

Sections that lorafit rewrites later sit between ``<!-- lorafit:NAME -->`` markers (``load`` when
pushed under a repo id, ``eval`` when scored); anything else a user edits in the card is kept.
"""

from __future__ import annotations

import platform
import re
from dataclasses import asdict, is_dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import yaml

from lorafit import runs
from lorafit.data.formats import format_names
from lorafit.data.sources import FILE_SUFFIXES, as_list
from lorafit.data.template import TEMPLATE_FILE, read_template
from lorafit.errors import LorafitError
from lorafit.paths import looks_like_path

CARD_FILE = "README.md"
_VERSIONED = ("lorafit", "torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets")
_ROUGE_NAMES = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "rougeLsum": "ROUGE-Lsum"}
# lorafit's builtin models and the hub repositories they come from
BUILTIN_HUB_IDS = {"builtin:smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def hub_model_id(name: str | None) -> str | None:
    """``name`` as a Hub model id, or None when it is a local path (or unknown)."""
    if not name:
        return None
    if name in BUILTIN_HUB_IDS:
        return BUILTIN_HUB_IDS[name]
    if looks_like_path(name) or Path(name).expanduser().exists():
        return None
    return name if re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) else None


def hub_datasets(paths: str | list[str] | None) -> list[str]:
    """The data sources that are Hub data sets (not files, folders or builtin data)."""
    found = []
    for path in as_list(paths):
        local = Path(path).expanduser()
        if path.startswith(("builtin:", "/", ".", "~")) or local.exists() or local.suffix in FILE_SUFFIXES:
            continue
        if path.count("/") <= 1:
            found.append(path)
    return found


def versions() -> dict[str, str]:
    found = {}
    for name in _VERSIONED:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


def hardware(device: Any, processes: int) -> str:
    import torch

    kind = getattr(device, "type", str(device or "cpu"))
    if kind == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"
    return f"{processes} x {name}" if processes > 1 else name


# ------------------------------------------------------------------------------------ sections
def section(name: str, body: str) -> str:
    return f"<!-- lorafit:{name} -->\n{body.rstrip()}\n<!-- /lorafit:{name} -->"


def replace_section(text: str, name: str, body: str) -> str:
    """Replace the marked section ``name`` (append it when the card has none)."""
    pattern = re.compile(rf"<!-- lorafit:{name} -->.*?<!-- /lorafit:{name} -->", re.S)
    new = section(name, body)
    if pattern.search(text):
        return pattern.sub(lambda _: new, text, count=1)
    return text.rstrip() + "\n\n" + new + "\n"


def has_section(text: str, name: str) -> bool:
    return f"<!-- lorafit:{name} -->" in text


def load_section(location: str, base: str, data_format: str) -> str:
    """How to load the adapter from ``location`` (a folder, or a repo id once pushed)."""
    is_repo = not Path(location).exists() and hub_model_id(location) == location
    # a downloaded adapter has no run config beside it: name the format the run trained on
    fetch = (f"hf download {location} --local-dir adapter\nlorafit generate adapter --format {data_format}"
             if is_repo else f"lorafit generate {location}")
    prompt = "Summarize the chat dialogue: ..." if data_format == "summarization" else "..."
    return f"""## How to use it

With peft (the base model, `{base}`, is loaded from `adapter_config.json`):

```python
from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer

model = AutoPeftModelForCausalLM.from_pretrained("{location}")
tokenizer = AutoTokenizer.from_pretrained("{location}")
```

With lorafit (applies the training prompt template; `--quantization int8|nf4` loads the base quantized):

```bash
{fetch} --prompt "{prompt}"
```

`lorafit merge` folds it into the base as a plain transformers model."""


def eval_section(result: dict[str, Any] | None, source: str | None = None) -> str:
    if not result:
        return "## Evaluation\n\nNot scored yet: `lorafit eval RUN` writes the scores here."
    meta = result.get("meta", {})
    source = source or meta.get("data", "?")
    origin = "the run's held-out rows of data.path" if source.startswith(runs.HELD_OUT_LABEL) else f"`{source}`"
    lines = ["## Evaluation", "", f"`lorafit eval` on {meta.get('rows', '?')} rows from {origin} "
             f"(greedy decoding, up to {meta.get('max_new_tokens', '?')} new tokens).", ""]
    rows = [("adapter", result.get("adapter") or {})]
    if result.get("starting_adapter"):
        rows.append(("starting adapter", result["starting_adapter"]))
    if result.get("baseline"):
        rows.append(("base model", result["baseline"]))
    keys = [k for k in (*_ROUGE_NAMES, "perplexity", "reward_accuracy", "reward_margin")
            if any(m.get(k) is not None for _, m in rows)]
    names = {**_ROUGE_NAMES, "reward_accuracy": "reward accuracy", "reward_margin": "reward margin"}
    lines.append("| model | " + " | ".join(names.get(k, k) for k in keys) + " |")
    lines.append("|---|" + "---|" * len(keys))
    for label, metrics in rows:
        cells = [f"{metrics[k]:.2f}" if metrics.get(k) is not None else "" for k in keys]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- metadata
def data_label(paths: str | list[str] | None) -> str:
    """Data sources as a card names them: hub ids and builtin names as they are, files by name only."""
    hub = set(hub_datasets(paths))
    return ", ".join(p if p in hub or p.startswith("builtin:") else Path(p).name for p in as_list(paths))


def _eval_results(eval_loss: float | None, result: dict[str, Any] | None, train_data: str,
                  eval_data: str, task: str) -> list[Any]:
    from huggingface_hub import EvalResult

    found = []
    if eval_loss is not None:
        found.append(EvalResult(task_type="text-generation", dataset_type=train_data,
                                dataset_name=f"{train_data} (held-out split)", metric_type="loss",
                                metric_name="held-out loss (training)", metric_value=round(eval_loss, 4)))
    for key, value in ((result or {}).get("adapter") or {}).items():
        if value is None:
            continue
        metric_type = "rouge" if key in _ROUGE_NAMES else key
        found.append(EvalResult(task_type=task, dataset_type=eval_data, dataset_name=eval_data,
                                metric_type=metric_type, metric_name=_ROUGE_NAMES.get(key, key),
                                metric_value=value))
    return found


def trained_format(adapter_dir: Path | None, config: Any) -> str:
    """The format the adapter trained with: its recorded template's, else the config's (an old run)."""
    try:
        record = read_template(adapter_dir)
    except LorafitError:
        record = None
    return record["format"] if record else config.data.format


def card_metadata(config: Any, *, eval_loss: float | None = None, eval_result: dict[str, Any] | None = None,
                  eval_source: str | None = None, model_name: str = "adapter", data_format: str | None = None) -> Any:
    from huggingface_hub import ModelCardData

    base = hub_model_id(config.model.name_or_path)
    tags = ["lorafit", "lora", "transformers"] + ([f"base_model:adapter:{base}"] if base else [])
    task = "summarization" if (data_format or config.data.format) == "summarization" else "text-generation"
    train_data = data_label(config.data.eval_path or config.data.path)
    own_rows = not eval_source or eval_source.startswith(runs.HELD_OUT_LABEL)  # lorafit.evaluation's label
    eval_data = train_data if own_rows else data_label(eval_source.split(", "))
    results = _eval_results(eval_loss, eval_result, train_data, eval_data, task)
    return ModelCardData(base_model=base, library_name="peft", pipeline_tag="text-generation", tags=tags,
                         datasets=hub_datasets(config.data.path) or None,
                         eval_results=results or None, model_name=model_name if results else None)


# --------------------------------------------------------------------------------------- build
def training_text(config: Any, result: dict[str, Any], *, train_rows: int | None, eval_rows: int | None,
                  processes: int | None, hardware_name: str | None, versions_found: dict[str, str],
                  data_format: str | None = None) -> str:
    lora, data, train, model = config.lora, config.data, config.train, config.model
    targets = lora.target_modules if lora.target_modules is not None else "per-architecture default"
    batch = f"{train.batch_size} x {train.grad_accum} accumulation" + (
        f" x {processes} processes" if processes and processes > 1 else "")
    losses = ""
    if result.get("first_eval_loss") is not None and result.get("final_eval_loss") is not None:
        losses = f"- Held-out loss: {result['first_eval_loss']:.4f} -> {result['final_eval_loss']:.4f}\n"
    params = ""
    if result.get("trainable_params"):
        share = 100 * result["trainable_params"] / max(result.get("total_params") or 1, 1)
        params = f" ({result['trainable_params']:,} trainable parameters, {share:.4f}% of {result['total_params']:,})"
    sources = ", ".join(f"`{p}`" for p in ([data.path] if isinstance(data.path, str) else data.path))
    rows = f"{train_rows:,} training samples" if train_rows is not None else "training samples: unknown"
    if eval_rows:
        rows += f", {eval_rows:,} held out"
    facts = [
        f"- Base model: `{model.name_or_path}`" + (f", loaded in {model.quantization}"
                                                   if model.quantization != "none" else ""),
        f"- Adapter: {lora.variant}, r={lora.r}, alpha={lora.alpha:g}, dropout={lora.dropout:g}, "
        f"targets {targets}{params}",
        f"- Data: {sources} ({data_format or data.format}), {rows}; seq_len {train.seq_len}, packing `{data.packing}`",
        f"- Prompt: the template training used is recorded in `{TEMPLATE_FILE}` (format, prompt or chat "
        "template); `lorafit generate`, `eval` and `merge` use it",
        f"- Steps: {result.get('steps')} of {result.get('max_steps')}; batch {batch}; {train.optimizer}, "
        f"lr {train.lr:g} ({train.schedule}), {result.get('tokens_seen', 0):,} tokens seen",
    ]
    if train.objective != "sft":
        start = f", continued from `{model.adapter}`" if model.adapter else ""
        facts.append(f"- Objective: {train.objective} on preference pairs (beta {train.beta:g}"
                     + (f", {train.dpo_loss} loss" if train.objective == "dpo" else "") + f"){start}")
    elif model.adapter:
        facts.append(f"- Continued from the adapter `{model.adapter}`")
    if hardware_name:
        facts.append(f"- Hardware: {hardware_name}; {result.get('elapsed_s', 0):.0f} s")
    if versions_found:
        facts.append("- Versions: " + ", ".join(f"{k} {v}" for k, v in versions_found.items()))
    config_yaml = yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False).rstrip()
    return ("## Training\n\n" + "\n".join(facts) + "\n" + losses +
            f"\n<details><summary>The full lorafit config</summary>\n\n```yaml\n{config_yaml}\n```\n\n</details>")


def build_card(adapter_dir: Path, config: Any, result: dict[str, Any], *, train_rows: int | None = None,
               eval_rows: int | None = None, processes: int | None = None, hardware_name: str | None = None,
               versions_found: dict[str, str] | None = None, eval_result: dict[str, Any] | None = None,
               eval_source: str | None = None, files: Path | None = None) -> Any:
    """The whole card (``huggingface_hub.ModelCard``) for an adapter trained per ``config``;
    ``files``: where the adapter's files are now (a staging folder), if not yet at ``adapter_dir``."""
    from huggingface_hub import ModelCard

    name = Path(config.output_dir).name or "adapter"
    base = config.model.name_or_path
    shown_base = hub_model_id(base) or base
    data_format = trained_format(files or adapter_dir, config)
    data = card_metadata(config, eval_loss=result.get("final_eval_loss"), eval_result=eval_result,
                         eval_source=eval_source, model_name=name, data_format=data_format)
    body = "\n\n".join([
        f"# {name}",
        f"A LoRA adapter for `{shown_base}`, trained with lorafit (peft's format: `adapter_config.json` + "
        "`adapter_model.safetensors`).",
        section("load", load_section(str(adapter_dir), shown_base, data_format)),
        training_text(config, result, train_rows=train_rows, eval_rows=eval_rows, processes=processes,
                      hardware_name=hardware_name, versions_found=versions_found or {}, data_format=data_format),
        section("eval", eval_section(eval_result, eval_source)),
    ])
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n")


def write_training_card(adapter_dir: str | Path | None, config: Any, result: Any, *, train_rows: int,
                        eval_rows: int, processes: int, device: Any, folder: Path | None = None) -> Path | None:
    """Write ``README.md`` into a freshly trained adapter (replacing peft's empty template);
    ``folder``: where the card is written when the adapter is staged before it moves to ``adapter_dir``."""
    if adapter_dir is None:
        return None
    adapter_dir = Path(adapter_dir)
    summary = asdict(result) if is_dataclass(result) else dict(result)
    card = build_card(adapter_dir, config, summary, train_rows=train_rows, eval_rows=eval_rows,
                      processes=processes, hardware_name=hardware(device, processes), versions_found=versions(),
                      files=folder)
    path = (folder or adapter_dir) / CARD_FILE
    card.save(path)
    return path


def update_card_eval(adapter_dir: Path, eval_result: dict[str, Any], *, source: str,
                     run_dir: Path | None = None, config: Any = None) -> Path | None:
    """After ``lorafit eval``: put the scores into the card's metadata and its eval section.

    A card lorafit did not write is left alone, unless the adapter belongs to a lorafit run, whose
    card is then (re)built from the run folder."""
    from huggingface_hub import ModelCard

    path = Path(adapter_dir) / CARD_FILE
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    if not has_section(text, "eval"):
        if run_dir is None or config is None:
            return None
        summary = _read_result(run_dir)
        card = build_card(Path(adapter_dir), config, summary, eval_result=eval_result, eval_source=source)
        card.save(path)
        return path
    card = ModelCard(text, ignore_metadata_errors=True)
    kept_loss = [r.metric_value for r in (card.data.eval_results or []) if r.metric_type == "loss"]
    if config is not None:
        fresh = card_metadata(config, eval_loss=kept_loss[0] if kept_loss else None, eval_result=eval_result,
                              eval_source=source, model_name=card.data.model_name or "adapter",
                              data_format=trained_format(Path(adapter_dir), config))
        card.data.eval_results, card.data.model_name = fresh.eval_results, fresh.model_name
    card.text = replace_section(card.text, "eval", eval_section(eval_result, source))
    card.save(path)
    return path


def card_for_repo(adapter_dir: Path, repo_id: str, base: str | None) -> str | None:
    """The card's text as it should read on the Hub: loading instructions name ``repo_id``."""
    from huggingface_hub import ModelCard

    path = Path(adapter_dir) / CARD_FILE
    if not path.exists():
        return None
    text = path.read_text(encoding="utf-8")
    if not has_section(text, "load"):
        return text
    card = ModelCard(text, ignore_metadata_errors=True)

    found = re.search(rf"^- Data: .*? \(({'|'.join(format_names())})\)", text, re.M)
    data_format = found.group(1) if found else "summarization"
    card.text = replace_section(card.text, "load", load_section(repo_id, base or "the base model", data_format))
    return str(card)


def _read_result(run_dir: Path) -> dict[str, Any]:
    import json

    try:
        return json.loads((Path(run_dir) / runs.RESULT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
