"""The in-container entry point: SageMaker's hyperparameters, channels and folders -> ``lorafit train``.

    python -m lorafit.sagemaker.entry --config lorafit.yaml --set train.max_steps=100
    python -m lorafit.sagemaker.entry --train.max_steps 100          # SageMaker's own style

What SageMaker provides, and where it goes:
- hyperparameters: command-line arguments; ``--section.key value`` and ``--set key=value`` both
  override config fields (values parsed as YAML, so ``True``/``100``/``[a, b]`` work). Arguments
  starting with ``b64:`` are decoded first (see ``hyperparameters.py``: values survive /bin/sh).
- ``SM_CHANNEL_TRAINING`` / ``SM_CHANNEL_TEST``: replace ``data.path`` / ``data.eval_path``;
  ``SM_CHANNEL_MODEL``: a base model uploaded by the launcher; ``SM_CHANNEL_ADAPTER``: the adapter
  the run continues from (``model.adapter``); ``SM_CHANNEL_CONFIG``: the config.
- checkpoints: ``output_dir`` becomes ``CHECKPOINT_DIR/run`` (``--checkpoint-dir``, else
  ``SM_CHECKPOINT_DIR``, else /opt/ml/checkpoints), which SageMaker syncs with S3; the training loop
  resumes from ``output_dir/checkpoints`` by itself (newest complete checkpoint), so a restarted
  spot job continues. The toolkit does not pass SIGTERM on to this process, so checkpoints are also
  saved every ``train.save_minutes`` (10 when the config leaves it unset), and with ``--max-run S``
  (the job's MaxRuntime) a last one is saved and the run stops before SageMaker would end it.
- ``SM_MODEL_DIR``: receives the run folder without checkpoints (adapter/, config.yaml, metrics,
  result.json) and, with ``--merge true``, merged/; SageMaker tars it into model.tar.gz.
- ``SM_HOSTS`` x ``SM_NUM_GPUS`` > 1 process: relaunched through torchrun; else in-process.
- ``SM_OUTPUT_DIR``: a failure (one-line error, or a stop before the end) is written to its
  ``failure`` file, which the toolkit leaves in place and SageMaker shows as the job's FailureReason.
Locally the same entry point runs with these variables set by hand.

torch-backed modules (training, distributed, export) are imported inside ``run`` and ``_merge``:
this module must import no ML library before ``main`` has quieted them (tests/test_quiet.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafit import quiet
from lorafit.config import config_path, load_config, read_yaml
from lorafit.data.sources import FILE_SUFFIXES
from lorafit.errors import ConfigError, DataError, LorafitError, first_line
from lorafit.runs import ADAPTER_CONFIG, ADAPTER_DIR, CONFIG_FILE, RESULT_FILE
from lorafit.sagemaker.handler import ServingSettings
from lorafit.sagemaker.hyperparameters import decode_argv
from lorafit.sagemaker.package import write_code

DEFAULT_CHECKPOINT_DIR = "/opt/ml/checkpoints"
DEFAULT_MODEL_DIR = "/opt/ml/model"
RUN_SUBDIR = "run"
CONFIG_FILE_IN_CHANNEL = "lorafit.yaml"
SAVE_MINUTES = 10.0  # train.save_minutes in a job when the config leaves it unset
DEADLINE_MARGIN_S = 300  # the last save starts this long before MaxRuntime (or 10% of it, if less)
FAILURE_FILE = "failure"
EXIT_DEADLINE = 124  # stopped before MaxRuntime, checkpoint saved (the timeout(1) convention)
_SECTIONS = ("model", "lora", "data", "train")
_EXPORTED_FILES = ("config.yaml", "metrics.jsonl", "result.json", "loss.png")


def _flag(value: str) -> bool:
    lowered = str(value).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def add_entry_arguments(parser: argparse.ArgumentParser) -> None:
    """The entry point's own options; dashes and SageMaker's underscores are both accepted."""
    parser.add_argument("--config", help="YAML config (default: SM_CHANNEL_CONFIG/lorafit.yaml, "
                                         "else the embedded default)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field (repeatable)")
    parser.add_argument("--checkpoint-dir", "--checkpoint_dir", dest="checkpoint_dir",
                        help="checkpoint folder (default: SM_CHECKPOINT_DIR, else /opt/ml/checkpoints)")
    parser.add_argument("--model-dir", "--model_dir", dest="model_dir",
                        help="where the adapter goes (default: SM_MODEL_DIR, else /opt/ml/model)")
    parser.add_argument("--base-model", "--base_model", dest="base_model",
                        help="base model name recorded in the exported adapter (the user's, not the container's path)")
    parser.add_argument("--merge", "--merge_model", dest="merge", type=_flag, default=False, metavar="BOOL",
                        help="also write the merged model to MODEL_DIR/merged")
    parser.add_argument("--distribution", choices=["auto", "torchrun", "none"], default="auto",
                        help="auto/torchrun: torchrun when SM_HOSTS x SM_NUM_GPUS > 1; none: one process")
    parser.add_argument("--max-run", "--max_run", dest="max_run", type=float, default=None, metavar="S",
                        help="the job's MaxRuntime in seconds: save a checkpoint and stop shortly before it")
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", type=_flag, nargs="?", const=True,
                        default=False, metavar="BOOL",
                        help="print the resolved config (JSON) and exit without training")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")


def hyperparameter_overrides(extra: list[str]) -> list[str]:
    """``--train.max_steps 100`` / ``--train.max_steps=100`` -> ``train.max_steps=100``."""
    overrides: list[str] = []
    index = 0
    while index < len(extra):
        item = extra[index]
        if not item.startswith("--") or len(item) == 2:
            raise ConfigError(f"hyperparameter {item!r}: expected --section.key VALUE")
        key, sep, value = item[2:].partition("=")
        if not sep:
            if index + 1 >= len(extra):
                raise ConfigError(f"hyperparameter --{key}: missing a value")
            value = extra[index + 1]
            index += 1
        index += 1
        section = key.split(".", 1)[0]
        if "." not in key or section not in _SECTIONS:
            raise ConfigError(f"unknown hyperparameter --{key} (config fields look like --train.max_steps; "
                              f"sections: {', '.join(_SECTIONS)})")
        overrides.append(f"{key}={value}")
    return overrides


@dataclass
class SageMakerEnv:
    """The SM_* variables the entry point reads, with the container's defaults."""

    model_dir: Path
    checkpoint_dir: Path
    training: Path | None
    test: Path | None
    model: Path | None
    config_channel: Path | None
    adapter: Path | None
    hosts: list[str]
    current_host: str
    num_gpus: int

    @classmethod
    def read(cls, args: argparse.Namespace, environ: dict[str, str] | None = None) -> SageMakerEnv:
        env = dict(os.environ if environ is None else environ)

        def channel(name: str) -> Path | None:
            value = env.get(f"SM_CHANNEL_{name}")
            return Path(value) if value else None

        try:
            hosts = json.loads(env.get("SM_HOSTS") or "[]") or []
        except json.JSONDecodeError as exc:
            raise ConfigError(f"SM_HOSTS: not a JSON list ({env.get('SM_HOSTS')!r})") from exc
        current = env.get("SM_CURRENT_HOST") or (hosts[0] if hosts else "localhost")
        try:
            gpus = int(env.get("SM_NUM_GPUS") or 0)
        except ValueError as exc:
            raise ConfigError(f"SM_NUM_GPUS: not a number ({env.get('SM_NUM_GPUS')!r})") from exc
        return cls(
            model_dir=Path(args.model_dir or env.get("SM_MODEL_DIR") or DEFAULT_MODEL_DIR),
            checkpoint_dir=Path(args.checkpoint_dir or env.get("SM_CHECKPOINT_DIR") or DEFAULT_CHECKPOINT_DIR),
            training=channel("TRAINING"),
            test=channel("TEST"),
            model=channel("MODEL"),
            config_channel=channel("CONFIG"),
            adapter=channel("ADAPTER"),
            hosts=[str(h) for h in hosts] or [current],
            current_host=current,
            num_gpus=max(gpus, 0),
        )

    @property
    def run_dir(self) -> Path:
        return self.checkpoint_dir / RUN_SUBDIR

    @property
    def is_master_host(self) -> bool:
        return self.current_host == self.hosts[0]


