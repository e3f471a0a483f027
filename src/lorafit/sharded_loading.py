"""Load a base for FSDP without a full copy per process.

Replicated data parallelism loads the whole base in every process. A base that is sharded because
it does not fit one GPU would not fit the host N times either (a 70B base is ~35 GB in nf4). So
under ``train.fsdp``:

1. every rank builds the adapted model on the meta device (shapes, no storage) and shards it
   (``lorafit.distributed.shard_model``);
2. rank 0 alone reads the safetensors files into host memory, as a one-process run does (a 4-bit
   base is quantized by transformers + bitsandbytes as it loads), and attaches the adapter;
3. torch's ``set_model_state_dict(..., full_state_dict=True, broadcast_from_rank0=True)`` sends
   rank 0's tensors one at a time: each rank keeps its shard of the sharded ones and the whole of
   the rest (LM head). Host memory: one model on rank 0, shards everywhere.

Two kinds of tensors are not in a state dict and follow the same way, from rank 0: buffers a
model does not save (rotary frequencies), and bitsandbytes' 4-bit statistics (a ``QuantState``,
sent in bitsandbytes' own ``as_dict`` form and set as ``Linear4bit.quant_state``, where
bitsandbytes finds them when FSDP hands the layer a plain tensor: ``lorafit.compat`` probes that).
The adapter's initial weights come from rank 0, so they are those of a one-process run.

Checked while it runs: the meta model must have rank 0's tensor names, and no tensor may stay on
the meta device. Either failing stops the run in one line; no path loads the whole base per process.
"""

from __future__ import annotations

import functools
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from lorafit import quiet
from lorafit.compat import installed
from lorafit.distributed import Collectives, shard_model
from lorafit.errors import LorafitError
from lorafit.modeling import attach_adapter, load_base_model, trainable_line

if TYPE_CHECKING:
    from lorafit.resolved import ResolvedRun

# rank 0 may spend minutes reading (and, for nf4, quantizing on the CPU) a large base while the
# others wait: their wait runs on a gloo group with this timeout, not the default group's
LOAD_TIMEOUT = timedelta(hours=3)
META = torch.device("meta")

Shapes = dict[str, tuple[tuple[int, ...], torch.dtype]]


def fsdp_support_problem(quantization: str, optimizer: str) -> str | None:
    """Why ``train.fsdp`` cannot run with these settings and installed libraries (one line), or None."""
    if quantization == "int8":
        return ("train.fsdp: an int8 base cannot be sharded (bitsandbytes' int8 weights and their row "
                "statistics are not shardable tensors); use model.quantization: nf4, or train.fsdp: false")
    if optimizer == "adamw_8bit":  # bitsandbytes' 8-bit update refuses DTensor parameters
        return ("train.optimizer: adamw_8bit does not run on FSDP's sharded adapter (DTensor); use adamw "
                "(the adapter's optimizer states are small)")
    return None


def load_sharded(run: ResolvedRun, device: torch.device, comm: Collectives, *,
                 cpu_offload: bool = False) -> tuple[Any, list[str], str, tuple[str, int, int]]:
    """The adapted model, sharded over the ranks and filled from rank 0 (see the module docstring).

    Returns (model, what ``lorafit.fused`` swapped, what was done: for the run's log, peft's
    trainable-parameter line and counts, taken on rank 0's loaded model)."""
    model, fused = attach_adapter(load_base_model(run, META), run)  # before rank 0's load: its RNG as one process's
    real = next((name for name, t in _tensors(model).items() if not t.is_meta), None)
    if real is not None:
        raise LorafitError(f"train.fsdp: transformers {installed('transformers')} built the model with weights "
                           f"(e.g. {real}) when asked for shapes only; set train.fsdp: false")
    waiting = _side_group()  # made by every rank before rank 0 reads: the others wait on it meanwhile
    source = attach_adapter(load_base_model(run, torch.device("cpu")), run)[0] if comm.rank == 0 else None
    facts = (_shapes(source), trainable_line(source)) if source is not None else None
    shapes, counted = comm.broadcast_object(facts, group=waiting)
    _match_shapes(model, shapes)
    quant_states = _share_quant_states(model, source, comm, waiting, device)
    shard_model(model, cpu_offload=cpu_offload)
    full = _full_state(source, model) if source is not None else {}
    _set_state(model, full, cpu_offload)
    del full
    _fill_unsaved_buffers(model, source, comm, device)
    del source
    for module, state in quant_states:
        module.quant_state = state
    _check_loaded(model)
    how = (f"transformer blocks sharded over {comm.world} processes; rank 0 read the weights and sent each "
           "rank its shard (torch's set_model_state_dict, broadcast_from_rank0)")
    return model, fused, how + ("; shards in host memory (CPU offload)" if cpu_offload else ""), counted


