"""Hub-ready adapters: the model card every adapter gets, its update by lorafit eval, lorafit push.

No network here: ``push --dry-run`` is checked against the files, the upload against a recording
stand-in for ``HfApi`` (the Hub itself cannot run here), and the missing-token error through the CLI.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from helpers_adapters import train_tiny_run

from lorafit.card import card_metadata, hub_model_id
from lorafit.cli import main
from lorafit.config import validate_config
from lorafit.errors import LorafitError
from lorafit.hub import plan_upload, push


@pytest.fixture(scope="module")
def run(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lorafit.builtin.dialogues import generate

    root = tmp_path_factory.mktemp("card-run")
    data = root / "dialogues.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in generate(64, 11)), encoding="utf-8")
    return train_tiny_run(tiny_llama, data, root / "run", max_steps=4, eval_steps=2)


def load_card(folder: Path):
    from huggingface_hub import ModelCard

    return ModelCard.load(folder / "README.md")


def test_a_trained_adapter_has_a_hub_model_card(run: Path) -> None:
    import torch

    card = load_card(run / "adapter")
    result = json.loads((run / "result.json").read_text())
    assert card.data.library_name == "peft" and card.data.pipeline_tag == "text-generation"
    assert card.data.base_model is None  # a local base: named in the text, not as a Hub id
    assert {"lorafit", "lora"} <= set(card.data.tags)
    losses = [r for r in card.data.eval_results if r.metric_type == "loss"]
    assert losses[0].metric_value == round(result["final_eval_loss"], 4)
    text = card.text
    assert "- Steps: 4 of 4;" in text and f"torch {torch.__version__}" in text and "training samples" in text
    assert f'AutoPeftModelForCausalLM.from_pretrained("{run / "adapter"}")' in text
    assert f"lorafit generate {run / 'adapter'}" in text
    shown = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(shown) == yaml.safe_load((run / "config.yaml").read_text())


def test_card_metadata_names_hub_bases_and_datasets(tmp_path: Path) -> None:
    local = tmp_path / "rows.jsonl"
    local.write_text("{}\n")
    config = validate_config({"model": {"name_or_path": "builtin:smollm2-135m-instruct"},
                              "data": {"path": ["knkarthick/samsum", str(local), "builtin:dialogues"]}})
    data = card_metadata(config).to_dict()
    assert data["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "base_model:adapter:HuggingFaceTB/SmolLM2-135M-Instruct" in data["tags"]
    assert data["datasets"] == ["knkarthick/samsum"]
    assert hub_model_id("bigscience/bloomz-7b1") == "bigscience/bloomz-7b1"
    assert hub_model_id(str(tmp_path)) is None and hub_model_id("./model") is None


def test_eval_puts_its_scores_into_the_card(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    readme = run / "adapter" / "README.md"
    readme.write_text(readme.read_text() + "\nNotes the user added.\n")
    assert main(["eval", str(run), "--max-new-tokens", "6", "--limit", "3", "--baseline"]) == 0
    capsys.readouterr()
    scores = json.loads((run / "eval.json").read_text())
    card = load_card(run / "adapter")
    rouge = {r.metric_name: r.metric_value for r in card.data.eval_results if r.metric_type == "rouge"}
    assert rouge == {"ROUGE-1": scores["adapter"]["rouge1"], "ROUGE-2": scores["adapter"]["rouge2"],
                     "ROUGE-L": scores["adapter"]["rougeL"], "ROUGE-Lsum": scores["adapter"]["rougeLsum"]}
    assert any(r.metric_type == "loss" for r in card.data.eval_results)  # training's loss kept
    assert "| base model |" in card.text and "Not scored yet" not in card.text
    assert "Notes the user added." in card.text and "- Steps: 4 of 4;" in card.text
    # the run's own held-out rows: named as such (no local path in the scores' section, which push
    # publishes as it is), and the training data set as the metadata's dataset
    section = card.text.split("## Evaluation", 1)[1].split("<!-- /lorafit:eval -->", 1)[0]
    assert "rows from the run's held-out rows of data.path" in section and str(run) not in section
    rouge_sets = {r.dataset_name for r in card.data.eval_results if r.metric_type == "rouge"}
    assert rouge_sets == {"dialogues.jsonl"}, rouge_sets


def test_push_dry_run_lists_the_files_and_sizes(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["push", str(run), "--repo-id", "someone/tiny-adapter", "--private", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would upload" in out and "https://huggingface.co/someone/tiny-adapter (private)" in out
    listed = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    adapter = run / "adapter"
    expected = {p.name for p in adapter.iterdir() if p.is_file()}
    assert set(listed) == expected
    weights = (adapter / "adapter_model.safetensors").stat().st_size
    assert f"{weights / 1000:.1f} kB" in listed["adapter_model.safetensors"]
    assert "no Hub id" in out  # the tiny base is a local folder: said, not hidden


def test_push_plan_points_the_hub_copy_at_the_hub_base(run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["model"]["name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    items, notes = plan_upload(copy, "someone/tiny-adapter")
    by_path = {i.path_in_repo: i for i in items}
    uploaded = json.loads(by_path["adapter_config.json"].content)
    assert uploaded["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and not notes
    card = by_path["README.md"].content.decode()
    assert 'AutoPeftModelForCausalLM.from_pretrained("someone/tiny-adapter")' in card
    assert "hf download someone/tiny-adapter --local-dir adapter" in card
    assert "lorafit generate adapter --format summarization" in card
    assert json.loads((copy / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] != \
        "HuggingFaceTB/SmolLM2-135M-Instruct"  # the local adapter is untouched


def test_push_merged_dry_run_estimates_without_merging(run: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    before = sorted(p.name for p in run.iterdir())
    assert main(["push", str(run), "--repo-id", "someone/tiny", "--merged", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert sorted(p.name for p in run.iterdir()) == before  # nothing written
    estimate = next(i for i in plan_upload(run, "someone/tiny", merged=True)[0]
                    if i.path_in_repo.startswith("merged/model"))
    assert "merged/model*.safetensors" in out and "made by lorafit merge at upload" in out
    assert main(["merge", str(run), "--output", str(tmp_path / "merged")]) == 0
    capsys.readouterr()
    actual = sum(p.stat().st_size for p in (tmp_path / "merged").glob("*.safetensors"))
    assert abs(estimate.size - actual) / actual < 0.05, (estimate.size, actual)


class RecordingHub:
    """Stands in for ``HfApi`` at the network boundary: records the calls lorafit makes."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple, dict]] = []

    def create_repo(self, *args: object, **kwargs: object) -> None:
        self.calls.append(("create_repo", args, kwargs))

    def create_commit(self, repo_id: str, operations: list, **kwargs: object) -> None:
        files = {}
        for op in operations:  # read now: merged files live in a staging folder removed afterwards
            source = op.path_or_fileobj
            files[op.path_in_repo] = source if isinstance(source, bytes) else Path(source).read_bytes()
        self.calls.append(("create_commit", (repo_id,), {"files": files, **kwargs}))


