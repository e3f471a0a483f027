"""Training objectives: what one micro-batch's loss is, over which units, and what else it reports.

The training loop is one for every objective (``lorafit.training``); an objective is the component
that turns a micro-batch into (sum of per-unit losses, units, sums of its metrics). The loop divides
the step's sum by the global batch's units, so N processes x batch b equal one process x batch N*b
whatever the objective.

- ``sft``: cross-entropy over the response tokens (``lorafit.loss``); the unit is a label token.
- ``dpo`` (Rafailov et al. 2023): for each pair, the log-probability of the chosen and of the
  rejected answer under the policy (the adapter being trained) and under a frozen reference;
  with Delta = (policy - reference)[chosen] - (policy - reference)[rejected], the ``sigmoid`` loss
  is -log sigmoid(beta Delta) (with ``train.label_smoothing`` e: -(1-e) log sigmoid(beta Delta)
  - e log sigmoid(-beta Delta), conservative DPO), ``hinge`` is relu(1 - beta Delta) and ``ipo``
  (Azar et al. 2023) is (Delta_avg - 1/(2 beta))^2 on log-ratios averaged per answer token, as TRL
  does. The unit is a pair. Rewards are beta x (policy - reference) per answer.
- ``orpo`` (Hong et al. 2024): no reference; the chosen answer's mean token NLL minus
  beta x log sigmoid(log odds(chosen) - log odds(rejected)), odds from the mean token
  log-probabilities. The unit is a pair; rewards are beta x the mean token log-probability.

The reference, with a LoRA policy, needs no second model. A fresh adapter's reference is the base
with the adapter switched off (peft's ``disable_adapter``). A run that starts from an adapter
(``model.adapter``) has that adapter as reference: its weights are kept aside once (megabytes)
and swapped into the adapter's parameters, without grad, for the reference forward, then swapped
back. Either way the reference runs with dropout off. With ``train.precompute_reference`` the
reference log-probabilities of every pair are computed once before training (the model is then
exactly the reference) and travel with the rows; no reference forward runs in a step.

Sequence log-probabilities come from the same two paths as the supervised loss: ``chunked`` runs
the backbone and applies the LM head to the answer positions a slice at a time, never holding
tokens x vocab logits. For a plain frozen ``nn.Linear`` head a fused function makes each token's
gradient with respect to its hidden state in the forward pass (as ``lorafit.loss`` does for the
summed loss), so backward only scales it by that token's weight and the head's matmul is not
recomputed; any other head runs per slice under activation checkpointing. ``full`` takes the
model's logits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lorafit.loss import IGNORE_INDEX, block_rows, compute_loss, slice_tokens
from lorafit.probe import backbone_and_head
from lorafit.storage import fp32_scratch_copy

if TYPE_CHECKING:
    from lorafit.data.prepare import PreparedData
    from lorafit.resolved import ResolvedRun

REFERENCE_KEY = "reference_logps"  # lorafit.data.preference.REFERENCE_KEY
PREFERENCE_METRICS = ("rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy",
                      "logps_chosen", "logps_rejected")


class SupervisedObjective:
    """``sft``: summed token cross-entropy; one unit per label token."""

    name = "sft"
    metrics: tuple[str, ...] = ()
    precomputes_reference = False

    def __init__(self, loss_mode: str, chunk_tokens: int) -> None:
        self.loss_mode, self.chunk_tokens = loss_mode, chunk_tokens

    def units(self, row: dict[str, list[int]]) -> int:
        """Tokens whose label counts in the loss (position t predicts label t+1)."""
        return sum(t != IGNORE_INDEX for t in row["labels"][1:])

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int, torch.Tensor]:
        total, tokens = compute_loss(model, batch, mode=self.loss_mode, chunk_tokens=self.chunk_tokens)
        return total, tokens, total.new_zeros(0)

    def describe(self) -> str:
        return "objective: sft (next-token loss on the responses)"


# ------------------------------------------------------------------------- sequence log-probs
def sequence_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], *, mode: str = "chunked",
                   chunk_tokens: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of label-token log-probabilities per sequence [N] in fp32, label tokens per sequence [N])."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k not in ("labels", REFERENCE_KEY)}
    shift_labels = labels[:, 1:]
    keep = shift_labels != IGNORE_INDEX
    targets = shift_labels[keep]
    owner = torch.arange(labels.size(0), device=labels.device)[:, None].expand_as(keep)[keep]
    parts = backbone_and_head(model) if mode == "chunked" else None
    if parts is not None:
        backbone, head = parts
        out = backbone(**inputs)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        selected = hidden[:, :-1][keep]
        vocab = getattr(head, "out_features", None) or head.weight.shape[0]
        chunk = slice_tokens(chunk_tokens, int(vocab))
        pieces = []
        if _fusable(head, selected):
            pieces.append(_LinearTokenLogps.apply(selected, head.weight, head.bias, targets, chunk))
        for start in range(0, selected.size(0) if not pieces else 0, chunk):
            args = (head, selected[start : start + chunk], targets[start : start + chunk])
            pieces.append(checkpoint(_slice_logps, *args, use_reentrant=False) if torch.is_grad_enabled()
                          else _slice_logps(*args))
        token_logps = torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)
    else:
        logits = model(**inputs).logits[:, :-1]
        token_logps = -F.cross_entropy(logits[keep].float(), targets, reduction="none")
    sums = torch.zeros(labels.size(0), dtype=torch.float32, device=labels.device).index_add(0, owner, token_logps)
    return sums, keep.sum(dim=1).to(torch.float32)


def _fusable(head: torch.nn.Module, hidden: torch.Tensor) -> bool:
    """A plain frozen Linear head whose weight is in the dtype the slice computes in (a 16-bit head
    computed in fp32 takes the upcasting slice path)."""
    if type(head) is not torch.nn.Linear or head.weight.requires_grad or \
            (head.bias is not None and head.bias.requires_grad):
        return False
    return torch.is_autocast_enabled(hidden.device.type) or head.weight.dtype == hidden.dtype


def _token_xent_(logits: torch.Tensor, targets: torch.Tensor, *, grads: bool) -> torch.Tensor:
    """Cross-entropy of each row of ``logits`` (fp32); with ``grads``, overwrite ``logits`` with
    softmax - onehot, each row's gradient. fp32 math a few rows at a time (``loss.block_rows``)."""
    rows = block_rows(logits.size(-1))
    out = torch.empty(logits.size(0), dtype=torch.float32, device=logits.device)
    for start in range(0, logits.size(0), rows):
        part = logits[start : start + rows]
        t = targets[start : start + rows]
        block = part.float()
        target_logit = block.gather(1, t[:, None]).squeeze(1)
        top = block.amax(dim=-1, keepdim=True)
        probs = block.sub_(top).exp_()
        norm = probs.sum(dim=-1, keepdim=True)
        out[start : start + rows] = (norm.log() + top).squeeze(1) - target_logit
        if grads:
            probs.div_(norm)
            probs[torch.arange(t.numel(), device=t.device), t] -= 1.0
            if block is not part:
                part.copy_(probs)
    return out


