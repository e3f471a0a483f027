"""The template a run trained with travels: recorded in the run folder and the adapter, and what
generate, eval, merge and the model card use, even when the base's tokenizer changed since."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_run_config
from helpers_data import CHAT_TEMPLATE, write_jsonl

from lorafit.adapters import AdapterSession
from lorafit.cli import main
from lorafit.config import DataConfig, validate_config
from lorafit.data.chat import FALLBACK_CHAT_TEMPLATE
from lorafit.data.template import TEMPLATE_FILE, apply_template, template_record
from lorafit.errors import DataError
from lorafit.generation import prompt_from_row, prompt_from_text, stop_token_ids
from lorafit.training import train

CONVERSATIONS = [{"conversations": [{"from": "human", "value": f"Can I borrow your bike on day {i}?"},
                                    {"from": "gpt", "value": f"Yes, pick it up at {i} pm."}]} for i in range(24)]
OTHER_TEMPLATE = "{% for m in messages %}<<{{ m['role'] }}>> {{ m['content'] }}\n{% endfor %}"


def _trained_prompt(text: str) -> str:
    """The generation prompt CHAT_TEMPLATE gives a user message (what training put before the answer)."""
    return f"<|endoftext|>user\n{text}<|pad|>\n<|endoftext|>assistant\n"


@pytest.fixture(scope="module")
def chat_run(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real run on ShareGPT rows with data.format left to auto, on a base whose tokenizer has a chat template."""
    root = tmp_path_factory.mktemp("travel")
    base = root / "base"
    shutil.copytree(tiny_llama, base)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base))
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(base)
    data = write_jsonl(root / "share.jsonl", CONVERSATIONS)
    raw = tiny_run_config(base, data, root / "run", max_steps=4, eval_steps=4)
    del raw["data"]["format"]  # auto
    train(validate_config(raw), progress=False)
    return root / "run"


def test_run_records_the_detected_format_and_template(chat_run: Path) -> None:
    run_json = json.loads((chat_run / "run.json").read_text())
    assert run_json["data_format"] == {"format": "sharegpt", "detected": True,
                                       "columns": {"conversations": "conversations"}, "counts": {"sharegpt": 24}}
    record = json.loads((chat_run / TEMPLATE_FILE).read_text())
    assert json.loads((chat_run / "adapter" / TEMPLATE_FILE).read_text()) == record
    assert (record["format"], record["chat_template"], record["chat_template_source"]) == \
        ("sharegpt", CHAT_TEMPLATE, "tokenizer")
    assert (record["add_special_tokens"], record["append_eos"], record["stop_tokens"]) == (False, False, ["<|pad|>"])
    assert yaml.safe_load((chat_run / "config.yaml").read_text())["data"]["format"] == "auto"  # the user's setting
    card = (chat_run / "adapter" / "README.md").read_text()
    assert "(sharegpt)" in card and TEMPLATE_FILE in card


def test_generate_uses_the_recorded_template_even_after_the_base_changed(chat_run: Path, tmp_path: Path) -> None:
    moved = tmp_path / "run"
    shutil.copytree(chat_run, moved)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):  # the adapter ships no tokenizer
        (moved / "adapter" / name).unlink(missing_ok=True)
    base = Path(yaml.safe_load((moved / "config.yaml").read_text())["model"]["name_or_path"])
    changed = tmp_path / "base"
    shutil.copytree(base, changed)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(changed))
    tokenizer.chat_template = OTHER_TEMPLATE  # e.g. the hub updated the base's template since training
    tokenizer.save_pretrained(changed)
    session = AdapterSession.open(moved, base=str(changed), device=torch.device("cpu"))
    assert session.template_file == moved / "adapter" / TEMPLATE_FILE
    assert session.data_config.format == "sharegpt"
    assert prompt_from_text("Lend me a pen?", session.data_config, session.tokenizer) == _trained_prompt("Lend me a pen?")
    row = {"conversations": [{"from": "human", "value": "Lend me a pen?"}]}
    assert prompt_from_row(row, session.data_config, session.tokenizer) == _trained_prompt("Lend me a pen?")
    eos, pad = session.tokenizer.eos_token_id, session.tokenizer.convert_tokens_to_ids("<|pad|>")
    assert stop_token_ids(session.data_config, session.tokenizer) == [eos, pad]  # stops at the turn's end


