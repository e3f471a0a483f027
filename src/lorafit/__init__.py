"""lorafit: LoRA / QLoRA fine-tuning of Hugging Face causal LMs, config-driven, on one GPU or more.

The Python API the CLI is a thin shell over::

    import lorafit
    config = lorafit.load_config("examples/bloomz-7b1-samsum.yaml", ["train.max_steps=100"])
    result = lorafit.train(config)
    print(result.adapter_dir, result.final_eval_loss)

Heavy imports (torch, transformers) happen on first use, so ``import lorafit`` stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lorafit.config import LorafitConfig, load_config
from lorafit.errors import LorafitError

if TYPE_CHECKING:
    from lorafit.training import TrainResult

__all__ = ["LorafitConfig", "LorafitError", "load_config", "train"]
__version__ = "0.1.0"


def train(config: LorafitConfig | str | None = None, **options: Any) -> TrainResult:
    """Fine-tune per ``config`` (a ``LorafitConfig``, a YAML path, or None for the default)."""
    from lorafit.training import train as _train

    if not isinstance(config, LorafitConfig):
        config = load_config(config)
    return _train(config, **options)