class _LinearTokenLogps(torch.autograd.Function):
    """log p(target) per token through a frozen Linear head, slice by slice: each slice's logits in
    the compute dtype, their log-softmax in fp32 a few rows at a time, and the gradient of each
    token's log-probability with respect to its hidden state, -(softmax - onehot) @ W, made at
    once. Backward scales those rows by the incoming per-token gradient: two head matmuls in all,
    where recomputing a checkpointed slice takes three."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, chunk: int) -> torch.Tensor:
        device_type = hidden.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
        need_h = ctx.needs_input_grad[0]
        with torch.autocast(device_type, enabled=False):
            w = weight.to(dtype)
            b = bias.to(dtype) if bias is not None else None
            out = torch.empty(hidden.size(0), dtype=torch.float32, device=hidden.device)
            grad_h = torch.empty_like(hidden) if need_h else None
            for start in range(0, hidden.size(0), chunk):
                logits = F.linear(hidden[start : start + chunk].to(dtype), w, b)
                out[start : start + chunk] = -_token_xent_(logits, targets[start : start + chunk], grads=need_h)
                if need_h:
                    grad_h[start : start + chunk] = logits @ w  # d(cross-entropy)/d(hidden) per token
                del logits
        if need_h:
            ctx.save_for_backward(grad_h)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (grad_h,) = ctx.saved_tensors
        return -(grad_out.to(grad_h.dtype)[:, None] * grad_h), None, None, None, None


def _slice_logps(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    weight = getattr(head, "weight", None)
    if type(head) is torch.nn.Linear and weight is not None and weight.dtype != hidden.dtype \
            and not torch.is_autocast_enabled(hidden.device.type):  # a 16-bit head computed in fp32
        bias = head.bias.to(hidden.dtype) if head.bias is not None else None
        # the scratch buffer only where autograd keeps nothing (the reference, eval); with grad this
        # runs inside a checkpoint, so the cast is recomputed in backward rather than kept
        cast = fp32_scratch_copy(weight) if not torch.is_grad_enabled() else weight.to(hidden.dtype)
        logits = F.linear(hidden, cast, bias)
    else:
        logits = head(hidden)
    return -F.cross_entropy(logits.float(), targets, reduction="none")


# ------------------------------------------------------------------------------- reference
@contextlib.contextmanager
def dropout_off(model: torch.nn.Module) -> Iterator[None]:
    """Dropout modules in eval mode for the block (the reference is deterministic); the rest of the
    model keeps its mode, so quantized layers take the same path as in the policy's forward."""
    switched = [m for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.training]
    for module in switched:
        module.eval()
    try:
        yield
    finally:
        for module in switched:
            module.train()


