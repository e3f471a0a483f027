"""lorafit vs the 2023 recipe and vs TRL's SFTTrainer: same model, data, LoRA and precision, one run.

    python benchmarks/train_speed.py            # BLOOM-560m shape + a Llama-3-style 0.5B shape
    python benchmarks/train_speed.py --quick    # small shapes, a few minutes
    python benchmarks/train_speed.py --shapes llama-0.5b --systems recipe,lorafit-equal --rounds 3
    pip install -e .[bench]                     # TRL, pinned (the peer; benchmark only)

Four systems train in their own subprocesses (so each peak RSS is its own), all alive at once and
stepping in lock-step (the system behind in trained tokens steps next, one step at a time), so
load from other work on a shared machine falls on all of them alike:

- recipe: the 2023 recipe. Samples concatenated and split into seq_len blocks, labels =
  input_ids, ``Trainer`` with gradient checkpointing, peft ``LoraConfig(r=8, lora_alpha=32,
  lora_dropout=0.05)`` on query_key_value (BLOOM) / q,k,v,o_proj (Llama).
- trl: TRL's ``SFTTrainer`` as its docs set it up today: the same peft ``LoraConfig``, a
  prompt-completion data set with ``completion_only_loss``, ``packing`` with the ``bfd`` strategy
  (which turns on padding-free batches) where the model keeps packed samples apart by position
  ids (Llama); BLOOM (ALiBi, no position ids) trains one sample per row, as lorafit does.
  Gradient checkpointing (SFTConfig's default), TRL's fused LM head (its default loss).
- lorafit: what ``lorafit train`` runs with its defaults: ``lorafit.modeling`` (adapter,
  checkpointing, fused ops), rows from ``lorafit.data`` (``packed`` where the model allows, else
  one sample per row; loss on responses only), the step of ``lorafit.training``.
- lorafit-equal: lorafit doing the recipe's work: ``data.train_on_prompt: true`` and ``chunk``
  packing (the recipe's blocks, loss on every token), everything else as lorafit.
- lorafit-16bit (fp32 runs only): lorafit with ``model.dtype: bfloat16`` at ``train.precision:
  fp32``: the frozen matrices stay bf16 and are upcast per matmul (``lorafit.storage``), the
  way to halve the base on a CPU that has no bf16 compute.

With ``--rounds N`` each shape is measured N times (fresh processes each round) and each system's
median time and peaks are reported, with every round's tokens/s: a system's speed can move 30%
between runs on a quiet machine, more than some of the gaps measured.

Printed per system: trained (non-padding) tokens/s, the whole process's peak memory and the
training phase's (GPU: max allocated; host: VmHWM, reset once model, data and optimizer are built,
see ``PeakMemory``), MFU, and the ratios lorafit / peer. The last line is one JSON object: per
shape ``train_memory_ratio`` and ``trl_train_memory_ratio`` (training-phase peaks), ``memory_ratio``,
``speed_ratio`` (vs the recipe), ``trl_memory_ratio``, ``trl_speed_ratio`` (vs TRL),
``equal_work_speed_ratio`` (lorafit-equal vs the recipe) and ``mfu``, and for lorafit-16bit
``bf16_storage`` with the same four ratios; the first shape's numbers also at the top level.

MFU counts model FLOPs, not recomputation: frozen weights cost 2 (forward) + 2 (input gradient)
FLOPs per weight per token; attention 3 x its forward; the LM head only on the positions whose
logits a system computes (recipe: all; TRL on CPU: all, on GPU: labelled; lorafit: labelled). It
is given against two ceilings measured in this run: a large square matmul, and the model's own
matmuls (each linear's forward and input-gradient GEMM at seq_len tokens, the LM head at a loss
slice), which is the most the model's GEMMs could reach here.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

import torch
from machine_info import cpu_name

SHAPES: dict[str, dict[str, Any]] = {
    "bloom-560m": {"model_type": "bloom", "hidden_size": 1024, "n_layer": 24, "n_head": 16, "vocab_size": 250880},
    # Llama-3.2-1B's proportions at half the width (GQA 4:1, SwiGLU 4x, Llama-3 vocabulary, tied
    # head): 0.50B parameters, so four systems fit a shared 24 GB machine at once.
    "llama-0.5b": {"model_type": "llama", "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                   "num_key_value_heads": 4, "intermediate_size": 4096, "vocab_size": 128256,
                   "tie_word_embeddings": True, "max_position_embeddings": 2048},
    # issue 4's Llama shape (multi-head, untied), kept for comparison with older results
    "llama-0.6b": {"model_type": "llama", "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                   "num_key_value_heads": 16, "intermediate_size": 2816, "vocab_size": 128256,
                   "tie_word_embeddings": False, "max_position_embeddings": 2048},
    "bloomz-7b1": {"model_type": "bloom", "hidden_size": 4096, "n_layer": 30, "n_head": 32, "vocab_size": 250880},
    "llama-8b": {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
                 "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256,
                 "tie_word_embeddings": False, "max_position_embeddings": 8192},
    "bloom-quick": {"model_type": "bloom", "hidden_size": 256, "n_layer": 4, "n_head": 4, "vocab_size": 250880},
    "llama-quick": {"model_type": "llama", "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
                    "num_key_value_heads": 1, "intermediate_size": 1024, "vocab_size": 128256,
                    "tie_word_embeddings": True, "max_position_embeddings": 2048},
}
RECIPE_TARGETS = {"bloom": ["query_key_value"], "llama": ["q_proj", "k_proj", "v_proj", "o_proj"]}
SYSTEMS = ("recipe", "trl", "lorafit", "lorafit-equal", "lorafit-16bit")
EOS = 2  # an EOS-like id ending every response


# ------------------------------------------------------------------------------------- data
def make_samples(n: int, vocab: int, seed: int = 1234, seq_len: int = 512) -> list[tuple[list[int], list[int]]]:
    """Deterministic (prompt, response) token lists of variable length, like dialogue summaries
    (at seq_len 512: prompts 24-419 tokens, responses 8-119 + EOS; scaled with seq_len)."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(n):
        p_len = int(torch.randint(24, max(25, 420 * seq_len // 512), (1,), generator=g))
        r_len = int(torch.randint(8, max(9, 120 * seq_len // 512), (1,), generator=g))
        ids = torch.randint(10, vocab, (p_len + r_len,), generator=g).tolist()
        samples.append((ids[:p_len], ids[p_len:] + [EOS]))
    return samples


def recipe_blocks(samples: list[tuple[list[int], list[int]]], seq_len: int) -> list[dict[str, list[int]]]:
    """The recipe's data: concatenate everything, split into seq_len blocks, labels = input_ids."""
    stream = [t for p, r in samples for t in p + r]
    n = len(stream) // seq_len
    return [{"input_ids": stream[i * seq_len:(i + 1) * seq_len], "attention_mask": [1] * seq_len,
             "labels": stream[i * seq_len:(i + 1) * seq_len]} for i in range(n)]


def packs_by_position(model_type: str) -> bool:
    """Whether packed samples stay apart in this model (position ids restart per sample): what
    lorafit's resolved run decides, from a small copy of the architecture."""
    from transformers import AutoConfig

    from lorafit.probe import architecture_facts

    return architecture_facts(AutoConfig.for_model(model_type)).keeps_packed_samples_apart is True


# ------------------------------------------------------------------------------------ model
def device() -> torch.device:
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def shape_config(shape: dict[str, Any]) -> Any:
    from transformers import AutoConfig

    settings = dict(shape)
    cfg = AutoConfig.for_model(settings.pop("model_type"), **settings)
    cfg.use_cache = False
    return cfg


def build_model(shape: dict[str, Any], dtype: torch.dtype) -> Any:
    """Random weights from a config: no file, so every system starts from the same RSS. The
    weights are bf16 values (as checkpoints ship) held in ``dtype``: every system computes the
    same function whatever dtype it keeps them in."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    torch.manual_seed(0)
    with device(), no_init_weights():  # transformers' init holds fp32 temporaries: a peak no run has
        model = AutoModelForCausalLM.from_config(shape_config(shape), dtype=dtype)
    model.tie_weights()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.fill_(1.0 if "norm" in name or name.endswith("ln_f.weight") else 0.0)
                continue
            for start in range(0, param.shape[0], 8192):  # in slices: no full-size temporaries
                part = param[start:start + 8192]
                part.copy_(torch.randn(part.shape, dtype=torch.float32, device=part.device).mul_(0.02)
                           .to(torch.bfloat16))
    return model


def save_random_model(shape: dict[str, Any], dtype: torch.dtype, folder: str) -> None:
    """A random-weight checkpoint on disk, for the quantized (int8/nf4) runs that load from files."""
    model = build_model(shape, dtype)
    model.save_pretrained(folder, safe_serialization=True)


def load_quantized_recipe(args: argparse.Namespace, dtype: torch.dtype) -> Any:
    """The recipe's quantized base: LLM.int8() (the recipe), or QLoRA's NF4; prepared for k-bit training."""
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if args.quant == "int8":
        quant = BitsAndBytesConfig(load_in_8bit=True)
    else:
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, quantization_config=quant, dtype=dtype,
                                                 device_map={"": device()})
    model.config.use_cache = False
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)


def model_flops(model: Any, processed: int, logit_tokens: int, row_lens: list[int]) -> float:
    """Model FLOPs of the measured steps (see the module docstring)."""
    cfg = model.config
    head = model.get_output_embeddings()
    embed = model.get_input_embeddings()
    base_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    body = base_params - embed.weight.numel() - (0 if head.weight is embed.weight else head.weight.numel())
    hidden, layers = cfg.hidden_size, cfg.num_hidden_layers
    attention = sum(3 * 2 * 2 * n * n * hidden * layers / 2 for n in row_lens)  # causal half, fwd + 2x bwd
    return 4.0 * body * processed + 4.0 * head.weight.numel() * logit_tokens + attention


def _best_time(fn: Any, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        _sync()
        t = time.perf_counter()
        fn()
        _sync()
        best = min(best, time.perf_counter() - t)
    return best


def gemm_ceiling(dtype: torch.dtype, reps: int = 5, n: int | None = None) -> float:
    """FLOP/s of a large square matmul in ``dtype``: the best of a few runs."""
    dev = device()
    n = n or (8192 if dev.type == "cuda" else 2048)
    a, b = torch.randn(n, n, device=dev).to(dtype), torch.randn(n, n, device=dev).to(dtype)
    return 2 * n ** 3 / _best_time(lambda: torch.matmul(a, b), reps)


def model_gemm_ceiling(shape: dict[str, Any], dtype: torch.dtype, tokens: int, reps: int = 3) -> float:
    """FLOP/s of the model's own matmuls: every frozen linear of one layer, forward (x W^T) and
    input gradient (g W), at ``tokens`` rows, plus the LM head at one loss slice, weighted by how
    often each runs per token (layers x linears, head once)."""
    from transformers import AutoModelForCausalLM

    from lorafit.loss import SLICE_BYTES

    dev = device()
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(shape_config(shape))
    layer_shapes: dict[tuple[int, int], int] = {}
    for name, module in meta.named_modules():
        if isinstance(module, torch.nn.Linear) and ".0." in name:  # the first decoder layer
            key = tuple(module.weight.shape)
            layer_shapes[key] = layer_shapes.get(key, 0) + 1
    layers = meta.config.num_hidden_layers
    vocab, hidden = meta.config.vocab_size, meta.config.hidden_size
    slice_rows = max(1, SLICE_BYTES // (4 * vocab))
    work = [(out, inp, tokens, count * layers) for (out, inp), count in layer_shapes.items()]
    work.append((vocab, hidden, slice_rows, max(1, tokens // slice_rows)))
    flops = seconds = 0.0
    for out, inp, rows, count in work:
        w = (torch.randn(out, inp, device=dev) * 0.02).to(dtype)
        x = torch.randn(rows, inp, device=dev).to(dtype)
        g = torch.randn(rows, out, device=dev).to(dtype)
        forward = _best_time(functools.partial(torch.nn.functional.linear, x, w), reps)
        backward = _best_time(functools.partial(torch.matmul, g, w), reps)
        flops += count * 2 * (2 * rows * out * inp)
        seconds += count * (forward + backward)
    return flops / seconds


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _status_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PeakMemory:
    """A system's peak memory, whole process and training phase apart.

    Loading sets a process's lifetime peak (a model built and cast), which says nothing about
    what a training step holds, so the peak is reset once the model, data and optimizer are built
    (``start_training``) and read at the end. GPU: ``max_memory_allocated`` and
    ``reset_peak_memory_stats``. Linux host: VmHWM, the high-water mark of this process's own
    memory, reset by writing 5 to /proc/self/clear_refs. Not ``ru_maxrss``: the kernel carries
    the pre-``exec`` image into it, so a child started by a parent holding 2 GiB reports 2 GiB
    whatever it does itself. ``train_start_bytes`` is what was resident when training began
    (weights, imports): ``train_peak - train_start`` is what the steps themselves added.
    """

    def __init__(self) -> None:
        self.loading_peak: int | None = None
        self.at_start: int | None = None

    def start_training(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.loading_peak = int(torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()
            self.at_start = int(torch.cuda.memory_allocated())
            return
        self.loading_peak = _status_bytes("VmHWM")
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            return
        self.at_start = _status_bytes("VmRSS")

    def read(self) -> dict[str, int | None]:
        if torch.cuda.is_available():
            train: int | None = int(torch.cuda.max_memory_allocated())
        else:
            train = _status_bytes("VmHWM") if self.at_start is not None else None
        whole = max(v for v in (self.loading_peak, train, 0) if v is not None)
        if not whole:  # neither GPU nor /proc: the process's max RSS (Linux KiB, macOS bytes)
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            whole = rss if sys.platform == "darwin" else rss * 1024
        return {"peak_bytes": whole, "loading_peak_bytes": self.loading_peak, "train_peak_bytes": train,
                "train_start_bytes": self.at_start}


MEMORY = PeakMemory()  # one per system process


# ----------------------------------------------------------------------------------- systems
class Turns:
    """Step timing. In lock-step mode a system waits for the parent's ``go`` before its first
    step and again after each step's report, so the systems' steps alternate and see the same
    load from other work on shared CPUs; anything but ``go`` ends the run."""

    def __init__(self, lockstep: bool) -> None:
        self.lockstep, self.elapsed, self.started, self.cleared = lockstep, 0.0, 0.0, False

    def wait(self) -> bool:
        """True to go on (always outside lock-step)."""
        if not self.lockstep:
            return True
        self.cleared = sys.stdin.readline().strip() == "go"
        return self.cleared

    def begin(self) -> bool:
        if not self.cleared and not self.wait():
            return False
        _sync()
        self.started = time.perf_counter()
        return True

    def end(self, tokens: int, measured: bool) -> bool:
        """Stop the clock, report the step; True if another step may follow."""
        _sync()
        took = time.perf_counter() - self.started
        if measured:
            self.elapsed += took
        if not self.lockstep:
            return True
        print(f"STEP {tokens} {int(measured)} {took:.4f}", flush=True)
        self.cleared = False
        return self.wait()


def _trainer_clock(args: argparse.Namespace, turns: Turns, tokens: deque) -> Any:
    """A Trainer callback timing each optimizer step in lock-step; ``tokens`` holds the non-padding
    token count of every collated batch in order (the data loader may fetch one ahead)."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.measured: list[int] = []

        def on_train_begin(self, targs, state, control, **kw):  # noqa: ANN001
            MEMORY.start_training()  # model, data and optimizer are built: training starts here

        def on_step_begin(self, targs, state, control, **kw):  # noqa: ANN001
            turns.begin()

        def on_step_end(self, targs, state, control, **kw):  # noqa: ANN001
            n = tokens.popleft()
            measured = state.global_step > args.warmup
            if measured:
                self.measured.append(n)
            if not turns.end(n, measured) or (not args.lockstep and sum(self.measured) >= args.steps * args.seq_len):
                control.should_training_stop = True

    return Clock()


def _counting(collate: Any, tokens: deque) -> Any:
    def wrapped(examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate(examples)
        mask = batch.get("attention_mask")
        tokens.append(int(mask.sum()) if mask is not None else int(batch["input_ids"].numel()))
        return batch

    return wrapped


def _lora_config(shape: dict[str, Any]) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
                      target_modules=RECIPE_TARGETS[shape["model_type"]])


def _base_model(args: argparse.Namespace, shape: dict[str, Any], dtype: torch.dtype) -> Any:
    return load_quantized_recipe(args, dtype) if args.quant != "none" else build_model(shape, dtype)


def run_recipe(args: argparse.Namespace, shape: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    try:
        from datasets import Dataset
    except ImportError:  # a bare GPU image: the Trainer takes a list too
        Dataset = None  # noqa: N806
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments, default_data_collator

    model = get_peft_model(_base_model(args, shape, dtype), _lora_config(shape))
    blocks = recipe_blocks(make_samples(args.samples, shape["vocab_size"], seq_len=args.seq_len), args.seq_len)
    dataset = Dataset.from_list(blocks) if Dataset is not None else blocks
    turns, tokens = Turns(args.lockstep), deque()
    clock = _trainer_clock(args, turns, tokens)
    targs = TrainingArguments(
        output_dir=args.workdir, per_device_train_batch_size=1, gradient_accumulation_steps=1,
        learning_rate=2e-4, max_steps=len(blocks), logging_steps=10_000, save_strategy="no", report_to=[],
        bf16=dtype == torch.bfloat16, gradient_checkpointing=True, use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0, disable_tqdm=True, seed=42, remove_unused_columns=False,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=dataset, data_collator=_counting(default_data_collator,
                                                                                              tokens),
                      callbacks=[clock])
    trainer.train()
    processed = sum(clock.measured)
    flops = model_flops(model, processed, processed, clock.measured)
    return {"tokens": processed, "label_tokens": processed - len(clock.measured), "elapsed_s": turns.elapsed,
            "flops": flops, "rows": "recipe blocks (labels = input_ids)"}


def _tiny_tokenizer() -> Any:
    """A word-level tokenizer with pad/eos tokens: TRL wants a processing class for its pad id;
    the data are token ids already."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "</s>": EOS}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                  pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    return tok


def run_trl(args: argparse.Namespace, shape: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model = _base_model(args, shape, dtype)
    samples = make_samples(args.samples, shape["vocab_size"], seq_len=args.seq_len)
    # prompt-completion, tokenized: TRL builds labels from completion_mask (completion_only_loss)
    dataset = Dataset.from_list([{"input_ids": p + r, "completion_mask": [0] * len(p) + [1] * len(r)}
                                 for p, r in samples])
    packing = packs_by_position(shape["model_type"])
    turns, tokens = Turns(args.lockstep), deque()
    clock = _trainer_clock(args, turns, tokens)
    extra: dict[str, Any] = {}
    if args.trl_liger:
        extra["use_liger_kernel"] = True
    config = SFTConfig(
        output_dir=args.workdir, per_device_train_batch_size=1, gradient_accumulation_steps=1,
        learning_rate=2e-4, max_steps=len(samples), logging_steps=10_000, save_strategy="no", report_to=[],
        bf16=dtype == torch.bfloat16, fp16=False, gradient_checkpointing=True,
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, disable_tqdm=True, seed=42,
        max_length=args.seq_len, packing=packing, packing_strategy="bfd", completion_only_loss=True,
        dataset_num_proc=None, **extra,
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=_tiny_tokenizer(),
                         peft_config=_lora_config(shape), callbacks=[clock])
    trainer.data_collator = _counting(trainer.data_collator, tokens)
    prepared = trainer.train_dataset
    trainer.train()
    processed = sum(clock.measured)
    rows = len(clock.measured)
    # labelled share of the prepared rows (completion-only): the same share holds for the measured ones
    from lorafit.data.encode import IGNORE_INDEX

    labelled = sum(sum(1 for t in r[1:] if t != IGNORE_INDEX) for r in prepared["labels"])
    total = sum(len(r) for r in prepared["input_ids"])
    label_tokens = round(processed * labelled / max(total, 1))
    logits = label_tokens if torch.cuda.is_available() else processed  # TRL scores every position on CPU
    flops = model_flops(trainer.model.get_base_model(), processed, logits, clock.measured)
    mode = "packing bfd (padding-free)" if packing else "one sample per row (no packing: ALiBi)"
    return {"tokens": processed, "label_tokens": label_tokens, "elapsed_s": turns.elapsed, "flops": flops,
            "rows": f"{mode}, completion_only_loss" + (", liger" if args.trl_liger else ""), "steps": rows}


def lorafit_batches(args: argparse.Namespace, shape: dict[str, Any], config: Any,
                    equal_work: bool = False, pad_to_multiple_of: int = 1) -> tuple[list[dict], str]:
    """lorafit's rows for the samples, as ``prepare_data`` makes them: ``packed`` (best-fit
    decreasing, position ids restarting per sample) where the model keeps packed samples apart,
    else one sample per row; with ``equal_work``, ``chunk`` rows with every token labelled
    (``data.train_on_prompt``); the epoch's row order and ``collate`` from ``PreparedData``, rows
    padded to ``pad_to_multiple_of`` tokens (the resolved run's: 64 on a CPU)."""
    from lorafit.data.encode import IGNORE_INDEX, Encoded
    from lorafit.data.packing import chunk_rows, pack_rows, single_rows
    from lorafit.data.prepare import PreparedData

    samples = make_samples(args.samples, shape["vocab_size"], seq_len=args.seq_len)
    if equal_work:
        encoded = [Encoded(input_ids=p + r, labels=p + r) for p, r in samples]
        mode = "chunk"
        rows = chunk_rows(encoded, args.seq_len)
    else:
        encoded = [Encoded(input_ids=(p + r)[: args.seq_len], labels=([IGNORE_INDEX] * len(p) + r)[: args.seq_len])
                   for p, r in samples]
        mode = "packed" if packs_by_position(shape["model_type"]) else "none"
        rows = pack_rows(encoded, args.seq_len) if mode == "packed" else single_rows(encoded)
    data = PreparedData(train=rows, eval=None, packing=mode, pad_token_id=0, summary="", stats={},
                        pad_to_multiple_of=pad_to_multiple_of, seq_len=args.seq_len)
    order = [i for batch in data.epoch_batches(0, 1, config.train.seed) for i in batch]
    label = f"lorafit.data packing={mode}" + (", train_on_prompt" if equal_work else "") \
        + (f", rows padded to x{pad_to_multiple_of}" if pad_to_multiple_of > 1 else "")
    return [data.collate([rows[i]]) for i in order], label


def shape_run(shape: dict[str, Any], settings: dict[str, Any] | None = None) -> Any:
    """lorafit's resolved run for a benchmark shape (its config.json in a temporary folder, no
    weights): the precision, loss and fused paths a real run of that shape gets."""
    from lorafit.config import LorafitConfig
    from lorafit.resolved import resolve

    folder = Path(tempfile.mkdtemp(prefix="lorafit-shape-"))
    atexit.register(shutil.rmtree, folder, True)  # the run's config may read it until the benchmark ends
    shape_config(shape).save_pretrained(folder)
    return resolve(LorafitConfig.model_validate({**(settings or {}), "model": {"name_or_path": str(folder)}}))


def lorafit_config(args: argparse.Namespace, shape: dict[str, Any], dtype: torch.dtype,
                   equal_work: bool = False, stored16: bool = False) -> Any:
    from lorafit.config import LorafitConfig

    precision = "bf16" if dtype == torch.bfloat16 else "fp32"
    weights = "bfloat16" if dtype == torch.bfloat16 or stored16 else "float32"
    model_dir = args.model_dir
    if not model_dir:  # the shape's config.json only: lorafit resolves the run from it (no weights)
        model_dir = str(Path(args.workdir) / "shape-config")
        shape_config(shape).save_pretrained(model_dir)
    return LorafitConfig.model_validate({
        "model": {"name_or_path": model_dir, "quantization": args.quant,
                  "dtype": weights},
        "data": {"train_on_prompt": equal_work, "packing": "chunk" if equal_work else "packed"},
        "train": {"seq_len": args.seq_len, "batch_size": 1, "grad_accum": 1, "precision": precision,
                  "loss": args.lorafit_loss, "checkpoint_every": args.checkpoint_every, "compile": args.compile,
                  "max_steps": args.warmup + args.steps},
        "output_dir": args.workdir,
    })


def run_lorafit(args: argparse.Namespace, shape: dict[str, Any], dtype: torch.dtype,
                equal_work: bool = False, stored16: bool = False) -> dict[str, Any]:
    from transformers import get_scheduler

    from lorafit import training
    from lorafit.checkpoint import TrainerState
    from lorafit.data.encode import IGNORE_INDEX
    from lorafit.distributed import Collectives
    from lorafit.modeling import apply_storage, attach_adapter, load_model
    from lorafit.objectives import build_objective
    from lorafit.resolved import resolve

    config = lorafit_config(args, shape, dtype, equal_work, stored16)
    run = resolve(config)  # the decisions a real run makes: precision, loss, fused paths
    if args.quant != "none":
        model, _ = load_model(run, device())  # lorafit's own loading: bitsandbytes, k-bit prep, adapter
    else:
        base = build_model(shape, run.precision.weights_dtype)
        apply_storage(base, run)  # what load_base_model does after reading the weights
        model, _ = attach_adapter(base, run)
    batches, packing = lorafit_batches(args, shape, config, equal_work, run.pad_to_multiple_of)
    if run.compiled:
        packing += ", compiled layers"
    elif args.compile:  # asked for, and the run fell back (its note says why): not a compiled figure
        packing += "; NOT compiled: " + "; ".join(n for n in run.notes if n.startswith("train.compile"))
    batches = [{k: v.to(device()) for k, v in b.items()} for b in batches]

    # the recipe's own step on a model built here (random weights, no file): the state setup() makes
    recipe = training.LoraFinetuneRecipe(config, progress=False)
    recipe.run, recipe.precision = run, run.precision
    recipe.device, recipe.world, recipe.rank, recipe.is_main = device(), 1, 0, True
    recipe.comm = Collectives(1, recipe.device)
    recipe.model = model
    recipe.trainable = [p for p in model.parameters() if p.requires_grad]
    recipe.objective = build_objective(run, model)
    recipe.optimizer = recipe._build_optimizer()
    recipe.scheduler = get_scheduler("linear", recipe.optimizer, num_warmup_steps=0,
                                     num_training_steps=len(batches))
    recipe.scaler = torch.amp.GradScaler(recipe.device.type) if run.precision.needs_scaler else None
    recipe.state = TrainerState(step=0, micro_batches_done=0, tokens_seen=0)
    model.train()
    turns = Turns(args.lockstep)
    MEMORY.start_training()
    # as many rows as it takes to train steps x seq_len tokens (rows vary); in lock-step the parent decides
    measured, budget = [], args.steps * args.seq_len
    for index, batch in enumerate(batches):
        if (not args.lockstep and budget <= 0) or not turns.begin():
            break
        label_tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        recipe._train_step([training.MicroBatch(batch, label_tokens, batch["input_ids"].numel())],
                           lambda: [False, False, False])
        more = turns.end(batch["input_ids"].numel(), index >= args.warmup)
        if index >= args.warmup:
            measured.append(batch)
            budget -= batch["input_ids"].numel()
        if not more:
            break
    processed = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
                    for b in measured)
    labels = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in measured)
    flops = model_flops(model.get_base_model(), processed, labels,
                        [n for b in measured for n in _sample_lengths(b)])
    return {"tokens": processed, "label_tokens": labels, "elapsed_s": turns.elapsed, "flops": flops,
            "rows": packing}


def _sample_lengths(batch: dict[str, torch.Tensor]) -> list[int]:
    """Lengths of the samples packed in a row (attention stays within a sample)."""
    if "position_ids" not in batch:
        return [int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].shape[1]]
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [batch["position_ids"].shape[1]]
    return [b - a for a, b in zip(starts, starts[1:], strict=False)]


def child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    shape = SHAPES[args.shape]
    if args.child == "recipe":
        result = run_recipe(args, shape, dtype)
    elif args.child == "trl":
        result = run_trl(args, shape, dtype)
    else:
        result = run_lorafit(args, shape, dtype, equal_work=args.child == "lorafit-equal",
                             stored16=args.child == "lorafit-16bit")
    result.update(MEMORY.read())
    print("RESULT " + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------ parent
def child_command(system: str, shape: str, args: argparse.Namespace, workdir: str) -> list[str]:
    return [sys.executable, __file__, "--child", system, "--shape", shape, "--precision", args.precision,
            "--steps", str(args.steps), "--warmup", str(args.warmup), "--seq-len", str(args.seq_len),
            "--samples", str(args.samples), "--threads", str(args.threads), "--workdir", workdir,
            "--quant", args.quant, "--lorafit-loss", args.lorafit_loss,
            "--checkpoint-every", str(args.checkpoint_every)] + (["--compile"] if args.compile else []) + (
        ["--model-dir", args.model_dir] if args.model_dir else []) + (["--trl-liger"] if args.trl_liger else [])


def _env() -> dict[str, str]:
    return {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def _parse(system: str, shape: str, code: int, lines: list[str], log: str) -> dict[str, Any]:
    found = [ln for ln in lines if ln.startswith("RESULT ")]
    if code != 0 or not found:
        sys.stderr.write("".join(lines)[-3000:] + log[-6000:])
        raise SystemExit(f"{system} on {shape} failed (exit {code})")
    return json.loads(found[-1][len("RESULT "):])


def run_sequential(systems: list[str], shape: str, args: argparse.Namespace, workdir: str) -> dict[str, dict]:
    """One system after the other, each alone on the machine."""
    results = {}
    for system in systems:
        proc = subprocess.run(child_command(system, shape, args, f"{workdir}-{system}"), capture_output=True,
                              text=True, env=_env())
        results[system] = _parse(system, shape, proc.returncode, proc.stdout.splitlines(True), proc.stderr)
    return results


def run_lockstep(systems: list[str], shape: str, args: argparse.Namespace, workdir: str) -> dict[str, dict]:
    """All systems at once in lock-step: one step at a time, the one behind in trained tokens
    goes next, so all sample the same load from other work on a shared machine."""
    procs, logs = {}, {}
    for system in systems:
        logs[system] = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed with the process)
        procs[system] = subprocess.Popen(child_command(system, shape, args, f"{workdir}-{system}") + ["--lockstep"],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=logs[system], text=True,
                                         env=_env())
    lines: dict[str, list[str]] = {s: [] for s in procs}

    def step(system: str) -> int | None:
        proc = procs[system]
        try:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return None
        for line in proc.stdout:
            lines[system].append(line)
            if line.startswith("STEP "):
                return int(line.split()[1])
        return None

    for system in procs:
        for _ in range(args.warmup):
            step(system)
    tokens = {s: 0 for s in procs}
    done = {s: False for s in procs}
    target = args.steps * args.seq_len
    while not all(done.values()):
        system = min((s for s in procs if not done[s]), key=lambda s: tokens[s])
        got = step(system)
        if got is None:
            done[system] = True
            continue
        tokens[system] += got
        done[system] = tokens[system] >= target
    results = {}
    for system, proc in procs.items():
        try:
            proc.stdin.write("stop\n")
            proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        lines[system].extend(proc.stdout)
        proc.wait()
        logs[system].seek(0)
        results[system] = _parse(system, shape, proc.returncode, lines[system], logs[system].read())
        logs[system].close()
    return results


def machine() -> str:
    cpu = cpu_name()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 if hasattr(os, "sysconf") else 0
    return (f"{cpu}, {os.cpu_count()} logical CPUs, {mem:.1f} GiB RAM, {gpu}, torch {torch.__version__}, "
            f"Python {platform.python_version()}, load average {load:.2f} at start")


def _versions() -> str:
    import peft
    import transformers

    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = "not installed"
    return f"transformers {transformers.__version__}, peft {peft.__version__}, trl {trl_version}"


def _gib(value: int | None) -> str:
    return f"{value / 2**30:.2f} GiB" if value is not None else "n/a"


def _minus(a: int | None, b: int | None) -> int | None:
    return a - b if a is not None and b is not None else None


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def median_round(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One system's result over several rounds: the time, tokens and FLOPs of its median-speed round
    and the memory figures of its median-peak round (lower middle for an even count), each a round
    that happened: a round with a slow step need not be the one with the high peak."""
    def middle(key: Any) -> dict[str, Any]:
        return sorted(rounds, key=key)[(len(rounds) - 1) // 2]

    merged = dict(middle(lambda r: r["tokens"] / r["elapsed_s"]))
    memory = middle(lambda r: r.get("train_peak_bytes") or r["peak_bytes"])
    for key in ("peak_bytes", "train_peak_bytes", "train_start_bytes"):
        if key in memory:
            merged[key] = memory[key]
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, a few minutes")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                        help="auto: bf16 when its GEMM is at least as fast as fp32 here, else fp32")
    parser.add_argument("--steps", type=int, default=None,
                        help="measured steps: trains steps x seq_len tokens (default 16; 2 with --quick)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--shapes", default=None, help="comma-separated shape names (default: bloom-560m,llama-0.5b)")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset of " + ", ".join(SYSTEMS))
    parser.add_argument("--quant", choices=["none", "int8", "nf4"], default="none",
                        help="bitsandbytes base for every system (GPU check); needs --model-dir")
    parser.add_argument("--lorafit-loss", choices=["chunked", "full"], default="chunked",
                        help="lorafit's train.loss (full: ablation of the chunked loss)")
    parser.add_argument("--checkpoint-every", type=int, default=1,
                        help="lorafit's train.checkpoint_every (1 = every layer, lorafit's default)")
    parser.add_argument("--compile", action="store_true",
                        help="lorafit's train.compile: true (decoder layers compiled in the warm-up step)")
    parser.add_argument("--trl-liger", action="store_true", help="TRL with use_liger_kernel (GPU, liger-kernel installed)")
    parser.add_argument("--model-dir", default=None, help="random-weight checkpoint for --quant; made if missing")
    parser.add_argument("--sequential", dest="lockstep", action="store_false",
                        help="run the systems one after the other (default: all at once, steps alternating)")
    parser.add_argument("--lockstep", dest="child_lockstep", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=SYSTEMS, help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure each shape this many times (fresh processes) and report each system's median")
    args = parser.parse_args()
    if args.child:
        args.lockstep = args.child_lockstep
        child(args)
        return
    args.seq_len = args.seq_len or (256 if args.quick else 512)
    # 16 by default: on a CPU each new row length adds compiled kernels that stay for the run, so a
    # system's peak keeps rising over its first dozens of steps; 4 steps hid that growth
    args.steps = args.steps or (2 if args.quick else 16)
    shapes = args.shapes.split(",") if args.shapes else (["bloom-quick", "llama-quick"] if args.quick
                                                           else ["bloom-560m", "llama-0.5b"])
    systems = [s for s in SYSTEMS if s in args.systems.split(",")]
    torch.set_num_threads(args.threads)
    # a small probe first: a CPU without bf16 instructions runs a 2048^3 bf16 matmul for minutes
    probe = {"bf16": gemm_ceiling(torch.bfloat16, reps=2, n=512), "fp32": gemm_ceiling(torch.float32, reps=2, n=512)}
    ceilings = {name: gemm_ceiling(dt) if probe[name] >= 0.5 * max(probe.values()) else probe[name]
                for name, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32))}
    if args.precision == "auto":
        if torch.cuda.is_available():
            args.precision = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        else:
            args.precision = "bf16" if ceilings["bf16"] >= ceilings["fp32"] else "fp32"
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    ceiling = ceilings[args.precision]
    if args.precision != "fp32" or args.quant != "none":  # 16-bit storage is lorafit's default there
        systems = [s for s in systems if s != "lorafit-16bit"]
    if args.quant != "none":
        if not args.model_dir:
            raise SystemExit("--quant needs --model-dir")
        if not (Path(args.model_dir) / "config.json").exists():
            save_random_model(SHAPES[shapes[0]], torch.bfloat16, args.model_dir)
    print(f"machine: {machine()}; threads {args.threads}; {_versions()}")
    slow = [name for name in probe if probe[name] < 0.5 * max(probe.values())]
    print(f"GEMM ceiling (2048^3 matmul{'; 8192^3 on GPU' if torch.cuda.is_available() else ''}"
          f"{'; ' + ', '.join(slow) + ' at 512^3 only: under half the other' if slow else ''}): "
          f"bf16 {ceilings['bf16'] / 1e9:.1f} GFLOP/s, fp32 {ceilings['fp32'] / 1e9:.1f} GFLOP/s; "
          f"every system runs in {args.precision}")
    if args.checkpoint_every != 1:
        print(f"lorafit: train.checkpoint_every {args.checkpoint_every}")
    if args.compile:
        print("lorafit: train.compile true (each decoder layer compiled in the warm-up step, not timed)")
    print(f"seq_len {args.seq_len}, batch 1, {args.warmup} warm-up step(s) + {args.steps} x {args.seq_len} trained "
          f"tokens per system, " + ("steps alternating between the systems (lock-step)" if args.lockstep
                                    else "one system after the other"), flush=True)
    summary: dict[str, Any] = {"precision": args.precision, "gemm_flops": ceiling, "shapes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for shape in shapes:
            own = model_gemm_ceiling(SHAPES[shape], dtype, args.seq_len)
            print(f"[{shape}] GEMM ceiling at the model's own matmul shapes: {own / 1e9:.1f} GFLOP/s", flush=True)
            run = run_lockstep if args.lockstep else run_sequential
            rounds = [run(systems, shape, args, str(Path(tmp) / f"{shape}-{i}")) for i in range(max(1, args.rounds))]
            results = {system: median_round([r[system] for r in rounds]) for system in systems}
            if len(rounds) > 1:
                for system in systems:
                    speeds = ", ".join(f"{r[system]['tokens'] / r[system]['elapsed_s']:.1f}" for r in rounds)
                    print(f"[{shape}] {system:14s} tokens/s by round: {speeds} (the median is reported)", flush=True)
            for system in systems:
                r = results[system]
                r["tokens_per_s"] = r["tokens"] / r["elapsed_s"]
                r["mfu"] = r["flops"] / r["elapsed_s"] / ceiling
                r["mfu_model_shapes"] = r["flops"] / r["elapsed_s"] / own
                print(f"[{shape}] {system:14s} {r['tokens_per_s']:8.1f} tokens/s  "
                      f"({r['label_tokens']} loss tokens of {r['tokens']})  peak {r['peak_bytes'] / 2**30:.2f} GiB "
                      f"(training {_gib(r.get('train_peak_bytes'))}, steps added "
                      f"{_gib(_minus(r.get('train_peak_bytes'), r.get('train_start_bytes')))})  "
                      f"MFU {r['mfu']:.1%} ({r['mfu_model_shapes']:.1%} of the model-shape ceiling)  [{r['rows']}]",
                      flush=True)
            out: dict[str, Any] = {"mfu": results["lorafit"]["mfu"] if "lorafit" in results else float("nan"),
                                   "mfu_model_shapes": results.get("lorafit", {}).get("mfu_model_shapes", float("nan")),
                                   "model_gemm_flops": own}
            lf = results.get("lorafit")
            for peer, prefix in (("recipe", ""), ("trl", "trl_")):
                if lf and peer in results and lf.get("train_peak_bytes") and results[peer].get("train_peak_bytes"):
                    out[f"{prefix}train_memory_ratio"] = _ratio(lf["train_peak_bytes"],
                                                                results[peer]["train_peak_bytes"])
            if lf and "recipe" in results:
                out["memory_ratio"] = _ratio(lf["peak_bytes"], results["recipe"]["peak_bytes"])
                out["speed_ratio"] = _ratio(lf["tokens_per_s"], results["recipe"]["tokens_per_s"])
                out["baseline_mfu"] = results["recipe"]["mfu"]
            if lf and "trl" in results:
                out["trl_memory_ratio"] = _ratio(lf["peak_bytes"], results["trl"]["peak_bytes"])
                out["trl_speed_ratio"] = _ratio(lf["tokens_per_s"], results["trl"]["tokens_per_s"])
            if "lorafit-equal" in results and "recipe" in results:
                out["equal_work_speed_ratio"] = _ratio(results["lorafit-equal"]["tokens_per_s"],
                                                       results["recipe"]["tokens_per_s"])
                out["equal_work_memory_ratio"] = _ratio(results["lorafit-equal"]["peak_bytes"],
                                                        results["recipe"]["peak_bytes"])
            stored = results.get("lorafit-16bit")
            if stored and "recipe" in results and "trl" in results:
                out["bf16_storage"] = {
                    "memory_ratio": _ratio(stored["peak_bytes"], results["recipe"]["peak_bytes"]),
                    "speed_ratio": _ratio(stored["tokens_per_s"], results["recipe"]["tokens_per_s"]),
                    "trl_memory_ratio": _ratio(stored["peak_bytes"], results["trl"]["peak_bytes"]),
                    "trl_speed_ratio": _ratio(stored["tokens_per_s"], results["trl"]["tokens_per_s"])}
                for name, value in out["bf16_storage"].items():
                    print(f"[{shape}] lorafit-16bit {name.replace('_', ' ')}: {value:.2f}x", flush=True)
            for name, label in (("train_memory_ratio", "lorafit/recipe training-phase memory"),
                                ("trl_train_memory_ratio", "lorafit/TRL training-phase memory"),
                                ("memory_ratio", "lorafit/recipe memory"), ("speed_ratio", "lorafit/recipe speed"),
                                ("trl_memory_ratio", "lorafit/TRL memory"), ("trl_speed_ratio", "lorafit/TRL speed"),
                                ("equal_work_speed_ratio", "lorafit at equal work/recipe speed"),
                                ("equal_work_memory_ratio", "lorafit at equal work/recipe memory")):
                if name in out:
                    print(f"[{shape}] {label}: {out[name]:.2f}x", flush=True)
            summary["shapes"][shape] = {**out, **results}
    first = summary["shapes"][shapes[0]]
    fields = ("train_memory_ratio", "trl_train_memory_ratio", "memory_ratio", "speed_ratio", "trl_memory_ratio", "trl_speed_ratio", "equal_work_speed_ratio", "mfu",
              "mfu_model_shapes")
    line: dict[str, Any] = {"shape": shapes[0], **{k: round(first[k], 4) for k in fields if k in first}}
    if "baseline_mfu" in first:
        line["baseline_mfu"] = round(first["baseline_mfu"], 4)
    line.update({"precision": args.precision, "gemm_gflops": round(ceiling / 1e9, 1),
                 "model_gemm_gflops": round(first["model_gemm_flops"] / 1e9, 1),
                 "checkpoint_every": args.checkpoint_every,
                 # asked for, and whether every lorafit system of the first shape really ran compiled
                 "compile": args.compile,
                 "compiled": any(s.startswith("lorafit") for s in first) and all(
                     "compiled layers" in str(v.get("rows", "")) for s, v in first.items()
                     if s.startswith("lorafit") and isinstance(v, dict))})
    for system, key in (("lorafit", "lorafit"), ("recipe", "baseline"), ("trl", "trl")):
        if system in first:
            line[f"{key}_peak_bytes"] = first[system]["peak_bytes"]
            line[f"{key}_train_peak_bytes"] = first[system].get("train_peak_bytes")
            line[f"{key}_tokens_per_s"] = round(first[system]["tokens_per_s"], 2)
    line["shapes"] = {k: {m: round(v[m], 4) for m in fields if m in v} for k, v in summary["shapes"].items()}
    for name, values in summary["shapes"].items():
        if "bf16_storage" in values:
            line["shapes"][name]["bf16_storage"] = {m: round(x, 4) for m, x in values["bf16_storage"].items()}
    print(json.dumps(line))


if __name__ == "__main__":
    main()
