"""Which library internals lorafit may rely on, by the versions it was checked against.

lorafit prefers public APIs. A few speed-ups and one CPU fix need a library's internals (BLOOM's
attention attributes, transformers' tanh-GELU classes, a bitsandbytes CPU flag). Each is listed
here with the range of versions whose source was read and whose equality tests passed; outside
that range lorafit takes the library's own code path and the run's log says so. The idea is
peft's ``import_utils``: gate on the version, never assume.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib.metadata import PackageNotFoundError, version

from packaging.version import Version


@dataclass(frozen=True)
class Internal:
    """One use of a library internal: the package and the inclusive range of checked versions."""

    package: str
    oldest: str
    newest: str
    what: str


# The newest version in each range is the one the suite runs on (.ci/run, main venv); the oldest
# is the floors venv's (.ci/run, torch 2.8 + pinned stack). A release outside the range falls back.
INTERNALS: dict[str, Internal] = {
    "bloom_sdpa_attention": Internal(
        "transformers", "5.24.0", "5.24.0",
        "BloomAttention's _reshape / query_key_value / dense / dropout attributes"),
    "tanh_gelu_swap": Internal(
        "transformers", "5.24.0", "5.24.0",
        "BloomGelu / NewGELUActivation / FastGELUActivation compute the tanh-approximated GELU"),
    "bnb_cpu_training_layout": Internal(
        "bitsandbytes", "0.50.2", "0.50.2",
        "Linear4bit.support_avx512bf16_for_cpu switches 4-bit CPU weights to a backward-less layout"),
    "fsdp_rank0_loading": Internal(
        "transformers", "5.24.0", "5.24.0",
        "from_pretrained(device_map={'': 'meta'}) builds the model without reading weights"),
    "fsdp_rank0_loading_torch": Internal(
        "torch", "2.8.0", "2.13.0",
        "module._parameters / _buffers set in place, then FSDP2's load_state_dict(assign=True) re-registers "
        "the DTensor shards"),
    "fsdp_rank0_loading_4bit": Internal(
        "bitsandbytes", "0.50.2", "0.50.2",
        "Params4bit / QuantState.as_dict / Linear4bit.quant_state under FSDP2"),
    "bnb_int8_cpu_autocast": Internal(
        "bitsandbytes", "0.50.2", "0.50.2",
        "the CPU int8 kernel multiplies int8 values as floats with torch.matmul, which fp16 autocast overflows"),
}


@cache
def installed(package: str) -> str | None:
    """The installed version of ``package``, or None."""
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def allowed(name: str) -> tuple[bool, str]:
    """Whether internal ``name`` may be used with the installed library, and a note saying why."""
    internal = INTERNALS[name]
    found = installed(internal.package)
    if found is None:
        return False, f"{internal.package} not installed"
    release = Version(Version(found).base_version)  # 2.13.0+cpu is 2.13.0 (local build labels aside)
    ok = Version(internal.oldest) <= release <= Version(internal.newest)
    checked = (internal.oldest if internal.oldest == internal.newest
               else f"{internal.oldest}..{internal.newest}")
    if ok:
        return True, f"{internal.package} {found} (checked: {checked})"
    return False, f"{internal.package} {found} is outside the checked {checked}: the library's own code runs"


def versions() -> dict[str, str | None]:
    """The versions that decide a run's numerics, for result.json and the run description."""
    import platform

    names = ("lorafit", "torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets",
             "safetensors")
    return {"python": platform.python_version(), **{n: installed(n) for n in names}}
