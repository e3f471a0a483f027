"""What the GGUF and the Ollama Modelfile must carry to serve the prompt the run trained on.

A model fine-tuned on ``Summarize the chat dialogue:\\n{dialogue}\\n---\\nSummary:\\n`` rambles when
served through its base's chat template; llama.cpp and Ollama only know the template the files
give them. So the run's prompt is taken apart once, from ``lorafit.generation.prompt_from_text``
(the entry point every lorafit command builds prompts through) with the run's recorded template
applied (``lorafit.adapters.trained_data_config``: ``lorafit_template.json``, never config.yaml's
``data.format: auto``), with a marker as the text: the pieces around the marker become

- the Modelfile's ``TEMPLATE`` (Go template: ``{{ .Prompt }}`` where the text goes), and
- for runs not trained through the tokenizer's chat template, the GGUF's own chat template
  (Jinja: the last message's content where the text goes), so ``llama-server`` and ``llama-cli``'s
  conversation mode send the trained prompt too. A chat-template run keeps the tokenizer's.

Stops: what ``lorafit generate`` stops at (``lorafit.generation.stop_token_ids``): EOS, which
training appends after every response, and for chat formats the template's end-of-turn token.
The checks compare what the GGUF says (EOS id, add-BOS flag, chat template) with what training
did, and name each difference in one line.

``lorafit.generation`` (torch) is imported inside the functions that call it: this module is
reached from the CLI's argument parsing (through ``lorafit.llamacpp.export``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lorafit.data.formats import concrete, uses_chat_template
from lorafit.errors import LorafitError, first_line

MARKER = "\ue000lorafit-text\ue001"  # private-use code points: in no real template
GO_TEXT = "{{ .Prompt }}"
JINJA_TEXT = "{{ messages[-1]['content'] }}"


@dataclass
class PromptTemplate:
    """The trained prompt as literal pieces around the user's text (the text may occur twice)."""

    pieces: list[str]
    carried: bool = True  # False: the run's template needs more than one text (see ``reason``)
    reason: str = ""

    def render(self, text: str) -> str:
        return text.join(self.pieces)

    def go(self) -> str:
        """Ollama's TEMPLATE: Go text/template, the response after the prompt."""
        return GO_TEXT.join(_go_literal(p) for p in self.pieces) + "{{ .Response }}"

    def jinja(self) -> str:
        """A GGUF chat template (Jinja) that renders the trained prompt around the last message.
        Jinja drops one newline at the very end of a template, so a final newline is followed by an
        empty expression."""
        source = JINJA_TEXT.join(_jinja_literal(p) for p in self.pieces)
        return source + "{{ '' }}" if source.endswith("\n") else source


def _go_literal(text: str) -> str:
    """Literal text in a Go template inside a Modelfile's triple quotes: ``{{`` and quotes escaped."""
    out = []
    for i, char in enumerate(text):
        if char == "{" and (i + 1 == len(text) or text[i + 1] == "{"):
            out.append('{{ "{" }}')
        elif char == '"':
            out.append('{{ "\\"" }}')
        else:
            out.append(char)
    return "".join(out)


def _jinja_literal(text: str) -> str:
    """Literal text in a Jinja template: an opening brace that would start a tag is escaped."""
    out = []
    for i, char in enumerate(text):
        if char == "{" and (i + 1 == len(text) or text[i + 1] in "{%#"):
            out.append("{{ '{' }}")
        else:
            out.append(char)
    return "".join(out)


def prompt_template(data_config: Any, tokenizer: Any) -> PromptTemplate:
    """The run's prompt around a marker text, split at the marker."""
    from lorafit.generation import prompt_from_text

    try:
        rendered = prompt_from_text(MARKER, data_config, tokenizer)
    except LorafitError as exc:  # e.g. a data.template with columns beyond the text
        return PromptTemplate(["", ""], carried=False, reason=first_line(exc).removeprefix("--prompt: "))
    pieces = rendered.split(MARKER)
    if len(pieces) < 2:
        return PromptTemplate(["", ""], carried=False, reason="the rendered prompt does not contain the text")
    return PromptTemplate(pieces)


def uses_tokenizer_chat_template(data_config: Any, tokenizer: Any) -> bool:
    return uses_chat_template(data_config, tokenizer)


