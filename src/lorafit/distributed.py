"""Several processes, one training loop: gradient averaging, FSDP sharding, and full-state I/O.

lorafit runs data-parallel on torch.distributed (launched by torchrun / ``accelerate launch`` /
``lorafit train --nproc``). Two ways to hold the model:

- replicated (default): every rank holds the whole (possibly quantized) base; after each step the
  adapter's gradients — megabytes — are averaged in one flat all-reduce. Works with int8 and nf4.
- FSDP (``train.fsdp: true``): torch's FSDP2 (``fully_shard``) on each transformer block and on the
  backbone as the root, so a block's weights are gathered only while it runs (forward, then again
  for its backward) and each rank otherwise holds 1/N of them; FSDP reduce-scatters the adapter's
  gradients. bf16/fp32 and nf4 bases (nf4 stored in the compute dtype, see ``lorafit.modeling``);
  not int8. The LM head stays outside, replicated and frozen: the chunked loss calls it directly.
  ``lorafit.sharded_loading`` loads such a base without a full copy per process.

Checkpoints store full (unsharded) tensors keyed by parameter name, so the same files serve both
ways and any number of processes.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from lorafit.errors import ConfigError
from lorafit.probe import backbone_of


def _is_dtensor(value: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a (possibly sharded) value; collective for DTensors."""
    return value.full_tensor() if _is_dtensor(value) else value


def _local_shard(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``full`` as ``like`` holds it (collective for DTensors), on ``like``'s device."""
    if not _is_dtensor(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    mesh = like.device_mesh
    return distribute_tensor(full.to(device=mesh.device_type, dtype=like.dtype), mesh, like.placements).to_local()


def shard_model(model: torch.nn.Module, *, cpu_offload: bool = False) -> torch.nn.Module:
    """Apply FSDP2 to each transformer block (the classes the model lists as ``_no_split_modules``)
    and then to the backbone holding them, which becomes the root.

    The root matters: a block that is its own root keeps its gathered weights from its forward to
    its backward, so nothing would be saved at the step's peak; under a common root every block is
    resharded after its forward (torch keeps only the root gathered). The backbone, not the whole
    model, is the root because the chunked loss runs the backbone and then the head itself.
    ``cpu_offload`` keeps the shards (and the adapter's gradients and optimizer states) in host
    memory (``CPUOffloadPolicy``).
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    base = _unwrap(model)
    backbone = backbone_of(base)
    if backbone is None:
        raise ConfigError(f"train.fsdp: cannot find the transformer inside {type(base).__name__}")
    block_names = set(getattr(base, "_no_split_modules", None) or [])
    blocks = _outermost(m for m in backbone.modules() if type(m).__name__ in block_names and m is not backbone)
    if not blocks:
        raise ConfigError("train.fsdp: this model does not name its transformer blocks (_no_split_modules)")
    policy = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy()
    for block in blocks:
        fully_shard(block, reshard_after_forward=True, offload_policy=policy)
    fully_shard(backbone, offload_policy=policy)
    return model


def _outermost(modules: Any) -> list[torch.nn.Module]:
    """Matching modules not nested in another match (FSDP2 groups are built bottom-up)."""
    found: list[torch.nn.Module] = []
    inside: set[int] = set()
    for module in modules:
        if id(module) in inside:
            continue
        found.append(module)
        inside.update(id(m) for m in module.modules())
    return found


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
    """Every cross-rank call of a run, in one place. Tensors travel on the process's device: NCCL
    (every multi-GPU run) only reduces CUDA tensors, gloo (CPU) CPU ones. Python objects are
    pickled (on ``group``: a gloo group for CPU objects next to NCCL). With one process, no-ops."""

    def __init__(self, world: int, device: torch.device, rank: int = 0) -> None:
        self.world = world
        self.device = device
        self.rank = rank

    def barrier(self, group: Any = None) -> None:
        """Wait until every rank gets here."""
        if self.world > 1:
            dist.barrier(group=group)

    def gather_objects(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order, on every rank."""
        if self.world == 1:
            return [value]
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, value)
        return gathered

    def broadcast_object(self, value: Any, group: Any = None) -> Any:
        """Rank 0's ``value`` on every rank (others pass anything, e.g. None)."""
        if self.world == 1:
            return value
        box = [value if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0, group=group)
        return box[0]

    def broadcast_(self, value: torch.Tensor) -> torch.Tensor:
        """Overwrite ``value`` with rank 0's, in place (on this process's device), and return it."""
        if self.world > 1:
            dist.broadcast(value, src=0)
        return value

    def sum_(self, value: torch.Tensor) -> torch.Tensor:
        """Sum ``value`` over ranks in place (it must live on this process's device) and return it."""
        if self.world > 1:
            if value.device.type != self.device.type:
                raise ValueError(f"collective on {value.device}, expected {self.device}")
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def vote_flags(self, read: Callable[[], list[bool]]) -> torch.Tensor:
        """This rank's votes (stop, save, ...) as a tensor for the step's one reduction, read as
        late as possible: once the step's forward and backward have run. On a GPU the host first
        waits for the queued work (building the tensor copies it to the device with a sync anyway,
        so the wait only moves before the read), so a signal that arrived during the step's work
        has been handled and is counted in this step, not the next."""
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        return torch.tensor([float(v) for v in read()], device=self.device)

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
    """Full copies of the trainable parameters by name (collective under FSDP).

    Not torch's ``get_model_state_dict``: it starts from the whole ``state_dict()``, which for a
    replicated 4-bit base also carries every layer's quantization statistics, copied only to be
    dropped; the adapter is all a checkpoint needs.
    """
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
            target = p.to_local() if _is_dtensor(p) else p
            target.copy_(_local_shard(state[name], p))


def _full_state_options(**extra: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **extra)


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state keyed by parameter name, with full tensors on rank 0 (collective
    under FSDP; other ranks get an empty state). torch's ``get_optimizer_state_dict``."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    reshard(model)
    return get_optimizer_state_dict(model, optimizer, options=_full_state_options(cpu_offload=True))


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Inverse of ``optimizer_state`` from the full state every rank read: each keeps its shard."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, saved, options=_full_state_options())


def run_launcher(command: list[str]) -> int:
    """Run a torchrun command, forwarding SIGTERM (e.g. a spot interruption) so every rank saves
    a checkpoint and stops cleanly. SIGINT reaches torchrun and the ranks through the terminal's
    process group; this process waits for them (it may hold the run folder's lock) instead of
    ending at the first Ctrl-C while they still save. ``OMP_NUM_THREADS`` defaults to 1 per rank,
    torchrun's own choice, which it otherwise announces in a banner before lorafit says anything."""
    process = subprocess.Popen(command, env={"OMP_NUM_THREADS": "1", **os.environ})

    def forward(signum: int, frame: Any) -> None:
        del frame
        process.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    previous_int = signal.signal(signal.SIGINT, lambda signum, frame: None)
    try:
        return process.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