def channel_data(folder: Path, variable: str) -> str | list[str]:
    """The data inside a channel folder: a save_to_disk folder, one file, or a list of files."""
    if not folder.is_dir():
        raise DataError(f"{variable}: {folder} is not a folder")
    if (folder / "dataset_dict.json").exists() or (folder / "state.json").exists():
        return str(folder)
    entries = [p for p in sorted(folder.iterdir()) if not p.name.startswith(".")]
    files = [p for p in entries if p.is_file() and p.name.lower().endswith(FILE_SUFFIXES)]
    folders = [p for p in entries if p.is_dir()]
    if files:
        return str(files[0]) if len(files) == 1 else [str(p) for p in files]
    if len(folders) == 1:
        return channel_data(folders[0], variable)
    raise DataError(f"{variable}: no data files ({', '.join(FILE_SUFFIXES)}) in {folder}")


def build_config(args: argparse.Namespace, extra: list[str], env: SageMakerEnv) -> tuple[Any, str | None]:
    """The run's config: file < --set < hyperparameters < channels and SageMaker's folders.

    Returns (config, base_model): base_model is the name to record in the exported adapter when the
    model came from a channel (the container's path would mean nothing on the user's machine).
    """
    path = args.config
    if path is None and env.config_channel is not None and (env.config_channel / CONFIG_FILE_IN_CHANNEL).exists():
        path = str(env.config_channel / CONFIG_FILE_IN_CHANNEL)
    overrides = list(args.overrides) + hyperparameter_overrides(extra)
    raw = read_yaml(config_path(path))
    original_model = (raw.get("model") or {}).get("name_or_path") if isinstance(raw.get("model"), dict) else None
    if env.training is not None:
        overrides.append(f"data.path={json.dumps(channel_data(env.training, 'SM_CHANNEL_TRAINING'))}")
    if env.test is not None:
        overrides.append(f"data.eval_path={json.dumps(channel_data(env.test, 'SM_CHANNEL_TEST'))}")
    base_model = args.base_model
    if env.model is not None:
        if not env.model.is_dir():
            raise ConfigError(f"SM_CHANNEL_MODEL: {env.model} is not a folder")
        overrides.append(f"model.name_or_path={json.dumps(str(env.model))}")
        base_model = base_model or original_model
    if env.adapter is not None:
        overrides.append(f"model.adapter={json.dumps(str(env.adapter))}")
    overrides.append(f"output_dir={json.dumps(str(env.run_dir))}")
    config = load_config(path, overrides)
    if config.train.save_minutes is None:  # no SIGTERM reaches this process: save on a clock instead
        config.train.save_minutes = SAVE_MINUTES
    return config, base_model


