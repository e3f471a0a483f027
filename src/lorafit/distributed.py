"""Several processes, one training loop: gradient averaging, FSDP sharding, and full-state I/O.

lorafit runs data-parallel on torch.distributed (launched by torchrun / ``accelerate launch`` /
``lorafit train --nproc``). Two ways to hold the model:

- replicated (default): every rank holds the whole (possibly quantized) base; after each step the
  adapter's gradients — megabytes — are averaged in one flat all-reduce. Works with int8 and nf4.
- FSDP (``train.fsdp: true``): each transformer block is sharded with torch's FSDP2
  (``fully_shard``), so a bf16 base that does not fit one GPU is split across them; FSDP
  reduce-scatters the block gradients. Embeddings and the LM head stay replicated (frozen), so
  the chunked loss can still reach them. Not with a quantized base (bitsandbytes' int8 / nf4 layers
  are not sharded by lorafit).

Checkpoints store full (unsharded) tensors keyed by parameter name, so the same files serve both
ways and any number of processes.
"""

from __future__ import annotations

import signal
import subprocess
from typing import Any

import torch
import torch.distributed as dist

from lorafit.errors import ConfigError


def _is_dtensor(value: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - old torch
        return False
    return isinstance(value, DTensor)


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a (possibly sharded) value; collective for DTensors."""
    return value.full_tensor() if _is_dtensor(value) else value


def _shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if not _is_dtensor(like):
        return full.to(device=like.device)
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(device=like.device, dtype=like.dtype), like.device_mesh, like.placements)


def shard_model(model: torch.nn.Module) -> torch.nn.Module:
    """Apply FSDP2 to each transformer block (the classes the model lists as ``_no_split_modules``).

    Unquantized bases only: ``lorafit.preflight`` refuses fsdp with int8/nf4 before anything loads.
    """
    from torch.distributed.fsdp import fully_shard

    block_names = set(getattr(_unwrap(model), "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in block_names]
    if not blocks:
        raise ConfigError("train.fsdp: this model does not name its transformer blocks (_no_split_modules)")
    for block in blocks:
        fully_shard(block)
    return model


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    getter = getattr(model, "get_base_model", None)
    return getter() if callable(getter) else model


def reshard(model: torch.nn.Module) -> None:
    """Put FSDP blocks back in their sharded state, so parameters are the optimizer's objects again."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


class Collectives:
    """Every cross-rank reduction of a run, in one place and on the process's device: NCCL (every
    multi-GPU run) only reduces CUDA tensors, gloo (CPU) CPU ones. With one process, no-ops."""

    def __init__(self, world: int, device: torch.device) -> None:
        self.world = world
        self.device = device

    def sum_(self, value: torch.Tensor) -> torch.Tensor:
        """Sum ``value`` over ranks in place (it must live on this process's device) and return it."""
        if self.world > 1:
            if value.device.type != self.device.type:
                raise ValueError(f"collective on {value.device}, expected {self.device}")
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Average the gradients of non-sharded trainable parameters over ranks in one flat
        all-reduce (adapter gradients are megabytes; FSDP reduce-scatters sharded ones itself)."""
        plain = [p for p in params if not _is_dtensor(p)]
        if self.world == 1 or not plain:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in plain]
        flat = self.sum_(torch.cat([g.reshape(-1).float() for g in grads]))
        flat /= self.world
        offset = 0
        for p, g in zip(plain, grads, strict=True):
            n = g.numel()
            p.grad = flat[offset : offset + n].view_as(g).to(g.dtype)
            offset += n


def grad_norm(params: list[torch.nn.Parameter], max_norm: float | None) -> torch.Tensor:
    """The gradients' total norm (clipped to ``max_norm`` when set), a 0-d tensor on the device.

    torch's own norm and clipping, applied per kind of tensor (FSDP's DTensors and plain ones
    can't be mixed in one call) and combined. Non-finite gradients give a non-finite norm: the
    step's one finite check.
    """
    with_grad = [p for p in params if p.grad is not None]
    groups = [[p for p in with_grad if _is_dtensor(p)], [p for p in with_grad if not _is_dtensor(p)]]
    norms = []
    for group in filter(None, groups):
        norm = torch.nn.utils.get_total_norm([p.grad for p in group])
        norms.append(full_tensor(norm).float())
    if not norms:
        return torch.zeros(())
    total = torch.stack([n.to(norms[0].device) for n in norms]).norm() if len(norms) > 1 else norms[0]
    if max_norm:
        for group in filter(None, groups):
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full copies of the trainable parameters by name (collective under FSDP)."""
    reshard(model)
    return {name: full_tensor(p.detach()).cpu().clone() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy saved full tensors into the (possibly sharded) trainable parameters."""
    named = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(named) - set(state))
    if missing:
        raise ConfigError(f"{source}: checkpoint lacks {len(missing)} adapter tensors (e.g. {missing[0]}); "
                          "it was made with other LoRA settings; pass --no-resume to start over")
    with torch.no_grad():
        for name, p in named.items():
            value = _shard_like(state[name], p)
            target = p.to_local() if _is_dtensor(p) else p
            target.copy_(value.to_local() if _is_dtensor(value) else value)


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state keyed by parameter name, with full tensors (collective under FSDP)."""
    reshard(model)
    names = {id(p): name for name, p in model.named_parameters() if p.requires_grad}
    state: dict[str, Any] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            entry = optimizer.state.get(p, {})
            state[names[id(p)]] = {k: full_tensor(v).cpu().clone() if torch.is_tensor(v) else v
                                   for k, v in entry.items()}
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": [names[id(p)] for p in g["params"]]}
              for g in optimizer.param_groups]
    return {"state": state, "param_groups": groups}


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Inverse of ``optimizer_state``: re-shard and load into this optimizer."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    names = {id(p): name for name, p in params.items()}
    index: dict[str, int] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            index[names[id(p)]] = len(index)
    state = {
        index[name]: {k: _shard_like(v, params[name]) if torch.is_tensor(v) and v.dim() > 0 else v
                      for k, v in entry.items()}
        for name, entry in saved["state"].items()
        if entry
    }
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": [index[n] for n in g["params"]]}
              for g in saved["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def run_launcher(command: list[str]) -> int:
    """Run a torchrun command, forwarding SIGTERM (e.g. a spot interruption) so every rank saves
    a checkpoint and stops cleanly; SIGINT reaches the ranks through the terminal's process group."""
    process = subprocess.Popen(command)

    def forward(signum: int, frame: Any) -> None:
        del frame
        process.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        return process.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
