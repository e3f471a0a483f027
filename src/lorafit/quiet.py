"""Library chatter stays off the console unless ``--debug``: lorafit's lines come first, and alone.

Several libraries talk on import or while loading: bitsandbytes logs that it could not load a CPU
kernel from the Hub, transformers draws a tqdm bar while it converts a GGUF file (carriage-return
lines in a log file), torch warns about its own deprecations. Each entry point (the ``lorafit``
command, ``python -m lorafit.sagemaker.entry``, and so every torchrun rank, which runs one of
them) calls ``configure`` before it imports any of these libraries. Settings go through the
environment too, so child processes inherit them. ``--debug`` (``LORAFIT_DEBUG=1``) shows
everything, deprecations included.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator

DEBUG_VARIABLE = "LORAFIT_DEBUG"
# loggers of libraries that log advice at WARNING level (bitsandbytes at import time)
_CHATTY_LOGGERS = ("bitsandbytes", "kernels", "torch.distributed", "accelerate")


def debugging() -> bool:
    """Whether this process (or the one that started it) runs with ``--debug``."""
    return os.environ.get(DEBUG_VARIABLE) == "1"


def configure(debug: bool = False) -> None:
    """Quiet the libraries (or, with ``debug``, show every warning); call before importing them."""
    if debug or debugging():
        os.environ[DEBUG_VARIABLE] = "1"  # child processes (--nproc) and tracker output follow it
        warnings.simplefilter("default")  # every warning once per place, deprecations included
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "warning")
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # tqdm >= 4.66 takes its defaults from TQDM_* variables: no library bar draws; lorafit's own
    # progress bar passes disable=False explicitly
    os.environ.setdefault("TQDM_DISABLE", "1")
    warnings.simplefilter("ignore")  # lorafit reports through its own lines, never Python warnings
    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def native_output_hidden() -> Iterator[None]:
    """Hide what native code writes straight to the process's stdout (file descriptor 1) inside the
    block, unless debugging: torch 2.8's gloo prints "[Gloo] Rank N is connected to ..." for every
    process group it connects."""
    if debugging():
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    sink = os.open(os.devnull, os.O_WRONLY)
    os.dup2(sink, 1)
    try:
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(sink)
