"""llama.cpp's own converter and quantizer, found (or fetched once) at the version lorafit pins.

Why not a converter of lorafit's own: llama.cpp defines GGUF and changes it (tensor names, new
metadata, tokenizer pre-types); its ``convert_hf_to_gguf.py`` is what every GGUF user relies on.
PyPI has no package of that script with its matching ``gguf-py``, but llama-cpp-python's source
distribution vendors the whole llama.cpp tree it builds, so the converter taken from the sdist of
the installed llama-cpp-python is exactly the llama.cpp that loads the file in the tests.

- ``pip install 'lorafit[gguf]'`` builds llama-cpp-python (the runtime and the quantizer).
- The converter files (two scripts, ``conversion/``, ``gguf-py/``) are extracted from that same
  sdist, fetched with pip, into ``<venv>/share/lorafit/`` (else lorafit's cache), once;
  ``LORAFIT_LLAMA_CPP`` points at a llama.cpp source folder of your own instead.
- The converter runs in a child interpreter (``_converter_main``): its ``gguf-py`` is newer than
  PyPI's ``gguf`` and must not meet the one this process may have imported.
"""

from __future__ import annotations

import ast
import contextlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from lorafit.errors import LorafitError
from lorafit.paths import cache_root

LLAMA_CPP_PYTHON = "0.3.36"  # the tested version; pyproject's gguf extra pins it
INSTALL_HINT = "pip install 'lorafit[gguf]'"
CONVERTER_ENV = "LORAFIT_LLAMA_CPP"
HF_SCRIPT = "convert_hf_to_gguf.py"
LORA_SCRIPT = "convert_lora_to_gguf.py"
_KEEP_FILES = {HF_SCRIPT, LORA_SCRIPT, "LICENSE"}
_KEEP_DIRS = ("conversion/", "gguf-py/gguf/")

# --quant values: written by the converter itself, or by llama.cpp's quantizer from a 16-bit GGUF
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")
QUANTIZER_TYPES = {
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
    "q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0", "q5_1": "LLAMA_FTYPE_MOSTLY_Q5_1",
    "q2_k": "LLAMA_FTYPE_MOSTLY_Q2_K", "q3_k_m": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
    "q4_k_s": "LLAMA_FTYPE_MOSTLY_Q4_K_S", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q5_k_s": "LLAMA_FTYPE_MOSTLY_Q5_K_S", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
}
QUANT_CHOICES = (*CONVERTER_TYPES, *QUANTIZER_TYPES)


class ToolError(LorafitError):
    """llama.cpp's converter or quantizer is missing, or failed."""


def llama_cpp_version() -> str | None:
    """The installed llama-cpp-python's version (None when it is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama_cpp_python")
    except PackageNotFoundError:
        return None


def _candidates(version: str) -> list[Path]:
    """Where a fetched converter lives: beside the environment's llama-cpp-python, else the cache."""
    name = f"llama.cpp-{version}"
    return [Path(sys.prefix) / "share" / "lorafit" / name, cache_root() / "tools" / name]


def _is_converter(folder: Path) -> bool:
    return (folder / HF_SCRIPT).is_file() and (folder / "gguf-py" / "gguf").is_dir()


def converter_dir(*, fetch: bool = True, log: Any = print) -> Path:
    """llama.cpp's converter folder: ``$LORAFIT_LLAMA_CPP``, else the one fetched for the installed
    llama-cpp-python (or the pinned version), fetched now if missing and ``fetch``."""
    explicit = os.environ.get(CONVERTER_ENV)
    if explicit:
        folder = Path(explicit).expanduser()
        if not _is_converter(folder):
            raise ToolError(f"{CONVERTER_ENV}={explicit}: no {HF_SCRIPT} with gguf-py/ there "
                            "(expected a llama.cpp source folder)")
        return folder
    version = llama_cpp_version() or LLAMA_CPP_PYTHON
    for folder in _candidates(version):
        if _is_converter(folder):
            return folder
    if not fetch:
        raise ToolError(f"llama.cpp's GGUF converter {version} is not installed: {INSTALL_HINT}, then "
                        f"python -m lorafit.llamacpp.tools")
    return fetch_converter(version, log=log)


def fetch_converter(version: str, *, log: Any = print) -> Path:
    """Extract the converter from llama-cpp-python's sdist (fetched with pip) into the first
    writable candidate folder; atomic, so an interrupted fetch leaves nothing half-written."""
    log(f"lorafit: fetching llama.cpp's GGUF converter (the llama-cpp-python {version} source "
        "distribution, with pip; once)")
    with tempfile.TemporaryDirectory(prefix="lorafit-llama-cpp-") as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                   "--disable-pip-version-check", "-q", "-d", tmp, f"llama-cpp-python=={version}"]
        done = subprocess.run(command, capture_output=True, text=True)
        archives = sorted(Path(tmp).glob("*.tar.gz"))
        if done.returncode != 0 or not archives:
            reason = _last_line(done.stderr) or "no source archive"
            raise ToolError(f"cannot fetch llama.cpp's GGUF converter (pip download llama-cpp-python=={version}: "
                            f"{reason}); with no network, set {CONVERTER_ENV} to a llama.cpp source folder")
        return install_converter(archives[0], version)


