"""Hyperparameter values that reach the entry point unchanged, whichever toolkit runs it.

The SageMaker training toolkit turns each hyperparameter into ``--key value`` and, up to
sagemaker-training 5.1.2 (what the Hugging Face images built before it carry), joins the command
with spaces and runs it through ``/bin/sh`` unquoted (``process.run_async``): a value with a space
splits into two arguments and ``$(...)`` runs. From 5.1.3 it runs the argument vector directly.
So the launcher sends any value that is not made only of characters ``/bin/sh`` leaves alone as
``b64:`` + URL-safe base64 of its UTF-8 bytes, and the entry point decodes every argument that
starts with ``b64:``. Plain values (``/opt/ml/model``, ``true``, ``86400``) stay readable in the console.
"""

from __future__ import annotations

import base64
import binascii
import re

from lorafit.errors import ConfigError

PREFIX = "b64:"
# Characters that mean nothing to /bin/sh inside a word (no quotes, spaces, $, `, \, globs,
# redirections, ~ or # at a word's start).
_SHELL_SAFE = re.compile(r"^[A-Za-z0-9_./:@%+=,-]+$")


def encode(value: str) -> str:
    """``value`` as it can travel through an unquoted /bin/sh command line."""
    if _SHELL_SAFE.match(value) and not value.startswith(PREFIX):
        return value
    return PREFIX + base64.urlsafe_b64encode(value.encode("utf-8")).decode("ascii").rstrip("=")


def decode(value: str) -> str:
    """The inverse of ``encode``; anything not starting with ``b64:`` is returned as it is."""
    if not value.startswith(PREFIX):
        return value
    data = value[len(PREFIX):]
    try:
        return base64.b64decode(data + "=" * (-len(data) % 4), altchars=b"-_", validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"hyperparameter value {value[:40]!r}: not valid {PREFIX} base64") from exc


def decode_argv(argv: list[str]) -> list[str]:
    """Every ``b64:`` argument decoded, including the value part of ``--key=b64:...``."""
    decoded = []
    for item in argv:
        key, sep, value = item.partition("=")
        if item.startswith("--") and sep and value.startswith(PREFIX):
            decoded.append(f"{key}={decode(value)}")
        else:
            decoded.append(decode(item))
    return decoded
