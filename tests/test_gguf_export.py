"""lorafit export --gguf, proven with llama.cpp itself (llama-cpp-python) against transformers.

Tiny random models (llama, and qwen2 for a second family) carry a random LoRA adapter with large
updates; their GGUF must give transformers' token ids on a fixed string set and transformers'
greedy tokens in f16. The tokenizer is a byte-level BPE trained in-process, which llama.cpp
cannot know by hash: the export names its pre-tokenizer from tokenizer.json, and the token test
is what proves that choice. The runs leave data.format to auto (the default) and carry the
template record training writes (lorafit_template.json), which is what the export renders from.
The real SmolLM2 run is in test_gguf_default.py (heavy).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import build_model, build_tokenizer, write_jsonl
from helpers_adapters import fake_run, peft_adapter
from helpers_data import CHAT_TEMPLATE
from helpers_gguf import (
    STRINGS,
    agreement,
    first_difference,
    hf_greedy,
    is_eog,
    llama_greedy,
    llama_ids,
    load_llama,
    need_llama_cpp,
    top2_gaps,
)

from lorafit.cli import main
from lorafit.data.template import TEMPLATE_FILE
from lorafit.modeling import NO_HUB_KERNELS

pytestmark = pytest.mark.gguf  # a CI step of its own, after llama-cpp-python is built (pytest -m gguf)

LOGIT_SCALE = 20.0
TIE = 0.05  # a top-2 logit gap several times f16's rounding of these logits: closer calls are coin flips
DIALOGUES = [
    "Anna: Are we still on for lunch?\nBen: Yes, 12:30 at the usual place.",
    "Tom: I lost my keys again.\nMia: Check the kitchen table!\nTom: Found them, thanks.",
    "Kim: The meeting moved to Friday.\nLee: OK, I'll tell the team.",
]


@pytest.fixture(scope="module")
def llama_cpp() -> object:
    return need_llama_cpp()


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lorafit.builtin.dialogues import generate

    return write_jsonl(tmp_path_factory.mktemp("gguf-data") / "d.jsonl", generate(16, 3))


def _base(folder: Path, arch: str) -> Path:
    """A tiny random model whose logits spread like a trained model's (the final norm scaled up):
    a random init's logits lie within ~1 of each other, so greedy picks would be near-ties."""
    from transformers import AutoModelForCausalLM

    build_model(folder, arch)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **NO_HUB_KERNELS)
    with torch.no_grad():
        model.model.norm.weight.mul_(LOGIT_SCALE)
    model.save_pretrained(folder)
    return folder