def stop_strings(data_config: Any, tokenizer: Any) -> list[str]:
    """The texts of the tokens ``lorafit generate`` stops at (Ollama matches stops as text): EOS and,
    for chat formats, the template's end-of-turn token (e.g. ``<|im_end|>``, ``<|eot_id|>``)."""
    from lorafit.generation import stop_token_ids

    stops: list[str] = []
    for token_id in stop_token_ids(data_config, tokenizer):
        text = tokenizer.decode([token_id], skip_special_tokens=False)
        if text and text not in stops:
            stops.append(text)
    return stops


def trained_with_bos(data_config: Any, tokenizer: Any) -> bool | None:
    """Whether training put BOS before each prompt (None: the chat template decides, not the flag)."""
    if uses_tokenizer_chat_template(data_config, tokenizer):
        return None
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


@dataclass
class ServingPlan:
    """Everything the export writes about serving, decided before converting."""

    template: PromptTemplate
    chat_template: str | None  # the Jinja the GGUF must carry (the run's prompt, or the tokenizer's own)
    replaces_chat_template: bool  # True: written by the export (the run never trained on the base's)
    stops: list[str]
    num_ctx: int
    eos_id: int | None
    bos: bool | None
    format: str
    chat: bool  # a chat format (chat, sharegpt, ...): the TEMPLATE covers one user message
    warnings: list[str] = field(default_factory=list)


def plan(data_config: Any, tokenizer: Any, *, context_length: int) -> ServingPlan:
    """The serving plan for a run's data settings and tokenizer (as ``trained_data_config`` gives them:
    a concrete format, the recorded chat template); warnings for what cannot travel."""
    template = prompt_template(data_config, tokenizer)
    warnings: list[str] = []
    keep_own = uses_tokenizer_chat_template(data_config, tokenizer)
    if not template.carried:
        warnings.append(f"the run's prompt template cannot be carried ({template.reason}): the Modelfile "
                        "and the GGUF's chat template pass your text through unchanged, so send the whole "
                        "training prompt yourself")
    if tokenizer.eos_token_id is None:
        warnings.append("the tokenizer has no EOS token, so training taught no stop: generation runs to "
                        "the length limit")
    chat_template = getattr(tokenizer, "chat_template", None) if keep_own else template.jinja()
    if not isinstance(chat_template, str) and keep_own:
        warnings.append("the tokenizer has several named chat templates; the GGUF carries the default one only")
        chat_template = None
    return ServingPlan(template, chat_template, not keep_own, stop_strings(data_config, tokenizer), context_length,
                       tokenizer.eos_token_id, trained_with_bos(data_config, tokenizer), data_config.format,
                       concrete(data_config).chat, warnings)


def gguf_metadata(path: Any) -> dict[str, Any]:
    """The tokenizer keys of a GGUF file that decide how it is prompted and where it stops."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    wanted = {"tokenizer.ggml.eos_token_id": "eos_id", "tokenizer.ggml.bos_token_id": "bos_id",
              "tokenizer.ggml.add_bos_token": "add_bos", "tokenizer.chat_template": "chat_template",
              "general.architecture": "architecture"}
    out: dict[str, Any] = {}
    for key, name in wanted.items():
        found = reader.get_field(key)
        if found is not None:
            out[name] = found.contents()
    arch = out.get("architecture")
    if arch:
        found = reader.get_field(f"{arch}.context_length")
        if found is not None:
            out["context_length"] = found.contents()
    return out


def check_gguf(plan: ServingPlan, metadata: dict[str, Any]) -> list[str]:
    """Differences between what the GGUF says and what training did, one line each."""
    problems = []
    if plan.eos_id is not None and metadata.get("eos_id") != plan.eos_id:
        problems.append(f"the GGUF's EOS token is {metadata.get('eos_id')}, training ended every response with "
                        f"{plan.eos_id}: llama.cpp will not stop where training taught it to")
    if plan.bos is not None and bool(metadata.get("add_bos", False)) != plan.bos:
        said = "adds" if metadata["add_bos"] else "does not add"
        problems.append(f"the GGUF {said} BOS before a prompt; training {'did' if plan.bos else 'did not'}")
    if plan.chat_template is not None and metadata.get("chat_template") != plan.chat_template:
        problems.append("the GGUF's chat template is not the one the run trained with: llama.cpp's servers "
                        "will build other prompts than training did")
    return problems
