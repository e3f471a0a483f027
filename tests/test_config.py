"""Config validation and the CLI's one-line errors (exit code 2, field named, no traceback)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lorafit.config import load_config
from lorafit.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lorafit", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_defaults_follow_the_seed_recipe() -> None:
    config = load_config(ROOT / "examples" / "bloomz-7b1-samsum.yaml")
    assert config.model.name_or_path == "bigscience/bloomz-7b1"
    assert config.model.quantization == "int8"
    assert (config.lora.r, config.lora.alpha, config.lora.dropout) == (8, 32, 0.05)
    assert config.lora.target_modules == ["query_key_value"]
    assert config.train.lr == 2e-4
    assert config.model.trust_remote_code is False


def test_embedded_default_loads() -> None:
    config = load_config(None)
    assert config.model.name_or_path == "builtin:smollm2-135m-instruct"
    assert config.data.path == "builtin:dialogues"


def test_set_overrides_nested_fields_with_yaml_types() -> None:
    config = load_config(None, ["train.max_steps=20", "output_dir=/tmp/run", "lora.target_modules=[a, b]",
                                "model.quantization=nf4"])
    assert config.train.max_steps == 20
    assert config.output_dir == "/tmp/run"
    assert config.lora.target_modules == ["a", "b"]
    assert config.model.quantization == "nf4"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["lora.rank=8"], "unknown key 'lora.rank'"),
        (["train.max_steps=many"], "train.max_steps"),
        (["lora.r=0"], "lora.r"),
        (["lora.r=-3"], "lora.r"),
        (["model.quantization=int4"], "model.quantization"),
        (["lora.target_modules=[]"], "lora.target_modules"),
        (["data.packing=yes"], "data.packing"),
        (["bogus=1"], "unknown key 'bogus'"),
    ],
)
def test_bad_fields_are_named(overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected.replace(".", r"\.")):
        load_config(None, overrides)


def test_broken_yaml_names_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name_or_path: [unclosed\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad\.yaml: line \d+ invalid YAML"):
        load_config(bad)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--set", "lora.bogus=1"], "unknown key 'lora.bogus'"),
        (["--set", "train.batch_size=big"], "train.batch_size"),
        (["--set", "lora.r=0"], "lora.r"),
        (["--set", "model.name_or_path=/nonexistent/model"], "model.name_or_path"),
        (["missing-config.yaml"], "missing-config.yaml: config file not found"),
    ],
)
def test_cli_bad_config_exits_2_with_one_line(args: list[str], expected: str, tmp_path: Path) -> None:
    result = run_cli("train", *args, "--set", f"output_dir={tmp_path / 'out'}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and expected in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_debug_flag_shows_the_traceback(tmp_path: Path) -> None:
    result = run_cli("train", "--set", "lora.r=0", "--debug", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" in result.stderr and "error: " in result.stderr


@pytest.mark.parametrize(("name", "is_path"), [
    ("bigscience/bloomz-7b1", False), ("gpt2", False), ("knkarthick/samsum", False),
    ("./model", True), ("/data/models/llama", True), ("~/runs/a", True), ("a/b/c", True),
    ("rows.jsonl", True), ("ROWS.CSV", True),
])
def test_one_rule_tells_paths_from_hub_ids(name: str, is_path: bool) -> None:
    """Model sources, data sources, run folders, cards and the SageMaker launcher share this rule."""
    from lorafit.data.sources import FILE_SUFFIXES
    from lorafit.paths import looks_like_path

    assert looks_like_path(name, FILE_SUFFIXES) is is_path


@pytest.mark.parametrize(("text", "expected"), [
    ("train:\n  max_steps: 6.0\n", "train.max_steps: Input should be a valid integer (got 6.0)"),
    ("lora:\n  r: '8'\n", "lora.r: Input should be a valid integer (got '8')"),
    ("lora:\n  r: true\n", "lora.r: Input should be a valid integer (got True)"),
    ("train:\n  gradient_checkpointing: 1\n", "train.gradient_checkpointing: Input should be a valid boolean"),
    ("data:\n  cache: 'no'\n", "data.cache: Input should be a valid boolean"),
    ("train:\n  lr: '0.001'\n", "train.lr: Input should be a valid number"),
    ("train:\n  seed: 1180591620717411303424\n", "train.seed: Input should be less than or equal to 4294967295"),
    ("train:\n  seed: -1\n", "train.seed"),
    ("output_dir: ''\n", "output_dir: must name a folder"),
    ("train:\n  lr: 1.0e-3\n  max_steps: 4\n  lr: 2.0e-3\n", "line 4 invalid YAML (key 'lr' given twice"),
    ("train:\n  lr: 1.0e-3\ntrain:\n  max_steps: 4\n", "line 3 invalid YAML (key 'train' given twice"),
])
def test_config_types_are_strict_and_keys_unique(text: str, expected: str, tmp_path: Path) -> None:
    """No silent coercion: a value of the wrong type, or a key given twice, is refused by name."""
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert expected in str(caught.value)


def test_yaml_1_2_floats_are_numbers() -> None:
    """``2e-4`` (no dot) is a float in YAML 1.2 and to users; PyYAML alone reads it as a string."""
    config = load_config(None, ["train.lr=2e-4", "train.max_grad_norm=1E+1"])
    assert config.train.lr == 2e-4 and config.train.max_grad_norm == 10.0


def test_empty_output_dir_writes_nothing_in_the_current_folder(tmp_path: Path) -> None:
    """``--set output_dir=$UNSET`` must not turn the current folder (with the user's config) into a run."""
    user_config = tmp_path / "config.yaml"
    user_config.write_text("# my notes\ntrain:\n  max_steps: 2\n", encoding="utf-8")
    result = run_cli("train", "config.yaml", "--set", "output_dir=", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == "error: --set output_dir=: output_dir: must name a folder (it is empty) (got '')"
    assert user_config.read_text(encoding="utf-8").startswith("# my notes")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


@pytest.mark.parametrize(("overrides", "expected"), [
    (["train.fsdp=true"], "train.fsdp: one process holds the whole model; nothing to shard"),
    (["train.checkpoint_every=2", "train.gradient_checkpointing=false"],
     "train.checkpoint_every: train.gradient_checkpointing is off"),
    (["train.loss=full", "train.loss_chunk_tokens=64"], "train.loss_chunk_tokens: train.loss is full"),
    (["train.max_consecutive_skips=9"], "train.max_consecutive_skips: train.on_nonfinite is stop"),
    (["train.max_steps=5", "train.epochs=1"], "train.epochs: train.max_steps is set"),
    (["data.eval_path=held.jsonl", "data.eval_fraction=0.2"], "data.eval_fraction: data.eval_path names the held-out"),
    (["data.packing=chunk", "data.overlong=drop"], "data.overlong: data.packing chunk"),
    (["data.format=chat", "data.template='Q: {messages}'"], "data.template: data.format chat has no prompt template"),
    (["data.format=text", "data.train_on_prompt=true"], "data.train_on_prompt: data.format text trains on every"),
    (["model.name_or_path=.", "model.revision=v2"], "model.revision: model.name_or_path is a local folder"),
    (["data.path=rows.jsonl", "data.split=validation"], "data.split: data files have no splits"),
    (["data.eval_fraction=0", "train.eval_steps=5"], "train.eval_steps: there is no held-out data"),
])
def test_options_that_do_not_apply_are_named(overrides: list[str], expected: str) -> None:
    from lorafit.preflight import ignored_settings

    assert expected in "\n".join(ignored_settings(load_config(None, overrides)))


def test_the_embedded_default_ignores_nothing() -> None:
    from lorafit.preflight import ignored_settings

    assert ignored_settings(load_config(None)) == []
    assert ignored_settings(load_config(None, ["train.fsdp=true"]), processes=2) == []


def test_generation_options_checked_and_ignored_ones_named(capsys: pytest.CaptureFixture[str]) -> None:
    from lorafit.cli import build_parser
    from lorafit.cli.generate import check_arguments
    from lorafit.errors import LorafitError

    parse = build_parser().parse_args
    check_arguments(parse(["generate", "run", "--prompt", "hi", "--temperature", "0.3", "--seed", "5",
                           "--output", "x.jsonl"]))
    err = capsys.readouterr().err
    assert "lorafit: note: ignored --temperature, --seed: no effect without --sample (decoding is greedy)" in err
    assert "lorafit: note: ignored --output: applies to --input" in err
    check_arguments(parse(["generate", "run", "--prompt", "hi", "--sample", "--temperature", "0.3"]))
    assert capsys.readouterr().err == ""
    for bad in (["--sample", "--top-p", "0"], ["--sample", "--top-k", "-1"], ["--repetition-penalty", "0"],
                ["--seed", "-1"]):
        with pytest.raises(LorafitError, match=bad[-2]):
            check_arguments(parse(["generate", "run", "--prompt", "hi", *bad]))
