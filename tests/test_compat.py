"""lorafit.compat: each library internal is checked by running it, and a check can fail."""

from __future__ import annotations

import pytest

from lorafit import compat


@pytest.fixture
def fresh_probes():
    compat.check.cache_clear()
    yield
    compat.check.cache_clear()


@pytest.mark.parametrize("name", sorted(compat.INTERNALS))
def test_every_probe_passes_on_the_installed_libraries(name: str, fresh_probes) -> None:
    found = compat.check(name)
    assert found.ok, found.note
    package = compat.INTERNALS[name][0]
    assert found.note == f"{package} {compat.installed(package)}: probe passed"


def test_the_layout_probe_sees_what_its_fix_prevents(monkeypatch: pytest.MonkeyPatch, fresh_probes) -> None:
    """On a CPU with AVX512-BF16 bitsandbytes repacks a 4-bit weight at its first eval-mode forward,
    into a layout without backward: without lorafit's fix the probe finds wrong gradients."""
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("bitsandbytes repacks 4-bit CPU weights only on AVX512-BF16 CPUs")
    monkeypatch.setattr(compat, "keep_4bit_training_layout", lambda model: None)
    found = compat.check("bnb_cpu_training_layout")
    assert not found.ok and "wrong input gradients after an evaluation" in found.note


def test_a_probe_that_raises_is_a_failed_check(monkeypatch: pytest.MonkeyPatch, fresh_probes) -> None:
    def broken() -> None:
        raise AttributeError("module 'transformers.activations' has no attribute 'NewGELUActivation'")

    monkeypatch.setitem(compat._PROBES, "tanh_gelu_swap", broken)
    found = compat.check("tanh_gelu_swap")
    assert not found.ok
    assert found.note.endswith("the probe failed: AttributeError: module 'transformers.activations' has no "
                               "attribute 'NewGELUActivation'")
