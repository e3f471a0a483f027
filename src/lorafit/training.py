"""The LoRA fine-tuning recipe: one training loop, readable top to bottom, on one device or many.

Stages: ``setup`` (data -> model -> optimizer -> resume) -> ``fit`` (the loop) -> ``finish``
(adapter, plot, result). Features and their trade-offs:

- Quantized frozen base (int8 / nf4): 2-4x less weight memory; int8 matmuls are slower than bf16.
- Gradient checkpointing: activations recomputed in backward; far less memory, ~30% more compute.
- Chunked loss (default): never holds tokens x vocab fp32 logits; same loss and gradients.
- Packing / length grouping: no compute spent on padding.
- Gradient accumulation: the loss of a step is summed over its micro-batches and divided by the
  step's label-token count (across ranks), so N processes x batch b equals 1 process x batch N*b.
- Distributed (torchrun / accelerate launch): each rank takes its slice of every global batch; the
  adapter's gradients (megabytes) are all-reduced once per step; only rank 0 writes files.
- Checkpoints + resume: adapter, optimizer, scheduler, RNG and data position; exact on resume.
- SIGTERM / SIGINT: the current step finishes, a checkpoint is saved, the run exits cleanly.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lorafit import checkpoint as ckpt
from lorafit import runs
from lorafit.config import LorafitConfig, dump_config
from lorafit.distributed import (
    average_replicated_gradients,
    grads_finite,
    trainable_state,
)
from lorafit.errors import LorafitError
from lorafit.loss import compute_loss


@dataclass
class TrainResult:
    """What a finished (or cleanly stopped) run produced."""

    output_dir: str
    adapter_dir: str | None
    trainable_params: int
    total_params: int
    steps: int
    max_steps: int
    first_eval_loss: float | None = None
    final_eval_loss: float | None = None
    first_train_loss: float | None = None
    final_train_loss: float | None = None
    resumed_from: str | None = None
    skipped_nonfinite: int = 0
    stopped_by: str | None = None
    tokens_seen: int = 0
    elapsed_s: float = 0.0


def rank_slice(global_rows: list[int], rank: int, per_rank: int) -> list[int]:
    """This rank's rows of a global batch: ranks take consecutive, disjoint slices."""
    return global_rows[rank * per_rank : (rank + 1) * per_rank]


