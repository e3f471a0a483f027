"""Lets the Hugging Face inference toolkit import next to transformers 5 (shipped as code/sitecustomize.py).

The toolkit (``sagemaker-huggingface-inference-toolkit`` 2.6.0, the newest on PyPI) imports
``is_tf_available`` and ``is_torch_available`` from ``transformers.file_utils``; transformers 5
dropped TensorFlow and no longer has the first, so the toolkit's handler module fails to import
once the endpoint's requirements.txt installs the transformers lorafit is tested with. The model
server starts its workers with ``code/`` on PYTHONPATH, so Python imports this file as
``sitecustomize`` before anything else: it adds an import hook that, just before the toolkit's
``transformers_utils`` loads, gives ``transformers.file_utils`` the names it lacks (TensorFlow:
not available; torch: transformers' own check). Names that exist are never replaced, so with a
toolkit or transformers that need no help this does nothing.

Self-contained on purpose: it runs in every Python process started with that PYTHONPATH (pip
included, before lorafit's requirements are installed), so it imports nothing at start and never
raises. Another ``sitecustomize`` further down ``sys.path`` (the image's own) still runs.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
from typing import Any

TOOLKIT_MODULE = "sagemaker_huggingface_inference_toolkit.transformers_utils"


def restore_removed_names() -> list[str]:
    """Add the names the toolkit imports to ``transformers.file_utils`` where missing; returns them."""
    try:
        import transformers.file_utils as file_utils
    except Exception:  # noqa: BLE001 - no transformers: the toolkit's own import error will say so
        return []
    added = []
    if not hasattr(file_utils, "is_tf_available"):
        file_utils.is_tf_available = lambda: False  # transformers 5 has no TensorFlow models
        added.append("is_tf_available")
    if not hasattr(file_utils, "is_torch_available"):
        from transformers.utils import is_torch_available

        file_utils.is_torch_available = is_torch_available
        added.append("is_torch_available")
    return added


class _BeforeToolkit(importlib.abc.MetaPathFinder):
    """Runs ``restore_removed_names`` when the toolkit's transformers_utils is about to be found,
    then lets the normal finders load it."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == TOOLKIT_MODULE:
            restore_removed_names()
        return None


def install() -> None:
    """Put the hook first on ``sys.meta_path`` (once)."""
    if not any(isinstance(finder, _BeforeToolkit) for finder in sys.meta_path):
        sys.meta_path.insert(0, _BeforeToolkit())


def _run_next_sitecustomize() -> None:
    """Python imports only the first ``sitecustomize`` on the path; run the next one too."""
    here = os.path.dirname(os.path.abspath(__file__))
    for entry in sys.path:
        folder = os.path.abspath(entry or os.getcwd())
        candidate = os.path.join(folder, "sitecustomize.py")
        if folder == here or not os.path.isfile(candidate):
            continue
        spec = importlib.util.spec_from_file_location("_next_sitecustomize", candidate)
        if spec is not None and spec.loader is not None:
            spec.loader.exec_module(importlib.util.module_from_spec(spec))
        return


if __name__ == "sitecustomize":
    try:
        install()
        _run_next_sitecustomize()
    except Exception as exc:  # noqa: BLE001 - interpreter start-up must never fail here
        print(f"lorafit sitecustomize: {exc.__class__.__name__}: {exc}", file=sys.stderr)
