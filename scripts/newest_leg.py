"""CI's leg on the newest releases: a subset of the suite on what `pip install` resolves today.

    bash scripts/install.sh --newest && .venv-newest/bin/python scripts/newest_leg.py

Prints each library's version next to the tested one (constraints.txt; torch: the main venv's).
If tests fail, they run again on the same versions (a failure that does not repeat is named flaky);
if they fail again, it names the library: each library newer than the tested one is put back to the
tested version alone (pip, no dependencies) and the failed tests run again; a library whose
tested version makes them pass is the one that broke them. lorafit then adapts, or caps that
library in pyproject.toml with the reason.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ElementTree
from importlib.metadata import version
from pathlib import Path

from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
LIBRARIES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets")
# training, the precision matrix (one family per attention kind), FSDP over gloo, merge, resume,
# the probed library internals, and library output (lorafit.quiet)
SUBSET = ["tests/test_train.py", "tests/test_precision_matrix.py", "tests/test_fsdp.py", "tests/test_distributed.py",
          "tests/test_merge.py", "tests/test_resume.py", "tests/test_fused.py", "tests/test_compat.py",
          "tests/test_quiet.py", "tests/test_compile.py"]
MATRIX = "not (llama-chunk or llama-none or qwen2)"  # the matrix's llama-packed and bloom rows


def tested() -> dict[str, str]:
    """The versions the main suite runs on: constraints.txt, and install.sh's torch."""
    found = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", (ROOT / "constraints.txt").read_text(), re.M))
    found["torch"] = re.search(r"^torch_version=(\S+)", (ROOT / "scripts/install.sh").read_text(), re.M)[1]
    return found


def pytest(tests: list[str], report: Path, select: str | None = None) -> int:
    # the subset's main-suite tests, and the heavy ones marked for this leg (what newer libraries break first)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gguf and (not heavy or newest)",
               f"--junitxml={report}", *tests]
    return subprocess.run(command + (["-k", select] if select else []), cwd=ROOT).returncode


def failed(report: Path) -> list[str]:
    """Node ids of the failed tests in a JUnit report."""
    ids = []
    for case in ElementTree.parse(report).iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            path = case.get("classname", "").replace(".", "/") + ".py"
            ids.append(f"{path}::{case.get('name')}")
    return ids


def pip_install(requirement: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", requirement], check=True,
                   env={**os.environ, "PIP_CONSTRAINT": "/dev/null"})


def main() -> int:
    pins = tested()
    newer = []
    for name in LIBRARIES:
        now = version(name)
        was = pins.get(name)
        is_newer = was is not None and Version(Version(now).base_version) > Version(was)
        newer += [name] if is_newer else []
        print(f"newest leg: {name} {now} (tested: {was}){'  <- newer' if is_newer else ''}", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "report.xml"
        matrix = [t for t in SUBSET if "precision_matrix" in t]
        rest = [t for t in SUBSET if t not in matrix]
        code = pytest(rest, report)
        broken = failed(report) if code else []
        if pytest(matrix, report, MATRIX):
            broken += failed(report)
        if not broken:
            print("newest leg: passed", flush=True)
            return 0
        print(f"newest leg: {len(broken)} tests failed; running them again on the same versions", flush=True)
        if pytest(broken, report) == 0:
            # a failure that does not repeat names no library: blaming the first one downgraded
            # would send the next reader after the wrong release
            print("newest leg: the failed tests pass when run again on the same versions: flaky, "
                  "not a library (fix the test)", flush=True)
            return 1
        repeated = failed(report)  # only these can name a library; the others were flakes
        flaky = sorted(set(broken) - set(repeated))
        if flaky:
            print(f"newest leg: passed when run again (flaky, not a library): {', '.join(flaky)}", flush=True)
        broken = repeated
        print(f"newest leg: {len(broken)} fail again; finding the library that broke them", flush=True)
        blamed = []
        for name in (n for n in newer if n != "torch"):  # torch is a multi-GB download: named last
            now = version(name)
            pip_install(f"{name}=={pins[name]}")
            if pytest(broken, report) == 0:
                blamed.append(f"{name} {now} (the failed tests pass with {pins[name]})")
            pip_install(f"{name}=={now}")
        if blamed:
            print("newest leg: broken by " + "; ".join(blamed), flush=True)
        else:
            others = ", ".join(f"{n} {version(n)}" for n in newer) or "none"
            print(f"newest leg: no single library explains it (newer than tested: {others})", flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
