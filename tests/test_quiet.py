"""Library chatter stays hidden unless --debug, from the first line of output (lorafit.quiet)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import tiny_run_config

# what an entry point does first, then what the libraries do: bitsandbytes logs its CPU-kernel
# advice on import (on CPUs with AVX512-BF16, like the CI machine), transformers draws a tqdm bar
# while it converts a GGUF file
LIBRARIES_TALK = """
import sys
from lorafit import quiet
quiet.configure(debug=sys.argv[1] == "debug")
import bitsandbytes
from bitsandbytes.functional import has_avx512bf16
from tqdm.auto import tqdm
for _ in tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."):
    pass
print("lorafit: done", "(cpu kernel advice expected)" if has_avx512bf16() else "")
"""


def _clean_env() -> dict[str, str]:
    names = ("LORAFIT_DEBUG", "TQDM_DISABLE", "TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS")
    return {k: v for k, v in os.environ.items() if k not in names}


@pytest.mark.parametrize("mode", ["quiet", "debug"])
def test_libraries_are_silent_unless_debug(mode: str) -> None:
    done = subprocess.run([sys.executable, "-c", LIBRARIES_TALK, mode], capture_output=True, text=True,
                          env=_clean_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    output = done.stdout + done.stderr
    if mode == "quiet":
        assert output.splitlines() and all(line.startswith("lorafit: ") for line in output.splitlines()), output
    else:  # the same libraries do talk: the quiet run above proves something
        assert "Converting and de-quantizing GGUF tensors" in done.stderr
        if "expected" in done.stdout:
            assert "Failed to load CPU gemm_4bit_forward" in done.stderr


OWN_BAR = """
from pathlib import Path
from lorafit import quiet
quiet.configure()
from lorafit.reporting import Reporter
reporter = Reporter("bar")
reporter.open_run(Path("."), None, total=3)
reporter.start(0)
reporter.step(1.0, 1e-3, 10.0)
reporter.stop()
"""


def test_lorafits_own_progress_bar_still_draws() -> None:
    done = subprocess.run([sys.executable, "-c", OWN_BAR], capture_output=True, text=True, env=_clean_env(),
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "train" in done.stdout and "1/3" in done.stdout, done.stdout


def test_a_quantized_cli_run_prints_only_lorafit_lines(tiny_llama: Path, dialogue_file: Path, tmp_path: Path) -> None:
    """The CLI as a user runs it, nf4 (bitsandbytes imported, quantizing on load): every line of
    stdout and stderr is lorafit's, the first one included."""
    raw = tiny_run_config(tiny_llama, dialogue_file, tmp_path / "run", max_steps=1, eval_steps=None)
    raw["model"]["quantization"] = "nf4"
    config = tmp_path / "nf4.yaml"
    config.write_text(yaml.safe_dump(raw), encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "lorafit", "train", str(config), "--no-progress"],
                          capture_output=True, text=True, env=dict(_clean_env(), OMP_NUM_THREADS="1"), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = (done.stdout + done.stderr).splitlines()
    assert lines[0].startswith("lorafit: model: ")
    assert [line for line in lines if not line.startswith("lorafit: ")] == [], lines[:10]


@pytest.mark.parametrize("entry", ["lorafit.cli", "lorafit.sagemaker.entry"])
def test_entry_points_import_no_library_before_quieting_them(entry: str) -> None:
    """tqdm (which torch imports) reads its settings from the environment once, on import, and
    bitsandbytes talks on import: an entry point's module must import neither before its main()
    has called lorafit.quiet.configure."""
    probe = f"import sys, {entry}; print(sorted(m for m in ('torch', 'tqdm', 'bitsandbytes', 'transformers') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=_clean_env(), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