def install_converter(archive: Path, version: str) -> Path:
    """Unpack the converter files of a llama-cpp-python sdist into lorafit's tools folder."""
    last_error: OSError | None = None
    for target in _candidates(version):
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        except OSError as exc:  # a system Python's prefix is not writable: use the cache
            last_error = exc
            continue
        try:
            _extract(archive, staging)
            if not _is_converter(staging):
                raise ToolError(f"{archive.name}: no vendor/llama.cpp/{HF_SCRIPT} inside")
            if not target.exists():
                staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target
    raise ToolError(f"cannot write llama.cpp's converter anywhere ({last_error})")


def _extract(archive: Path, out: Path) -> None:
    """Only the converter's files, and only regular files under vendor/llama.cpp/ (no links)."""
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            parts = member.name.split("/", 1)
            inner = parts[1] if len(parts) == 2 else ""
            if not inner.startswith("vendor/llama.cpp/") or not member.isfile():
                continue
            relative = inner[len("vendor/llama.cpp/"):]
            if ".." in relative.split("/") or not (relative in _KEEP_FILES or relative.startswith(_KEEP_DIRS)):
                continue
            dest = out / relative
            dest.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(member)
            assert source is not None
            with source, dest.open("wb") as handle:
                shutil.copyfileobj(source, handle)


def supported_architectures(converter: Path) -> set[str]:
    """Architectures (``config.architectures`` names) the converter registers, read from its
    ``@ModelBase.register(...)`` decorators without importing it."""
    names: set[str] = set()
    files = [converter / HF_SCRIPT, *sorted((converter / "conversion").glob("*.py"))]
    for path in files:
        if not path.is_file():
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr == "register" and isinstance(node.func.value, ast.Name) \
                    and node.func.value.id == "ModelBase":
                names.update(a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str))
    return names


def run_converter(converter: Path, script: str, args: list[str], *, log: Any = print) -> None:
    """Run one of llama.cpp's converter scripts in a child interpreter; a failure is one line
    (the script's own last words). ``LORAFIT_DEBUG=1`` shows its whole log."""
    runner = Path(__file__).with_name("_converter_main.py")
    debug = os.environ.get("LORAFIT_DEBUG") == "1"
    # offline: the converter is handed local folders only, so nothing it calls may reach the Hub
    env = dict(os.environ, PYTHONIOENCODING="utf-8", TQDM_DISABLE="1", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, str(runner), str(converter), script, *args], env=env,
                          capture_output=not debug, text=True, encoding="utf-8", errors="replace")
    notes = [line for line in (done.stderr or "").splitlines() if line.startswith("lorafit:")]
    for note in notes:
        log(note)
    if done.returncode != 0:
        reason = _last_line(done.stderr or "") or f"exit code {done.returncode}"
        if "No module named 'sentencepiece'" in reason:
            reason += f" ({INSTALL_HINT})"
        raise ToolError(f"llama.cpp's {script} failed: {reason}")


def _last_line(text: str) -> str:
    """The last line that says something: an exception, or the converter's final error."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith(("ERROR:", "error:")) or ("Error" in line.split(":")[0] and ":" in line):
            return line[:300]
    return lines[-1][:300] if lines else ""


def quantize(source: Path, target: Path, quant: str) -> None:
    """Re-quantize a 16-bit GGUF with llama.cpp's quantizer (``llama_model_quantize``)."""
    llama_cpp = import_llama_cpp(f"--quant {quant}")
    ftype = getattr(llama_cpp, QUANTIZER_TYPES[quant], None)
    if ftype is None:
        raise ToolError(f"--quant {quant}: this llama-cpp-python ({llama_cpp_version()}) has no "
                        f"{QUANTIZER_TYPES[quant]}; {INSTALL_HINT}")
    import ctypes

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = os.cpu_count() or 1
    # llama.cpp logs every tensor through llama-cpp-python's callback, which prints to sys.stderr
    # (its level filter misreads this llama.cpp's levels, so the logger's level cannot quiet it):
    # kept for a failure's reason, shown with --debug
    log = io.StringIO()
    with contextlib.nullcontext() if os.environ.get("LORAFIT_DEBUG") == "1" else contextlib.redirect_stderr(log):
        code = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if code != 0 or not target.exists():
        reason = _last_line(log.getvalue())
        raise ToolError(f"llama.cpp's quantizer failed on {source.name} -> {quant} "
                        f"({reason or f'code {code}'})")


def import_llama_cpp(purpose: str) -> Any:
    """llama-cpp-python, or one line saying how to install it."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise ToolError(f"{purpose} needs llama.cpp's library (llama-cpp-python {LLAMA_CPP_PYTHON}): "
                        f"{INSTALL_HINT}") from exc
    return llama_cpp


def main(argv: list[str] | None = None) -> int:
    """``python -m lorafit.llamacpp.tools [SDIST]``: install the converter (for installers and CI)."""
    argv = sys.argv[1:] if argv is None else argv
    version = llama_cpp_version() or LLAMA_CPP_PYTHON
    folder = install_converter(Path(argv[0]), version) if argv else converter_dir()
    print(f"lorafit: llama.cpp's GGUF converter {version} is in {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
