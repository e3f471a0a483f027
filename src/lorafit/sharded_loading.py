"""Load a base for FSDP without a full copy per process.

Replicated data parallelism loads the whole base in every process. A base that is sharded because
it does not fit one GPU would not fit the host N times either (a 70B base is ~35 GB in nf4). So
under ``train.fsdp`` rank 0 alone reads the safetensors files (on the CPU; a 4-bit base is
quantized by transformers + bitsandbytes as it loads, exactly as in a one-process run) and
attaches the adapter; the other ranks build the same model on the meta device (shapes, no
storage). Every rank then shards its model (``lorafit.distributed.shard_model``) and rank 0 sends
one tensor at a time: sharded parameters are scattered (each rank receives its shard only), the
rest (LM head, buffers) broadcast whole. Host memory: one model on rank 0, shards on the others.
The adapter's initial weights come from rank 0, so they are those of a one-process run.

bitsandbytes' 4-bit statistics (absmax, code: a ``QuantState``) are not parameters; they travel in
bitsandbytes' own serialised form (``QuantState.as_dict`` / ``from_dict``) and each layer gets them
as ``Linear4bit.quant_state``, where bitsandbytes itself recovers them when FSDP hands the layer a
plain tensor. This path was read and run against the versions ``lorafit.compat`` lists (``fsdp_rank0_loading``,
and ``fsdp_rank0_loading_4bit`` for nf4); with others every rank loads the full base and keeps its
shard (the libraries' own path, N copies of host memory), and the run's log line says which path ran.
"""

from __future__ import annotations

import functools
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from lorafit.resolved import ResolvedRun

# rank 0 may spend minutes reading (and, for nf4, quantizing on the CPU) a large base while the
# others wait: their wait runs on a gloo group with this timeout, not the default group's
LOAD_TIMEOUT = timedelta(hours=3)


def fsdp_support_problem(quantization: str, optimizer: str) -> str | None:
    """Why ``train.fsdp`` cannot run with these settings and installed libraries (one line), or None."""
    if quantization == "int8":
        return ("train.fsdp: an int8 base cannot be sharded (bitsandbytes' int8 weights and their row "
                "statistics are not shardable tensors); use model.quantization: nf4, or train.fsdp: false")
    if optimizer == "adamw_8bit":  # bitsandbytes' 8-bit update refuses DTensor parameters (0.50.2)
        return ("train.optimizer: adamw_8bit does not run on FSDP's sharded adapter (DTensor); use adamw "
                "(the adapter's optimizer states are small)")
    return None


def rank0_loading(quantization: str) -> bool:
    """Whether rank 0 alone may read the base: only with library versions this path was checked on."""
    from lorafit.compat import allowed

    names = ["fsdp_rank0_loading", "fsdp_rank0_loading_torch"] + (
        ["fsdp_rank0_loading_4bit"] if quantization == "nf4" else [])
    return all(allowed(name)[0] for name in names)


def load_for_sharding(run: ResolvedRun, device: torch.device) -> tuple[Any, list[str], bool]:
    """The adapted model before sharding: real on rank 0 (host memory), on the meta device elsewhere.

    Returns (model, what lorafit.fused swapped, from_rank0). Without the rank-0 path every rank
    loads the full base on ``device``. The run's precision is the GPU's wherever rank 0 stages.
    """
    from lorafit.modeling import attach_adapter, load_base_model

    from_rank0 = rank0_loading(run.quantization)
    if not from_rank0:
        return *attach_adapter(load_base_model(run, device), run), False
    waiting = _side_group()
    where = torch.device("cpu") if dist.get_rank() == 0 else torch.device("meta")
    model, fused = attach_adapter(load_base_model(run, where), run)
    dist.barrier(group=waiting)
    return model, fused, True