class AdapterOff:
    """The reference of a fresh adapter: the base model, the adapter switched off."""

    label = "the base model (adapter disabled)"

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with self.model.disable_adapter(), dropout_off(self.model):
            yield


class StartingAdapter:
    """The reference of a run that starts from an adapter: that adapter's weights, kept aside at the
    start and swapped into the trainable parameters (this rank's shards under FSDP) for the block.

    Autocast keeps one low-precision copy of each fp32 weight that requires grad for the whole
    autocast region, and a step runs the reference and the policy in one region: the copies are
    dropped on the way in and out, so each forward multiplies by the weights it was given."""

    label = "the starting adapter (model.adapter)"

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.saved = [_local(p).detach().clone() for p in self.params]

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        current = [_local(p).detach().clone() for p in self.params]
        with torch.no_grad():
            for p, value in zip(self.params, self.saved, strict=True):
                _local(p).copy_(value)
        torch.clear_autocast_cache()
        try:
            with dropout_off(self.model):
                yield
        finally:
            with torch.no_grad():
                for p, value in zip(self.params, current, strict=True):
                    _local(p).copy_(value)
            torch.clear_autocast_cache()


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") and hasattr(p, "device_mesh") else p


# -------------------------------------------------------------------------------- objectives
class PreferenceObjective:
    """Shared by DPO and ORPO: pairs as units, sequence log-probabilities, the reported metrics."""

    name = "preference"
    metrics: tuple[str, ...] = PREFERENCE_METRICS
    precomputes_reference = False

    def __init__(self, beta: float, loss_mode: str, chunk_tokens: int) -> None:
        self.beta, self.loss_mode, self.chunk_tokens = beta, loss_mode, chunk_tokens

    def units(self, row: dict[str, list[int]]) -> int:
        return 1

    def logps(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return sequence_logps(model, batch, mode=self.loss_mode, chunk_tokens=self.chunk_tokens)

    def _metrics(self, rewards: tuple[torch.Tensor, torch.Tensor], logps: tuple[torch.Tensor, torch.Tensor],
                 *extra: torch.Tensor) -> torch.Tensor:
        chosen, rejected = (r.detach() for r in rewards)
        values = [chosen.sum(), rejected.sum(), (chosen - rejected).sum(), (chosen > rejected).float().sum(),
                  logps[0].detach().sum(), logps[1].detach().sum(), *(e.detach().sum() for e in extra)]
        return torch.stack(values).float()


class DirectPreferenceObjective(PreferenceObjective):
    """``dpo``: see the module docstring."""

    name = "dpo"

    def __init__(self, beta: float, loss_type: str, label_smoothing: float, loss_mode: str, chunk_tokens: int,
                 reference: Callable[[], contextlib.AbstractContextManager] | None, reference_label: str,
                 precompute: bool) -> None:
        super().__init__(beta, loss_mode, chunk_tokens)
        self.loss_type, self.label_smoothing = loss_type, label_smoothing
        self.reference, self.reference_label = reference, reference_label
        self.precomputes_reference = precompute

    def reference_logps(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sequence log-probabilities under the reference (no grad)."""
        if REFERENCE_KEY in batch:
            return batch[REFERENCE_KEY]
        if self.reference is None:
            raise RuntimeError("the reference log-probabilities were to be precomputed, and these rows have none")
        with torch.no_grad(), self.reference():
            return self.logps(model, batch)[0]

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int, torch.Tensor]:
        reference = self.reference_logps(model, batch)  # before the policy: nothing of it is kept
        policy, lengths = self.logps(model, batch)
        chosen, rejected = policy.chunk(2)
        ratios = (chosen - reference.chunk(2)[0], rejected - reference.chunk(2)[1])
        delta = ratios[0] - ratios[1]
        if self.loss_type == "sigmoid":
            e = self.label_smoothing
            losses = -(1 - e) * F.logsigmoid(self.beta * delta) - e * F.logsigmoid(-self.beta * delta)
        elif self.loss_type == "hinge":
            losses = torch.relu(1 - self.beta * delta)
        elif self.loss_type == "ipo":
            length_c, length_r = lengths.clamp(min=1).chunk(2)
            losses = (ratios[0] / length_c - ratios[1] / length_r - 1 / (2 * self.beta)) ** 2
        else:
            raise ValueError(f"train.dpo_loss: unknown loss '{self.loss_type}'")
        rewards = (self.beta * ratios[0], self.beta * ratios[1])
        return losses.sum(), chosen.numel(), self._metrics(rewards, (chosen, rejected))

    def describe(self) -> str:
        smoothing = f", label_smoothing {self.label_smoothing:g}" if self.label_smoothing else ""
        when = "precomputed once before training" if self.precomputes_reference else "a forward without grad per step"
        return (f"objective: dpo ({self.loss_type}, beta {self.beta:g}{smoothing}); reference: "
                f"{self.reference_label}, {when}")


class OddsRatioObjective(PreferenceObjective):
    """``orpo``: see the module docstring."""

    name = "orpo"
    metrics = (*PREFERENCE_METRICS, "nll_loss", "log_odds_ratio")

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int, torch.Tensor]:
        sums, lengths = self.logps(model, batch)
        mean = sums / lengths.clamp(min=1)
        chosen, rejected = mean.chunk(2)
        # log odds = log p - log(1 - p); log(1 - p) as log(-expm1(log p)), exact near p = 1
        log_odds = (chosen - rejected) - (torch.log(-torch.expm1(chosen)) - torch.log(-torch.expm1(rejected)))
        ratio = F.logsigmoid(log_odds)
        nll = -chosen
        losses = nll - self.beta * ratio
        rewards = (self.beta * chosen, self.beta * rejected)
        return losses.sum(), chosen.numel(), self._metrics(rewards, (chosen, rejected), nll, ratio)

    def describe(self) -> str:
        return f"objective: orpo (beta {self.beta:g}: the odds-ratio term's weight; no reference model)"


Objective = SupervisedObjective | DirectPreferenceObjective | OddsRatioObjective


def build_objective(run: ResolvedRun, model: torch.nn.Module) -> Objective:
    """The run's objective; for DPO its reference, chosen here once (see the module docstring).

    Call before any training step and before resuming: a starting adapter's weights are kept aside
    here, as they are before the first update."""
    train = run.config.train
    if train.objective == "sft":
        return SupervisedObjective(run.loss, train.loss_chunk_tokens)
    if train.objective == "orpo":
        return OddsRatioObjective(train.beta, run.loss, train.loss_chunk_tokens)
    starting = run.start_adapter is not None
    reference = StartingAdapter(model) if starting else AdapterOff(model)
    return DirectPreferenceObjective(train.beta, train.dpo_loss, train.label_smoothing, run.loss,
                                     train.loss_chunk_tokens, reference, reference.label,
                                     train.precompute_reference)


def scoring_objective(train: Any, reference: Callable[[], contextlib.AbstractContextManager] | None,
                      reference_label: str) -> DirectPreferenceObjective | OddsRatioObjective:
    """The run's preference objective for scoring held-out pairs outside training (``lorafit eval``):
    the full-logits path, and the reference the caller provides."""
    if train.objective == "orpo":
        return OddsRatioObjective(train.beta, "full", train.loss_chunk_tokens)
    return DirectPreferenceObjective(train.beta, train.dpo_loss, train.label_smoothing, "full",
                                     train.loss_chunk_tokens, reference, reference_label, False)


def with_reference_logps(objective: DirectPreferenceObjective, model: torch.nn.Module, data: PreparedData, *,
                         batch_size: int, device: torch.device, comm: Any, rank: int, world: int,
                         context: Callable[[], contextlib.AbstractContextManager]) -> PreparedData:
    """``data`` with every pair's reference log-probabilities (train and eval rows), computed once.

    Ranks split the batches (under FSDP every rank runs the same number of forwards) and the
    values are summed across ranks, so every rank holds all of them."""
    from lorafit.training import eval_shard

    assert objective.reference is not None
    splits = {"train": data.train, "eval": data.eval or []}
    values = {}
    was_training = model.training
    model.train()  # the same layer paths as the policy's forward (quantized layers differ in eval mode)
    for split, rows in splits.items():
        table = torch.zeros(len(rows), 2, device=device)
        starts = list(range(0, len(rows), batch_size))
        for start, counted in eval_shard(starts, rank, world):
            chunk = rows[start : start + batch_size]
            batch = {k: v.to(device) for k, v in data.collate(chunk).items()}
            with torch.no_grad(), context(), objective.reference():
                logps = objective.logps(model, batch)[0]
            if counted:
                table[start : start + len(chunk)] = torch.stack(logps.chunk(2), dim=1)
        values[split] = comm.sum_(table).cpu().tolist()
    model.train(was_training)
    train = [{**row, REFERENCE_KEY: pair} for row, pair in zip(data.train, values["train"], strict=True)]
    eval_rows = [{**row, REFERENCE_KEY: pair} for row, pair in zip(data.eval or [], values["eval"], strict=True)]
    return replace(data, train=train, eval=eval_rows if data.eval is not None else None)
