"""The README's two commands, as a user runs them: the embedded default (SFT), then `lorafit train
builtin:dpo`, then `lorafit eval` on the DPO run. Heavy: SmolLM2-135M on a CPU (minutes quiet)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def _lorafit(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "lorafit", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=7200, env=dict(os.environ))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.mark.heavy
def test_sft_then_dpo_learns_the_pairs_and_keeps_the_summaries(tmp_path: Path, embedded_default_run: Path) -> None:
    # the first command's run (`lorafit train`, shared with the other heavy tests) where it leaves it
    shutil.copytree(embedded_default_run, tmp_path / "output" / "lorafit-default")
    _lorafit(tmp_path, "train", "builtin:dpo", "--no-progress")
    records = [json.loads(line) for line in (tmp_path / "output" / "lorafit-dpo" / "metrics.jsonl").read_text()
               .splitlines()]
    evals = [r for r in records if "eval_loss" in r]
    assert evals[0]["eval_loss"] == pytest.approx(0.6931471805599453, abs=1e-5)  # the SFT adapter is the reference
    assert evals[-1]["eval_reward_accuracy"] >= 0.75 and evals[-1]["eval_reward_margin"] > 0, evals[-1]
    done = _lorafit(tmp_path, "eval", "output/lorafit-dpo", "--json", "--max-new-tokens", "48")
    result = json.loads(done.stdout)
    assert result["adapter"]["reward_accuracy"] == pytest.approx(evals[-1]["eval_reward_accuracy"], abs=1e-6)
    # what SFT taught is kept: the DPO adapter's summaries score about as the SFT adapter's do
    assert result["adapter"]["rougeL"] >= 0.9 * result["starting_adapter"]["rougeL"], result