def container_started_at(max_run: float, environ: dict[str, str] | None = None, now: float | None = None) -> float:
    """When this job's clock started, as best the container can tell: the start of PID 1 (the
    container's first process; pip and the toolkit ran before this script) when running under the
    toolkit (SM_TRAINING_ENV set) and that start is plausible, else this process's start."""
    env = os.environ if environ is None else environ
    now = time.time() if now is None else now
    if "SM_TRAINING_ENV" in env:
        started = _process_start(1)
        if started is not None and now - max_run < started <= now:
            return started
    return _process_start(os.getpid()) or now


def _process_start(pid: int) -> float | None:
    """A process's start as time.time(), from /proc (Linux); None where that cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, starttime, after the command name
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def job_deadline(max_run: float, started: float) -> float:
    """When to save and stop: ``DEADLINE_MARGIN_S`` (or a tenth of a short MaxRuntime) before the end."""
    return started + max_run - min(DEADLINE_MARGIN_S, 0.1 * max_run)


def write_failure(message: str, environ: dict[str, str] | None = None) -> Path | None:
    """``SM_OUTPUT_DIR/failure``: SageMaker reports its first 1024 characters as FailureReason.

    The toolkit writes this file only when it does not exist yet, so the first message (ours,
    naming the field or file) is the one the job shows instead of ``ExecuteUserScriptError``.
    """
    folder = (os.environ if environ is None else environ).get("SM_OUTPUT_DIR")
    if not folder:
        return None
    path = Path(folder) / FAILURE_FILE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("x", encoding="utf-8") as handle:  # the first failure wins, as in the toolkit
            handle.write(message[:1024])
    except FileExistsError:
        pass
    except OSError:
        return None
    return path


def _job_name() -> str:
    return os.environ.get("TRAINING_JOB_NAME") or os.environ.get("SAGEMAKER_JOB_NAME") or "JOB"


def _stop_message(stopped_by: str, steps: int, max_steps: int, run_dir: Path) -> str:
    why = "MaxRuntime was near" if stopped_by == "deadline" else f"{stopped_by} was received"
    return (f"stopped at step {steps} of {max_steps} because {why}; checkpoint saved in "
            f"{run_dir}/checkpoints. Continue with: lorafit sagemaker launch CONFIG ... "
            f"--resume-from {_job_name()}")


def _torchrun_command(env: SageMakerEnv, argv: list[str]) -> list[str]:
    nproc = max(env.num_gpus, 1)
    if len(env.hosts) > 1:
        nodes = [f"--nnodes={len(env.hosts)}", f"--node_rank={env.hosts.index(env.current_host)}",
                 f"--master_addr={env.hosts[0]}", "--master_port=29500"]
    else:
        nodes = ["--standalone"]
    return [sys.executable, "-m", "torch.distributed.run", *nodes, f"--nproc_per_node={nproc}",
            "-m", "lorafit.sagemaker.entry", *argv]


def _argv(args: argparse.Namespace, extra: list[str], config_path: str | None) -> list[str]:
    """The same run for the torchrun children (with the paths already resolved)."""
    argv = [f"--config={config_path}"] if config_path else []
    argv += [f"--set={item}" for item in args.overrides]
    for name in ("checkpoint_dir", "model_dir", "base_model", "max_run"):
        if getattr(args, name):
            argv.append(f"--{name.replace('_', '-')}={getattr(args, name)}")
    return argv + list(extra)


def export_run(run_dir: Path, model_dir: Path, base_model: str | None = None, merge: bool = False) -> Path:
    """Copy the finished run (not its checkpoints) into SM_MODEL_DIR; optionally add the merged model."""
    adapter = run_dir / ADAPTER_DIR
    if not (adapter / ADAPTER_CONFIG).exists():
        raise LorafitError(f"{adapter}: no adapter was written; nothing to export")
    model_dir.mkdir(parents=True, exist_ok=True)
    shutil.copytree(adapter, model_dir / ADAPTER_DIR, dirs_exist_ok=True)
    for name in _EXPORTED_FILES:
        if (run_dir / name).exists():
            shutil.copy2(run_dir / name, model_dir / name)
    if base_model:
        _record_base_model(model_dir, base_model)
    if merge:
        _merge(run_dir, model_dir / "merged")
    _write_serving_code(model_dir, merge)
    return model_dir


def _write_serving_code(model_dir: Path, merged: bool) -> None:
    """code/ for an endpoint (``lorafit.sagemaker.package``), so ``lorafit sagemaker deploy JOB`` can
    serve this model.tar.gz as it is; deploy sends the settings it checked in LORAFIT_SERVING."""
    write_code(model_dir, ServingSettings(weights="merged" if merged else "adapter"))


def _record_base_model(model_dir: Path, base_model: str) -> None:
    """Point the exported adapter and config at the user's base model name, not the container path."""
    import yaml

    adapter_config = model_dir / ADAPTER_DIR / ADAPTER_CONFIG
    data = json.loads(adapter_config.read_text(encoding="utf-8"))
    data["base_model_name_or_path"] = base_model
    adapter_config.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    config_file = model_dir / CONFIG_FILE
    if config_file.exists():
        config = yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}
        config.setdefault("model", {})["name_or_path"] = base_model
        config_file.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")


