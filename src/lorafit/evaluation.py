"""Score an adapter (and, with ``baseline``, the bare base) on held-out rows: ROUGE and perplexity.

- ROUGE-1/2/L/Lsum (Google's ``rouge_score``, stemming on) compare greedy generations with the
  reference responses, as F-measures x 100. ROUGE-Lsum splits texts into sentences on newlines,
  so sentences are put on their own lines first (as the summarization recipes do with nltk).
  ROUGE is computed for summarization data, where a reference summary exists to compare with.
- Perplexity = exp(mean token loss over the response tokens), the tokens training was scored on,
  for every format (for plain text, every token).
- Preference runs (``train.objective`` dpo / orpo): the run's objective on the held-out pairs: reward
  accuracy (the share of pairs whose chosen answer gets the higher reward), reward margin, the
  rewards and log-probabilities, and the objective's loss; ROUGE and perplexity against the
  chosen answers. DPO's reference is the one training used (the base, or the starting adapter,
  which is then scored too, as ``starting_adapter``: the SFT behaviour a DPO run should keep).

Rows scored: ``--data`` if given; else exactly the held-out rows the run drew and kept in its
folder (``heldout.jsonl``: file, line and content hash of each, from ``data.eval_path`` or the
seeded ``eval_fraction`` split, after the rows training dropped), so a score never includes a
row the run trained on. The output says which rows were scored.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from lorafit.data.collate import collate
from lorafit.data.encode import IGNORE_INDEX, encode, encode_options
from lorafit.data.formats import PREFERENCE_FORMATS, BadRow, render, segments, uses_chat_template
from lorafit.data.preference import collate_pairs, encode_rows
from lorafit.data.sources import load_rows
from lorafit.errors import DataError, first_line
from lorafit.generation import (
    GenerationSettings,
    generate,
    length_batches,
    prompt_from_row,
    stop_token_ids,
)
from lorafit.loss import compute_loss
from lorafit.objectives import scoring_objective
from lorafit.resolved import RUN_FILE
from lorafit.runs import HELD_OUT_FILE, HELD_OUT_LABEL, RunTarget

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> str:
    """One sentence per line, as rougeLsum expects."""
    return "\n".join(s for s in _SENTENCE_END.split(text.strip()) if s)


def rouge_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE F-measures x 100 over the pairs."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError("predictions and references differ in length")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_KEYS, 0.0)
    for prediction, reference in zip(predictions, references, strict=True):
        scores = scorer.score(split_sentences(reference), split_sentences(prediction))
        for key in ROUGE_KEYS:
            totals[key] += scores[key].fmeasure
    n = max(len(predictions), 1)
    return {key: round(100 * totals[key] / n, 4) for key in ROUGE_KEYS}


def eval_rows(target: RunTarget, data_config: Any, tokenizer: Any, data: str | None = None,
              limit: int | None = None) -> tuple[list[dict[str, Any]], str]:
    """The rows to score and a label saying where they came from (see the module docstring)."""
    if data:
        rows, source = _readable(load_rows([data], data_config.split, "--data", data_config.subset)), data
    else:
        rows, source = held_out_rows(target)
    rows = [r for r in rows if _renders(r, data_config, tokenizer)]
    if not rows:
        raise DataError(f"{data or source}: no usable rows to evaluate (format {data_config.format})")
    return (rows[:limit] if limit else rows), source


def held_out_rows(target: RunTarget) -> tuple[list[dict[str, Any]], str]:
    """The rows the run held out, as it kept them, and a label naming them."""
    folder = target.run_dir
    path = folder / HELD_OUT_FILE if folder is not None else None
    if path is None or not path.exists():
        where = folder or target.adapter_dir
        raise DataError(f"--data: {where} keeps no held-out rows (no {HELD_OUT_FILE}: an adapter without its run, "
                        "or a run with no eval split); name the data to score")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            records.append((record["row"], record.get("source")))
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(f"{path}:{number}: not a held-out record as training writes it ({first_line(exc)})") from exc
    files = sorted({Path(source).name for _, source in records if source})
    # the label starts with HELD_OUT_LABEL (the model card tells the run's own rows from a --data
    # file by it) and names no local path (it goes into a card that may be published)
    label = f"{HELD_OUT_LABEL}: {len(records)} rows of {HELD_OUT_FILE}, drawn from {', '.join(files) or 'the data'}"
    return [row for row, _ in records], label


def _readable(raw: list[Any]) -> list[dict[str, Any]]:
    return [r.data for r in raw if r.data is not None]


def _renders(row: dict[str, Any], data_config: Any, tokenizer: Any) -> bool:
    try:
        segments(row, data_config, tokenizer)
    except BadRow:
        return False
    return True


def loss_sample(row: dict[str, Any], data_config: Any, tokenizer: Any, seq_len: int
                ) -> tuple[list[int], list[int]] | None:
    """A row encoded exactly as in training (cut to ``seq_len``); None when it has no trained token."""
    try:
        parts = segments(row, data_config, tokenizer)
    except BadRow:
        return None
    sample = encode(parts, tokenizer, encode_options(data_config, tokenizer))
    ids, labels = sample.input_ids[:seq_len], sample.labels[:seq_len]
    return (ids, labels) if any(t != IGNORE_INDEX for t in labels[1:]) else None


@torch.no_grad()
def loss_totals(model: Any, tokenizer: Any, samples: list[tuple[list[int], list[int]]], *,
                batch_size: int = 8) -> tuple[float, int]:
    """(summed token loss, tokens) over ``samples``, ``batch_size`` at a time in order; the sums add
    up across calls in the same order, so an endpoint's batches give the local figure."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    loss_sum, tokens = 0.0, 0
    for start in range(0, len(samples), batch_size):
        rows = [{"input_ids": ids, "labels": labels} for ids, labels in samples[start : start + batch_size]]
        batch = collate(rows, pad_id)
        value, n = compute_loss(model, {k: v.to(device) for k, v in batch.items()}, mode="full")
        loss_sum += float(value)
        tokens += int(n)
    return loss_sum, tokens


