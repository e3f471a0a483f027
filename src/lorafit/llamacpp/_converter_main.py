"""Child-process entry: ``python _converter_main.py CONVERTER_DIR SCRIPT ARGS...`` runs llama.cpp's
converter script as its own ``__main__``, with the converter's ``gguf-py`` first on the path.

One addition, and only where the converter gives up: llama.cpp identifies a BPE tokenizer's
pre-tokenizer by hashing how a known model tokenizes a test string, so a tokenizer trained or
extended by the user is "not recognized" even when it splits text exactly like a known one. When
the converter raises that, ``tokenizer.json``'s pre-tokenizer is compared with the two that
transformers itself builds for byte-level BPE: GPT-2's (``ByteLevel`` with its regex; llama.cpp's
``gpt-2``) and Qwen2's (``Qwen2Tokenizer``'s split regex, read from transformers, then
``ByteLevel``; llama.cpp's ``qwen2``). Anything else keeps the converter's own error. The export's
tests tokenize a fixed string set with llama.cpp and transformers and require the same ids, which
is what proves the choice.
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path


def _pre_type(tokenizer_json: Path) -> str | None:
    """llama.cpp's pre-type for a byte-level BPE whose pre-tokenizer transformers builds itself."""
    try:
        data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if (data.get("model") or {}).get("type") != "BPE":
        return None
    pre = data.get("pre_tokenizer") or {}
    normalizer = (data.get("normalizer") or {}).get("type")
    if normalizer is None and pre.get("type") == "ByteLevel" and pre.get("use_regex", True) \
            and not pre.get("add_prefix_space", False):
        return "gpt-2"
    steps = pre.get("pretokenizers") or []
    if pre.get("type") == "Sequence" and len(steps) == 2 and normalizer in (None, "NFC"):
        split, byte_level = steps
        try:
            from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2
        except ImportError:
            return None
        if split.get("type") == "Split" and (split.get("pattern") or {}).get("Regex") == QWEN2 \
                and split.get("behavior") == "Isolated" and not split.get("invert") \
                and byte_level.get("type") == "ByteLevel" and not byte_level.get("use_regex", True) \
                and not byte_level.get("add_prefix_space", False):
            return "qwen2"
    return None


def _recognise_pre_tokenizer() -> None:
    try:
        from conversion.base import TextModel  # the converter's package (llama.cpp 2026 layout)
    except ImportError:
        return
    original = getattr(TextModel, "get_vocab_base_pre", None)
    if original is None:
        return

    def get_vocab_base_pre(self, tokenizer):  # noqa: ANN001, ANN202 - the converter's signature
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            name = _pre_type(Path(self.dir_model) / "tokenizer.json")
            if name is None:
                raise
            print(f"lorafit: llama.cpp does not know this tokenizer by its hash; its pre-tokenizer is "
                  f"the one transformers builds for '{name}', so it is written as pre-type '{name}'",
                  file=sys.stderr, flush=True)
            return name

    TextModel.get_vocab_base_pre = get_vocab_base_pre


def main() -> None:
    converter, script, *args = sys.argv[1:]
    sys.path[0] = converter
    sys.path.insert(1, str(Path(converter) / "gguf-py"))
    _recognise_pre_tokenizer()
    sys.argv = [script, *args]
    runpy.run_path(str(Path(converter) / script), run_name="__main__")


if __name__ == "__main__":
    main()
