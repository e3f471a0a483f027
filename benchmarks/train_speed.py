"""lorafit vs the seed recipe (transformers Trainer + peft), same model, data and precision, one run.

    python benchmarks/train_speed.py            # BLOOM-560m shape + a Llama shape of similar size
    python benchmarks/train_speed.py --quick    # smaller shapes, under two minutes

Each system trains in a fresh subprocess (so peak RSS is its own), back to back, on the same
deterministic variable-length samples:

- baseline: the recipe. Samples concatenated and split into seq_len blocks, labels = input_ids,
  ``Trainer`` with gradient checkpointing, peft ``LoraConfig(r=8, lora_alpha=32,
  lora_dropout=0.05)`` on query_key_value (BLOOM) / q,k,v,o_proj (Llama).
- lorafit: what ``lorafit train`` runs: its adapter attach (``lorafit.modeling``), its packing
  (``lorafit.data`` when present, else the same packing done here), the recipe's training step
  (``lorafit.training``: chunked loss, clipping, AdamW), gradient checkpointing.

Printed per system: trained (non-padding) tokens/s, peak memory (CPU: peak RSS of the process;
GPU: max allocated), MFU against a GEMM ceiling measured in this run, and lorafit/baseline
ratios. The last line is one JSON object (the BLOOM-shape numbers at the top level).

MFU counts model FLOPs, not recomputation: frozen weights cost 2 (forward) + 2 (input gradient)
FLOPs per weight per token; attention 3 x its forward; the LM head only on the positions whose
logits a system computes (baseline: all, lorafit: those with a label).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from machine_info import cpu_name

SHAPES: dict[str, dict[str, Any]] = {
    "bloom-560m": {"model_type": "bloom", "hidden_size": 1024, "n_layer": 24, "n_head": 16, "vocab_size": 250880},
    # Llama-family shape of similar size (~0.57B): Llama-3 vocabulary, untied head.
    "llama-0.6b": {"model_type": "llama", "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                   "num_key_value_heads": 16, "intermediate_size": 2816, "vocab_size": 128256,
                   "tie_word_embeddings": False, "max_position_embeddings": 2048},
    "bloomz-7b1": {"model_type": "bloom", "hidden_size": 4096, "n_layer": 30, "n_head": 32, "vocab_size": 250880},
    "bloom-quick": {"model_type": "bloom", "hidden_size": 256, "n_layer": 4, "n_head": 4, "vocab_size": 250880},
    "llama-quick": {"model_type": "llama", "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
                    "num_key_value_heads": 4, "intermediate_size": 704, "vocab_size": 128256,
                    "tie_word_embeddings": False, "max_position_embeddings": 2048},
}
RECIPE_TARGETS = {"bloom": ["query_key_value"], "llama": ["q_proj", "k_proj", "v_proj", "o_proj"]}


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
        samples.append((ids[:p_len], ids[p_len:] + [2]))  # 2: an EOS-like id
    return samples


def recipe_blocks(samples: list[tuple[list[int], list[int]]], seq_len: int) -> list[dict[str, list[int]]]:
    """The recipe's data: concatenate everything, split into seq_len blocks, labels = input_ids."""
    stream = [t for p, r in samples for t in p + r]
    n = len(stream) // seq_len
    return [{"input_ids": stream[i * seq_len:(i + 1) * seq_len], "attention_mask": [1] * seq_len,
             "labels": stream[i * seq_len:(i + 1) * seq_len]} for i in range(n)]