@functools.lru_cache(maxsize=1)
def _side_group() -> Any:
    """A gloo group with a long timeout: for waiting on rank 0's load, and for metadata (CPU objects)."""
    with quiet.native_output_hidden():
        return dist.new_group(backend="gloo", timeout=LOAD_TIMEOUT)


def _tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer by each of its names (tied weights under both)."""
    return {**dict(model.named_parameters(remove_duplicate=False)),
            **dict(model.named_buffers(remove_duplicate=False))}


def _shapes(model: torch.nn.Module) -> Shapes:
    return {name: (tuple(t.shape), t.dtype) for name, t in _tensors(model).items()}


def _match_shapes(model: torch.nn.Module, shapes: Shapes) -> None:
    """Give the meta model rank 0's names, shapes and dtypes: a loaded 4-bit weight is packed
    ((n/2)/itemsize, 1), while the meta model still has the layer's (out, in)."""
    local = _tensors(model)
    differ = sorted(set(local) ^ set(shapes))
    if differ:
        raise LorafitError(f"train.fsdp: the model built on the meta device differs from the one rank 0 loaded "
                           f"({len(differ)} tensor names, e.g. {differ[0]}); set train.fsdp: false")
    for name, tensor in local.items():
        shape, dtype = shapes[name]
        if tuple(tensor.shape) == shape and tensor.dtype == dtype:
            continue
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        empty = torch.empty(shape, dtype=dtype, device=META)
        if isinstance(tensor, torch.nn.Parameter):
            module.register_parameter(attr, torch.nn.Parameter(empty, requires_grad=tensor.requires_grad))
        else:
            module.register_buffer(attr, empty)


def _full_state(source: torch.nn.Module, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Rank 0's tensors under the names the sharded model saves: parameters and saved buffers, as
    plain tensors (a 4-bit weight's packed bits; its statistics go separately). Those the model
    keeps whole (the LM head) are copies: torch takes them as they are, and a tensor loaded from
    safetensors is a view of the file's memory map, which would stay resident as long as it lives."""
    from torch.distributed.tensor import DTensor

    saved = set(model.state_dict())
    sharded = {name for name, t in _tensors(model).items() if isinstance(t, DTensor)}
    return {name: t.detach().as_subclass(torch.Tensor) if name in sharded else t.detach().clone()
            for name, t in _tensors(source).items() if name in saved}


def _set_state(model: torch.nn.Module, full: dict[str, torch.Tensor], cpu_offload: bool) -> None:
    """torch's loading of a full state dict on rank 0 into the sharded model of every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, cpu_offload=cpu_offload)
    set_model_state_dict(model, full, options=options)


def _share_quant_states(model: torch.nn.Module, source: torch.nn.Module | None, comm: Collectives, group: Any,
                        device: torch.device) -> list[tuple[Any, Any]]:
    """Rank 0's 4-bit statistics for every ``Linear4bit``, rebuilt on ``device`` on every rank."""
    from bitsandbytes.nn import Linear4bit

    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, Linear4bit)]
    if not layers:
        return []
    from bitsandbytes.functional import QuantState

    sent = None
    if source is not None:
        loaded = dict(source.named_modules())
        sent = {name: (getattr(loaded[name].weight, "quant_state", None) or loaded[name].quant_state).as_dict()
                for name, _ in layers}
    states = comm.broadcast_object(sent, group=group)
    return [(module, QuantState.from_dict(states[name], device=device)) for name, module in layers]


@torch.no_grad()
def _fill_unsaved_buffers(model: torch.nn.Module, source: torch.nn.Module | None, comm: Collectives,
                          device: torch.device) -> None:
    """Buffers a model does not save (rotary frequencies) are still on the meta device: rank 0's."""
    loaded = dict(source.named_buffers(remove_duplicate=False)) if source is not None else {}
    for name, buffer in model.named_buffers(remove_duplicate=False):  # the same order on every rank
        if not buffer.is_meta:
            continue
        value = loaded[name].to(device, copy=True) if source is not None else torch.empty_like(buffer, device=device)
        owner, _, attr = name.rpartition(".")
        model.get_submodule(owner).register_buffer(attr, comm.broadcast_(value.contiguous()), persistent=False)


def _check_loaded(model: torch.nn.Module) -> None:
    left = [name for name, t in _tensors(model).items() if t.is_meta]
    if left:
        raise LorafitError(f"train.fsdp: {len(left)} tensors were not loaded (e.g. {left[0]}); set train.fsdp: false")
