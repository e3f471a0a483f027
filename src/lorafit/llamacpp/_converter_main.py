"""Child-process entry: ``python _converter_main.py CONVERTER_DIR SCRIPT ARGS...`` runs llama.cpp's
converter script as its own ``__main__``, with the converter's ``gguf-py`` first on the path.

One addition, and only where the converter gives up: llama.cpp identifies a BPE tokenizer's
pre-tokenizer by hashing how a known model tokenizes a test string, so a tokenizer trained or
extended by the user is "not recognized" even when it splits text exactly like GPT-2. When the
converter raises that, and ``tokenizer.json`` says the pre-tokenizer is GPT-2's byte-level regex
(no normalizer, no prefix space), the pre-type is ``gpt-2``: llama.cpp's name for that regex.
Anything else keeps the converter's own error. The export's tests tokenize a fixed string set with
llama.cpp and transformers and require the same ids, which is what proves the choice.
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path


def _is_gpt2_byte_level(tokenizer_json: Path) -> bool:
    try:
        data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    pre = data.get("pre_tokenizer") or {}
    return (data.get("normalizer") is None and pre.get("type") == "ByteLevel"
            and pre.get("use_regex", True) and not pre.get("add_prefix_space", False)
            and (data.get("model") or {}).get("type") == "BPE")


def _recognise_gpt2_pre_tokenizer() -> None:
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
            if not _is_gpt2_byte_level(Path(self.dir_model) / "tokenizer.json"):
                raise
            print("lorafit: llama.cpp does not know this tokenizer by its hash; tokenizer.json's "
                  "pre-tokenizer is GPT-2's byte-level regex, so it is written as pre-type 'gpt-2'",
                  file=sys.stderr, flush=True)
            return "gpt-2"

    TextModel.get_vocab_base_pre = get_vocab_base_pre


def main() -> None:
    converter, script, *args = sys.argv[1:]
    sys.path[0] = converter
    sys.path.insert(1, str(Path(converter) / "gguf-py"))
    _recognise_gpt2_pre_tokenizer()
    sys.argv = [script, *args]
    runpy.run_path(str(Path(converter) / script), run_name="__main__")


if __name__ == "__main__":
    main()
