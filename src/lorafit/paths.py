"""Where lorafit keeps converted models and tokenized-data caches (never inside the user's data)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$LORAFIT_CACHE`` if set, else ``$XDG_CACHE_HOME/lorafit`` or ``~/.cache/lorafit``."""
    explicit = os.environ.get("LORAFIT_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lorafit"