def test_generate_eval_and_merge_from_the_cli(chat_run: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", str(chat_run), "--prompt", "Lend me a pen?", "--max-new-tokens", "3", "--no-stream"]) == 0
    capsys.readouterr()
    out = tmp_path / "eval.json"
    assert main(["eval", str(chat_run), "--json", "--max-new-tokens", "3", "--output", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["meta"]["format"] == "sharegpt" and result["adapter"]["perplexity"] > 1
    merged = tmp_path / "merged"
    assert main(["merge", str(chat_run), "--output", str(merged)]) == 0
    assert json.loads((merged / TEMPLATE_FILE).read_text())["format"] == "sharegpt"
    session = AdapterSession.open(merged, device=torch.device("cpu"))  # the merged model, a bare model now
    assert session.data_config.format == "sharegpt"
    assert session.tokenizer.chat_template == CHAT_TEMPLATE
    assert prompt_from_text("Hi", session.data_config, session.tokenizer) == _trained_prompt("Hi")


def test_run_folders_without_the_record_still_work(chat_run: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    old = tmp_path / "old"
    shutil.copytree(chat_run, old)
    (old / TEMPLATE_FILE).unlink()
    (old / "adapter" / TEMPLATE_FILE).unlink()
    config = yaml.safe_load((old / "config.yaml").read_text())
    config["data"]["format"] = "chat"  # what a run from before the record said
    (old / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    session = AdapterSession.open(old, device=torch.device("cpu"))
    assert session.template_file is None and session.data_config.format == "chat"
    assert prompt_from_text("Hi", session.data_config, session.tokenizer) == _trained_prompt("Hi")
    config["data"]["format"] = "auto"  # a new run whose record was deleted: say so, in one line
    (old / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    capsys.readouterr()
    assert main(["generate", str(old), "--prompt", "Hi"]) == 2  # before any model loads
    assert capsys.readouterr().err.strip() == (f"error: {old}: the run's data.format is auto and its "
                                               "lorafit_template.json is missing; pass --format")
    assert main(["generate", str(old), "--prompt", "Hi", "--format", "chat", "--max-new-tokens", "2",
                 "--no-stream"]) == 0


def test_a_fallback_template_record_wins_over_a_tokenizer_template(tiny_llama: Path) -> None:
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(str(tiny_llama))
    assert not plain.chat_template
    record = template_record(DataConfig(format="chat"), plain)
    assert (record["chat_template"], record["chat_template_source"]) == (FALLBACK_CHAT_TEMPLATE, "lorafit fallback")
    later = AutoTokenizer.from_pretrained(str(tiny_llama))
    later.chat_template = OTHER_TEMPLATE
    config = apply_template(record, DataConfig(), later, "run")
    assert prompt_from_text("Hi", config, later) == "### User:\nHi\n\n### Assistant:\n"
    changed = {**record, "prompt_templates": None, "format": "summarization"}
    assert prompt_from_text("A: hi", apply_template(changed, DataConfig(), later, "run"), later).startswith(
        "Summarize the chat dialogue:\nA: hi")
    with pytest.raises(DataError, match=r"^run: the run trained with prompt templates this lorafit renders"):
        apply_template({**changed, "prompt_templates": {"prompt": "Old: {dialogue}"}}, DataConfig(), later, "run")


def test_a_run_started_with_a_named_format_resumes_under_auto(tiny_llama: Path, dialogue_file: Path,
                                                              tmp_path: Path) -> None:
    """A run interrupted before data.format defaulted to auto resumes when auto finds the same format."""
    from lorafit.training import LoraFinetuneRecipe

    raw = tiny_run_config(tiny_llama, dialogue_file, tmp_path / "run", max_steps=4, save_steps=2, eval_steps=None)
    recipe = LoraFinetuneRecipe(validate_config(raw), progress=False)
    recipe.setup()
    recipe.max_steps = 2  # stop after the checkpoint at step 2, as an interrupted run would
    recipe.fit()
    recipe.close()  # releases the run folder, as train() does when a run ends
    del raw["data"]["format"]
    result = train(validate_config(raw), progress=False)
    assert result.resumed_from and result.steps == 4
    assert json.loads((tmp_path / "run" / TEMPLATE_FILE).read_text())["format"] == "summarization"


@pytest.mark.parametrize("weights", ["merged", "adapter"])
def test_an_endpoint_serves_the_recorded_template_and_stops_where_generate_does(
        chat_run: Path, tmp_path: Path, weights: str, capsys: pytest.CaptureFixture) -> None:
    """The SageMaker handler on the packaged chat run (format auto, a chat template whose end of turn
    is not EOS): it renders requests with the recorded template and stops at the end-of-turn token,
    giving exactly what ``lorafit generate`` gives."""
    from lorafit.sagemaker.handler import input_fn, load, predict_fn, read_settings

    folder = tmp_path / weights
    assert main(["sagemaker", "deploy", str(chat_run), "--instance-type", "ml.m5.xlarge", "--package-only",
                 str(folder), "--weights", weights]) == 0
    served = load(folder, read_settings(folder))
    assert served.session.data_config.format == "sharegpt"
    assert stop_token_ids(served.session.data_config, served.session.tokenizer) == \
        stop_token_ids(AdapterSession.open(chat_run).data_config, served.session.tokenizer)
    question = "Can I borrow your bike on day 3?"
    request = input_fn(json.dumps({"inputs": question, "parameters": {"max_new_tokens": 12}}), "application/json")
    answer = predict_fn(request, served)[0]["generated_text"]
    capsys.readouterr()
    assert main(["generate", str(chat_run), "--prompt", question, "--max-new-tokens", "12", "--no-stream"]) == 0
    assert answer == capsys.readouterr().out.strip()