def perplexity_of(loss_sum: float, tokens: int) -> float:
    return round(math.exp(loss_sum / max(tokens, 1)), 4)


def perplexity(model: Any, tokenizer: Any, rows: list[dict[str, Any]], data_config: Any, *,
               seq_len: int = 1024, batch_size: int = 8) -> float | None:
    """exp(mean loss over the trained tokens of ``rows``), encoded exactly as in training."""
    samples = [s for s in (loss_sample(row, data_config, tokenizer, seq_len) for row in rows) if s is not None]
    if not samples:
        return None
    return perplexity_of(*loss_totals(model, tokenizer, samples, batch_size=batch_size))


def score(model: Any, tokenizer: Any, rows: list[dict[str, Any]], data_config: Any, *,
          settings: GenerationSettings | None = None, batch_size: int = 8, seq_len: int = 1024,
          predictions_out: list[str] | None = None) -> dict[str, float | None]:
    """All metrics for one model state (adapter active, or the bare base)."""
    metrics: dict[str, float | None] = {}
    if data_config.format in ("summarization", *PREFERENCE_FORMATS):
        prompts, references = [], []
        for row in rows:
            try:
                references.append(render(row, data_config, tokenizer).response)
            except BadRow:
                continue
            prompts.append(prompt_from_row(row, data_config, tokenizer))
        predictions = generate(model, tokenizer, prompts, settings or GenerationSettings(), batch_size=batch_size,
                               add_special_tokens=not uses_chat_template(data_config, tokenizer),
                               stop_ids=stop_token_ids(data_config, tokenizer))
        metrics.update(rouge_scores(predictions, references))
        if predictions_out is not None:
            predictions_out.extend(predictions)
    metrics["perplexity"] = perplexity(model, tokenizer, rows, data_config, seq_len=seq_len, batch_size=batch_size)
    return metrics