def _run(tmp: Path, base: Path, data_file: Path, **model: object) -> Path:
    """A run folder as training leaves it, around a random adapter with large updates: config.yaml with
    data.format left to auto (the default), and the template record training writes into the run and
    its adapter, made by training's own data preparation (detection included) from ``data_file``."""
    from lorafit.config import validate_config
    from lorafit.data import prepare_data
    from lorafit.data.template import write_template
    from lorafit.modeling import load_tokenizer
    from lorafit.resolved import resolve

    adapter = peft_adapter(base, tmp / "adapter-src", seed=5, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    run = fake_run(base, adapter, tmp / "run", data_file, **model)
    raw = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    del raw["data"]["format"]
    (run / "config.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    resolved = resolve(validate_config(raw))
    record = prepare_data(resolved, load_tokenizer(resolved)).template
    write_template(run, record)
    write_template(run / "adapter", record)
    return run


def _export(run: Path, out: Path, *args: str) -> Path:
    assert main(["export", str(run), "--gguf", "--output", str(out), *args]) == 0
    return out


def _reference(base: Path, adapter: Path) -> torch.nn.Module:
    """transformers on the merged model: base + adapter, merged by peft, fp32."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, **NO_HUB_KERNELS)
    return PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().eval()


def _prompts(run: Path, texts: list[str] = DIALOGUES) -> list[str]:
    """What ``lorafit generate --prompt`` sends for each text: the run's recorded template."""
    from lorafit.adapters import base_run_config, load_tokenizer_for, trained_data_config
    from lorafit.generation import prompt_from_text
    from lorafit.resolved import resolve
    from lorafit.runs import locate_run

    target = locate_run(run)
    tokenizer = load_tokenizer_for(resolve(base_run_config(target), new_adapter=False), target.adapter_dir)
    data_config, _ = trained_data_config(target, target.config.data, tokenizer)
    return [prompt_from_text(t, data_config, tokenizer) for t in texts]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def exported(request: pytest.FixtureRequest, llama_cpp: object, data_file: Path,
             tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A run per family, exported in f16 through the CLI."""
    tmp = tmp_path_factory.mktemp(f"gguf-{request.param}")
    base = _base(tmp / "base", request.param)
    run = _run(tmp, base, data_file)
    out = _export(run, tmp / "out")
    return {"arch": request.param, "base": base, "run": run, "out": out,
            "gguf": out / "run-f16.gguf", "reference": _reference(base, run / "adapter")}


def test_export_writes_gguf_modelfile_and_readme(exported: dict) -> None:
    """A run with data.format auto (the default): the TEMPLATE is the one auto chose in training
    (summarization, from the dialogue/summary rows), read from the run's template record."""
    out, run = exported["out"], exported["run"]
    assert "format" not in yaml.safe_load((run / "config.yaml").read_text())["data"]
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "README.md", "lorafit_export.json",
                                                     TEMPLATE_FILE, "run-f16.gguf"]
    assert json.loads((out / TEMPLATE_FILE).read_text()) == json.loads((run / TEMPLATE_FILE).read_text())
    modelfile = (out / "Modelfile").read_text()
    assert "FROM ./run-f16.gguf\n" in modelfile
    assert 'TEMPLATE """Summarize the chat dialogue:\n{{ .Prompt }}\n---\nSummary:\n{{ .Response }}"""' in modelfile
    assert 'PARAMETER stop "<|endoftext|>"' in modelfile and "PARAMETER num_ctx 128" in modelfile
    readme = (out / "README.md").read_text()
    assert "ollama create" in readme and "llama-cli -m run-f16.gguf" in readme
    assert "Summarize the chat dialogue:\nAnna: Are we still on for lunch?" in readme
    record = json.loads((out / "lorafit_export.json").read_text())
    assert record["warnings"] == [] and record["quant"] == "f16" and record["chat_template_replaced"]
    assert record["format"] == "summarization"


def test_llama_cpp_tokenizes_like_transformers(exported: dict) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(exported["base"])
    llm = load_llama(exported["gguf"])
    texts = STRINGS + _prompts(exported["run"]) + ["before<|endoftext|>after", "<|pad|><|endoftext|>"]
    for text in texts:
        assert llama_ids(llm, text) == tokenizer(text)["input_ids"], text
    metadata = llm.metadata
    assert metadata["tokenizer.ggml.pre"] == {"llama": "gpt-2", "qwen2": "qwen2"}[exported["arch"]]
    assert int(metadata["tokenizer.ggml.eos_token_id"]) == tokenizer.eos_token_id


def _same_greedy(llm: object, reference: torch.nn.Module, tokenizer: object, prompts: list[str]) -> list[list[int]]:
    """llama.cpp's greedy tokens equal transformers', token for token; a generation may part only
    where transformers' top two logits are closer than TIE (f16 weights may rightly pick the other
    there), and most tokens agree before any parting. Returns transformers' generations."""
    equal = total = 0
    generations = []
    for prompt in prompts:
        ids = tokenizer(prompt)["input_ids"]
        ours, theirs = llama_greedy(llm, ids, 24), hf_greedy(reference, tokenizer, ids, 24)
        parted = first_difference(ours, theirs)
        if parted is not None:
            gap = top2_gaps(reference, ids, theirs)[parted]
            assert gap < TIE, f"llama.cpp parted from transformers at token {parted} (gap {gap:.3f}): {prompt!r}"
        equal, total = equal + (len(theirs) if parted is None else parted), total + len(theirs)
        generations.append(theirs)
    assert equal >= 0.75 * total, (equal, total)
    return generations


def test_f16_greedy_equals_transformers_token_for_token(exported: dict) -> None:
    """(SmolLM2's run: equal over whole generations, test_gguf_default.py.)"""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(exported["base"])
    prompts = _prompts(exported["run"])
    generations = _same_greedy(load_llama(exported["gguf"]), exported["reference"], tokenizer, prompts)
    base = _reference_base(exported["base"])
    for prompt, theirs in zip(prompts, generations, strict=True):  # the adapter is in the weights
        assert theirs != hf_greedy(base, tokenizer, tokenizer(prompt)["input_ids"], 24)


def _reference_base(base: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, **NO_HUB_KERNELS).eval()


def test_chat_template_in_the_gguf_renders_the_training_prompt(exported: dict) -> None:
    """llama-server / llama-cli -cnv format chats with the GGUF's template: it must give the prompt
    the run trained on; transformers' GGUF loader reads the same template (and the weights) back."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = exported["gguf"]
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    for dialogue, prompt in zip(DIALOGUES, _prompts(exported["run"]), strict=True):
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": dialogue}], tokenize=False,
                                                 add_generation_prompt=True)
        assert rendered == prompt
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    llm = load_llama(gguf)
    formatter = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos_token="", bos_token="")
    assert formatter(messages=[{"role": "user", "content": DIALOGUES[0]}]).prompt == _prompts(exported["run"])[0]
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                  **NO_HUB_KERNELS).eval()
    ids = torch.tensor([tokenizer(_prompts(exported["run"])[0])["input_ids"]])
    with torch.no_grad():
        diff = (loaded(ids).logits - exported["reference"](ids).logits).abs().max().item()
    assert diff < 0.05  # f16 weights


def test_generation_stops_at_the_training_eos(exported: dict, llama_cpp: object) -> None:
    """The token training appended after every response is an end-of-generation token in llama.cpp:
    a completion that reaches it ends there, with finish_reason 'stop'."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(exported["base"])
    eos = tokenizer.eos_token_id
    llm = load_llama(exported["gguf"])
    assert is_eog(llm, eos)
    prompt = _prompts(exported["run"])[0]
    free = llm.create_completion(prompt, max_tokens=8, temperature=0)
    assert free["choices"][0]["finish_reason"] == "length"
    # steer the third token to EOS: generation must end right there
    steered = llm.create_completion(prompt, max_tokens=8, temperature=0,
                                    logits_processor=[_eos_at(len(tokenizer(prompt)["input_ids"]) + 2, eos)])
    assert steered["choices"][0]["finish_reason"] == "stop"
    assert steered["usage"]["completion_tokens"] == 2  # two tokens of text, then EOS (not text) ended it


def _eos_at(position: int, eos: int):  # noqa: ANN202
    def processor(input_ids, scores):  # noqa: ANN001, ANN202
        if len(input_ids) == position:
            scores[:] = -1e9
            scores[eos] = 0.0
        return scores
    return processor


def test_q8_0_and_q4_k_m_agree_with_transformers(llama_cpp: object, data_file: Path,
                                                  tmp_path_factory: pytest.TempPathFactory) -> None:
    """q8_0 (the converter) and q4_k_m (llama.cpp's quantizer): the next-token argmax agrees with
    transformers on a stated share of positions (SmolLM2's shares: benchmarks/RESULTS.md)."""
    from transformers import AutoTokenizer

    tmp = tmp_path_factory.mktemp("gguf-quant")
    base = _base(tmp / "base", "llama")
    run = _run(tmp, base, data_file)
    reference = _reference(base, run / "adapter")
    tokenizer = AutoTokenizer.from_pretrained(base)
    sequences, starts = [], []
    for prompt in _prompts(run):
        ids = tokenizer(prompt)["input_ids"]
        sequences.append(ids + hf_greedy(reference, tokenizer, ids, 24))
        starts.append(len(ids))
    shares = {}
    for quant, floor in (("q8_0", 0.9), ("q4_k_m", 0.5)):
        out = _export(run, tmp / quant, "--quant", quant)
        gguf = out / f"run-{quant}.gguf"
        assert sorted(p.name for p in out.iterdir() if p.suffix == ".gguf") == [gguf.name]
        shares[quant] = agreement(load_llama(gguf, logits_all=True), reference, sequences, starts)
        assert shares[quant] >= floor, shares
    assert (tmp / "q4_k_m" / "run-q4_k_m.gguf").stat().st_size < (tmp / "q8_0" / "run-q8_0.gguf").stat().st_size


def test_qlora_run_exports_its_adapter_on_the_dequantized_base(llama_cpp: object, data_file: Path,
                                                                tmp_path_factory: pytest.TempPathFactory) -> None:
    """An nf4 run: the GGUF holds the adapter merged into the nf4 weights dequantized (what training
    saw), and llama.cpp's greedy tokens equal transformers' nf4 base + adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorafit.modeling import quantization_config

    tmp = tmp_path_factory.mktemp("gguf-nf4")
    base = _base(tmp / "base", "llama")
    run = _run(tmp, base, data_file, quantization="nf4")
    out = _export(run, tmp / "out")
    quantized = AutoModelForCausalLM.from_pretrained(
        base, dtype=torch.float32, device_map={"": "cpu"}, **NO_HUB_KERNELS,
        quantization_config=quantization_config("nf4", torch.float32, sharded=False))
    trained = PeftModel.from_pretrained(quantized, str(run / "adapter")).eval()  # what the run trained
    tokenizer = AutoTokenizer.from_pretrained(base)
    prompts = _prompts(run)
    generations = _same_greedy(load_llama(out / "run-f16.gguf"), trained, tokenizer, prompts)
    original = _reference(base, run / "adapter")
    # the nf4 weights matter: merged into the original weights, it would serve another model
    assert any(theirs != hf_greedy(original, tokenizer, tokenizer(prompt)["input_ids"], 24)
               for prompt, theirs in zip(prompts, generations, strict=True))


def test_adapter_only_writes_a_lora_gguf_that_llama_cpp_applies(llama_cpp: object, data_file: Path,
                                                                 tmp_path_factory: pytest.TempPathFactory) -> None:
    from transformers import AutoTokenizer

    tmp = tmp_path_factory.mktemp("gguf-adapter")
    base = _base(tmp / "base", "qwen2")
    run = _run(tmp, base, data_file)
    out = _export(run, tmp / "out", "--adapter-only")
    assert sorted(p.name for p in out.glob("*.gguf")) == ["base-f16.gguf", "run-lora-f16.gguf"]
    modelfile = (out / "Modelfile").read_text()
    assert "FROM ./base-f16.gguf\nADAPTER ./run-lora-f16.gguf\n" in modelfile
    reference = _reference(base, run / "adapter")
    tokenizer = AutoTokenizer.from_pretrained(base)
    prompts = _prompts(run)
    generations = _same_greedy(load_llama(out / "base-f16.gguf", lora=out / "run-lora-f16.gguf"), reference,
                               tokenizer, prompts)
    bare = load_llama(out / "base-f16.gguf")
    assert any(llama_greedy(bare, tokenizer(p)["input_ids"], 24) != g for p, g in zip(prompts, generations, strict=True))
    # an existing base GGUF: only the adapter is written, and the Modelfile points at that base
    again = _export(run, tmp / "again", "--adapter-only", "--base-gguf", str(out / "base-f16.gguf"))
    assert sorted(p.name for p in again.glob("*.gguf")) == ["run-lora-f16.gguf"]
    assert f"FROM {out / 'base-f16.gguf'}\n" in (again / "Modelfile").read_text()


def test_unsupported_architecture_is_refused_in_one_line(llama_cpp: object, data_file: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import AutoModelForCausalLM, OPTConfig

    base = tmp_path / "opt"
    base.mkdir()
    build_tokenizer(base)
    config = OPTConfig(vocab_size=384, hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=2,
                       word_embed_proj_dim=32, max_position_embeddings=128, bos_token_id=0, eos_token_id=0,
                       pad_token_id=1)
    AutoModelForCausalLM.from_config(config).save_pretrained(base)
    adapter = peft_adapter(base, tmp_path / "adapter", targets=("q_proj", "v_proj"))
    run = fake_run(base, adapter, tmp_path / "run", data_file)
    capsys.readouterr()
    assert main(["export", str(run), "--gguf"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --gguf: llama.cpp's converter") and "\n" not in err
    assert "does not support OPTForCausalLM" in err and "llama, mistral" in err and "qwen2" in err
    assert not (run / "gguf").exists()


def test_missing_tools_are_one_line_naming_the_install(llama_cpp: object, data_file: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: {name_or_path: x}\n")
    (run / "adapter").mkdir()
    (run / "adapter" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if llama-cpp-python were not installed
    assert main(["export", str(run), "--gguf", "--quant", "q4_k_m"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: --quant q4_k_m needs llama.cpp's library (llama-cpp-python 0.3.36): "
                   "pip install 'lorafit[gguf]'")
    monkeypatch.setenv("LORAFIT_LLAMA_CPP", str(tmp_path))
    assert main(["export", str(run), "--gguf"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: LORAFIT_LLAMA_CPP={tmp_path}: no convert_hf_to_gguf.py") and "\n" not in err
    assert not (run / "gguf").exists()


FAILING_CONVERTERS = {  # a converter that fails after the merge: with its own error, or stopped by SIGTERM
    "error": ('import sys\nsys.exit("ERROR: no space left on device")\n', 2,
              "error: llama.cpp's convert_hf_to_gguf.py failed: ERROR: no space left on device"),
    "sigterm": ("import os, signal, time\nos.kill(os.getppid(), signal.SIGTERM)\ntime.sleep(60)\n", 143,
                "error: export stopped by SIGTERM: nothing was written to {out}"),
}


@pytest.mark.parametrize("how", list(FAILING_CONVERTERS))
def test_a_failed_export_leaves_the_output_as_it_was(how: str, data_file: Path, tiny_llama: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The export is written into a staging folder and renamed into place only when whole: a
    conversion that fails or is stopped after the merge leaves --output as it was (--overwrite
    too) and no staging folder behind."""
    script, code, message = FAILING_CONVERTERS[how]
    converter = tmp_path / "llama.cpp"
    (converter / "gguf-py" / "gguf").mkdir(parents=True)
    (converter / "conversion").mkdir()
    (converter / "conversion" / "llama.py").write_text('@ModelBase.register("LlamaForCausalLM")\nclass A: ...\n')
    (converter / "convert_hf_to_gguf.py").write_text(script)
    monkeypatch.setenv("LORAFIT_LLAMA_CPP", str(converter))
    run = _run(tmp_path, tiny_llama, data_file)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old-f16.gguf").write_text("the previous export")
    capsys.readouterr()
    assert main(["export", str(run), "--gguf", "--output", str(out), "--overwrite"]) == code
    captured = capsys.readouterr()
    assert "lorafit: merged " in captured.out  # it failed after the merge, with the staging folder full
    assert captured.err.strip().splitlines()[-1] == message.format(out=out)  # (library progress bars above)
    assert sorted(p.name for p in out.iterdir()) == ["old-f16.gguf"]
    assert (out / "old-f16.gguf").read_text() == "the previous export"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # the staging folder is gone

TEMPLATES = [  # (format, data.template): the defaults, the chat fallback, and one full of Go/Jinja syntax
    ("summarization", None),
    ("instruction", None),
    ("chat", None),
    ("instruction", '"Q" {{{{x}}}} {{%}} {{#}} """ {instruction}\nA: {{'),
]


@pytest.mark.parametrize(("fmt", "template"), TEMPLATES)
def test_modelfile_and_gguf_templates_render_the_training_prompt(fmt: str, template: str | None,
                                                                 tiny_llama: Path, tmp_path: Path) -> None:
    """Ollama renders TEMPLATE with Go's text/template (run here with Go itself where it is
    installed); llama.cpp's servers render the GGUF's chat template (Jinja: jinja2 here, as
    transformers and llama-cpp-python do). Both must give prompt_from_text's prompt exactly."""
    import shutil
    from types import SimpleNamespace

    from transformers import AutoTokenizer
    from transformers.utils.chat_template_utils import _compile_jinja_template

    from lorafit.config import DataConfig
    from lorafit.generation import prompt_from_text
    from lorafit.llamacpp import readme, serving

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    data_config = DataConfig(format=fmt, template=template)
    plan = serving.plan(data_config, tokenizer, context_length=256)
    assert plan.warnings == [] and plan.template.carried
    text = 'Anna: "hi" {{ .Prompt }} {% raw %}\nBen: 🚀'
    expected = prompt_from_text(text, data_config, tokenizer)
    jinja = _compile_jinja_template(plan.chat_template)
    assert jinja.render(messages=[{"role": "user", "content": text}], add_generation_prompt=True) == expected
    target = SimpleNamespace(run_dir=tmp_path, adapter_dir=tmp_path / "adapter")
    (tmp_path / "Modelfile").write_text(readme.modelfile(plan, "m.gguf", None, target), encoding="utf-8")
    if shutil.which("go") is None:
        pytest.skip("Go is not installed: the Modelfile's TEMPLATE is checked with Go's text/template")
    (tmp_path / "prompt.txt").write_text(text, encoding="utf-8")
    renderer = Path(__file__).parent / "go" / "render_template.go"
    done = subprocess.run(["go", "run", str(renderer), str(tmp_path / "Modelfile"), str(tmp_path / "prompt.txt")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout == expected


OTHER_TEMPLATE = "{% for m in messages %}<<{{ m['role'] }}>> {{ m['content'] }}\n{% endfor %}"


def test_chat_run_carries_its_recorded_chat_template_and_stops(llama_cpp: object, tmp_path: Path) -> None:
    """A run trained through the tokenizer's chat template, data.format auto: the GGUF carries the
    template recorded at training (whole conversations render as in training) even though the base's
    tokenizer has another one by now; the Modelfile renders one user message the same way and stops
    where ``lorafit generate`` stops: EOS and the template's end-of-turn token."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    from transformers import AutoTokenizer

    from lorafit.adapters import base_run_config, load_tokenizer_for, trained_data_config
    from lorafit.generation import stop_token_ids
    from lorafit.resolved import resolve
    from lorafit.runs import locate_run

    base = _base(tmp_path / "base", "llama")
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(base)
    rows = [{"messages": [{"role": "user", "content": d}, {"role": "assistant", "content": "ok"}]} for d in DIALOGUES]
    run = _run(tmp_path, base, write_jsonl(tmp_path / "chat.jsonl", rows))
    assert json.loads((run / TEMPLATE_FILE).read_text())["format"] == "chat"  # what auto chose
    tokenizer.chat_template = OTHER_TEMPLATE  # the base changed after training
    tokenizer.save_pretrained(base)
    out = _export(run, tmp_path / "out")
    record = json.loads((out / "lorafit_export.json").read_text())
    assert record["format"] == "chat" and not record["chat_template_replaced"] and record["warnings"] == []
    llm = load_llama(out / "run-f16.gguf")
    assert llm.metadata["tokenizer.chat_template"] == CHAT_TEMPLATE
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                    {"role": "user", "content": DIALOGUES[0]}]
    tokenizer.chat_template = CHAT_TEMPLATE
    formatter = Jinja2ChatFormatter(CHAT_TEMPLATE, eos_token="", bos_token="")
    assert formatter(messages=conversation).prompt == tokenizer.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=True)
    modelfile = (out / "Modelfile").read_text()
    assert 'TEMPLATE """<|endoftext|>user\n{{ .Prompt }}<|pad|>\n<|endoftext|>assistant\n{{ .Response }}"""' \
        in modelfile
    assert _prompts(run)[0] == f"<|endoftext|>user\n{DIALOGUES[0]}<|pad|>\n<|endoftext|>assistant\n"
    target = locate_run(run)
    trained_tokenizer = load_tokenizer_for(resolve(base_run_config(target), new_adapter=False), target.adapter_dir)
    data_config, _ = trained_data_config(target, target.config.data, trained_tokenizer)
    stops = trained_tokenizer.convert_ids_to_tokens(stop_token_ids(data_config, trained_tokenizer))
    assert stops == ["<|endoftext|>", "<|pad|>"] and record["stop"] == stops
    assert 'PARAMETER stop "<|endoftext|>"\nPARAMETER stop "<|pad|>"\n' in modelfile


def test_auto_run_of_another_shape_exports_its_template_with_only_lorafit_lines(
        llama_cpp: object, tiny_llama: Path, tmp_path: Path) -> None:
    """``lorafit export`` as a user runs it (its own process, q4_k_m through llama.cpp's quantizer, a
    CPU with bf16 units) on a run whose data.format auto chose instruction: the TEMPLATE is the
    instruction prompt (not the summarization one an unresolved auto would render), every line
    printed is lorafit's, and the merge is fp32 (training's auto would pick bf16 on this CPU)."""
    rows = [{"instruction": f"Name a colour, number {i}.", "output": "Blue."} for i in range(8)]
    run = _run(tmp_path, tiny_llama, write_jsonl(tmp_path / "instr.jsonl", rows))
    quiet_env = {k: v for k, v in os.environ.items()
                 if k not in ("LORAFIT_DEBUG", "TQDM_DISABLE", "TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS")}
    done = subprocess.run([sys.executable, "-m", "lorafit", "export", str(run), "--gguf", "--quant", "q4_k_m"],
                          capture_output=True, text=True, env=dict(quiet_env, OMP_NUM_THREADS="1", LORAFIT_CPU_BF16="1"), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = (done.stdout + done.stderr).splitlines()
    assert lines and all(line.startswith("lorafit: ") for line in lines), done.stdout + done.stderr
    assert any(line.startswith("lorafit: merged ") and line.endswith("(float32)") for line in lines), lines
    prompt = _prompts(run, ["Name a colour."])[0]
    assert prompt.startswith("Below is an instruction") or "Name a colour." in prompt
    assert "Summarize" not in prompt
    before, after = prompt.split("Name a colour.")
    modelfile = (run / "gguf" / "Modelfile").read_text()
    template = modelfile.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    assert template == f"{before}{{{{ .Prompt }}}}{after}{{{{ .Response }}}}"
    assert json.loads((run / "gguf" / "lorafit_export.json").read_text())["format"] == "instruction"
    llm = load_llama(run / "gguf" / "run-q4_k_m.gguf")
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    formatter = Jinja2ChatFormatter(llm.metadata["tokenizer.chat_template"], eos_token="", bos_token="")
    assert formatter(messages=[{"role": "user", "content": "Name a colour."}]).prompt == prompt


def test_auto_run_without_its_template_record_is_one_line(llama_cpp: object, data_file: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """data.format auto in config.yaml and no lorafit_template.json: which format training chose is
    unknown, so nothing is guessed or written until --format names it."""
    base = _base(tmp_path / "base", "llama")
    run = _run(tmp_path, base, data_file)
    (run / TEMPLATE_FILE).unlink()
    (run / "adapter" / TEMPLATE_FILE).unlink()
    capsys.readouterr()
    assert main(["export", str(run), "--gguf"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {run}: the run's data.format is auto and its lorafit_template.json is missing; pass --format"
    assert not (run / "gguf").exists() and not list(run.glob(".gguf*"))
    assert main(["export", str(run), "--gguf", "--format", "summarization"]) == 0  # as the message says
    assert 'TEMPLATE """Summarize the chat dialogue:\n{{ .Prompt }}' in (run / "gguf" / "Modelfile").read_text()
    assert not (run / "gguf" / TEMPLATE_FILE).exists()  # no record of a run that has none


def test_converter_is_unpacked_from_the_sdist_and_nothing_else(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the converter's files come out of llama-cpp-python's sdist: no links, nothing outside
    the tools folder, nothing but the scripts, conversion/ and gguf-py/gguf/."""
    import io
    import sys as _sys
    import tarfile

    from lorafit.llamacpp import tools

    archive = tmp_path / "llama_cpp_python-9.9.9.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        def add(name: str, data: bytes = b"x = 1\n", kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
            info = tarfile.TarInfo(f"llama_cpp_python-9.9.9/{name}")
            info.type, info.linkname, info.size = kind, link, len(data) if kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
        add("vendor/llama.cpp/convert_hf_to_gguf.py")
        add("vendor/llama.cpp/convert_lora_to_gguf.py")
        add("vendor/llama.cpp/conversion/llama.py", b'@ModelBase.register("LlamaForCausalLM")\nclass A: ...\n')
        add("vendor/llama.cpp/gguf-py/gguf/__init__.py")
        add("vendor/llama.cpp/src/llama.cpp")
        add("vendor/llama.cpp/conversion/../../../evil.py")
        add("vendor/llama.cpp/conversion/link.py", kind=tarfile.SYMTYPE, link="/etc/passwd")
        add("setup.py")
    monkeypatch.setattr(_sys, "prefix", str(tmp_path / "venv"))
    folder = tools.install_converter(archive, "9.9.9")
    assert folder == tmp_path / "venv" / "share" / "lorafit" / "llama.cpp-9.9.9"
    found = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() or p.is_symlink())
    assert found == ["conversion/llama.py", "convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "gguf-py/gguf/__init__.py"]
    assert not (tmp_path / "evil.py").exists() and not list(tmp_path.glob("venv/share/lorafit/evil*"))
    assert tools.supported_architectures(folder) == {"LlamaForCausalLM"}