def _merge(run_dir: Path, target: Path) -> None:
    """The merged model (base + adapter), made from the run folder, whose config names the base
    as the container sees it (SM_CHANNEL_MODEL or a hub id)."""
    from lorafit.export import merge

    merge(run_dir, target, overwrite=True)


def run(args: argparse.Namespace, extra: list[str]) -> int:
    """Train (or resume) per the SageMaker environment, then export to SM_MODEL_DIR."""
    env = SageMakerEnv.read(args)
    config, base_model = build_config(args, extra, env)
    if args.max_run is not None and args.max_run <= 0:
        raise ConfigError(f"--max-run: must be a positive number of seconds (got {args.max_run:g})")
    deadline = job_deadline(args.max_run, container_started_at(args.max_run)) if args.max_run else None
    if args.dry_run:
        print(json.dumps({"config": config.model_dump(mode="json"), "base_model": base_model,
                          "deadline": deadline, "run_dir": str(env.run_dir)}), flush=True)
        return 0
    under_torchrun = "LOCAL_RANK" in os.environ
    processes = len(env.hosts) * max(env.num_gpus, 1)
    distributed = args.distribution != "none" and (processes > 1 or args.distribution == "torchrun")
    finished = (env.run_dir / RESULT_FILE).exists()
    if finished and not under_torchrun:
        print(f"lorafit: the run in {env.run_dir} already finished; exporting it", flush=True)
    elif distributed and not under_torchrun:
        config_path = args.config or (str(env.config_channel / CONFIG_FILE_IN_CHANNEL)
                                      if env.config_channel is not None else None)
        command = _torchrun_command(env, _argv(args, extra, config_path))
        print(f"lorafit: {processes} processes on {len(env.hosts)} host(s): {' '.join(command[1:])}", flush=True)
        from lorafit.distributed import run_launcher

        code = run_launcher(command)
        if code != 0:
            write_failure(f"training processes exited with code {code}; see the job's log "
                          f"(lorafit sagemaker logs {_job_name()})")
            return code
    else:
        from lorafit.training import train

        # plain lines: what SageMaker's metric regexes read
        result = train(config, resume=True, log_format="plain", deadline=deadline)
        if result.stopped_by:
            message = _stop_message(result.stopped_by, result.steps, result.max_steps, env.run_dir)
            print(f"lorafit: {message}", flush=True)
            write_failure(message)
            if result.stopped_by == "deadline":
                return EXIT_DEADLINE
            return 128 + int(getattr(signal, result.stopped_by))
        if under_torchrun:
            return 0  # the launching process exports, once, after every rank is done
    if not env.is_master_host:
        return 0
    exported = export_run(env.run_dir, env.model_dir, base_model, args.merge)
    print(f"lorafit: exported the adapter to {exported}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m lorafit.sagemaker.entry``: one-line errors with exit code 2, like the CLI. Nothing
    above imports torch: tqdm, which torch imports, reads lorafit.quiet's settings once, on import."""
    argv = sys.argv[1:] if argv is None else argv
    quiet.configure(debug=any(item == "--debug" or item.startswith("--debug=") for item in argv))
    parser = argparse.ArgumentParser(prog="python -m lorafit.sagemaker.entry", description=__doc__.splitlines()[0],
                                     allow_abbrev=False, exit_on_error=False)
    add_entry_arguments(parser)
    try:
        args, extra = parser.parse_known_args(decode_argv(argv))
    except (ConfigError, argparse.ArgumentError) as exc:  # e.g. a hyperparameter typed in the console
        print(f"error: {exc}", file=sys.stderr)
        write_failure(f"error: {exc}")
        return 2
    try:
        return run(args, extra)
    except LorafitError as exc:
        if args.debug:
            import traceback

            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        write_failure(f"error: {exc}")
        return exc.exit_code
    except Exception as exc:  # e.g. CUDA out of memory: the traceback follows on stderr
        write_failure(f"{type(exc).__name__}: {first_line(exc)}")
        raise


if __name__ == "__main__":
    sys.exit(main())