def test_push_uploads_exactly_the_planned_files(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    hub = RecordingHub()
    planned = [i.path_in_repo for i in plan_upload(run, "someone/tiny")[0]]
    push(run, "someone/tiny", private=True, api=hub, log=lambda _: None)
    assert hub.calls[0] == ("create_repo", ("someone/tiny",), {"private": True, "exist_ok": True})
    files = hub.calls[1][2]["files"]
    assert list(files) == planned
    assert files["adapter_model.safetensors"] == (run / "adapter" / "adapter_model.safetensors").read_bytes()
    assert b'from_pretrained("someone/tiny")' in files["README.md"]

    hub = RecordingHub()
    push(run, "someone/tiny", merged=True, api=hub, log=lambda _: None)
    files = hub.calls[1][2]["files"]
    assert "merged/config.json" in files and any(p.startswith("merged/model") for p in files)
    assert not list(run.glob(".push-merged-*"))  # the staging folder is gone

    # a merge that fails (a run whose base is gone) leaves no staging folder in the run either
    broken = run.parent / "run-broken"
    shutil.copytree(run, broken)
    (broken / "config.yaml").write_text((broken / "config.yaml").read_text().replace(
        str(yaml.safe_load((run / "config.yaml").read_text())["model"]["name_or_path"]), str(run.parent / "gone")))
    with pytest.raises(LorafitError, match="model.name_or_path"):
        push(broken, "someone/tiny", merged=True, api=RecordingHub(), log=lambda _: None)
    assert not list(broken.glob(".push-merged-*"))


def test_push_without_a_token_is_one_line(run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    import huggingface_hub.constants

    for name in ("HF_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))  # not logged in
    assert main(["push", str(run), "--repo-id", "someone/tiny", "--merged"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no Hugging Face token:") and err.count("\n") == 1
    assert not list(run.glob(".push-merged-*"))  # checked before merging anything


@pytest.mark.parametrize("offline", [True, False])
def test_push_offline_or_without_a_network_is_one_line(offline: bool, run: Path) -> None:
    """HF_HUB_OFFLINE, or a Hub that cannot be reached (a closed local port stands in for no network)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_TOKEN": "hf_test_token", "HF_HUB_OFFLINE": "1" if offline else "0",
           "HF_ENDPOINT": "http://127.0.0.1:9"}
    done = subprocess.run([sys.executable, "-m", "lorafit", "push", str(run), "--repo-id", "someone/tiny"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    if offline:
        assert lines[0].startswith("error: push: offline mode is on (HF_HUB_OFFLINE)")
    else:
        assert lines[0].startswith("error: push: could not upload to https://huggingface.co/someone/tiny (")
        assert lines[0].endswith("nothing was committed")
