"""``precision: auto`` on a CPU: bf16 where the CPU has bf16 matrix units, fp32 elsewhere.

The choice comes from the CPU's reported capability (/proc/cpuinfo flags), is printed at the start
of a run and recorded in run.json, and keeps the held-out loss within the precision matrix's
bf16 tolerance of the fp32 run. ``LORAFIT_CPU_BF16`` pins the answer (conftest pins 0).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_run_config

from lorafit.config import validate_config
from lorafit.resolved import CPU_BF16_ENV, cpu_bf16_units, resolve_precision
from lorafit.training import train

SAPPHIRE_RAPIDS = "flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"
ZEN4 = "flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
ZEN3 = "flags\t\t: fpu sse2 avx2 fma\n"


def test_capability_read_from_the_cpu_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CPU_BF16_ENV, raising=False)
    assert cpu_bf16_units(SAPPHIRE_RAPIDS) == "amx_bf16"
    assert cpu_bf16_units(ZEN4) == "avx512_bf16"
    assert cpu_bf16_units(ZEN3) == ""
    assert cpu_bf16_units("processor\t: 0\nFeatures\t: fp asimd bf16\n") == ""  # not an x86 flags line
    monkeypatch.setenv(CPU_BF16_ENV, "0")
    assert cpu_bf16_units(SAPPHIRE_RAPIDS) == ""
    monkeypatch.setenv(CPU_BF16_ENV, "1")
    assert cpu_bf16_units(ZEN3) == f"{CPU_BF16_ENV}=1"


@pytest.mark.parametrize(("units", "model_dtype", "precision", "expected"), [
    (False, "auto", "auto", ("float32", "float32")),
    (True, "auto", "auto", ("bfloat16", "bfloat16")),
    (True, "float32", "fp32", ("float32", "float32")),  # asked for: fp32 wherever it runs
    (True, "auto", "fp32", ("bfloat16", "float32")),  # as on a bf16 GPU: bf16 weights, fp32 math
    (False, "auto", "bf16", ("float32", "bfloat16")),  # asked for on a CPU without units: as before
])
def test_auto_on_a_cpu_follows_its_bf16_units(units: bool, model_dtype: str, precision: str,
                                               expected: tuple[str, str]) -> None:
    got = resolve_precision(model_dtype, precision, device_kind="cpu", bf16_supported=True, cpu_bf16_units=units)
    assert (got.weights, got.compute) == expected


def test_auto_trains_in_bf16_on_a_cpu_with_bf16_units(tiny_llama: Path, dialogue_file: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    """As a user on an AMX / AVX-512 BF16 machine runs it: precision auto picks bf16, says so, and
    the held-out loss agrees with the fp32 run of the same model and data (bf16's tolerance in
    tests/test_precision_matrix.py)."""
    results = {}
    for units in ("0", "1"):
        monkeypatch.setenv(CPU_BF16_ENV, units)
        raw = tiny_run_config(tiny_llama, dialogue_file, tmp_path / f"units-{units}", max_steps=4, eval_steps=None)
        results[units] = train(validate_config(raw), progress=False)
    printed = capsys.readouterr().out
    assert f"precision auto: bf16 on this CPU ({CPU_BF16_ENV}=1" in printed
    fp32 = json.loads((tmp_path / "units-0" / "run.json").read_text())
    bf16 = json.loads((tmp_path / "units-1" / "run.json").read_text())
    assert fp32["precision"] == {"weights": "float32", "compute": "float32"}
    assert bf16["precision"] == {"weights": "bfloat16", "compute": "bfloat16"}
    assert bf16["environment"]["cpu_bf16_units"] == f"{CPU_BF16_ENV}=1"
    assert any("precision auto: bf16" in note for note in bf16["notes"])
    gap = abs(results["1"].first_eval_loss - results["0"].first_eval_loss) / results["0"].first_eval_loss
    assert gap < 2e-2, (results["1"].first_eval_loss, results["0"].first_eval_loss)
    assert results["1"].final_eval_loss < results["1"].first_eval_loss