def own_packing(samples: list[tuple[list[int], list[int]]], seq_len: int,
                positions: bool = True) -> list[dict[str, torch.Tensor]]:
    """Stand-in for lorafit.data packing: samples packed in order into rows <= seq_len, loss on
    responses only, each sample's first label masked, positions restarting per sample."""
    rows, cur_ids, cur_lab, cur_pos = [], [], [], []
    for prompt, response in samples:
        ids = (prompt + response)[:seq_len]
        lab = ([-100] * len(prompt) + response)[:seq_len]
        lab[0] = -100
        if len(cur_ids) + len(ids) > seq_len and cur_ids:
            rows.append((cur_ids, cur_lab, cur_pos))
            cur_ids, cur_lab, cur_pos = [], [], []
        cur_ids, cur_lab, cur_pos = cur_ids + ids, cur_lab + lab, cur_pos + list(range(len(ids)))
    if cur_ids:
        rows.append((cur_ids, cur_lab, cur_pos))
    out = [{"input_ids": torch.tensor([i]), "attention_mask": torch.ones(1, len(i), dtype=torch.long),
            "labels": torch.tensor([lab])} for i, lab, _ in rows]
    if positions:  # BLOOM (ALiBi) takes no position ids
        for row, (_, _, p) in zip(out, rows, strict=True):
            row["position_ids"] = torch.tensor([p])
    return out


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
    """Random weights from a config: no file, so both systems start from the same RSS."""
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
                param[start:start + 8192].normal_(0.0, 0.02)
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


def gemm_ceiling(dtype: torch.dtype, reps: int = 5) -> float:
    """FLOP/s of a large square matmul in ``dtype``: the best of a few runs."""
    dev = device()
    n = 8192 if dev.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=dev).to(dtype), torch.randn(n, n, device=dev).to(dtype)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(reps):
        _sync()
        t = time.perf_counter()
        torch.matmul(a, b)
        _sync()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_memory() -> int:
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


# ----------------------------------------------------------------------------------- systems
class Turns:
    """Step timing; in lock-step mode each step waits for the parent's ``go`` and reports after,
    so the two systems' steps alternate and see the same load from other work on shared CPUs."""

    def __init__(self, lockstep: bool) -> None:
        self.lockstep, self.elapsed, self.started = lockstep, 0.0, 0.0

    def begin(self) -> bool:
        if self.lockstep and sys.stdin.readline().strip() != "go":
            return False
        _sync()
        self.started = time.perf_counter()
        return True

    def end(self, tokens: int, measured: bool) -> None:
        _sync()
        took = time.perf_counter() - self.started
        if measured:
            self.elapsed += took
        if self.lockstep:
            print(f"STEP {tokens} {int(measured)} {took:.4f}", flush=True)


def run_baseline(args: argparse.Namespace, shape: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    try:
        from datasets import Dataset
    except ImportError:  # a bare GPU image: the Trainer takes a list too
        Dataset = None  # noqa: N806
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

    model = load_quantized_recipe(args, dtype) if args.quant != "none" else build_model(shape, dtype)
    lora = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
                      target_modules=RECIPE_TARGETS[shape["model_type"]])
    model = get_peft_model(model, lora)
    blocks = recipe_blocks(make_samples(args.samples, shape["vocab_size"], seq_len=args.seq_len), args.seq_len)
    total = args.warmup + args.steps
    dataset = Dataset.from_list(blocks[:total]) if Dataset is not None else blocks[:total]

    turns = Turns(args.lockstep)

    class Clock(TrainerCallback):
        def on_step_begin(self, targs, state, control, **kw):  # noqa: ANN001
            turns.begin()

        def on_step_end(self, targs, state, control, **kw):  # noqa: ANN001
            turns.end(args.seq_len, state.global_step > args.warmup)

    clock = Clock()
    targs = TrainingArguments(
        output_dir=args.workdir, per_device_train_batch_size=1, gradient_accumulation_steps=1,
        learning_rate=2e-4, max_steps=total, logging_steps=10_000, save_strategy="no", report_to=[],
        bf16=dtype == torch.bfloat16, gradient_checkpointing=True, use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0, disable_tqdm=True, seed=42, remove_unused_columns=False,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=dataset, data_collator=default_data_collator,
                      callbacks=[clock])
    trainer.train()
    _sync()
    elapsed = turns.elapsed
    measured = blocks[args.warmup:total]
    processed = sum(len(b["input_ids"]) for b in measured)
    flops = model_flops(model, processed, processed, [len(b["input_ids"]) for b in measured])
    return {"tokens": processed, "label_tokens": processed - len(measured), "elapsed_s": elapsed, "flops": flops}