def shard_loaded(model: Any, device: torch.device, *, from_rank0: bool,
                 cpu_offload: bool = False) -> tuple[Any, str]:
    """Shard ``model`` (see ``lorafit.distributed.shard_model``); on the rank-0 path, then fill
    every rank's shards and replicated tensors from rank 0, one tensor at a time. Returns the
    model and what was done, for the run's log."""
    from lorafit.distributed import shard_model

    how = f"transformer blocks sharded over {dist.get_world_size()} processes; " + (
        "rank 0 read the weights and sent each rank its shard" if from_rank0 else
        "every rank read the full base (rank-0 loading not checked with these library versions)")
    how += "; shards in host memory (CPU offload)" if cpu_offload else ""
    if not from_rank0:
        return shard_model(model, cpu_offload=cpu_offload), how
    group = _side_group()
    rank = dist.get_rank()
    names = _tensor_names(model)
    info = [{name: (tuple(t.shape), t.dtype) for name, t in names.items()} if rank == 0 else None]
    dist.broadcast_object_list(info, src=0, group=group)
    shapes = info[0]
    if rank != 0:
        _match_shapes(model, shapes)
    quant_states = _share_quant_states(model, group, device)
    full = {name: t.detach() for name, t in names.items()} if rank == 0 else {}
    shard_model(model, cpu_offload=cpu_offload)
    _fill_from_rank0(model, full, shapes, device, cpu_offload)
    for module, state in quant_states:
        module.quant_state = state
    return model, how


@functools.lru_cache(maxsize=1)
def _side_group() -> Any:
    """A gloo group with a long timeout: for waiting on rank 0's load, and for metadata (CPU objects)."""
    return dist.new_group(backend="gloo", timeout=LOAD_TIMEOUT)


def _tensor_names(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by each of its names (tied weights under both)."""
    return {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers(remove_duplicate=False))}


def _match_shapes(model: torch.nn.Module, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
    """Give meta tensors rank 0's shapes: a loaded 4-bit weight is packed ((n/2)/itemsize, 1),
    while the meta model still has the layer's (out, in)."""
    for name, tensor in _tensor_names(model).items():
        shape, dtype = shapes[name]
        if tuple(tensor.shape) == shape and tensor.dtype == dtype:
            continue
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        empty = torch.empty(shape, dtype=dtype, device="meta")
        if attr in module._parameters:
            module._parameters[attr] = torch.nn.Parameter(empty, requires_grad=tensor.requires_grad)
        else:
            module._buffers[attr] = empty


def _share_quant_states(model: torch.nn.Module, group: Any, device: torch.device) -> list[tuple[Any, Any]]:
    """Rank 0's 4-bit statistics for every ``Linear4bit``, rebuilt on ``device`` on every rank."""
    from bitsandbytes.functional import QuantState
    from bitsandbytes.nn import Linear4bit

    out = []
    for module in model.modules():
        if not isinstance(module, Linear4bit):
            continue
        state = getattr(module.weight, "quant_state", None) or module.quant_state
        payload = [state.as_dict() if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(payload, src=0, group=group)
        out.append((module, QuantState.from_dict(payload[0], device=device)))
    return out


@torch.no_grad()
def _fill_from_rank0(model: torch.nn.Module, full: dict[str, torch.Tensor],
                     shapes: dict[str, tuple[tuple[int, ...], torch.dtype]], device: torch.device,
                     cpu_offload: bool) -> None:
    """Scatter rank 0's tensors into the sharded model: shards to their ranks, the rest broadcast."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    current = _tensor_names(model)
    param_names = set(dict(model.named_parameters(remove_duplicate=False)))
    params: dict[str, torch.Tensor] = {}
    buffers: dict[str, torch.Tensor] = {}
    for name in shapes:  # the same order on every rank: rank 0's names
        shape, dtype = shapes[name]
        local = current[name]
        if dist.get_rank() == 0:
            value = full.pop(name).data.to(device=device).contiguous()  # .data: a Params4bit's bare bits
        else:
            value = torch.empty(shape, dtype=dtype, device=device)
        if isinstance(local, DTensor):
            value = distribute_tensor(value, local.device_mesh, local.placements, src_data_rank=0)
            if cpu_offload:
                value = value.to("cpu")
        else:
            dist.broadcast(value, src=0)
        if name in param_names:
            params[name] = value
        else:
            buffers[name] = value
    for name, value in buffers.items():
        owner, _, attr = name.rpartition(".")
        model.get_submodule(owner)._buffers[attr] = value
    # assign: the meta tensors have no storage to copy into; torch keeps each parameter's
    # requires_grad, and FSDP re-registers the new shards (its load_state_dict hook)
    model.load_state_dict(params, strict=False, assign=True)
