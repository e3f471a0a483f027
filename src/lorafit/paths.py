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


def looks_like_path(name: str, file_suffixes: tuple[str, ...] = ()) -> bool:
    """Whether ``name`` is meant as a file-system path rather than a Hub id (``org/name``).

    The one rule for models and data alike: a path starts with ``/``, ``.`` or ``~``, has more than
    one ``/`` (a Hub id has at most one), uses this OS's separator, or ends in a data-file suffix.
    """
    return (name.startswith(("/", ".", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)
            or (bool(file_suffixes) and name.lower().endswith(file_suffixes)))
