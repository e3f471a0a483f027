"""The LoRA fine-tuning recipe: one training loop, readable top to bottom, on one device or many.

Stages: ``setup`` (resolve the run -> data -> model -> optimizer -> resume) -> ``fit`` (the loop)
-> ``finish`` (adapter, card, plot, result). Every decision (precision, packing, loss, fused paths)
comes from the resolved run (``lorafit.resolved``). Features and their trade-offs:

- Mixed precision: bf16 / fp16 autocast (``torch.autocast``) with fp32 adapter weights; fp16 adds
  torch's loss scaler. LoRA layers compute in the autocast dtype (peft's input cast switched off
  for each step, forward and backward: no per-layer fp32 copy). The host syncs once per step.

- Quantized frozen base (int8 / nf4): 2-4x less weight memory; int8 matmuls are slower than bf16.
- Gradient checkpointing: activations recomputed in backward; far less memory, ~30% more compute.
- Chunked loss (default): never holds tokens x vocab fp32 logits; same loss and gradients.
- Packing / length grouping: no compute spent on padding.
- Gradient accumulation: the loss of a step is summed over its micro-batches and divided by the
  step's label-token count (across ranks), so N processes x batch b equals 1 process x batch N*b.
- Distributed (torchrun / accelerate launch): each rank takes its slice of every global batch; the
  adapter's gradients (megabytes) are all-reduced once per step; only rank 0 writes files.
- Checkpoints + resume: adapter, optimizer, scheduler, RNG and data position; exact on resume.
- SIGTERM / SIGINT: the step in progress finishes (the stop is voted in that step's sync), a
  checkpoint is saved, the run exits cleanly. Signals during a save (the final export included)
  wait for it; a second Ctrl-C during a step stops at once (the last checkpoint stays).
- The run folder is locked for the run and never mixes two runs (``lorafit.rundir``).
- ``train.save_minutes`` and a deadline: a checkpoint when that many minutes have passed since the
  last one, and a last one (then a clean stop) at the deadline, for hosts that end a run without a
  signal the script sees (SageMaker's spot interruptions and MaxRuntime). Costs a save per interval.
- Objectives (``train.objective``, ``lorafit.objectives``): sft, or dpo / orpo on preference pairs
  (two sequences per row; DPO adds a reference forward without grad per step, or one pass before
  training with ``train.precompute_reference``). The objective is a component; the loop is the same.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lorafit import checkpoint as ckpt
from lorafit import quiet, rundir, runs
from lorafit.card import write_training_card
from lorafit.config import LorafitConfig, dump_config
from lorafit.data import prepare_data
from lorafit.data.sources import as_list, fingerprint
from lorafit.data.template import TEMPLATE_FILE, write_template
from lorafit.distributed import Collectives, grad_norm, optimizer_state, trainable_state
from lorafit.errors import ConfigError, LorafitError, first_line
from lorafit.modeling import load_model, load_tokenizer, trainable_line
from lorafit.objectives import build_objective, with_reference_logps
from lorafit.planner import warn_if_not_fit
from lorafit.preflight import check_settings, ignored_settings
from lorafit.reporting import Reporter, plot_losses, resolve_mode
from lorafit.resolved import RUN_FILE, resolve
from lorafit.sharded_loading import load_sharded


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
    run: dict[str, Any] | None = None  # what ran: the resolved run, versions, data hashes, seed


@dataclass
class MicroBatch:
    """This rank's tensors of one micro-batch, and the counts of the whole global batch.

    ``global_label_tokens``: what the step's loss is averaged over, the objective's units (label tokens;
    pairs for a preference objective)."""

    batch: dict[str, torch.Tensor]
    global_label_tokens: int  # every rank's rows of this step's global batch, not this rank's alone
    global_input_tokens: int


def data_fingerprints(config: LorafitConfig) -> dict[str, str]:
    """A content hash per data source (hub data sets by name), for result.json and run.json."""
    data = config.data
    out = {}
    for field_name, paths in (("data.path", as_list(data.path)), ("data.eval_path", as_list(data.eval_path))):
        for path in paths:
            out[path] = fingerprint([path], data.split, field_name, data.subset)
    return out


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
    """Turns SIGTERM/SIGINT into a flag that the step's sync reads (``_train_step``).

    Installed from the first step to the end of the final export, so a signal during a save never
    cuts it short: it is noted and the save completes. A second Ctrl-C during a step stops at once
    (``hard_stop``), except under torchrun, whose ranks get each Ctrl-C twice (from the terminal and
    forwarded by torchrun)."""

    def __init__(self, hard_stop: bool = True) -> None:
        self.received: str | None = None
        self.hard_stop = hard_stop
        self.saving = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignal:
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread: no handlers
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.saving:
            self.received = self.received or name
            _announce(f"{name} received: the save in progress finishes first")
        elif self.received is None:
            self.received = name
            _announce(f"{name} received: finishing this step, then saving a checkpoint")
        elif signum == signal.SIGINT and self.hard_stop:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once; the last checkpoint stays

    @contextlib.contextmanager
    def protect(self) -> Iterator[None]:
        """A save in progress: signals are noted, never acted on, until it is complete."""
        self.saving = True
        try:
            yield
        finally:
            self.saving = False

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _announce(message: str) -> None:
    """A line from a signal handler: it may interrupt a print in progress, whose buffer would then
    refuse a reentrant write; the raw descriptor takes it."""
    text = f"\nlorafit: {message}\n"
    try:
        print(text, end="", flush=True)
    except RuntimeError:
        os.write(1, text.encode())


class LoraFinetuneRecipe:
    """One run of LoRA fine-tuning, configured by a ``LorafitConfig``."""

    def __init__(self, config: LorafitConfig, *, resume: bool = True, overwrite: bool = False,
                 progress: bool = True, resume_anyway: bool = False, deadline: float | None = None,
                 log_format: str | None = None) -> None:
        self.config = config
        self.deadline = deadline  # wall-clock time.time() by which the run saves and stops
        self._last_save = time.monotonic()
        self.resume = resume
        self.resume_anyway = resume_anyway
        self.overwrite = overwrite
        self.progress = progress
        self.log_format = log_format or ("auto" if progress else "plain")  # see lorafit.reporting
        self.output_dir = Path(config.output_dir).expanduser()
        self.checkpoint_dir = self.output_dir / runs.CHECKPOINTS_DIR
        self.state = ckpt.TrainerState(step=0, micro_batches_done=0, tokens_seen=0)
        self.resumed_from: Path | None = None
        self.train_losses: list[float] = []
        self.eval_losses: list[tuple[int, float]] = []
        self._pending_records: list[dict[str, Any]] = []
        self.stopped_by: str | None = None  # SIGTERM / SIGINT / deadline, once fit stopped early
        self.reporter: Reporter | None = None  # setup() builds it and the rest of the run's parts
        self.stop_signal: _StopSignal | None = None  # installed by train() around fit and finish
        self._lock: rundir.RunLock | None = None  # held by the process that writes the run's files
        self._created = False  # output_dir made by this run (removed again if it fails before writing)
        self._notes: list[str] = []  # what preparing the folder found, said once the reporter is up
        self._saved_at: tuple[int, int] | None = None  # (step, micro-batches) of the newest checkpoint
        self._set_up = False

    # ----------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        """Resolve the run, read the data, load the model, build the optimizer, resume."""
        self.started = time.perf_counter()
        try:
            self._check_output_dir()
            self._setup()
        except BaseException:
            self.close(failed=True)
            raise
        self._set_up = True

    def close(self, failed: bool = False) -> None:
        """Release the trackers and the run folder. After a failure, a run this one was replacing is
        put back (this one has no checkpoint: the first one drops it), and a folder this run created
        is removed if it failed before training (a full disk, bad data). The lock goes last."""
        if self.reporter is not None:
            self.reporter.close()  # trackers closed even when the run stops with an error
        if self._lock is None:
            return
        out = self.output_dir
        if failed:
            with contextlib.suppress(OSError):
                if rundir.pending(out):
                    rundir.restore(out)
                    _announce(f"the previous run in {out} was put back (this run saved no checkpoint)")
                if self._created and not self._set_up:
                    shutil.rmtree(out)  # all of it this run's (it made the folder and held it)
        self._lock.release()
        self._lock = None

    def _setup(self) -> None:
        from accelerate import PartialState
        from transformers import get_scheduler

        cfg = self.config
        kwargs = {}
        if torch.cuda.is_available() and cfg.train.fsdp and cfg.train.fsdp_cpu_offload:
            # FSDP's CPU offload keeps the adapter's shards and gradients on the CPU: collectives
            # over them (the gradient norm) need a CPU backend beside NCCL
            kwargs["backend"] = "cuda:nccl,cpu:gloo"
        with quiet.native_output_hidden():  # gloo's connect lines (torch 2.8)
            state = PartialState(cpu=not torch.cuda.is_available(), **kwargs)
        self.device = state.device
        self.is_main = state.is_main_process
        self.world = state.num_processes
        self.rank = state.process_index
        self.comm = Collectives(self.world, self.device, self.rank)
        self._wait = self.comm.barrier
        # console, metrics.jsonl and trackers; a missing tracker package fails here, before data and model
        self.reporter = Reporter(resolve_mode(self.log_format), main=self.is_main, report_to=cfg.train.report_to)
        for note in self._notes:
            self._say(note)
        check_settings(cfg, device_type=self.device.type, processes=self.world)  # before data or model load
        for ignored in ignored_settings(cfg, processes=self.world):
            self._say(f"note: ignored {ignored}")
        self.run = resolve(cfg)  # every decision the run depends on, made once
        self.config = cfg = self.run.config  # with model.adapter: its base and LoRA settings
        for line in self.run.describe():
            self._say(line)
        self.precision = self.run.precision

        self.tokenizer = load_tokenizer(self.run)
        self.data = prepare_data(self.run, self.tokenizer)  # bad data stops here, before the model loads
        self._say(self.data.format_line)
        self._say(self.data.summary)
        self._warn_if_plan_does_not_fit()

        if self.run.fsdp:  # rank 0 reads the weights, every rank gets its shard
            self.model, fused, how, counted = load_sharded(self.run, self.device, self.comm,
                                                           cpu_offload=cfg.train.fsdp_cpu_offload)
        else:
            self.model, fused = load_model(self.run, self.device)
            counted = trainable_line(self.model)
        line, self.trainable_params, self.total_params = counted
        self._say(line)
        if fused:
            self._say("fused: " + "; ".join(fused))
        if self.run.fsdp:
            self._say(f"FSDP: {how}")

        self.global_batch = cfg.train.batch_size * self.world
        # every epoch has at least one full batch: lorafit.data tops a short last batch up
        self.batches_per_epoch = len(self.data.epoch_batches(0, self.global_batch, cfg.train.seed))
        self.max_steps = cfg.train.max_steps or max(
            1, math.floor(cfg.train.epochs * self.batches_per_epoch) // cfg.train.grad_accum
        )
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self._setup_objective()
        self.optimizer = self._build_optimizer()
        self.scheduler = get_scheduler(
            cfg.train.schedule if cfg.train.schedule != "constant" else "constant_with_warmup",
            self.optimizer,
            num_warmup_steps=cfg.train.warmup_steps,
            num_training_steps=self.max_steps,
        )
        # fp16 gradients underflow without loss scaling; torch's scaler runs on CUDA and CPU alike
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision.needs_scaler else None
        self._maybe_resume()
        self.run_record = {**self.run.to_json(), "data_files": data_fingerprints(cfg), "seed": cfg.train.seed,
                           "data_format": self.data.detection}
        self.reporter.open_run(self.output_dir, cfg, total=self.max_steps, resumed_step=self.state.step,
                               device=self.device, facts={
                                   "max_steps": self.max_steps, "processes": self.world,
                                   "trainable_params": self.trainable_params, "total_params": self.total_params,
                                   "precision": self.precision.label(), "device": self.device.type,
                                   "train_rows": len(self.data.train)})
        if self.is_main:
            self._write_run_files()

    def _setup_objective(self) -> None:
        """The run's objective (``lorafit.objectives``), built before any update or resume: a DPO
        reference taken from the starting adapter is its weights as loaded, and precomputed
        reference log-probabilities are computed here, from the model as it starts."""
        self.objective = build_objective(self.run, self.model)
        self._say(self.objective.describe())
        if self.objective.precomputes_reference:
            started = time.perf_counter()

            def forward_context() -> contextlib.AbstractContextManager:
                stack = contextlib.ExitStack()
                stack.enter_context(self._lora_in_compute_dtype())
                stack.enter_context(self._autocast())
                return stack

            self.data = with_reference_logps(self.objective, self.model, self.data,
                                             batch_size=self.config.train.batch_size, device=self.device,
                                             comm=self.comm, rank=self.rank, world=self.world,
                                             context=forward_context)
            pairs = len(self.data.train) + len(self.data.eval or [])
            self._say(f"reference log-probabilities of {pairs} pairs computed in {time.perf_counter() - started:.1f} s")

    def _autocast(self) -> contextlib.AbstractContextManager:
        """The run's compute precision for forward passes (checkpoint recompute re-enters it)."""
        return torch.autocast(self.device.type, dtype=self.precision.compute_dtype, enabled=self.precision.autocast)

    def _lora_in_compute_dtype(self) -> contextlib.AbstractContextManager:
        """Under autocast, peft would upcast every adapted layer's input to the fp32 adapter weights
        (a copy per layer, cast back down inside the matmul). peft's own switch keeps the input in
        the compute dtype; the fp32 adapter weights stay the master copy. Scoped to a whole step,
        forward and backward, because checkpointed layers are recomputed during backward."""
        from peft.helpers import disable_input_dtype_casting

        return disable_input_dtype_casting(self.model, active=self.run.lora_in_compute_dtype)

    def _write_run_files(self) -> None:
        """config.yaml, run.json (the resolved run), heldout.jsonl (the eval rows as drawn) and a
        start record in metrics.jsonl: enough to reproduce the run."""
        with _naming_the_file(self.output_dir / runs.CONFIG_FILE):
            dump_config(self.config, self.output_dir / runs.CONFIG_FILE)
        _write_text(self.output_dir / RUN_FILE, json.dumps(self.run_record, indent=2) + "\n")
        with _naming_the_file(self.output_dir / TEMPLATE_FILE):  # what generate/eval/merge render prompts with
            write_template(self.output_dir, self.data.template)
        self._log({"step": self.state.step, "event": "start", "resumed": self.resumed_from is not None,
                   **{k: self.run_record[k] for k in ("versions", "environment", "precision", "fused",
                                                      "data_files", "seed")}})
        for record in self._pending_records:  # what resuming found, logged once the run folder is open
            self._log(record)
        held = self.output_dir / runs.HELD_OUT_FILE
        if self.data.held_out:
            _write_text(held, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.data.held_out))
        else:
            held.unlink(missing_ok=True)

    def _check_output_dir(self) -> None:
        """The run folder must be creatable, writable and this run's alone before anything slow
        happens: the process that writes the files (rank 0) locks it, completes or undoes what a
        killed run left half done, and removes stale checkpoint staging folders."""
        if self.output_dir.exists() and not self.output_dir.is_dir():
            raise LorafitError(f"output_dir: {self.output_dir} is a file, expected a folder")
        taken = next((p for p in self.output_dir.parents if p.exists() and not p.is_dir()), None)
        if taken is not None:
            raise LorafitError(f"output_dir: {taken} is a file, so {self.output_dir} cannot be created")
        if int(os.environ.get("RANK", "0")) == 0:
            rundir.check_owned(self.output_dir)
        created = not self.output_dir.exists()
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LorafitError(f"output_dir: cannot create {self.output_dir} ({exc.strerror or exc})") from exc
        if not os.access(self.output_dir, os.W_OK | os.X_OK):
            raise LorafitError(f"output_dir: {self.output_dir} is not writable")
        if int(os.environ.get("RANK", "0")) != 0:
            return  # only rank 0 writes files: it holds the folder for all ranks
        self._lock, self._created = rundir.acquire(self.output_dir), created
        self._notes += filter(None, [self._lock.note, rundir.recover(self.output_dir)])
        stale = rundir.remove_stale_staging(self.output_dir)
        if stale:
            self._notes.append(f"removed {len(stale)} unfinished checkpoint save(s) of an earlier process "
                               f"({', '.join(stale)})")
        if (self.output_dir / runs.RESULT_FILE).exists() and not self.overwrite:
            raise LorafitError(
                f"output_dir: {self.output_dir} holds a finished run; pass --overwrite to replace it "
                "or choose another output_dir"
            )

    def _warn_if_plan_does_not_fit(self) -> None:
        message = warn_if_not_fit(self.run, self.device)
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
        self._wait()  # every rank sees the same checkpoints
        existing = ckpt.latest_checkpoint(self.checkpoint_dir, report=self._say)
        if existing is not None and self.resume and not self.overwrite:
            changes = self._config_changes()
            self.state = ckpt.load_checkpoint(existing, self.model, self.optimizer, self.scheduler, self.rank)
            self.resumed_from = existing
            self._saved_at = (self.state.step, self.state.micro_batches_done)
            self._say(f"resuming from {existing} (step {self.state.step} of {self.max_steps})")
            self._truncate_metrics(self.state.step)
            if changes and self.is_main:
                runs.record_config_change(self.output_dir, self.state.step, changes)
                self._pending_records.append({"step": self.state.step, "event": "config_changed",
                                              "changed": {k: list(v) for k, v in changes.items()}})
            return
        if self.is_main and rundir.has_previous_run(self.output_dir):  # a fresh start over an earlier run
            rundir.set_aside(self.output_dir)
            self._say(f"starting over: the previous run in {self.output_dir} is set aside and put back if this "
                      "run stops before its first checkpoint; removed after it (its checkpoints kept as "
                      f"{rundir.OLD_CHECKPOINTS}TIME)")
        self._wait()

    def _config_changes(self) -> dict[str, tuple[Any, Any]]:
        """Fields that change the result and differ from the run's config.yaml: refused unless
        ``resume_anyway`` (then returned, to be recorded)."""
        saved = self.output_dir / runs.CONFIG_FILE
        if not saved.exists():
            return {}
        changes = runs.result_changes(runs.read_run_config(saved), self.config)
        formats = changes.get("data.format")
        if formats and "auto" in formats and self.data.format in formats:  # auto found the format it trained with
            del changes["data.format"]
        if changes and not self.resume_anyway:
            shown = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())
            raise ConfigError(
                f"{saved}: resuming with a config that changes the result ({shown}); pass --resume-anyway "
                "to continue with the new values (recorded in the run folder), or --no-resume to start over"
            )
        for key, (old, new) in changes.items():
            self._say(f"resuming with {key} changed: {old!r} -> {new!r} (--resume-anyway)")
        return changes

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
    def _micro_batches(self) -> Iterator[MicroBatch]:
        """This rank's micro-batches in order, endless over epochs, from the resume position.

        Token counts are those of the whole global batch, read from the rows every rank holds, so
        normalising the loss needs no collective and no device sync."""
        cfg = self.config.train
        position = self.state.micro_batches_done
        epoch, index = divmod(position, self.batches_per_epoch)
        while True:
            batches = self.data.epoch_batches(epoch, self.global_batch, cfg.seed)
            for global_rows in batches[index:]:
                rows = [self.data.train[i] for i in rank_slice(global_rows, self.rank, cfg.batch_size)]
                everyone = [self.data.train[i] for i in global_rows]
                batch = {k: v.to(self.device, non_blocking=True) for k, v in self.data.collate(rows).items()}
                yield MicroBatch(batch, global_label_tokens=sum(self.objective.units(r) for r in everyone),
                                 global_input_tokens=sum(len(r["input_ids"]) for r in everyone))
            epoch, index = epoch + 1, 0

    # ------------------------------------------------------------------------------------- fit
    def fit(self) -> None:
        cfg = self.config.train
        stream = self._micro_batches()
        self.model.train()
        if self.state.step == 0 and self._has_eval():
            self._evaluate()
        self.reporter.start(self.state.step)
        started, tokens_at_start = time.perf_counter(), self.state.tokens_seen
        self.stopped_by = None
        skipped_in_a_row = 0
        compile_reported = not self.run.compiled  # said after this process's first step (a resumed run too)
        with self._signals() as stop:
            while self.state.step < self.max_steps:
                micro = [next(stream) for _ in range(cfg.grad_accum)]
                loss, (stopping, save_due, late), extra = self._train_step(micro, lambda: self._clock_votes(stop))
                self.state.micro_batches_done += cfg.grad_accum
                self.state.tokens_seen += sum(m.global_input_tokens for m in micro)
                if loss is None:
                    skipped_in_a_row += 1
                    self._check_skips(skipped_in_a_row)
                else:
                    skipped_in_a_row = 0
                    self.state.step += 1
                    self.train_losses.append(loss)
                    if not compile_reported:
                        self._report_compile()
                        compile_reported = True
                elapsed = time.perf_counter() - started
                rate = (self.state.tokens_seen - tokens_at_start) / max(elapsed, 1e-9)
                lr = self.scheduler.get_last_lr()[0]
                self.reporter.step(loss, lr, rate)
                if loss is None or self.state.step % cfg.logging_steps == 0 or self.state.step == self.max_steps:
                    self._log({"step": self.state.step, "loss": loss, **extra, "lr": lr, "tokens": self.state.tokens_seen,
                               "tokens_per_s": round(rate, 2), "elapsed_s": round(elapsed, 3)})
                finished_step = loss is not None and self.state.step < self.max_steps
                if finished_step and self._has_eval() and cfg.eval_steps and self.state.step % cfg.eval_steps == 0:
                    self._evaluate()
                if finished_step and cfg.save_steps and self.state.step % cfg.save_steps == 0:
                    self._save_checkpoint()
                if late and self.state.step < self.max_steps:  # on the last step, finishing saves anyway
                    self.stopped_by = "deadline"
                    self._say(f"deadline reached after step {self.state.step}: saving a checkpoint and stopping")
                    break
                if save_due and self.state.step < self.max_steps:
                    self._save_checkpoint()
                # agreed by all ranks inside the step's one sync; one process also heeds a signal that
                # came after it (during logging, an evaluation or a save) without running another step
                if stopping or (self.world == 1 and stop.received is not None):
                    self.stopped_by = stop.received or "SIGTERM"
                    break
        self.reporter.stop()
        if not self.stopped_by and stop.received is not None and self.world == 1:
            self.stopped_by = stop.received  # came after the last step: stop here, resuming exports
            # (several processes go on to the export: only the step's sync makes them agree on a stop)
        if self.stopped_by:
            self._save_checkpoint()
            return
        if self._has_eval() and not (self.eval_losses and self.eval_losses[-1][0] == self.state.step):
            self._evaluate()  # not again when resuming a run whose last evaluation is on record
        self._save_checkpoint()

    def _signals(self) -> contextlib.AbstractContextManager[_StopSignal]:
        """The handlers train() installed around fit and finish, or (fit called on its own) fresh
        ones for the loop."""
        if self.stop_signal is not None:
            return contextlib.nullcontext(self.stop_signal)
        self.stop_signal = _StopSignal()
        return self.stop_signal

    def _clock_votes(self, stop: _StopSignal) -> list[bool]:
        """This rank's view, at the end of a step's work, of whether to stop (a signal), save
        (``train.save_minutes`` passed) or save and stop (the deadline passed). The step's one sync
        combines every rank's votes, so all ranks act after the same step."""
        minutes = self.config.train.save_minutes
        due = bool(minutes) and time.monotonic() - self._last_save >= minutes * 60
        late = self.deadline is not None and time.time() >= self.deadline
        return [stop.received is not None, due, late]

    def _report_compile(self) -> None:
        """Say whether the compiled layers really ran compiled (after the step that compiled them)."""
        from lorafit.compiling import fallback_report

        line = fallback_report(self.model)
        self._say(line or "train.compile: the decoder layers ran compiled (no graph breaks)")

    def _train_step(self, micro: list[MicroBatch], votes: Callable[[], list[bool]]
                    ) -> tuple[float | None, list[bool], dict[str, float]]:
        """One optimizer step over ``micro``: (the step's mean loss per unit or None if skipped, the
        ranks' combined ``votes()``: stop, save due, deadline passed, read once the step's forward
        and backward are done, so a signal during the step stops the run after it; the objective's
        metrics, means per unit, e.g. DPO's rewards).

        The loss of a step is summed over its micro-batches and divided by the global batch's
        label tokens, so N processes x batch b equal one process x batch N*b. The host waits for
        the device once per step: for the loss, the gradient norm that clipping computes anyway
        (non-finite gradients make it non-finite) and the ranks' stop flag, reduced together.
        """
        cfg = self.config.train
        normalizer = max(sum(m.global_label_tokens for m in micro), 1)
        loss_sum = torch.zeros((), device=self.device)
        metric_sums = torch.zeros(len(self.objective.metrics), device=self.device)
        with self._lora_in_compute_dtype():
            for item in micro:
                with self._autocast():
                    batch_loss, _, metrics = self.objective.loss(self.model, item.batch)
                scaled = batch_loss / normalizer * self.world  # gradients are averaged over ranks below
                if self.scaler is not None:
                    scaled = self.scaler.scale(scaled)
                scaled.backward()
                loss_sum += batch_loss.detach().float()
                metric_sums += metrics
        self.comm.average_gradients(self.trainable)  # FSDP-sharded ones are reduced already
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = grad_norm(self.trainable, cfg.max_grad_norm)
        flags = self.comm.vote_flags(votes)
        shared = self.comm.sum_(torch.cat([loss_sum.reshape(1), metric_sums, flags]))
        total, *rest, norm_value = torch.cat([shared, norm.reshape(1).float().to(self.device)]).tolist()
        total /= normalizer
        count = len(self.objective.metrics)
        extra = {name: value / normalizer for name, value in zip(self.objective.metrics, rest[:count], strict=True)}
        agreed = [n > 0 for n in rest[count:]]
        if not math.isfinite(total) or (self.scaler is None and not math.isfinite(norm_value)):
            self.optimizer.zero_grad(set_to_none=True)
            return self._on_nonfinite(total, norm_value), agreed, {}
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips the update itself when fp16 gradients overflowed
            self.scaler.update()  # and lowers the scale
        else:
            self.optimizer.step()
        if math.isfinite(norm_value):  # as transformers' Trainer: the schedule waits for an update that ran
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total, agreed, extra

    def _on_nonfinite(self, loss: float, norm: float) -> None:
        """A step with a NaN/inf loss or gradient: stop (naming the step), or skip it. A skipped
        step changes nothing: no update, no scheduler step, not counted toward max_steps."""
        step = self.state.step + 1
        what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {norm}"
        if self.config.train.on_nonfinite == "skip":
            self.state.skipped_nonfinite += 1
            self._say(f"step {step}: non-finite {what}: skipped ({self.state.skipped_nonfinite} so far)")
            return None
        last = ckpt.latest_checkpoint(self.checkpoint_dir)
        kept = f"; last good checkpoint: {last}" if last else "; no checkpoint was saved yet"
        raise LorafitError(
            f"non-finite {what} at step {step}: stopped{kept}. Lower train.lr, or set "
            "train.on_nonfinite: skip to skip such steps"
        )

    def _check_skips(self, in_a_row: int) -> None:
        """Skipping is for rare bad batches; a run that keeps skipping is broken and must say so."""
        cfg = self.config.train
        budget = max(1, math.floor(cfg.max_skipped_fraction * self.max_steps))
        reason = None
        if in_a_row >= cfg.max_consecutive_skips:
            reason = f"{in_a_row} non-finite steps in a row (train.max_consecutive_skips {cfg.max_consecutive_skips})"
        elif self.state.skipped_nonfinite > budget:
            reason = (f"{self.state.skipped_nonfinite} non-finite steps skipped, more than "
                      f"train.max_skipped_fraction {cfg.max_skipped_fraction:g} of {self.max_steps} steps")
        if reason is None:
            return
        last = ckpt.latest_checkpoint(self.checkpoint_dir)
        kept = f"; last good checkpoint: {last}" if last else "; no checkpoint was saved yet"
        raise LorafitError(f"training diverged: {reason} at step {self.state.step}{kept}. Lower train.lr "
                           "or check the data")

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
        names = self.objective.metrics
        totals = torch.zeros(2 + len(names), device=self.device)  # loss sum, units (label tokens or pairs), metrics
        with self._lora_in_compute_dtype():
            for start, counted in eval_shard(starts, self.rank, self.world):  # the same count on every rank
                batch = {k: v.to(self.device) for k, v in self.data.collate(list(rows[start : start + size])).items()}
                with self._autocast():
                    batch_loss, n, metrics = self.objective.loss(self.model, batch)
                if counted:
                    totals += torch.cat([torch.stack([batch_loss.float(), torch.tensor(float(n), device=self.device)]),
                                         metrics])
        loss_sum, units, *sums = self.comm.sum_(totals).tolist()
        value = loss_sum / max(units, 1.0)
        self.model.train()
        self.eval_losses.append((self.state.step, value))
        self._log({"step": self.state.step, "eval_loss": value,
                   **{f"eval_{name}": total / max(units, 1.0) for name, total in zip(names, sums, strict=True)}})
        return value

    # ---------------------------------------------------------------------------------- output
    def _say(self, message: str) -> None:
        self.reporter.say(message)

    def _log(self, record: dict[str, Any]) -> None:
        self.reporter.log(record)  # metrics.jsonl, the console line, the trackers (main process only)

    def _saving(self) -> contextlib.AbstractContextManager[None]:
        """A save that signals must not cut short (see ``_StopSignal``)."""
        return self.stop_signal.protect() if self.stop_signal is not None else contextlib.nullcontext()

    def _save_checkpoint(self) -> None:
        if self._saved_at == (self.state.step, self.state.micro_batches_done):
            return  # this very state is on disk already (a resumed run with no step left): no second copy
        with self._saving():
            trainable = trainable_state(self.model)  # collective under FSDP: every rank takes part
            optim = optimizer_state(self.model, self.optimizer)
            rng = self.comm.gather_objects(ckpt.rng_states())
            if self.is_main:
                path = ckpt.save_checkpoint(self.checkpoint_dir, self.state, self.model, self.scheduler,
                                            keep=self.config.train.save_total_limit, trainable=trainable,
                                            optimizer_state=optim, rng_per_rank=rng)
                self._say(f"checkpoint saved: {path}")
                if rundir.pending(self.output_dir):  # this run is real now: drop the one it replaces
                    kept = rundir.commit(self.output_dir)
                    self._say("the replaced run was removed" + (f"; its checkpoints are kept in {kept}" if kept else ""))
            self._saved_at = (self.state.step, self.state.micro_batches_done)
            self._last_save = time.monotonic()
            self._wait()

    def finish(self) -> TrainResult:
        """Write the adapter with its card, the loss plot and result.json (rank 0; signals wait for
        it: see ``_StopSignal``); return the summary."""
        weights = None
        if not self.stopped_by:  # same on every rank: the stop decision is agreed on
            weights = trainable_state(self.model)  # collective under FSDP
        adapter_dir = self.output_dir / runs.ADAPTER_DIR if weights is not None and self.is_main else None
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
            run=self.run_record,
        )
        if adapter_dir is not None:
            with self._saving():
                self._save_adapter(weights, result)
                with _naming_the_file(self.output_dir / runs.LOSS_PLOT):
                    plot_losses(self.output_dir)
                text = json.dumps(asdict(result), indent=2)
                _write_text(self.output_dir / runs.RESULT_FILE, text + "\n")  # last: the run finished
        summary = {k: v for k, v in asdict(result).items() if k != "run"}
        self.reporter.finish(None if self.stopped_by else summary)
        self._wait()
        self.close()
        return result

    def _save_adapter(self, weights: dict[str, torch.Tensor], result: TrainResult) -> None:
        """The adapter in PEFT's format, pointing at a base that loads offline, plus the tokenizer
        and the model card: written into a staging folder and renamed into place, so ``adapter/`` is
        whole or absent. A failed export (a full disk) keeps the last checkpoint to export from."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        target = self.output_dir / runs.ADAPTER_DIR
        staging = self.output_dir / f"{rundir.STAGING_PREFIX}{runs.ADAPTER_DIR}"
        self.model.peft_config["default"].base_model_name_or_path = self.run.source.location
        try:
            rundir.remove(staging)
            self.model.save_pretrained(staging, state_dict=weights, safe_serialization=True)
            self.tokenizer.save_pretrained(staging)
            write_template(staging, self.data.template)  # travels with the adapter (push, download)
            saved = sum(t.numel() for t in load_file(str(staging / runs.ADAPTER_WEIGHTS)).values())
            if saved == 0:
                raise LorafitError(f"{target / runs.ADAPTER_WEIGHTS}: adapter saved empty (no LoRA weights matched)")
            write_training_card(target, self.config, result, train_rows=len(self.data.train),
                                eval_rows=len(self.data.eval) if self.data.eval is not None else 0,
                                processes=self.world, device=self.device, folder=staging)
            rundir.replace_folder(staging, target)
        except BaseException as exc:
            shutil.rmtree(staging, ignore_errors=True)
            if isinstance(exc, OSError | SafetensorError):
                raise LorafitError(f"could not write the adapter to {target} ({_reason(exc)}); the last checkpoint "
                                   "is kept: run the same command again to export it") from exc
            raise
        self._say(f"adapter saved: {target} ({saved:,d} parameters)")


def train(config: LorafitConfig, *, resume: bool = True, overwrite: bool = False, progress: bool = True,
          resume_anyway: bool = False, deadline: float | None = None, log_format: str | None = None) -> TrainResult:
    """Run the recipe end to end and return what it produced.

    ``deadline`` (a ``time.time()`` value): after the first step that ends past it, save a
    checkpoint and stop (``stopped_by="deadline"``); the SageMaker entry sets it before MaxRuntime.
    ``log_format``: auto, bar, plain, json or quiet (see ``lorafit.reporting``); None = auto, or
    plain when ``progress`` is False.
    """
    recipe = LoraFinetuneRecipe(config, resume=resume, overwrite=overwrite, progress=progress,
                                resume_anyway=resume_anyway, deadline=deadline, log_format=log_format)
    try:
        recipe.setup()
        with _StopSignal(hard_stop="LOCAL_RANK" not in os.environ) as stop:
            recipe.stop_signal = stop  # from the first step to the end of the export
            recipe.fit()
            result = recipe.finish()
    except BaseException:
        recipe.close(failed=True)
        raise
    recipe.close()
    return result


def _reason(exc: BaseException) -> str:
    """An OS error's reason (``No space left on device``), else the exception's first line."""
    return getattr(exc, "strerror", None) or first_line(exc)


@contextlib.contextmanager
def _naming_the_file(path: Path) -> Iterator[None]:
    """A failed write of one of the run's files (a full or read-only disk) as one line naming it."""
    try:
        yield
    except OSError as exc:
        raise LorafitError(f"output_dir: cannot write {path} ({_reason(exc)})") from exc


def _write_text(path: Path, text: str) -> None:
    with _naming_the_file(path):
        path.write_text(text, encoding="utf-8")