def lorafit_batches(args: argparse.Namespace, shape: dict[str, Any], config: Any) -> tuple[list[dict], str]:
    """lorafit's rows for the samples, the way ``prepare_data`` makes them: ``packed`` (best-fit
    decreasing, position ids restarting per sample) where the model keeps packed samples apart,
    else one sample per row; the epoch's row order and ``collate`` from ``PreparedData``."""
    samples = make_samples(args.samples, shape["vocab_size"], seq_len=args.seq_len)
    try:
        from lorafit.data.encode import Encoded
        from lorafit.data.packing import pack_rows, packed_attention_support, single_rows
        from lorafit.data.prepare import PreparedData
    except ImportError:
        return own_packing(samples, args.seq_len, shape["model_type"] != "bloom"), "benchmark's own packing"
    encoded = [Encoded(input_ids=(p + r)[: args.seq_len], labels=([-100] * len(p) + r)[: args.seq_len])
               for p, r in samples]
    problem = packed_attention_support(shape["model_type"], None)
    mode = "packed" if problem is None else "none"
    rows = pack_rows(encoded, args.seq_len) if mode == "packed" else single_rows(encoded)
    data = PreparedData(train=rows, eval=None, packing=mode, pad_token_id=0, summary="", stats={})
    order = [i for batch in data.epoch_batches(0, 1, config.train.seed) for i in batch]
    return [data.collate([rows[i]]) for i in order], f"lorafit.data packing={mode}"


