"""Adapter files from a model trained with ``torch.distributed`` (DDP, FSDP2).

Under a process group every rank holds a model, but only rank 0 writes files:

* **DDP** (``DistributedDataParallel``): each rank holds the full, identical adapter; the wrapper
  is looked through (:func:`unwrap`) and rank 0 writes. No communication is needed, so a save
  called on rank 0 alone works too.
* **FSDP2** (``torch.distributed.fsdp.fully_shard``): each parameter is a ``DTensor`` whose rank
  ``k`` holds rows ``[k·⌈n/N⌉, (k+1)·⌈n/N⌉)`` of dim 0 (``N`` ranks, uneven last shard). The
  tensors of the adapter file are all-gathered (``DTensor.full_tensor``, a collective: **every
  rank must call** ``save_adapter``; a call on rank 0 alone would wait forever) and rank 0 writes
  the same file a single process would — never sharded keys, never an empty tensor. Only the
  tensors that go in the file are gathered: the frozen base weights stay sharded.

Loading copies each full tensor of a file into a ``DTensor`` parameter's local shard
(:func:`copy_full_into`), the same rows ``fully_shard`` gave that rank. An adapter injected into an
already sharded model keeps its new tensors whole (:func:`new_parameters_whole`): they are outside
FSDP's units, so they serve inference, not training (:func:`check_load_target`).
"""

from __future__ import annotations

import contextlib
import os
import pickle
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch import nn

T = TypeVar("T")
StateDictFn = Callable[..., dict[str, torch.Tensor]]


def _dist():
    """``torch.distributed`` when a process group is running, else None."""
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def rank() -> int:
    """This process's global rank: from the process group, else torchrun's ``RANK`` (0 alone)."""
    dist = _dist()
    return dist.get_rank() if dist is not None else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """Processes in the default group (1 without one)."""
    dist = _dist()
    return dist.get_world_size() if dist is not None else 1


def is_distributed() -> bool:
    """A process group with more than one rank is running."""
    return world_size() > 1


def is_main_process() -> bool:
    """Rank 0, or a single process: the one process that writes files, logs and progress."""
    return rank() == 0


