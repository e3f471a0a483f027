"""One exception type for everything the user can fix.

The CLI turns a ``LorafitError`` into a single ``error: ...`` line and exit code 2; anything else
is a bug in lorafit and keeps its traceback.
"""

from __future__ import annotations


class LorafitError(Exception):
    """A problem with the user's input (config, paths, data, adapters) that they can fix."""

    exit_code = 2


class ConfigError(LorafitError):
    """The config file or a ``--set`` override is invalid; the message names the field."""


class DataError(LorafitError):
    """The training data cannot be used; the message names the file (and line)."""


class AdapterError(LorafitError):
    """An adapter folder is missing, corrupted or made for another base model."""


def first_line(exc: BaseException) -> str:
    """A library exception's first line (capped), for embedding in a one-line lorafit error."""
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else exc.__class__.__name__
