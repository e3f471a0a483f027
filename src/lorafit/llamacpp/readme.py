"""The Ollama ``Modelfile`` and the short README written beside an exported GGUF."""

from __future__ import annotations

import json
from typing import Any

from lorafit.llamacpp.serving import ServingPlan

_EXAMPLE = {
    "summarization": "Anna: Are we still on for lunch?\nBen: Yes, 12:30 at the usual place.",
    "instruction": "Give three tips for staying focused while studying.",
    "chat": "Give three tips for staying focused while studying.",
    "text": "Once upon a time",
}


def _quoted(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)


def modelfile(plan: ServingPlan, model: str, adapter: str | None, target: Any) -> str:
    """FROM, ADAPTER, TEMPLATE (the trained prompt), stops, context length, greedy decoding."""
    where = target.run_dir or target.adapter_dir
    lines = [
        f"# Ollama Modelfile written by `lorafit export` for {where}",
        "# ollama create my-model -f Modelfile && ollama run my-model \"your text\"",
        f"FROM ./{model}" if "/" not in model else f"FROM {model}",
    ]
    if adapter:
        lines.append(f"ADAPTER ./{adapter}")
    if plan.template.carried and plan.chat:
        lines.append("# TEMPLATE renders the prompt the run trained on for one user message; whole conversations "
                     "follow the GGUF's chat template in llama.cpp's servers")
        lines.append(f'TEMPLATE """{plan.template.go()}"""')
    elif plan.template.carried:
        lines.append(f"# TEMPLATE renders the prompt the run trained on ({plan.format} format)")
        lines.append(f'TEMPLATE """{plan.template.go()}"""')
    else:
        lines.append("# the run's template needs more than one text: send the whole training prompt")
        lines.append('TEMPLATE """{{ .Prompt }}{{ .Response }}"""')
    lines += [f"PARAMETER stop {_quoted(stop)}" for stop in plan.stops]
    lines.append("# the context the run trained with (train.seq_len, within the model's)")
    lines.append(f"PARAMETER num_ctx {plan.num_ctx}")
    lines.append("# greedy, as `lorafit generate` decodes by default; raise it to sample")
    lines.append("PARAMETER temperature 0")
    return "\n".join(lines) + "\n"


def readme(plan: ServingPlan, model: str, adapter: str | None, target: Any, quant: str, warnings: list[str],
           base_note: str | None) -> str:
    """How to run the export with llama.cpp and Ollama, with the exact prompt the run trained on."""
    where = target.run_dir or target.adapter_dir
    example = _EXAMPLE.get(plan.format, _EXAMPLE["instruction"])
    prompt = plan.template.render(example) if plan.template.carried else example
    lora = f" --lora {adapter}" if adapter else ""
    parts = [
        f"# {where.name}: GGUF export ({quant})",
        "",
        f"Written by `lorafit export` from `{where}`: "
        + (f"`{model}` is the base model and `{adapter}` the LoRA adapter in llama.cpp's format."
           if adapter else f"`{model}` is the base model with the adapter merged in."),
    ]
    if base_note:
        parts += ["", f"Base: {base_note}."]
    parts += [
        "",
        "## Prompt",
        "",
        f"The run trained on the `{plan.format}` format. The prompt it trained on, for an example input:",
        "",
        "```text",
        prompt,
        "```",
        "",
        _prompt_note(plan),
        "",
        "## llama.cpp",
        "",
        "```bash",
        f"llama-cli -m {model}{lora} -cnv          # type the input; the chat template adds the prompt",
        f"llama-server -m {model}{lora} -c {plan.num_ctx}  # OpenAI-style /v1/chat/completions",
        "```",
        "",
        "From Python (`pip install llama-cpp-python`):",
        "",
        "```python",
        "from llama_cpp import Llama",
        f"llm = Llama(model_path={model!r}" + (f", lora_path={adapter!r}" if adapter else "")
        + f", n_ctx={plan.num_ctx})",
        f"print(llm.create_completion({prompt!r}, max_tokens=128, temperature=0)['choices'][0]['text'])",
        "```",
        "",
        "## Ollama",
        "",
        "```bash",
        "ollama create my-model -f Modelfile",
        f"ollama run my-model {_quoted(example)}",
        "```",
    ]
    if warnings:
        parts += ["", "## Warnings", ""] + [f"- {w}" for w in warnings]
    return "\n".join(parts) + "\n"


def _prompt_note(plan: ServingPlan) -> str:
    chat = ("the GGUF's chat template (replaced: the run never trained on the base's)" if plan.replaces_chat_template
            else "the GGUF's chat template (the tokenizer's, as trained)")
    stops = ", ".join(f"`{s}`" for s in plan.stops) or "nothing (no EOS token)"
    return (f"The Modelfile's `TEMPLATE` and {chat} build this prompt from your text, so send only the input. "
            f"Generation stops at {stops}: where every training response ended (as `lorafit generate` stops).")