def is_dtensor(t: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.4: no public DTensor, so no FSDP2 either
        return False
    return isinstance(t, DTensor)


def has_dtensors(model: nn.Module) -> bool:
    """Some parameter is a ``DTensor`` (the model was sharded, e.g. by ``fully_shard``)."""
    return any(is_dtensor(p) for p in model.parameters())


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside a ``DistributedDataParallel`` wrapper (FSDP2 shards in place and
    needs no unwrapping)."""
    from torch.nn.parallel import DistributedDataParallel

    while isinstance(model, DistributedDataParallel):
        model = model.module
    return model


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or the whole of a ``DTensor`` (collective: all ranks must call), on the CPU."""
    if is_dtensor(t):
        return t.detach().full_tensor().cpu()
    return t


def full_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every ``DTensor`` of ``tensors`` made whole (collective, in sorted key order on every rank)."""
    return {k: full_tensor(tensors[k]) for k in sorted(tensors)}


def gather_adapter_state(model: nn.Module, state_dict_fn: StateDictFn, *args: Any) -> dict[str, torch.Tensor]:
    """``state_dict_fn(model, *args)`` (e.g. ``peft_format.adapter_state_dict``) with full
    tensors where ``model``'s state holds ``DTensor`` shards; the same result a single process gets.

    Without DTensors this is just ``state_dict_fn(model, *args)``. With them, the function is
    first run on a stand-in state whose value ``i`` is the one-element tensor ``[i]``, which
    tells which model keys the file holds; only those are then gathered, in the same order on
    every rank (the gathers are collectives), and the function runs once more on that state.

    Raises:
        RuntimeError: ``state_dict_fn`` transformed the stand-in values, so the keys it reads
            cannot be traced (a lorakit bug, not a user error).
    """
    state = model.state_dict()
    if not any(is_dtensor(v) for v in state.values()):
        return state_dict_fn(model, *args)
    keys = list(state)
    probe = {k: torch.tensor([i]) for i, k in enumerate(keys)}  # (1,) int64, one storage each
    picked = _call_with_state(model, probe, state_dict_fn, args)
    used: list[str] = []
    for fk, t in picked.items():
        if t.dtype != torch.int64 or t.numel() != 1 or not 0 <= int(t) < len(keys):
            raise RuntimeError(f"cannot trace which model tensor {fk!r} comes from (got {t!r}); "
                               "gather_adapter_state expects state_dict_fn to pick tensors, not transform them")
        used.append(keys[int(t)])
    needed = sorted(set(used))  # sorted: the same collective order on every rank
    gathered = {k: full_tensor(state[k]) for k in needed}
    return _call_with_state(model, {**state, **gathered}, state_dict_fn, args)


def _call_with_state(model: nn.Module, state: dict[str, torch.Tensor], fn: StateDictFn, args) -> dict[str, Any]:
    """Run ``fn(model, *args)`` while ``model.state_dict()`` returns ``state`` (only the call's duration)."""
    model.state_dict = lambda *a, **k: dict(state)  # instance attribute shadows the method
    try:
        return fn(model, *args)
    finally:
        del model.state_dict


def on_main_process(fn: Callable[[], T], *, sync: bool) -> T | None:
    """Run ``fn`` on rank 0 only (in a single process: just run it).

    With ``sync``, every rank waits for rank 0 and receives its result (it must be picklable);
    if ``fn`` raised on rank 0, the other ranks raise the same exception (or a RuntimeError
    naming it, if it cannot be pickled), so no rank carries on as if it had succeeded. Without
    ``sync`` the other ranks return None at once.

    Raises:
        Whatever ``fn`` raises, on every rank with ``sync``.
    """
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return fn()
    result: Any = None
    error: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            result = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised below, after the other ranks are told
            error = e
    if sync:
        sent: BaseException | None = error
        if error is not None:
            try:
                pickle.dumps(error)
            except Exception:  # an exception holding something unpicklable: send its text
                sent = RuntimeError(f"rank 0 failed: {type(error).__name__}: {error}")
        box = [(result, sent)]
        dist.broadcast_object_list(box, src=0)
        result, sent = box[0]
        if sent is not None and dist.get_rank() != 0:
            raise sent
    if error is not None:
        raise error
    return result


def copy_full_into(target: torch.Tensor, value: torch.Tensor) -> None:
    """``target.copy_(value)``; for a ``DTensor`` target, its local shard gets the matching rows
    of the full ``value`` (every rank holds the same ``value``; no communication)."""
    if not is_dtensor(target):
        target.copy_(value)
        return
    from torch.distributed.tensor import distribute_tensor

    shard = distribute_tensor(value.to(target.device, target.dtype), target.device_mesh, target.placements,
                              src_data_rank=None)  # this rank's rows of value, computed locally
    target.to_local().copy_(shard.to_local())


@contextlib.contextmanager
def new_parameters_whole(model: nn.Module) -> Iterator[None]:
    """Around an ``inject`` into an FSDP2-sharded model: a parameter the block creates as a
    ``DTensor`` (a ``modules_to_save`` deep copy of a sharded head, a DoRA magnitude computed from
    a sharded weight) is outside FSDP's management, and mixing it with FSDP's gathered tensors
    fails ("got mixed torch.Tensor and DTensor"). Each becomes a whole, plain parameter of the same
    shape, dtype and trainability — uninitialised: the adapter file's tensors fill it."""
    before = {id(p) for p in model.parameters() if is_dtensor(p)}
    yield
    if not before:
        return
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and is_dtensor(p) and id(p) not in before:
                whole = torch.empty(p.shape, dtype=p.dtype, device=p.to_local().device)  # the full shape
                module._parameters[name] = nn.Parameter(whole, requires_grad=p.requires_grad)


def check_load_target(model: nn.Module, use_dora: bool, is_trainable: bool) -> None:
    """Into an already sharded (FSDP2) model, a new adapter loads for inference only: its tensors
    join whole, outside FSDP's units and gradient reduction. DoRA cannot be injected there (its
    magnitudes are computed from the sharded base weights).

    Raises:
        ValueError: ``is_trainable=True`` or a DoRA adapter, on a model with DTensor parameters.
    """
    if not has_dtensors(model) or not (is_trainable or use_dora):
        return
    what = "is_trainable=True" if is_trainable else "a DoRA adapter"
    raise ValueError(f"load_adapter: {what} on a model already sharded with fully_shard is not supported (the new "
                     "tensors would sit outside FSDP's units). Load the adapter first, then shard "
                     "(lorakit.train.distributed.shard_model), or load a plain LoRA adapter with is_trainable=False")
