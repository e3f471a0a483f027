"""The in-container entry point, run locally with the SM_* variables pointing at temporary folders.

A real short training run laid out as the launcher lays out a job (config, data, eval and model
channels; SageMaker-style hyperparameters), then simulated restarts: a fresh container whose
checkpoint folder holds only the step-2 checkpoint, and one container stopped before MaxRuntime,
killed (as a spot interruption does: no signal reaches the script) and restored with a half-uploaded
newest checkpoint; each continues and ends bit-identical. The image's own toolkit code
(sagemaker-training, sagemaker-pytorch-training from PyPI) runs the entry to show what the job's
FailureReason says and that hyperparameters survive its command line.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import yaml
from conftest import tiny_run_config, write_jsonl
from safetensors.torch import load_file

from lorafit.sagemaker import entry

STEPS = 4


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> dict[str, Path]:
    """Channel folders as SageMaker fills them from S3 (/opt/ml/input/data/<channel>/)."""
    from lorafit.builtin.dialogues import generate

    channels = tmp_path_factory.mktemp("sm-job") / "input" / "data"
    for name in ("training", "test", "config"):
        (channels / name).mkdir(parents=True)
    write_jsonl(channels / "training" / "dialogues.jsonl", generate(64, 11))
    write_jsonl(channels / "test" / "held-out.jsonl", generate(8, 5))
    raw = tiny_run_config(Path("/where/the/user/had/it"), Path("/user/data.jsonl"), Path("/user/out"),
                          max_steps=50, save_steps=2, eval_steps=2)
    raw["model"]["name_or_path"] = "my-org/tiny-llama"
    (channels / "config" / "lorafit.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    return {"training": channels / "training", "test": channels / "test", "config": channels / "config",
            "model": tiny_llama}


def sm_env(job: dict[str, Path], model_dir: Path, checkpoint_dir: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", SM_MODEL_DIR=str(model_dir), SM_CHECKPOINT_DIR=str(checkpoint_dir),
               SM_CHANNEL_TRAINING=str(job["training"]), SM_CHANNEL_TEST=str(job["test"]),
               SM_CHANNEL_CONFIG=str(job["config"]), SM_CHANNEL_MODEL=str(job["model"]),
               SM_HOSTS='["algo-1"]', SM_CURRENT_HOST="algo-1", SM_NUM_GPUS="0")
    env.update(extra)
    for name in ("LOCAL_RANK", "RANK", "WORLD_SIZE"):
        env.pop(name, None)
    return env


def run(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def eval_losses(folder: Path) -> list[float]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["eval_loss"] for line in lines if "eval_loss" in json.loads(line)]


@pytest.fixture(scope="module")
def first_run(job: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The job as launched: hyperparameters exactly as the SageMaker toolkit passes them."""
    root = tmp_path_factory.mktemp("sm-first")
    model_dir, checkpoint_dir = root / "model", root / "checkpoints"
    hyperparameters = ["--config", str(job["config"] / "lorafit.yaml"), "--checkpoint_dir", str(checkpoint_dir),
                       "--base_model", "my-org/tiny-llama", "--train.max_steps", str(STEPS)]
    done = run([sys.executable, "-m", "lorafit.sagemaker.entry", *hyperparameters],
               sm_env(job, model_dir, root / "unused"))
    return {"model": model_dir, "checkpoints": checkpoint_dir, "stdout": done.stdout}