def evaluate_session(session: Any, rows: list[dict[str, Any]], *, adapters: list[str] | None = None,
                     baseline: bool = False, settings: GenerationSettings | None = None, batch_size: int = 8,
                     samples: int = 3) -> dict[str, Any]:
    """Score each named adapter (default: all loaded) and optionally the base, on one loaded base.

    Returns ``{"adapter": metrics of the first, "adapters": {name: metrics}, "baseline": metrics}``
    plus a few example generations, so a reader can see what the numbers mean.
    """
    names = adapters if adapters is not None else list(session.adapters)
    data_config = session.data_config
    seq_len = session.config.train.seq_len
    result: dict[str, Any] = {}
    examples: dict[str, list[str]] = {}
    per_adapter: dict[str, Any] = {}
    reference = _preference_reference(session) if data_config.format in PREFERENCE_FORMATS else None
    for name in names:
        with session.activate(name) as model:
            predictions: list[str] = []
            per_adapter[name] = score(model, session.tokenizer, rows, data_config, settings=settings,
                                      batch_size=batch_size, seq_len=seq_len, predictions_out=predictions)
            examples[name] = predictions[:samples]
            if reference is not None:
                per_adapter[name].update(preference_scores(session, model, rows, reference, batch_size))
    if reference is not None and reference[1] is not None:  # the starting adapter, scored as it was
        with session.activate(reference[1]) as model:
            predictions = []
            result["starting_adapter"] = score(model, session.tokenizer, rows, data_config, settings=settings,
                                        batch_size=batch_size, seq_len=seq_len, predictions_out=predictions)
            examples["starting_adapter"] = predictions[:samples]
    if names:
        result["adapter"] = per_adapter[names[0]]
        result["adapters"] = per_adapter
    if baseline or not names:
        with session.activate(None) as model:
            predictions = []
            result["baseline"] = score(model, session.tokenizer, rows, data_config, settings=settings,
                                       batch_size=batch_size, seq_len=seq_len, predictions_out=predictions)
            examples["baseline"] = predictions[:samples]
    if data_config.format in ("summarization", *PREFERENCE_FORMATS):
        result["examples"] = [
            {"reference": render(row, data_config, session.tokenizer).response,
             **{name: texts[i] for name, texts in examples.items() if i < len(texts)}}
            for i, row in enumerate(rows[:samples])
        ]
    return result


REFERENCE_ADAPTER = "starting_adapter"  # the session's name for a DPO run's starting adapter (its reference)


def _preference_reference(session: Any) -> tuple[Any, str | None]:
    """(a context for the reference forward, the starting adapter's name in the session or None) for
    the session's preference run; the starting adapter is loaded into the session once."""
    config = session.config
    if config.train.objective != "dpo":
        return None, None
    start = _start_adapter(session.target)
    if start is None:
        return (lambda: session.model.disable_adapter()), None
    if not Path(start).expanduser().exists():
        raise DataError(f"model.adapter: {start}, the adapter this DPO run started from and its reference, is not "
                        "here; the rewards need it (a run from a SageMaker job: copy it back to that path)")
    if REFERENCE_ADAPTER not in session.adapters:
        session.add(start, name=REFERENCE_ADAPTER)
    return (lambda: session.activate(REFERENCE_ADAPTER)), REFERENCE_ADAPTER


def _start_adapter(target: Any) -> str | None:
    """The adapter a run started from: run.json's resolved folder, else the config's model.adapter."""
    if target.run_dir is not None and (target.run_dir / RUN_FILE).exists():
        try:
            recorded = json.loads((target.run_dir / RUN_FILE).read_text(encoding="utf-8")).get("start_adapter")
        except ValueError:
            recorded = None
        if recorded:
            return str(recorded)
    config = target.config
    return config.model.adapter if config is not None and config.model.adapter else None


