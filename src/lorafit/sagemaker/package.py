"""The model folder a SageMaker endpoint serves: exactly what model.tar.gz holds.

    config.yaml, run.json, result.json,  the run's own (the format and template it trained with travel
    lorafit_template.json                 with it; the handler renders requests with them)
    adapter/                              the trained adapter and its tokenizer
    merged/                               --weights merged: the adapter folded into the base (safetensors)
    base/                                 --weights adapter with a local or builtin base: the base's files
                                          (a hub base is named instead and downloaded by the endpoint)
    code/inference.py                     the toolkit's hooks, imported from lorafit.sagemaker.handler
    code/lorafit/                         lorafit itself: the container cannot pip-install it
    code/requirements.txt                 lorafit's dependencies pinned to the versions installed here
    code/sitecustomize.py                 lorafit.sagemaker.toolkit_compat (the toolkit on transformers 5)
    code/lorafit-serving.json             the ServingSettings (weights, limits); deploy also sends them
                                          as the LORAFIT_SERVING environment variable

It is a lorafit run folder, so ``lorafit generate DIR`` reads it too. A training job writes the
same ``code/`` into its model.tar.gz (``write_code``), so a finished job can be deployed without
downloading or uploading anything when its archive already holds the weights to serve.

``lorafit.export`` (torch) is imported inside ``package_run``: the CLI and the SageMaker entry
import this module before the libraries are quieted.
"""

from __future__ import annotations

import json
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lorafit.data.template import TEMPLATE_FILE
from lorafit.errors import AdapterError, LorafitError
from lorafit.resolved import resolve_model_source
from lorafit.runs import locate_run
from lorafit.sagemaker import toolkit_compat
from lorafit.sagemaker.handler import BASE_DIR, MERGED_DIR, SETTINGS_FILE, ServingSettings
from lorafit.sagemaker.launcher import lorafit_files, requirements

CODE_DIR = "code"
RUN_FILES = ("config.yaml", "run.json", "result.json", TEMPLATE_FILE)
INFERENCE_SOURCE = '''"""The Hugging Face inference toolkit loads this file; lorafit (vendored beside it) serves the run."""
from lorafit.sagemaker.handler import input_fn, model_fn, predict_fn  # noqa: F401
'''


def default_weights(quantization: str) -> str:
    """merged for unquantized runs (faster, smaller: benchmarks/RESULTS.md); the adapter on its
    int8 / nf4 base for quantized ones, which serves exactly what was trained (a merged model
    re-quantized changes the weights the adapter learned against)."""
    return "merged" if quantization == "none" else "adapter"


def write_code(model_dir: Path, settings: ServingSettings, image_torch: str | None = None) -> Path:
    """``model_dir/code``: inference.py, vendored lorafit, requirements.txt, sitecustomize.py, settings."""
    code = model_dir / CODE_DIR
    code.mkdir(parents=True, exist_ok=True)
    (code / "inference.py").write_text(INFERENCE_SOURCE, encoding="utf-8")
    (code / "requirements.txt").write_text("\n".join(requirements(image_torch)) + "\n", encoding="utf-8")
    shutil.copyfile(toolkit_compat.__file__, code / "sitecustomize.py")
    (code / SETTINGS_FILE).write_text(json.dumps(settings.to_json(), indent=2) + "\n", encoding="utf-8")
    for path, name in lorafit_files():
        target = code / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return code


def run_folder(path: str | Path) -> Any:
    """The run behind ``path`` (a run folder: its config.yaml holds the template the endpoint renders)."""
    try:
        target = locate_run(path)
    except AdapterError as exc:
        raise LorafitError(f"RUN_OR_JOB: {exc}") from exc
    if target.run_dir is None or target.config is None:
        raise LorafitError(f"RUN_OR_JOB: {path} is an adapter without its run folder; deploy the run folder "
                           "(its config.yaml holds the format and template the endpoint must render)")
    return target


def package_run(path: str | Path, output: str | Path, settings: ServingSettings, *, merge_dtype: str | None,
                image_torch: str | None = None, echo: Callable[[str], None] = print) -> Path:
    """Write the model folder for the run at ``path`` into ``output`` (new or empty). ``merge_dtype``:
    the dtype merged weights are saved in (the serving dtype on the endpoint's device)."""
    from lorafit.export import check_output_dir, merge

    target = run_folder(path)
    out = Path(output).expanduser()
    check_output_dir(out, False, [target.run_dir])
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        shutil.copytree(target.adapter_dir, out / "adapter")
        for name in RUN_FILES:
            if (target.run_dir / name).exists():
                shutil.copy2(target.run_dir / name, out / name)
        if settings.weights == "merged":
            existing = target.run_dir / MERGED_DIR
            if (existing / "config.json").exists():
                shutil.copytree(existing, out / MERGED_DIR)
                echo(f"lorafit: merged weights: {existing} (merged by the training job)")
            else:
                merge(target.run_dir, out / MERGED_DIR, dtype=merge_dtype, log=lambda m: echo(m.removeprefix("lorafit: ")))
        else:
            source = resolve_model_source(settings.base or target.config.model.name_or_path)
            if source.kind == "hub":
                settings.base = source.name
                echo(f"lorafit: base {source.name}: from the hub, downloaded by the endpoint (private or gated: "
                     "--env HF_TOKEN=...)")
            else:
                _copy_model(Path(source.location), out / BASE_DIR)
                settings.base = BASE_DIR
        write_code(out, settings, image_torch)
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        else:
            for child in out.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        raise
    return out


def _copy_model(source: Path, target: Path) -> None:
    """A model folder's files (not caches or hidden files)."""
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts):
            (target / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target / relative)


def tar_folder(folder: Path, archive: Path) -> Path:
    """model.tar.gz of ``folder``'s contents (paths relative to it, as SageMaker unpacks them into
    /opt/ml/model); deterministic (sorted, no owners or times)."""
    with tarfile.open(archive, "w:gz", format=tarfile.PAX_FORMAT) as handle:
        for path in sorted(folder.rglob("*")):
            if not path.is_file():
                continue
            info = tarfile.TarInfo(path.relative_to(folder).as_posix())
            info.size, info.mode, info.mtime = path.stat().st_size, 0o644, 0
            with path.open("rb") as data:
                handle.addfile(info, data)
    return archive
