"""The template a run trained with, recorded so that serving uses exactly it: ``lorafit_template.json``.

Written into the run folder at start (beside run.json), into ``adapter/`` (so it travels with a
pushed adapter) and into a merged model's folder. It holds the format, its columns, the prompt
templates (summarization / instruction) or the chat template text (chat formats: the tokenizer's,
or lorafit's fallback), how tokenization treats special tokens, and the end-of-turn token(s).
``generate``, ``eval``, ``merge`` and the model card read it (``AdapterSession`` applies it), so
``lorafit.generation.prompt_from_text`` / ``prompt_from_row`` build the prompt the run trained
with. A run folder from before this record reads its config.yaml's data settings as it always did.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lorafit.data.chat import (
    FALLBACK_CHAT_TEMPLATE,
    chat_template_text,
    end_of_turn_tokens,
    has_chat_template,
)
from lorafit.data.formats import FORMATS, get_format, uses_chat_template
from lorafit.errors import DataError, first_line

TEMPLATE_FILE = "lorafit_template.json"
RECORD_VERSION = 1


def template_record(data_config: Any, tokenizer: Any, detection: Any = None) -> dict[str, Any]:
    """What a run renders rows with (``data_config`` names a concrete format)."""
    fmt = get_format(data_config.format)
    record: dict[str, Any] = {
        "lorafit_template": RECORD_VERSION,
        "format": fmt.name,
        "detected": bool(detection.detected) if detection is not None else False,
        "columns": dict(data_config.columns),
        "template": data_config.template,
        "prompt_templates": fmt.prompt_templates(data_config) if fmt.prompt_templates else None,
        "chat_template": None,
        "chat_template_source": None,
        "add_special_tokens": not uses_chat_template(data_config, tokenizer),
        "append_eos": not fmt.chat,
        "eos_token": getattr(tokenizer, "eos_token", None),
        "stop_tokens": [],
    }
    if fmt.chat:
        record["chat_template"] = chat_template_text(tokenizer)
        record["chat_template_source"] = "tokenizer" if has_chat_template(tokenizer) else "lorafit fallback"
        record["stop_tokens"] = end_of_turn_tokens(tokenizer)
    return record


def write_template(folder: Path, record: dict[str, Any]) -> Path:
    path = Path(folder) / TEMPLATE_FILE
    path.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def read_template(folder: Path | None) -> dict[str, Any] | None:
    """The record in ``folder`` (None when there is none); a damaged one is one line naming it."""
    if folder is None:
        return None
    path = Path(folder) / TEMPLATE_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{path}: unreadable template record ({first_line(exc)})") from exc
    if not isinstance(record, dict) or record.get("format") not in FORMATS:
        raise DataError(f"{path}: not a lorafit template record (format {record.get('format')!r} unknown)"
                        if isinstance(record, dict) else f"{path}: not a lorafit template record")
    return record


def find_template(*folders: Path | None) -> tuple[dict[str, Any] | None, Path | None]:
    """The first record found in ``folders`` (adapter, run, model folder) and where it was."""
    for folder in folders:
        record = read_template(folder)
        if record is not None:
            return record, Path(folder) / TEMPLATE_FILE  # type: ignore[arg-type]
    return None, None


def apply_template(record: dict[str, Any], data_config: Any, tokenizer: Any, where: Path | str) -> Any:
    """A copy of ``data_config`` rendering as the record says, and ``tokenizer`` set to the recorded
    chat template; refuses a record whose default prompt templates this lorafit renders differently."""
    config = data_config.model_copy(update={"format": record["format"], "columns": dict(record.get("columns") or {}),
                                            "template": record.get("template")})
    fmt = get_format(record["format"])
    recorded = record.get("prompt_templates")
    if recorded and fmt.prompt_templates is not None and fmt.prompt_templates(config) != recorded:
        raise DataError(f"{where}: the run trained with prompt templates this lorafit renders differently; "
                        "set data.template to the recorded one")
    if fmt.chat and record.get("chat_template"):
        if record.get("chat_template_source") != "lorafit fallback":
            tokenizer.chat_template = record["chat_template"]
        elif record["chat_template"] == FALLBACK_CHAT_TEMPLATE:
            tokenizer.chat_template = None  # lorafit's fallback renders, special tokens added as in training
        else:
            raise DataError(f"{where}: the run trained with a fallback chat template this lorafit renders "
                            "differently")
    return config