@torch.no_grad()
def preference_scores(session: Any, model: Any, rows: list[dict[str, Any]], reference: tuple[Any, str | None],
                      batch_size: int = 8) -> dict[str, float]:
    """The run's objective on ``rows`` (pairs) with ``model`` as the policy: loss and reward metrics."""
    config = session.config
    label = "the starting adapter" if reference[1] else "the base model (adapter disabled)"
    objective = scoring_objective(config.train, reference[0], label)
    pairs = encode_rows(rows, config.data, config.train.seq_len, session.tokenizer)
    if not pairs:
        return {}
    device = next(model.parameters()).device
    pad_id = session.tokenizer.pad_token_id if session.tokenizer.pad_token_id is not None else 0
    loss_sum, units = 0.0, 0
    sums = torch.zeros(len(objective.metrics))
    for start in range(0, len(pairs), batch_size):
        batch = {k: v.to(device) for k, v in collate_pairs(pairs[start : start + batch_size], pad_id).items()}
        loss, n, metrics = objective.loss(model, batch)
        loss_sum += float(loss)
        units += n
        sums += metrics.cpu()
    out = {f"{objective.name}_loss": round(loss_sum / units, 6)}
    out.update({name: round(float(value) / units, 6) for name, value in zip(objective.metrics, sums, strict=True)})
    return out


def write_eval(result: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return path


def evaluate_endpoint(invoke: Any, raw_rows: list[dict[str, Any]], *, settings: GenerationSettings,
                      batch_size: int = 8, limit: int | None = None, echo: Any = None
                      ) -> tuple[dict[str, float | None], int, str]:
    """``score`` for a model behind a SageMaker endpoint (``lorafit.sagemaker.handler``), computed
    from the same rows, batches and sums as the local one: the endpoint renders and counts each
    row's prompt, this side forms ``generate``'s length-sorted batches and ``perplexity``'s batches
    from those counts, and each batch is one request. ``invoke(payload)`` sends one request.

    Returns (metrics, rows scored, the data format the endpoint serves)."""
    infos: list[dict[str, Any]] = []
    data_format, max_batch = "", batch_size
    for start in range(0, len(raw_rows), 256):
        answer = invoke({"lorafit": "rows", "inputs": raw_rows[start:start + 256]})
        infos += answer["rows"]
        data_format, max_batch = answer["format"], int(answer["max_batch_size"])
    usable = [(row, info) for row, info in zip(raw_rows, infos, strict=True) if info["usable"]][:limit]
    if not usable:
        raise DataError(f"--data: no usable rows to evaluate (format {data_format})")
    if batch_size > max_batch:
        if echo is not None:
            echo(f"lorafit: batch size {max_batch}, the most the endpoint takes per request (lorafit eval RUN "
                 f"--batch-size {max_batch} scores the same batches)")
        batch_size = max_batch
    metrics: dict[str, float | None] = {}
    parameters = settings.request_parameters()
    if data_format == "summarization":
        predictions = [""] * len(usable)
        for batch in length_batches([info["prompt_tokens"] for _, info in usable], batch_size):
            answer = invoke({"inputs": [usable[i][0] for i in batch], "parameters": parameters})
            for index, item in zip(batch, answer, strict=True):
                predictions[index] = item["generated_text"]
        metrics.update(rouge_scores(predictions, [info["reference"] for _, info in usable]))
    scored = [row for row, info in usable if info["scored"]]
    loss_sum, tokens = 0.0, 0
    for start in range(0, len(scored), batch_size):
        answer = invoke({"lorafit": "loss", "inputs": scored[start:start + batch_size]})
        loss_sum += float(answer["loss_sum"])
        tokens += int(answer["tokens"])
    metrics["perplexity"] = perplexity_of(loss_sum, tokens) if scored else None
    return metrics, len(usable), data_format
