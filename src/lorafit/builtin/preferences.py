"""A deterministic preference set derived from the built-in dialogues: a chat, its summary, and a wrong one.

``builtin:dialogue-preferences`` (2,000 pairs) and ``builtin:dialogue-preferences-test`` (200) hold
rows ``{id, prompt, chosen, rejected}``: ``prompt`` is a dialogue from ``lorafit.builtin.dialogues``
(other seeds than ``builtin:dialogues``, so an SFT run on those has not seen these chats),
``chosen`` its summary and ``rejected`` the same summary with one fact the dialogue contradicts:
a time, day, place, item, amount or name replaced, or who does what swapped. The wrong answer
reads as fluently as the right one, so the pairs teach faithfulness to the dialogue, not style.
With ``data.template`` set to the summarization prompt (``builtin:dpo`` does), the prompts are
exactly those an SFT run on ``builtin:dialogues`` trained with.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

from lorafit.builtin import dialogues as d
from lorafit.errors import LorafitError
from lorafit.paths import cache_root

VERSION = "v1"
SPLITS = {"dialogue-preferences": (2000, 4321), "dialogue-preferences-test": (200, 8765)}
_FACTS = [d.TIMES, d.DAYS, d.PLACES, d.ITEMS, d.GROCERIES, d.GIFTS, d.MOVIES, d.RESTAURANTS, d.TASKS,
          d.PETS, d.CITIES, d.DISHES, d.DRINKS, d.REASONS_LATE, d.REASONS_CANCEL,
          [e.removeprefix("the ") for e in d.EVENTS], ["10", "15", "20", "30", "45"],
          ["keys", "wallet", "phone", "glasses", "scarf", "headphones"]]


def _word(value: str) -> re.Pattern[str]:
    return re.compile(rf"(?<![\w']){re.escape(value)}(?![\w'])")


def corrupt(summary: str, speakers: tuple[str, str], r: random.Random) -> str:
    """The summary with one fact changed (or the two speakers swapped); never equal to ``summary``."""
    found = [(values, v) for values in _FACTS for v in values if _word(v).search(summary)]
    found = [(values, v) for values, v in found  # the longest match of a list ("7:30 pm", not "30")
             if not any(v != w and v in w and _word(w).search(summary) for _, w in found)]
    if found and (r.random() < 0.75 or not all(_word(s).search(summary) for s in speakers)):
        values, value = r.choice(found)
        other = r.choice([v for v in values if v != value and not _word(v).search(summary)])
        return _word(value).sub(other, summary, count=1)
    a, b = speakers
    swapped = _word(b).sub("\0", _word(a).sub("\1", summary)).replace("\1", b).replace("\0", a)
    if swapped != summary:
        return swapped
    return summary.rstrip(".") + " instead." if not summary.endswith(" instead.") else summary[:-9] + "."


def generate(count: int, seed: int) -> list[dict[str, str]]:
    """``count`` rows ``{id, prompt, chosen, rejected}``, the same for the same seed."""
    r = random.Random(f"lorafit-preferences:{seed}")
    rows = []
    for row in d.generate(count, seed):
        speakers = tuple(dict.fromkeys(line.split(":", 1)[0] for line in row["dialogue"].splitlines()))[:2]
        rejected = corrupt(row["summary"], (speakers + ("", ""))[:2], r)
        rows.append({"id": row["id"], "prompt": row["dialogue"], "chosen": row["summary"], "rejected": rejected})
    return rows


def materialize_preferences(name: str) -> Path:
    """Write split ``name`` to the cache once (atomically) and return the .jsonl path."""
    if name not in SPLITS:
        known = ", ".join(f"builtin:{n}" for n in SPLITS)
        raise LorafitError(f"data.path: unknown builtin data set 'builtin:{name}' (known: {known})")
    target = cache_root() / "data" / f"builtin-{name}-{VERSION}.jsonl"
    if target.exists():
        return target
    count, seed = SPLITS[name]
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    with staging.open("w", encoding="utf-8") as handle:
        for row in generate(count, seed):
            handle.write(json.dumps(row) + "\n")
    staging.replace(target)
    return target