def test_train_and_export_to_model_dir(job: dict[str, Path], first_run: dict) -> None:
    model_dir, checkpoint_dir = first_run["model"], first_run["checkpoints"]
    assert "resuming" not in first_run["stdout"]
    checkpoints = checkpoint_dir / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-0000002", "step-0000004"]
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "config.yaml",
                 "metrics.jsonl", "result.json"):
        assert (model_dir / name).is_file(), name
    assert not (model_dir / "checkpoints").exists()  # checkpoints stay out of model.tar.gz
    # an endpoint's serving code, so `lorafit sagemaker deploy JOB` serves the archive as it is
    assert (model_dir / "code" / "inference.py").is_file() and (model_dir / "code" / "lorafit" / "generation.py").is_file()
    assert json.loads((model_dir / "code" / "lorafit-serving.json").read_text())["weights"] == "adapter"
    result = json.loads((model_dir / "result.json").read_text())
    assert result["steps"] == STEPS and result["output_dir"] == str(checkpoint_dir / "run")
    adapter_config = json.loads((model_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "my-org/tiny-llama"  # not the container's path
    exported = yaml.safe_load((model_dir / "config.yaml").read_text())
    assert exported["model"]["name_or_path"] == "my-org/tiny-llama"
    assert exported["data"]["path"] == str(job["training"] / "dialogues.jsonl")
    assert exported["data"]["eval_path"] == str(job["test"] / "held-out.jsonl")
    assert exported["train"]["max_steps"] == STEPS
    from lorafit.runs import locate_run

    assert locate_run(model_dir).base_model == "my-org/tiny-llama"


def test_spot_restart_resumes_from_the_checkpoint_folder(job: dict[str, Path], first_run: dict,
                                                         tmp_path: Path) -> None:
    # a fresh container; the checkpoint folder restored from S3 as it was at step 2
    model_dir, checkpoint_dir = tmp_path / "model", tmp_path / "checkpoints"
    (checkpoint_dir / "run" / "checkpoints").mkdir(parents=True)
    shutil.copytree(first_run["checkpoints"] / "run" / "checkpoints" / "step-0000002",
                    checkpoint_dir / "run" / "checkpoints" / "step-0000002")
    done = run([sys.executable, "-m", "lorafit", "sagemaker", "train", "--set", f"train.max_steps={STEPS}",
                "--base-model", "my-org/tiny-llama"],  # config from SM_CHANNEL_CONFIG, folders from SM_*
               sm_env(job, model_dir, checkpoint_dir))
    assert f"resuming from {checkpoint_dir / 'run' / 'checkpoints' / 'step-0000002'}" in done.stdout
    a = load_file(str(first_run["model"] / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(model_dir / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        assert a[key].equal(b[key]), key
    assert json.loads((model_dir / "result.json").read_text())["resumed_from"].endswith("step-0000002")

    # restarted once more after it had finished: nothing is retrained, the export is redone,
    # this time with the merged model as well (hyperparameter merge=true)
    again = tmp_path / "model-again"
    can_merge = importlib.util.find_spec("lorafit.export") is not None
    old = dict(os.environ)
    try:
        os.environ.update(sm_env(job, again, checkpoint_dir))
        code = entry.main(["--base_model", "my-org/tiny-llama", "--merge", str(can_merge)])
    finally:
        os.environ.clear()
        os.environ.update(old)
    assert code == 0
    assert load_file(str(again / "adapter" / "adapter_model.safetensors")).keys() == b.keys()
    if not can_merge:
        return
    merged = again / "merged"
    assert (merged / "config.json").is_file()
    weights = {}
    for shard in merged.glob("*.safetensors"):
        weights.update(load_file(str(shard)))
    assert weights and not any("lora" in k for k in weights)  # a plain model: the adapter is folded in
    base = load_file(str(job["model"] / "model.safetensors"))
    changed = [k for k in base if k in weights and not base[k].equal(weights[k])]
    assert changed and all(("q_proj" in k or "v_proj" in k or "k_proj" in k or "o_proj" in k) for k in changed)


def test_two_processes_go_through_torchrun(job: dict[str, Path], first_run: dict, tmp_path: Path) -> None:
    """SM_NUM_GPUS=2: two data-parallel ranks (gloo on CPU); batch 2 x 2 ranks = batch 4 x 1 process."""
    model_dir = tmp_path / "model"
    done = run([sys.executable, "-m", "lorafit.sagemaker.entry", "--train.max_steps", str(STEPS),
                "--train.batch_size", "2"],
               sm_env(job, model_dir, tmp_path / "checkpoints", SM_NUM_GPUS="2"))
    assert "2 processes on 1 host(s)" in done.stdout and "--nproc_per_node=2" in done.stdout
    # every rank's output is lorafit's own, from the first line (the job's CloudWatch log)
    lines = (done.stdout + done.stderr).splitlines()
    assert [line for line in lines if line.strip() and not line.startswith("lorafit: ")] == [], lines[:20]
    assert json.loads((model_dir / "result.json").read_text())["steps"] == STEPS
    assert len(eval_losses(model_dir)) == 3
    assert eval_losses(model_dir) == pytest.approx(eval_losses(first_run["model"]), rel=1e-4)


# ---------------------------------------------------------------------------- fast, in-process
def test_hyperparameters_both_styles() -> None:
    assert entry.hyperparameter_overrides(["--train.max_steps", "100", "--lora.r=16", "--train.lr", "1e-4"]) == \
        ["train.max_steps=100", "lora.r=16", "train.lr=1e-4"]
    for bad, message in ((["--epochs", "3"], "unknown hyperparameter --epochs"),
                         (["--train.max_steps"], "missing a value"),
                         (["stray"], "expected --section.key VALUE")):
        with pytest.raises(entry.LorafitError, match=message):
            entry.hyperparameter_overrides(bad)


def test_channels_and_folders_override_the_config(tmp_path: Path) -> None:
    (tmp_path / "training").mkdir()
    write_jsonl(tmp_path / "training" / "b.jsonl", [{"dialogue": "x", "summary": "y"}])
    write_jsonl(tmp_path / "training" / "a.jsonl", [{"dialogue": "x", "summary": "y"}])
    saved = tmp_path / "test" / "my-dataset"
    saved.mkdir(parents=True)
    (saved / "dataset_dict.json").write_text("{}")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"data": {"path": "elsewhere.jsonl"}, "output_dir": "/somewhere"}))
    environ = {"SM_CHANNEL_TRAINING": str(tmp_path / "training"), "SM_CHANNEL_TEST": str(tmp_path / "test"),
               "SM_MODEL_DIR": str(tmp_path / "model"), "SM_CHECKPOINT_DIR": str(tmp_path / "ckpt"),
               "SM_HOSTS": '["algo-1", "algo-2"]', "SM_CURRENT_HOST": "algo-2", "SM_NUM_GPUS": "4"}
    parser = entry.argparse.ArgumentParser()
    entry.add_entry_arguments(parser)
    args, extra = parser.parse_known_args(["--config", str(config), "--train.max_steps", "7"])
    env = entry.SageMakerEnv.read(args, environ)
    assert env.hosts == ["algo-1", "algo-2"] and not env.is_master_host and env.num_gpus == 4
    config_obj, base_model = entry.build_config(args, extra, env)
    assert config_obj.data.path == [str(tmp_path / "training" / "a.jsonl"), str(tmp_path / "training" / "b.jsonl")]
    assert config_obj.data.eval_path == str(saved)
    assert config_obj.output_dir == str(tmp_path / "ckpt" / "run")
    assert config_obj.train.max_steps == 7 and base_model is None
    command = entry._torchrun_command(env, ["--train.max_steps=7"])
    assert command[-3:] == ["-m", "lorafit.sagemaker.entry", "--train.max_steps=7"]
    assert {"--nnodes=2", "--node_rank=1", "--master_addr=algo-1", "--nproc_per_node=4"} <= set(command)
    # the default locations when nothing is set
    defaults = entry.SageMakerEnv.read(parser.parse_known_args([])[0], {})
    assert defaults.checkpoint_dir == Path("/opt/ml/checkpoints") and defaults.model_dir == Path("/opt/ml/model")
    assert defaults.hosts == ["localhost"] and defaults.is_master_host


def test_entry_errors_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("SM_CHANNEL_TRAINING", str(tmp_path / "empty"))
    monkeypatch.setenv("SM_CHECKPOINT_DIR", str(tmp_path / "ckpt"))
    monkeypatch.setenv("SM_OUTPUT_DIR", str(tmp_path / "output"))
    assert entry.main([]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: SM_CHANNEL_TRAINING: no data files (.jsonl, .json, .csv, .parquet) in {tmp_path / 'empty'}"
    assert (tmp_path / "output" / "failure").read_text() == err  # the job's FailureReason
    monkeypatch.delenv("SM_OUTPUT_DIR")
    monkeypatch.delenv("SM_CHANNEL_TRAINING")
    assert entry.main(["--epochs", "3"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: unknown hyperparameter --epochs")
    assert entry.main(["--merge", "maybe"]) == 2
    assert capsys.readouterr().err.strip() == ("error: argument --merge/--merge_model: expected true or false, "
                                               "got 'maybe'")


def adapters_equal(a_dir: Path, b_dir: Path) -> None:
    a = load_file(str(a_dir / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(b_dir / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        assert a[key].equal(b[key]), key


def test_stopped_killed_and_half_restored_job_ends_equal(job: dict[str, Path], first_run: dict,
                                                          tmp_path: Path) -> None:
    """One job's container life: stopped before MaxRuntime, restarted and killed by a spot
    interruption, restored with its newest checkpoint half uploaded; it ends as the uninterrupted run."""
    from lorafit import checkpoint as ckpt

    model_dir, checkpoint_dir, output = tmp_path / "model", tmp_path / "checkpoints", tmp_path / "output"
    folder = checkpoint_dir / "run" / "checkpoints"
    env = sm_env(job, model_dir, checkpoint_dir, SM_OUTPUT_DIR=str(output))
    entry_command = [sys.executable, "-m", "lorafit.sagemaker.entry", "--base_model", "my-org/tiny-llama",
                     "--train.max_steps", str(STEPS)]

    # MaxRuntime 1 s: the deadline (0.9 s after the process started) has passed after the first step
    done = subprocess.run([*entry_command, "--max_run", "1"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == entry.EXIT_DEADLINE, done.stdout[-2000:] + done.stderr[-2000:]
    reason = (output / "failure").read_text()
    assert reason.startswith(f"stopped at step 1 of {STEPS} because MaxRuntime was near; checkpoint saved in "
                             f"{checkpoint_dir / 'run'}/checkpoints. Continue with: lorafit sagemaker launch ")
    assert f"lorafit: {reason}" in done.stdout
    assert [p.name for p in ckpt.list_checkpoints(folder)] == ["step-0000001"]
    assert not model_dir.exists()  # nothing exported: the job is not done
    (output / "failure").unlink()

    # restarted, then a spot interruption: SIGKILL (the toolkit passes no SIGTERM on) once a timed
    # checkpoint after the restart exists
    process = subprocess.Popen([*entry_command, "--train.save_minutes", "1e-6"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (folder / "step-0000002").exists():
        assert process.poll() is None, "finished before it could be interrupted"
        assert time.time() < deadline
        time.sleep(0.005)
    process.kill()
    process.wait()
    assert not (checkpoint_dir / "run" / "result.json").exists()
    newest = ckpt.latest_checkpoint(folder)
    assert newest is not None and 2 <= ckpt.checkpoint_step(newest) < STEPS

    # the next container gets the folder back from S3 with the newest checkpoint half uploaded
    half = folder / ckpt.checkpoint_name(ckpt.checkpoint_step(newest) + 1)
    shutil.copytree(newest, half)
    optimizer = half / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    done = run(entry_command, env)
    assert f"checkpoint {half} is incomplete (optimizer.pt is unreadable" in done.stdout
    assert f"resuming from {newest}" in done.stdout
    adapters_equal(first_run["model"], model_dir)
    assert json.loads((model_dir / "result.json").read_text())["steps"] == STEPS
    assert not (output / "failure").exists()


def test_failure_reason_through_the_toolkit(job: dict[str, Path], tmp_path: Path) -> None:
    """The Hugging Face image runs ``train``: sagemaker-training's trainer calls sagemaker-pytorch-training's
    main, which runs the entry with ``capture_error=True`` (process.check_error). The failure file
    the entry writes is what the job's FailureReason shows; the toolkit keeps it."""
    from lorafit.config import load_config
    from lorafit.sagemaker.launcher import (
        PROGRAM,
        LaunchOptions,
        job_hyperparameters,
        source_archive,
    )

    base = tmp_path / "ml"  # SAGEMAKER_BASE_DIR: the toolkit's /opt/ml
    data = base / "input" / "data"
    (data / "training").mkdir(parents=True)
    write_jsonl(data / "training" / "rows.jsonl", [{"dialogue": "A: hi"}, {"dialogue": "B: yo"}, {"text": "x"}])
    shutil.copytree(job["config"], data / "config")
    (data / "model").symlink_to(job["model"])
    source = tmp_path / "source"  # sourcedir.tar.gz as uploaded, without requirements.txt: no pip here
    with tarfile.open(fileobj=io.BytesIO(source_archive()), mode="r:gz") as archive:
        archive.extractall(source, filter="data")
    (source / "requirements.txt").unlink()
    config = load_config(job["config"] / "lorafit.yaml")
    hyperparameters = job_hyperparameters(LaunchOptions(None, "arn:aws:iam::123456789012:role/R", "ml.g5.2xlarge"),
                                          config, "lorafit-fails", "us-east-1", str(source))
    settings = base / "input" / "config"
    settings.mkdir(parents=True)
    (settings / "hyperparameters.json").write_text(json.dumps(hyperparameters))
    (settings / "resourceconfig.json").write_text(json.dumps({"current_host": "algo-1", "hosts": ["algo-1"]}))
    (settings / "inputdataconfig.json").write_text(json.dumps(
        {name: {"TrainingInputMode": "File"} for name in ("training", "config", "model")}))
    env = dict(os.environ, SAGEMAKER_BASE_DIR=str(base), SM_STUDIO_LOCAL_MODE="true",  # no DNS wait for algo-1
               SAGEMAKER_TRAINING_MODULE="sagemaker_pytorch_container.training:main",
               SM_CHECKPOINT_DIR=str(tmp_path / "checkpoints"), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "sagemaker_training.cli.train"], env=env, capture_output=True,
                          text=True, timeout=600)
    log = done.stdout + done.stderr
    assert done.returncode == 1, log[-3000:]
    assert (base / "code" / PROGRAM).is_file()  # the toolkit installed and ran the uploaded program
    reason = (base / "output" / "failure").read_text()
    assert reason == ("error: data.path: all 3 rows are bad: rows.jsonl line 1 missing 'summary', "
                      "rows.jsonl line 2 missing 'summary', rows.jsonl line 3 looks like a text row (text), but the "
                      "data is summarization (dialogue, summary)")
    assert reason in log  # the entry's own stderr line, in the job's log
    assert "ExecuteUserScriptError" in log  # the toolkit's error, whose empty ErrorMessage no longer matters


def test_hyperparameters_survive_the_toolkit_command_line(job: dict[str, Path], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The toolkit's own code builds the command: hyperparameters.json -> read_hyperparameters ->
    Environment.to_cmd_args -> ProcessRunner._create_command. Toolkits up to 5.1.2 join it with spaces
    and run it through /bin/sh (process.run_async); later ones run the argument vector."""
    from sagemaker_training import environment, process

    from lorafit.config import load_config
    from lorafit.sagemaker.launcher import (
        PROGRAM,
        PROGRAM_SOURCE,
        LaunchOptions,
        job_hyperparameters,
    )

    awkward = "/home/me/My Models/llama $(touch pwned) `touch pwned` 'single' \"double\" ;&| * ~ #x b64:y"
    config = load_config(job["config"] / "lorafit.yaml", [f"model.name_or_path={json.dumps(awkward)}"])
    options = LaunchOptions(None, "arn:aws:iam::123456789012:role/R", "ml.g5.2xlarge", max_runtime=3600, merge=True)
    hyperparameters = job_hyperparameters(options, config, "lorafit-shell", "us-east-1", "s3://bucket/source.tar.gz")
    hyperparameters["dry_run"] = "true"  # the entry prints what it received instead of training
    path = tmp_path / "hyperparameters.json"
    path.write_text(json.dumps(hyperparameters))
    monkeypatch.setattr(environment, "hyperparameters_file_dir", str(path))
    toolkit_env = environment.Environment(resource_config={"current_host": "algo-1", "hosts": ["algo-1"]},
                                          input_data_config={}, hyperparameters=environment.read_hyperparameters())
    command = process.ProcessRunner(PROGRAM, toolkit_env.to_cmd_args(), toolkit_env.to_env_vars(), 1)._create_command()
    assert command[-len(toolkit_env.to_cmd_args()) - 1] == PROGRAM
    code = tmp_path / "code"
    code.mkdir()
    (code / PROGRAM).write_text(PROGRAM_SOURCE)
    env = sm_env(job, tmp_path / "model", tmp_path / "checkpoints")
    for how in (["/bin/sh", "-c", " ".join(command)], command):
        done = subprocess.run(how, cwd=code, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        printed = json.loads(done.stdout.strip().splitlines()[-1])
        assert printed["base_model"] == awkward
        assert printed["config"]["train"]["max_steps"] == 50 and printed["deadline"] is not None
        assert not (code / "pwned").exists()


def test_log_lines_match_the_metric_regexes(first_run: dict) -> None:
    """The job's log as lorafit prints it (not a terminal) against the launcher's MetricDefinitions."""
    import re

    from lorafit.sagemaker.launcher import METRIC_DEFINITIONS

    lines = [line for line in first_run["stdout"].splitlines() if line.startswith("lorafit: step ")]
    assert any(" loss=" in line for line in lines), first_run["stdout"][-2000:]
    regex = {m["Name"]: re.compile(m["Regex"]) for m in METRIC_DEFINITIONS}
    records = [json.loads(line) for line in (first_run["model"] / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in records if r.get("loss") is not None]
    eval_losses = [r["eval_loss"] for r in records if "eval_loss" in r]
    seen_train = [float(m.group(1)) for line in lines if (m := regex["train:loss"].search(line))]
    seen_eval = [float(m.group(1)) for line in lines if (m := regex["eval:loss"].search(line))]
    assert seen_train == pytest.approx(train_losses, abs=1e-4)
    assert seen_eval == pytest.approx(eval_losses, abs=1e-4)
    assert all(regex["train:learning_rate"].search(line) and regex["train:tokens_per_s"].search(line)
               for line in lines if regex["train:loss"].search(line))


def test_hyperparameter_encoding_and_the_deadline() -> None:
    from lorafit.sagemaker import hyperparameters as hp

    for value in ("/opt/ml/model", "my-org/tiny-llama", "86400", "a=b,c:d@e+f%g"):
        assert hp.encode(value) == value  # plain values stay readable in the console
    for value in ("My Models/x", "$(rm -rf ~)", "'\"`;&|*?[]{}<>#!\\\n\t", "b64:abc", "", "ünïcödé ✓"):
        encoded = hp.encode(value)
        assert encoded.startswith("b64:") and hp.decode(encoded) == value
        assert all(c.isalnum() or c in ":-_" for c in encoded)
    assert hp.decode_argv(["--base_model", hp.encode("a b"), f"--x={hp.encode('c d')}"]) == \
        ["--base_model", "a b", "--x=c d"]
    with pytest.raises(entry.LorafitError, match="not valid b64"):
        hp.decode("b64:!!")

    assert entry.job_deadline(3600, 1000.0) == 1000.0 + 3600 - 300
    assert entry.job_deadline(100, 0.0) == 90.0  # a tenth of a short MaxRuntime
    import psutil  # a dependency of sagemaker-training (dev extra)

    now = time.time()
    own = entry._process_start(os.getpid())
    assert own is not None and abs(own - psutil.Process().create_time()) < 1.0
    assert entry.container_started_at(1e12, {}, now) == own  # not under the toolkit: this process
    assert entry.container_started_at(1e12, {"SM_TRAINING_ENV": "{}"}, now) == entry._process_start(1)
    assert entry.container_started_at(1e-9, {"SM_TRAINING_ENV": "{}"}, now) == own  # PID 1 too old to be the job's


def test_failure_file_and_save_minutes_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SM_OUTPUT_DIR", str(tmp_path / "output"))
    assert entry.write_failure("first") == tmp_path / "output" / "failure"
    entry.write_failure("second")  # the first failure wins, as in the toolkit
    assert (tmp_path / "output" / "failure").read_text() == "first"
    (tmp_path / "output" / "failure").unlink()

    def out_of_memory(args: object, extra: object) -> int:
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")

    monkeypatch.setattr(entry, "run", out_of_memory)  # what an unexpected exception leaves behind
    with pytest.raises(RuntimeError):
        entry.main([])
    assert (tmp_path / "output" / "failure").read_text() == "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
    monkeypatch.undo()
    assert entry.write_failure("nowhere") is None

    parser = entry.argparse.ArgumentParser()
    entry.add_entry_arguments(parser)
    config_file = tmp_path / "c.yaml"
    config_file.write_text(yaml.safe_dump({"train": {"max_steps": 3}}))
    env = entry.SageMakerEnv.read(parser.parse_known_args([])[0], {"SM_CHECKPOINT_DIR": str(tmp_path / "ckpt")})
    config, _ = entry.build_config(parser.parse_known_args(["--config", str(config_file)])[0], [], env)
    assert config.train.save_minutes == entry.SAVE_MINUTES  # unset: on in a job
    config, _ = entry.build_config(parser.parse_known_args(["--config", str(config_file)])[0],
                                   ["--train.save_minutes", "0"], env)
    assert config.train.save_minutes == 0  # the user's 0 turns it off
