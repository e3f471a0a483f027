"""One exception type for everything the user can fix.

The CLI turns a ``LorafitError`` into a single ``error: ...`` line and exit code 2; anything else
is a bug in lorafit and keeps its traceback.
"""

from __future__ import annotations

import re


class LorafitError(Exception):
    """A problem with the user's input (config, paths, data, adapters) that they can fix."""

    exit_code = 2


class ConfigError(LorafitError):
    """The config file or a ``--set`` override is invalid; the message names the field."""


class DataError(LorafitError):
    """The training data cannot be used; the message names the file (and line)."""


class AdapterError(LorafitError):
    """An adapter folder is missing, corrupted or made for another base model."""


class StoppedBySignal(LorafitError):
    """SIGTERM / SIGINT ended a command that had nothing to save; exits 128 + the signal's number."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


_MODULE_REPR = re.compile(r"\(\n.*?\n\)", re.S)  # a torch module's multi-line repr: Name(\n  (a): ...\n)


def first_line(exc: BaseException) -> str:
    """A library exception's reason as one line (capped), for embedding in a one-line lorafit error:
    a module's multi-line repr is shortened to its class name (peft's "Target module LlamaModel(...)
    is not supported"), and a first line that only announces what follows ("Error(s) in loading
    state_dict for X:") is joined with the next one, which holds the reason."""
    text = _MODULE_REPR.sub("", str(exc).strip())
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return exc.__class__.__name__
    line = lines[0]
    if line.endswith(":") and len(lines) > 1:
        line = f"{line} {lines[1]}"
    return line[:300]


def load_reason(exc: BaseException) -> str:
    """Why transformers could not load a model: its first line, or what to do when it ships code."""
    if "contains custom code" in str(exc):
        return ("it ships its own Python code, which runs only with model.trust_remote_code: true "
                "(CLI: --trust-remote-code); turn that on only if you trust the code")
    return first_line(exc)