def run_lorafit(args: argparse.Namespace, shape: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    from lorafit import training
    from lorafit.checkpoint import TrainerState
    from lorafit.config import LorafitConfig
    from lorafit.modeling import attach_adapter, load_model

    precision = "bf16" if dtype == torch.bfloat16 else "fp32"
    config = LorafitConfig.model_validate({
        "model": {"name_or_path": args.model_dir or "random", "quantization": args.quant,
                  "dtype": "bfloat16" if dtype == torch.bfloat16 else "float32"},
        "train": {"seq_len": args.seq_len, "batch_size": 1, "grad_accum": 1, "precision": precision,
                  "loss": args.lorafit_loss, "checkpoint_every": args.checkpoint_every,
                  "max_steps": args.warmup + args.steps},
        "output_dir": args.workdir,
    })
    if args.quant != "none":
        model = load_model(config, device())  # lorafit's own loading: bitsandbytes, k-bit prep, adapter
    else:
        model = attach_adapter(build_model(shape, dtype), config)
    batches, packing = lorafit_batches(args, shape, config)
    batches = [{k: v.to(device()) for k, v in b.items()} for b in batches]
    from accelerate import Accelerator

    recipe = training.LoraFinetuneRecipe(config, progress=False)
    recipe.accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=recipe._mixed_precision())
    recipe.device, recipe.world, recipe.rank, recipe.is_main = recipe.accelerator.device, 1, 0, True
    recipe.model = model
    recipe._fuse_for_precision()  # as setup() does: LoRA in the autocast dtype under bf16
    recipe.trainable = [p for p in model.parameters() if p.requires_grad]
    recipe.optimizer = recipe._build_optimizer()
    from transformers import get_scheduler

    recipe.scheduler = get_scheduler("linear", recipe.optimizer, num_warmup_steps=0,
                                     num_training_steps=len(batches))
    recipe.scaler = None
    recipe.state = TrainerState(step=0, micro_batches_done=0, tokens_seen=0)
    model.train()
    turns = Turns(args.lockstep)
    # as many rows as it takes to train the tokens the baseline trains (steps x seq_len): rows vary
    measured, budget = [], args.steps * args.seq_len
    for index, batch in enumerate(batches):
        if (not args.lockstep and budget <= 0) or not turns.begin():
            break
        recipe._train_step([batch], batch["input_ids"].numel())
        turns.end(batch["input_ids"].numel(), index >= args.warmup)
        if index >= args.warmup:
            measured.append(batch)
            budget -= batch["input_ids"].numel()
    elapsed = turns.elapsed
    processed = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
                    for b in measured)
    labels = sum(int((b["labels"][:, 1:] != -100).sum()) for b in measured)
    flops = model_flops(model.get_base_model(), processed, labels,
                        [n for b in measured for n in _sample_lengths(b)])
    return {"tokens": processed, "label_tokens": labels, "elapsed_s": elapsed, "flops": flops, "packing": packing}


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
    runner = run_baseline if args.child == "baseline" else run_lorafit
    result = runner(args, shape, dtype)
    result["peak_bytes"] = peak_memory()
    print("RESULT " + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------ parent
def child_command(system: str, shape: str, args: argparse.Namespace, workdir: str) -> list[str]:
    return [sys.executable, __file__, "--child", system, "--shape", shape, "--precision", args.precision,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--seq-len", str(args.seq_len),
           "--samples", str(args.samples), "--threads", str(args.threads), "--workdir", workdir,
           "--quant", args.quant, "--lorafit-loss", args.lorafit_loss,
           "--checkpoint-every", str(args.checkpoint_every)] + (["--model-dir", args.model_dir] if args.model_dir else [])


def spawn(system: str, shape: str, args: argparse.Namespace, workdir: str) -> dict[str, Any]:
    cmd = child_command(system, shape, args, workdir)
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        raise SystemExit(f"{system} on {shape} failed (exit {proc.returncode})")
    return json.loads(lines[-1][len("RESULT "):])


def run_pair(shape: str, args: argparse.Namespace, workdir: str) -> dict[str, dict[str, Any]]:
    """Both systems at once in lock-step: one step at a time, the one behind in trained tokens
    goes next, so both sample the same load from other work on a shared machine."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    procs, logs = {}, {}
    for system in ("baseline", "lorafit"):
        logs[system] = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed with the process)
        procs[system] = subprocess.Popen(child_command(system, shape, args, f"{workdir}-{system}") + ["--lockstep"],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=logs[system], text=True,
                                         env=env)
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
        found = [ln for ln in lines[system] if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not found:
            logs[system].seek(0)
            sys.stderr.write("".join(lines[system])[-3000:] + logs[system].read()[-6000:])
            raise SystemExit(f"{system} on {shape} failed (exit {proc.returncode})")
        results[system] = json.loads(found[-1][len("RESULT "):])
    return results


def machine() -> str:
    cpu = cpu_name()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} logical CPUs, {gpu}, torch {torch.__version__}, {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller shapes, under two minutes")
    parser.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                        help="auto: bf16 when its GEMM is at least as fast as fp32 here, else fp32")
    parser.add_argument("--steps", type=int, default=None, help="measured optimizer steps per system")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=None,
                        help="baseline/lorafit alternations; each system's fastest round counts (shared CPUs)")
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--shapes", default=None, help="comma-separated shape names (default: both)")
    parser.add_argument("--quant", choices=["none", "int8", "nf4"], default="none",
                        help="bitsandbytes base for both systems (GPU check); needs --model-dir")
    parser.add_argument("--lorafit-loss", choices=["chunked", "full"], default="chunked",
                        help="lorafit's train.loss (full: ablation of the chunked loss)")
    parser.add_argument("--checkpoint-every", type=int, default=1,
                        help="lorafit's train.checkpoint_every (1 = every layer, lorafit's default)")
    parser.add_argument("--model-dir", default=None, help="random-weight checkpoint for --quant; made if missing")
    parser.add_argument("--sequential", dest="lockstep", action="store_false",
                        help="run the systems one after the other (default: both at once, steps alternating)")
    parser.add_argument("--lockstep", dest="child_lockstep", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=["baseline", "lorafit"], help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.lockstep = args.child_lockstep
        child(args)
        return
    args.seq_len = args.seq_len or (256 if args.quick else 512)
    args.steps = args.steps or (2 if args.quick else 4)
    args.rounds = args.rounds or (1 if args.quick else 2)
    shapes = args.shapes.split(",") if args.shapes else (["bloom-quick", "llama-quick"] if args.quick
                                                           else ["bloom-560m", "llama-0.6b"])
    torch.set_num_threads(args.threads)
    ceilings = {"bf16": gemm_ceiling(torch.bfloat16), "fp32": gemm_ceiling(torch.float32)}
    if args.precision == "auto":
        if torch.cuda.is_available():
            args.precision = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        else:
            args.precision = "bf16" if ceilings["bf16"] >= ceilings["fp32"] else "fp32"
    ceiling = ceilings[args.precision]
    if args.quant != "none":
        if not args.model_dir:
            raise SystemExit("--quant needs --model-dir")
        if not (Path(args.model_dir) / "config.json").exists():
            save_random_model(SHAPES[shapes[0]], torch.bfloat16, args.model_dir)
    print(f"machine: {machine()}; threads {args.threads}")
    print(f"GEMM ceiling (large square matmul): bf16 {ceilings['bf16'] / 1e9:.1f} GFLOP/s, fp32 "
          f"{ceilings['fp32'] / 1e9:.1f} GFLOP/s; both systems run in {args.precision}")
    if args.checkpoint_every != 1:
        print(f"lorafit: train.checkpoint_every {args.checkpoint_every}")
    print(f"seq_len {args.seq_len}, batch 1, {args.warmup} warm-up + {args.steps} measured steps per system, "
          + ("steps alternating between the two systems (lock-step)" if args.lockstep
           else f"{args.rounds} round(s) each (fastest counts; peak = highest)"))
    summary: dict[str, Any] = {"precision": args.precision, "gemm_flops": ceiling, "shapes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for shape in shapes:
            results: dict[str, dict[str, Any]] = {}
            if args.lockstep:
                results = run_pair(shape, args, str(Path(tmp) / shape))
                for r in results.values():
                    r["tokens_per_s"] = r["tokens"] / r["elapsed_s"]
                    r["mfu"] = r["flops"] / r["elapsed_s"] / ceiling
            for round_ in range(0 if args.lockstep else args.rounds):  # alternate systems; keep each one's fastest round
                for system in ("baseline", "lorafit"):
                    r = spawn(system, shape, args, str(Path(tmp) / f"{shape}-{system}-{round_}"))
                    r["tokens_per_s"] = r["tokens"] / r["elapsed_s"]
                    r["mfu"] = r["flops"] / r["elapsed_s"] / ceiling
                    best = results.get(system)
                    if best is None or r["tokens_per_s"] > best["tokens_per_s"]:
                        r["peak_bytes"] = max(r["peak_bytes"], best["peak_bytes"] if best else 0)
                        results[system] = r
                    else:
                        best["peak_bytes"] = max(best["peak_bytes"], r["peak_bytes"])
            for system, r in results.items():
                print(f"[{shape}] {system:8s} {r['tokens_per_s']:8.1f} tokens/s  "
                      f"({r['label_tokens']} loss tokens of {r['tokens']})  peak {r['peak_bytes'] / 2**30:.2f} GiB  "
                      f"MFU {r['mfu']:.1%}" + (f"  [{r['packing']}]" if "packing" in r else ""), flush=True)
            b, lf = results["baseline"], results["lorafit"]
            ratios = {"memory_ratio": lf["peak_bytes"] / b["peak_bytes"],
                      "speed_ratio": lf["tokens_per_s"] / b["tokens_per_s"], "mfu": lf["mfu"],
                      "baseline_mfu": b["mfu"]}
            print(f"[{shape}] lorafit/baseline: memory {ratios['memory_ratio']:.2f}x, "
                  f"speed {ratios['speed_ratio']:.2f}x", flush=True)
            summary["shapes"][shape] = {**ratios, "baseline": b, "lorafit": lf}
    first = summary["shapes"][shapes[0]]
    line = {"shape": shapes[0], "memory_ratio": round(first["memory_ratio"], 4),
            "speed_ratio": round(first["speed_ratio"], 4), "mfu": round(first["mfu"], 4),
            "baseline_mfu": round(first["baseline_mfu"], 4), "precision": args.precision,
            "gemm_gflops": round(ceiling / 1e9, 1), "checkpoint_every": args.checkpoint_every,
            "lorafit_peak_bytes": first["lorafit"]["peak_bytes"], "baseline_peak_bytes": first["baseline"]["peak_bytes"],
            "lorafit_tokens_per_s": round(first["lorafit"]["tokens_per_s"], 2),
            "baseline_tokens_per_s": round(first["baseline"]["tokens_per_s"], 2),
            "shapes": {k: {m: round(v[m], 4) for m in ("memory_ratio", "speed_ratio", "mfu")}
                       for k, v in summary["shapes"].items()}}
    print(json.dumps(line))


if __name__ == "__main__":
    main()
