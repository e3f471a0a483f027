"""Where a run's progress and metrics go: the console (in one of four forms), metrics.jsonl, trackers.

One ``Reporter`` is chosen per run (``--log-format``, ``--quiet``) and every line the training loop
prints goes through it, so a run reads well wherever its output lands:

- ``bar`` (``auto`` on a terminal): a tqdm bar with loss, lr and tokens/s; messages print above it.
- ``plain`` (``auto`` when stdout is not a terminal: nohup, CI, CloudWatch, ``> run.log``): no bar
  and no carriage returns; one line per logging step and one per evaluation::

      lorafit: step 12/60 loss=1.2345 lr=2.000e-04 tokens_per_s=1234.5 elapsed=62s eta=250s
      lorafit: step 12/60 eval_loss=1.2345

  (``loss=skipped`` for a skipped non-finite step; a preference objective adds
  ``reward_accuracy=0.7500 reward_margin=0.1234`` after the loss, and ``eval_reward_accuracy`` /
  ``eval_reward_margin`` after ``eval_loss``). SageMaker's metric definitions match exactly
  these lines: ``METRIC_REGEXES``. ``elapsed`` counts from the start of this process's training
  loop; ``eta`` extrapolates its steps per second.
- ``json``: stdout carries only the metrics.jsonl records, one JSON object per line (train and
  eval records alike); lorafit's other messages go to stderr.
- ``quiet``: nothing on stdout; errors still reach stderr.

Every record is appended to ``metrics.jsonl`` and sent to the run's trackers (``train.report_to``,
see ``lorafit.tracking``). Only the main process prints, writes or tracks.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from lorafit import runs
from lorafit.errors import LorafitError
from lorafit.paths import cache_root
from lorafit.tracking import check_trackers, open_trackers

LOG_FORMATS = ("auto", "bar", "plain", "json")

# SageMaker metric definitions over the plain lines (name -> regex); the launcher registers these.
METRIC_REGEXES = {
    "train:loss": r"step \d+/\d+ loss=([0-9.eE+-]+)",
    "eval:loss": r"eval_loss=([0-9.eE+-]+)",
    "train:learning_rate": r" lr=([0-9.eE+-]+)",
    "train:tokens_per_s": r"tokens_per_s=([0-9.eE+-]+)",
    "train:reward_accuracy": r" reward_accuracy=([0-9.eE+-]+)",
    "train:reward_margin": r" reward_margin=([0-9.eE+-]+)",
    "eval:reward_accuracy": r"eval_reward_accuracy=([0-9.eE+-]+)",
    "eval:reward_margin": r"eval_reward_margin=([0-9.eE+-]+)",
}
SHOWN_METRICS = ("reward_accuracy", "reward_margin")  # of a preference objective, on the plain lines


def resolve_mode(log_format: str = "auto", quiet: bool = False, stream: Any = None) -> str:
    """``auto`` becomes ``bar`` on a terminal and ``plain`` otherwise; ``quiet`` wins over all."""
    if quiet or log_format == "quiet":
        return "quiet"
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format {log_format!r}: expected one of {', '.join(LOG_FORMATS)}")
    if log_format != "auto":
        return log_format
    stream = stream or sys.stdout
    isatty = getattr(stream, "isatty", None)
    return "bar" if isatty is not None and isatty() else "plain"


def train_line(record: dict[str, Any], total: int, steps_done: int) -> str:
    """The plain line of a train record; ``steps_done`` are the steps this process has run."""
    loss = record.get("loss")
    elapsed = float(record.get("elapsed_s", 0.0))
    step = int(record["step"])
    eta = elapsed / steps_done * (total - step) if steps_done > 0 else 0.0
    shown = "skipped" if loss is None else f"{loss:.4f}"
    extra = "".join(f" {k}={record[k]:.4f}" for k in SHOWN_METRICS if record.get(k) is not None)
    return (f"lorafit: step {step}/{total} loss={shown}{extra} lr={record['lr']:.3e} "
            f"tokens_per_s={record['tokens_per_s']:.1f} elapsed={elapsed:.0f}s eta={eta:.0f}s")


def eval_line(record: dict[str, Any], total: int) -> str:
    extra = "".join(f" eval_{k}={record['eval_' + k]:.4f}" for k in SHOWN_METRICS if record.get(f"eval_{k}") is not None)
    return f"lorafit: step {record['step']}/{total} eval_loss={record['eval_loss']:.4f}{extra}"


def peak_memory_gib(device: Any) -> float:
    """Peak memory so far: GPU memory allocated by torch on CUDA, the process's peak RSS elsewhere."""
    import torch

    if device is not None and getattr(device, "type", str(device)) == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    own = _vm_hwm_bytes()
    if own is not None:
        return round(own / 2**30, 3)
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(peak / (2**30 if sys.platform == "darwin" else 2**20), 3)