def eval_shard(starts: list[int], rank: int, world: int) -> list[tuple[int, bool]]:
    """This rank's evaluation batches as (start, counted): ranks take every ``world``-th batch, and
    a rank with one fewer repeats a batch uncounted, so every rank runs the same number of
    forwards (under FSDP each forward is collective: an uneven split would hang)."""
    mine = [(start, True) for start in starts[rank::world]]
    per_rank = -(-len(starts) // world)
    return mine + [(starts[0], False)] * (per_rank - len(mine)) if starts else []


class _StopSignal:
    """Turns SIGTERM/SIGINT into a flag the loop checks between steps."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignal:
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread: no handlers
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.received = signal.Signals(signum).name
        print(f"\nlorafit: {self.received} received: finishing this step, then saving a checkpoint", flush=True)

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class LoraFinetuneRecipe:
    """One run of LoRA fine-tuning, configured by a ``LorafitConfig``."""

    def __init__(self, config: LorafitConfig, *, resume: bool = True, overwrite: bool = False,
                 progress: bool = True) -> None:
        self.config = config
        self.resume = resume
        self.overwrite = overwrite
        self.progress = progress
        self.output_dir = Path(config.output_dir).expanduser()
        self.checkpoint_dir = self.output_dir / runs.CHECKPOINTS_DIR
        self.state = ckpt.TrainerState(step=0, micro_batches_done=0, tokens_seen=0)
        self.resumed_from: Path | None = None
        self.train_losses: list[float] = []
        self.eval_losses: list[tuple[int, float]] = []

    # ----------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        from transformers import get_scheduler

        from lorafit.data import prepare_data
        from lorafit.modeling import load_model, load_tokenizer, model_path, trainable_line
        from lorafit.preflight import check_settings

        cfg = self.config
        self.started = time.perf_counter()
        self._check_output_dir()
        check_settings(cfg)  # contradictory options fail here, before data or model load
        self.accelerator = self._new_accelerator()
        self.device = self.accelerator.device
        self.is_main = self.accelerator.is_main_process
        self.world = self.accelerator.num_processes
        self.rank = self.accelerator.process_index

        self.base_model_path = model_path(cfg)  # a missing local model fails here, before anything else
        self.tokenizer = load_tokenizer(cfg)
        self.data = prepare_data(cfg, self.tokenizer)  # bad data stops here, before the model loads
        self._say(self.data.summary)
        self._warn_if_plan_does_not_fit()

        sharded = cfg.train.fsdp and self.world > 1
        if sharded:  # rank 0 reads the weights, the others build the model on the meta device
            from lorafit.sharded_loading import load_for_sharding, shard_loaded

            self.model, from_rank0 = load_for_sharding(cfg, self.device)
        else:
            self.model = load_model(cfg, self.device)
        line, self.trainable_params, self.total_params = trainable_line(self.model)
        self._say(line)
        fused = [*getattr(self.model, "fused_ops", []), *filter(None, [self._fuse_for_precision()])]
        if fused:
            self._say("fused: " + "; ".join(fused))
        if sharded:
            self.model, how = shard_loaded(self.model, self.device, from_rank0=from_rank0,
                                           cpu_offload=cfg.train.fsdp_cpu_offload)
            self._say(f"FSDP: {how}")
        note = self.data.adapt_to_model(self.model)  # packed rows need attention that keeps samples apart
        if note:
            self._say(note)

        self.global_batch = cfg.train.batch_size * self.world
        # every epoch has at least one full batch: lorafit.data tops a short last batch up
        self.batches_per_epoch = len(self.data.epoch_batches(0, self.global_batch, cfg.train.seed))
        self.max_steps = cfg.train.max_steps or max(
            1, math.floor(cfg.train.epochs * self.batches_per_epoch) // cfg.train.grad_accum
        )
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = self._build_optimizer()
        self.scheduler = get_scheduler(
            cfg.train.schedule if cfg.train.schedule != "constant" else "constant_with_warmup",
            self.optimizer,
            num_warmup_steps=cfg.train.warmup_steps,
            num_training_steps=self.max_steps,
        )
        self.scaler = torch.amp.GradScaler("cuda") if self._mixed_precision() == "fp16" else None
        self._maybe_resume()
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, self.output_dir / runs.CONFIG_FILE)

    def _new_accelerator(self) -> Any:
        """accelerate keeps one mixed-precision setting per process and refuses another; a second
        ``lorafit.train()`` in the same process with another ``train.precision`` gets a fresh one
        (the process group, if any, is kept)."""
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState

        wanted = self._mixed_precision()
        if AcceleratorState._shared_state.get("_mixed_precision", wanted) != wanted:
            AcceleratorState._reset_state(reset_partial_state=False)
        handlers = []
        if torch.cuda.is_available() and self.config.train.fsdp and self.config.train.fsdp_cpu_offload:
            from accelerate.utils import InitProcessGroupKwargs

            # FSDP's CPU offload keeps the adapter's shards and gradients on the CPU: collectives
            # over them (the gradient norm) need a CPU backend beside NCCL
            handlers.append(InitProcessGroupKwargs(backend="cuda:nccl,cpu:gloo"))
        return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=wanted, kwargs_handlers=handlers)

    def _fuse_for_precision(self) -> str | None:
        """Under autocast (every forward of this recipe, recompute included), LoRA computes in the
        autocast dtype too: see ``lorafit.fused.lora_in_autocast_dtype``. Returns what changed."""
        from lorafit.fused import lora_in_autocast_dtype

        if self.config.train.fused_ops and self._mixed_precision() != "no":
            return lora_in_autocast_dtype(self.model)
        return None

    def _mixed_precision(self) -> str:
        wanted = self.config.train.precision
        if wanted == "auto":
            if not torch.cuda.is_available():
                return "no"
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[wanted]

    def _check_output_dir(self) -> None:
        done = self.output_dir / runs.RESULT_FILE
        if done.exists() and not self.overwrite:
            raise LorafitError(
                f"output_dir: {self.output_dir} holds a finished run; pass --overwrite to replace it "
                "or choose another output_dir"
            )
        if self.output_dir.exists() and not self.output_dir.is_dir():
            raise LorafitError(f"output_dir: {self.output_dir} is a file, expected a folder")
        taken = next((p for p in self.output_dir.parents if p.exists() and not p.is_dir()), None)
        if taken is not None:
            raise LorafitError(f"output_dir: {taken} is a file, so {self.output_dir} cannot be created")

    def _warn_if_plan_does_not_fit(self) -> None:
        try:
            from lorafit.planner import warn_if_not_fit
        except ImportError:
            return
        message = warn_if_not_fit(self.config, self.device, processes=self.world)
        if message:
            self._say(message)

    def _build_optimizer(self) -> torch.optim.Optimizer:
        train = self.config.train
        if train.optimizer == "adafactor":
            from transformers.optimization import Adafactor

            return Adafactor(self.trainable, lr=train.lr, scale_parameter=False, relative_step=False,
                             warmup_init=False, weight_decay=train.weight_decay)
        if train.optimizer == "adamw_8bit":
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(self.trainable, lr=train.lr, weight_decay=train.weight_decay)
        return torch.optim.AdamW(self.trainable, lr=train.lr, weight_decay=train.weight_decay)

    def _maybe_resume(self) -> None:
        self.accelerator.wait_for_everyone()  # every rank sees the same checkpoints
        existing = ckpt.latest_checkpoint(self.checkpoint_dir)
        if existing is not None and self.resume and not self.overwrite:
            self.state = ckpt.load_checkpoint(existing, self.model, self.optimizer, self.scheduler, self.rank)
            self.resumed_from = existing
            self._say(f"resuming from {existing} (step {self.state.step} of {self.max_steps})")
            self._truncate_metrics(self.state.step)
            return
        if self.is_main:  # a fresh start: set earlier checkpoints aside (never delete them)
            if existing is not None:
                aside = self.checkpoint_dir.with_name(f"{runs.CHECKPOINTS_DIR}.old-{int(time.time())}")
                self.checkpoint_dir.rename(aside)
                self._say(f"starting over; earlier checkpoints moved to {aside}")
            for stale in (runs.METRICS_FILE, runs.RESULT_FILE):
                (self.output_dir / stale).unlink(missing_ok=True)
        self.accelerator.wait_for_everyone()

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric lines logged after the checkpoint, so the file reads as one clean run,
        and take back the losses before it (the result reports the whole run's first losses)."""
        path = self.output_dir / runs.METRICS_FILE
        if not path.exists():
            return
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
                if record.get("step", 0) > step:
                    continue
            except (json.JSONDecodeError, AttributeError):
                continue  # a line cut short by the crash
            kept.append(line)
            if record.get("loss") is not None:
                self.train_losses.append(record["loss"])
            if "eval_loss" in record:
                self.eval_losses.append((record["step"], record["eval_loss"]))
        if self.is_main:
            path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    # ------------------------------------------------------------------------------------ data
    def _micro_batches(self) -> Iterator[tuple[dict[str, torch.Tensor], int]]:
        """This rank's micro-batches (and their non-padding token counts) in order, endless over
        epochs, from the resume position."""
        cfg = self.config.train
        position = self.state.micro_batches_done
        epoch, index = divmod(position, self.batches_per_epoch)
        while True:
            batches = self.data.epoch_batches(epoch, self.global_batch, cfg.seed)
            for global_rows in batches[index:]:
                rows = [self.data.train[i] for i in rank_slice(global_rows, self.rank, cfg.batch_size)]
                batch = {k: v.to(self.device) for k, v in self.data.collate(rows).items()}
                yield batch, sum(len(row["input_ids"]) for row in rows)
            epoch, index = epoch + 1, 0

    # ------------------------------------------------------------------------------------- fit
    def fit(self) -> None:
        from tqdm.auto import tqdm

        cfg = self.config.train
        stream = self._micro_batches()
        self.model.train()
        if self.state.step == 0 and self._has_eval():
            self._evaluate()
        bar = self._bar = tqdm(total=self.max_steps, initial=self.state.step,
                               disable=not (self.is_main and self.progress), desc="train",
                               dynamic_ncols=True, file=sys.stdout)
        started, tokens_at_start = time.perf_counter(), self.state.tokens_seen
        self.stopped_by: str | None = None
        with _StopSignal() as stop:
            while self.state.step < self.max_steps:
                micro = [next(stream) for _ in range(cfg.grad_accum)]
                loss = self._train_step([batch for batch, _ in micro], sum(n for _, n in micro))
                self.state.step += 1
                self.state.micro_batches_done += cfg.grad_accum
                elapsed = time.perf_counter() - started
                rate = (self.state.tokens_seen - tokens_at_start) / max(elapsed, 1e-9)
                lr = self.scheduler.get_last_lr()[0]
                if loss is not None:
                    self.train_losses.append(loss)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}" if loss is not None else "skip", lr=f"{lr:.2e}",
                                tok_s=f"{rate:,.0f}")
                if self.state.step % cfg.logging_steps == 0 or self.state.step == self.max_steps:
                    self._log({"step": self.state.step, "loss": loss, "lr": lr, "tokens": self.state.tokens_seen,
                               "tokens_per_s": round(rate, 2), "elapsed_s": round(elapsed, 3)})
                if self._has_eval() and cfg.eval_steps and self.state.step % cfg.eval_steps == 0 \
                        and self.state.step < self.max_steps:
                    self._evaluate()
                if cfg.save_steps and self.state.step % cfg.save_steps == 0 and self.state.step < self.max_steps:
                    self._save_checkpoint()
                if self._any_rank_stopping(stop):
                    self.stopped_by = stop.received or "SIGTERM"
                    break
        bar.close()
        self._bar = None
        if self.stopped_by:
            self._save_checkpoint()
            return
        if self._has_eval():
            self._evaluate()
        self._save_checkpoint()

    def _any_rank_stopping(self, stop: _StopSignal) -> bool:
        """All ranks must stop after the same step, even if the signal reached them at different times."""
        if self.world == 1:
            return stop.received is not None
        flag = torch.tensor(1.0 if stop.received else 0.0, device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def _train_step(self, micro: list[dict[str, torch.Tensor]], input_tokens: int) -> float | None:
        """One optimizer step over ``micro``; returns the step's mean token loss (None if skipped).

        ``input_tokens`` (non-padding tokens processed) only feeds the tokens/s report.
        """
        cfg = self.config.train
        label_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
        counts = self._all_reduce_sum(torch.tensor([float(label_tokens), float(input_tokens)], device=self.device))
        normalizer = max(counts[0].item(), 1.0)
        loss_sum = torch.zeros((), device=self.device)
        for batch in micro:
            with self.accelerator.autocast():
                batch_loss, _ = compute_loss(self.model, batch, mode=cfg.loss, chunk_tokens=cfg.loss_chunk_tokens)
            scaled = batch_loss / normalizer * self.world  # gradients are averaged over ranks below
            if self.scaler is not None:
                scaled = self.scaler.scale(scaled)
            scaled.backward()
            loss_sum += batch_loss.detach().float()
        total_loss = self._all_reduce_sum(loss_sum).item() / normalizer
        self.state.tokens_seen += int(counts[1].item())
        average_replicated_gradients(self.trainable, self.world)  # FSDP-sharded ones are reduced already
        if not math.isfinite(total_loss) or not self._grads_finite():
            self.optimizer.zero_grad(set_to_none=True)
            return self._on_nonfinite(total_loss)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.trainable, cfg.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total_loss

    def _on_nonfinite(self, loss: float) -> None:
        step = self.state.step + 1
        if self.config.train.on_nonfinite == "skip":
            self.state.skipped_nonfinite += 1
            self.scheduler.step()
            return None
        last = ckpt.latest_checkpoint(self.checkpoint_dir)
        kept = f"; last good checkpoint: {last}" if last else "; no checkpoint was saved yet"
        raise LorafitError(
            f"non-finite loss ({loss}) at step {step}: stopped{kept}. Lower train.lr, or set "
            "train.on_nonfinite: skip to skip such steps"
        )

    def _grads_finite(self) -> bool:
        if self.scaler is not None:  # fp16: the scaler handles overflow by itself
            return True
        return grads_finite(self.trainable, self.world)

    def _all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.SUM)
        return value

    # ------------------------------------------------------------------------------------ eval
    def _has_eval(self) -> bool:
        return self.data.eval is not None and len(self.data.eval) > 0

    @torch.no_grad()
    def _evaluate(self) -> float:
        cfg = self.config.train
        self.model.eval()
        rows = self.data.eval
        size = cfg.batch_size
        starts = list(range(0, len(rows), size))
        if cfg.eval_batches:
            starts = starts[: cfg.eval_batches]
        loss_sum = torch.zeros((), device=self.device)
        tokens = torch.zeros((), device=self.device)
        for start, counted in eval_shard(starts, self.rank, self.world):
            batch = {k: v.to(self.device) for k, v in self.data.collate(list(rows[start : start + size])).items()}
            with self.accelerator.autocast():
                batch_loss, n = compute_loss(self.model, batch, mode=cfg.loss, chunk_tokens=cfg.loss_chunk_tokens)
            if counted:
                loss_sum += batch_loss.float()
                tokens += n
        value = (self._all_reduce_sum(loss_sum) / self._all_reduce_sum(tokens).clamp(min=1)).item()
        self.model.train()
        self.eval_losses.append((self.state.step, value))
        self._log({"step": self.state.step, "eval_loss": value})
        self._say(f"step {self.state.step}: eval loss {value:.4f}")
        return value

    # ---------------------------------------------------------------------------------- output
    def _say(self, message: str) -> None:
        if not self.is_main:
            return
        bar = getattr(self, "_bar", None)
        if bar is not None and not bar.disable:
            bar.write(f"lorafit: {message}")  # above the progress bar, not through it
        else:
            print(f"lorafit: {message}", flush=True)

    def _log(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with (self.output_dir / runs.METRICS_FILE).open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def _save_checkpoint(self) -> None:
        from lorafit.distributed import optimizer_state, trainable_state

        trainable = trainable_state(self.model)  # collective under FSDP: every rank takes part
        optim = optimizer_state(self.model, self.optimizer)
        rng = [ckpt.rng_states()]
        if self.world > 1:
            rng = [None] * self.world
            torch.distributed.all_gather_object(rng, ckpt.rng_states())
        if self.is_main:
            path = ckpt.save_checkpoint(self.checkpoint_dir, self.state, self.model, self.scheduler,
                                        keep=self.config.train.save_total_limit, trainable=trainable,
                                        optimizer_state=optim, rng_per_rank=rng)
            self._say(f"checkpoint saved: {path}")
        self.accelerator.wait_for_everyone()

    def finish(self) -> TrainResult:
        """Write the adapter, the loss plot and result.json (rank 0); return the summary."""
        adapter_dir = None
        if not self.stopped_by:  # same on every rank: the stop decision is agreed on
            self._final_weights = trainable_state(self.model)  # collective under FSDP
        if self.is_main and not self.stopped_by:
            adapter_dir = self._save_adapter()
            self._plot()
        result = TrainResult(
            output_dir=str(self.output_dir),
            adapter_dir=str(adapter_dir) if adapter_dir else None,
            trainable_params=self.trainable_params,
            total_params=self.total_params,
            steps=self.state.step,
            max_steps=self.max_steps,
            first_eval_loss=self.eval_losses[0][1] if self.eval_losses else None,
            final_eval_loss=self.eval_losses[-1][1] if self.eval_losses else None,
            first_train_loss=self.train_losses[0] if self.train_losses else None,
            final_train_loss=self.train_losses[-1] if self.train_losses else None,
            resumed_from=str(self.resumed_from) if self.resumed_from else None,
            skipped_nonfinite=self.state.skipped_nonfinite,
            stopped_by=self.stopped_by,
            tokens_seen=self.state.tokens_seen,
            elapsed_s=round(time.perf_counter() - self.started, 2),
        )
        if self.is_main and not self.stopped_by:
            text = json.dumps(asdict(result), indent=2)
            (self.output_dir / runs.RESULT_FILE).write_text(text + "\n", encoding="utf-8")
        self.accelerator.wait_for_everyone()
        return result

    def _save_adapter(self) -> Path:
        """The adapter in PEFT's format, pointing at a base that loads offline, plus the tokenizer."""
        target = self.output_dir / runs.ADAPTER_DIR
        self.model.peft_config["default"].base_model_name_or_path = self.base_model_path
        self.model.save_pretrained(target, state_dict=self._final_weights, safe_serialization=True)
        self.tokenizer.save_pretrained(target)
        from safetensors.torch import load_file

        saved = sum(t.numel() for t in load_file(str(target / runs.ADAPTER_WEIGHTS)).values())
        if saved == 0:
            raise LorafitError(f"{target / runs.ADAPTER_WEIGHTS}: adapter saved empty (no LoRA weights matched)")
        self._say(f"adapter saved: {target} ({saved:,d} parameters)")
        return target

    def _plot(self) -> None:
        import os

        from lorafit.paths import cache_root

        # matplotlib keeps a font cache and config under ~/.cache and ~/.config; keep them in ours
        os.environ.setdefault("MPLCONFIGDIR", str(cache_root() / "matplotlib"))
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        records = [json.loads(line) for line in
                   (self.output_dir / runs.METRICS_FILE).read_text(encoding="utf-8").splitlines() if line.strip()]
        train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
        evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
        fig, ax = plt.subplots(figsize=(6, 4))
        if train:
            ax.plot(*zip(*train, strict=True), label="train loss")
        if evals:
            ax.plot(*zip(*evals, strict=True), marker="o", label="eval loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (mean per trained token)")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(self.output_dir / runs.LOSS_PLOT, dpi=100)
        plt.close(fig)


def train(config: LorafitConfig, *, resume: bool = True, overwrite: bool = False, progress: bool = True) -> TrainResult:
    """Run the recipe end to end and return what it produced."""
    recipe = LoraFinetuneRecipe(config, resume=resume, overwrite=overwrite, progress=progress)
    recipe.setup()
    recipe.fit()
    return recipe.finish()