def _vm_hwm_bytes() -> int | None:
    """Linux: this process's own peak RSS (VmHWM). Not ``ru_maxrss``, which keeps the image the
    process replaced at ``exec``: a rank that torchrun started reports at least torchrun's RSS."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


class Reporter:
    """The run's one output channel: console in the chosen mode, metrics.jsonl, trackers."""

    def __init__(self, mode: str = "plain", *, main: bool = True, report_to: list[str] | None = None) -> None:
        self.mode = mode
        self.main = main
        self.report_to = list(report_to or [])
        check_trackers(self.report_to)  # a missing package fails here, before data or model load
        self.total = 0
        self.initial = 0
        self.output_dir: Path | None = None
        self.device: Any = None
        self.trackers: Any = None
        self._bar: Any = None

    # ------------------------------------------------------------------------------- lifecycle
    def open_run(self, output_dir: Path, config: Any, *, total: int, resumed_step: int = 0, device: Any = None,
                 facts: dict[str, Any] | None = None) -> None:
        """The run folder exists and the step count is known: start the trackers (main process)."""
        self.output_dir, self.total, self.device = Path(output_dir), total, device
        if self.main and self.report_to:
            self.trackers = open_trackers(self.report_to, self.output_dir, config, resumed_step=resumed_step,
                                          facts=facts or {})

    def start(self, initial: int) -> None:
        """The training loop begins at step ``initial``; on a terminal the bar appears."""
        self.initial = initial
        if self.mode == "bar" and self.main:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, initial=initial, desc="train", dynamic_ncols=True, file=sys.stdout,
                             disable=False)  # lorafit.quiet turns the libraries' bars off, not this one

    def step(self, loss: float | None, lr: float, tokens_per_s: float) -> None:
        """Called after every optimizer step; only the bar moves (records go through ``log``)."""
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{loss:.4f}" if loss is not None else "skip", lr=f"{lr:.2e}",
                                  tok_s=f"{tokens_per_s:,.0f}")

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def finish(self, summary: dict[str, Any] | None = None) -> None:
        """Send the run's final numbers to the trackers and close them."""
        self.stop()
        if self.trackers is not None:
            self.trackers.finish(summary or {})
            self.trackers = None

    def close(self) -> None:
        """Release the bar and trackers after a failure (``finish`` already did on success)."""
        self.stop()
        if self.trackers is not None:
            self.trackers.close()
            self.trackers = None

    # ---------------------------------------------------------------------------------- output
    def say(self, message: str) -> None:
        """A message for people: above the bar, on stdout, on stderr (json), or nowhere (quiet)."""
        if not self.main or self.mode == "quiet":
            return
        text = f"lorafit: {message}"
        if self._bar is not None:
            self._bar.write(text)
        elif self.mode == "json":
            print(text, file=sys.stderr, flush=True)
        else:
            print(text, flush=True)

    def log(self, record: dict[str, Any]) -> dict[str, Any]:
        """One metrics record: appended to metrics.jsonl, printed per the mode, sent to trackers."""
        if not self.main:
            return record
        if "loss" in record and "peak_memory_gib" not in record:
            record = {**record, "peak_memory_gib": peak_memory_gib(self.device)}
        if self.output_dir is not None:
            path = self.output_dir / runs.METRICS_FILE
            try:
                self.output_dir.mkdir(parents=True, exist_ok=True)
                with path.open("a", encoding="utf-8") as handle:
                    handle.write(json.dumps(record) + "\n")
            except OSError as exc:  # a full or read-only disk: one line, the checkpoints stay
                raise LorafitError(f"output_dir: cannot write {path} ({exc.strerror or exc})") from exc
        self._print(record)
        if self.trackers is not None:
            self.trackers.log_record(record)
        return record

    def _print(self, record: dict[str, Any]) -> None:
        if self.mode == "json":
            print(json.dumps(record), flush=True)
        elif "eval_loss" in record:
            self.say(eval_line(record, self.total)[len("lorafit: "):])
        elif self.mode == "plain" and "lr" in record:
            print(train_line(record, self.total, int(record["step"]) - self.initial), flush=True)


def plot_losses(output_dir: Path) -> None:
    """``loss.png`` in the run folder: train and eval loss over steps, from metrics.jsonl (nothing
    without matplotlib)."""
    import os

    # matplotlib keeps a font cache and config under ~/.cache and ~/.config; keep them in ours
    os.environ.setdefault("MPLCONFIGDIR", str(cache_root() / "matplotlib"))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    records = [json.loads(line) for line in
               (output_dir / runs.METRICS_FILE).read_text(encoding="utf-8").splitlines() if line.strip()]
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
    fig.savefig(output_dir / runs.LOSS_PLOT, dpi=100)
    plt.close(fig)
