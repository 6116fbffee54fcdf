"""Training on N processes under ``torchrun``: data parallel (DDP) or sharded (FSDP2).

The engine is PyTorch's own (``torch.distributed``, launched by ``torchrun``); this module only
decides what each rank does, so that N ranks compute the update one process computes with the
whole batch:

* **Data**: the global batch of micro-step ``k`` is the single-process batch of size
  ``B·N`` (``B`` = ``batch_size`` per rank); rank ``i`` takes the ``i``-th of ``N`` near-equal
  contiguous slices of it.
* **Loss**: with ``n_i`` answer tokens (or examples) on rank ``i`` summed over the step's
  micro-batches, ``N_step = Σ_i n_i`` (one ``all_reduce``). Rank ``i`` back-propagates
  ``N · Σ_{t ∈ rank i} CE_t / N_step``; DDP and FSDP average gradients over the N ranks, so the
  step's gradient is ``Σ_{all t} ∇CE_t / N_step`` — exactly the single-process gradient, not the
  mean of per-rank means (which weighs a rank's tokens by ``1/n_i``).
* **DDP** (default): ``DistributedDataParallel`` keeps a whole replica per rank and all-reduces
  the trainable gradients (frozen base weights have none).
* **FSDP2** (``fsdp=True``): :func:`shard_model` applies ``fully_shard`` to every decoder block,
  then to the root; each rank keeps ``1/N`` of every parameter (dim-0 rows, a ``DTensor``), and
  gathers one block's weights at a time for its forward and backward. The optimizer holds only
  the adapters' shards: frozen base shards are never gathered for it. With ``bf16``: bf16
  compute, fp32 gradient reduction and fp32 master weights.
* **Files**: checkpoints gather the trainable tensors and optimizer state to rank 0, which alone
  writes (and, on resume, alone reads and broadcasts); every rank's RNG state is kept.

A rank with nothing left of a short last batch (fewer examples than ranks) runs the first
example with every label ignored, so its collectives still match and it adds zero to the loss.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lorakit.data.dataset import IGNORE_INDEX, TokenDataset, collate, collate_packed
from lorakit.io.distributed import is_distributed, is_main_process, on_main_process, rank, world_size
from lorakit.train.checkpoint import check_world_size, find_checkpoint, read_checkpoint, write_checkpoint
from lorakit.train.config import TrainConfig

__all__ = ["Parallel", "init_from_env", "shutdown", "shard_model", "decoder_blocks", "mixed_precision",
           "local_device", "is_main_process", "rank", "world_size"]


def init_from_env() -> bool:
    """Start the default process group when launched by ``torchrun`` with ``WORLD_SIZE > 1``,
    unless one is running: gloo for CPU tensors and, where CUDA is available, NCCL for CUDA
    tensors on this node's GPU ``LOCAL_RANK``.

    Returns:
        True when this call started it (then :func:`shutdown` ends it).
    """
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(local_device("cuda"))
        dist.init_process_group("cpu:gloo,cuda:nccl")
    else:
        dist.init_process_group("gloo")
    return True


def shutdown(started: bool, clean: bool = True, exit_code: int = 0) -> None:
    """End the process group if :func:`init_from_env` started it; after a ``clean`` end (every
    rank got here the same way), ranks other than 0 then leave the process at once with
    ``exit_code``.

    Why they leave at once: after a collective returns, a gloo worker thread still frees the
    finished work, and freeing Python-owned tensors (``broadcast_object_list``'s) takes the GIL.
    A rank that exits right away can reach interpreter shutdown first; the thread then aborts
    the process ("terminate called without an active exception", exit code -6): seen on this
    busy 2-core machine in 2 of 8 runs of one configuration, and still after a ``dist.barrier``
    (which may run on gloo's other worker thread). Ranks other than 0 write and log
    nothing, so skipping their interpreter shutdown loses nothing; rank 0 exits normally (its
    files and plots after the last collective leave the threads ample time) so that atexit
    hooks, e.g. loggers', still run.
    """
    import torch.distributed as dist

    if not (started and dist.is_initialized()):
        return
    leave = clean and dist.get_rank() != 0
    if clean:
        dist.barrier()
    dist.destroy_process_group()
    if leave:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)


def local_device(name: str) -> torch.device:
    """``name`` as a device; ``"auto"``/``"cuda"`` under torchrun mean this node's GPU
    ``LOCAL_RANK`` (the CPU without CUDA)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(name)


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one: modules whose class a Hugging Face model names
    in ``_no_split_modules`` (``LlamaDecoderLayer``, ``Qwen2DecoderLayer``...), else the children
    of the longest ``nn.ModuleList`` (BERT's ``encoder.layer``). In ``model.modules()`` order:
    a block nested in another comes after it."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names and m is not model]
    if blocks:
        return blocks
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def mixed_precision(bf16: bool):
    """FSDP2's policy: with ``bf16``, parameters are all-gathered and computed in bfloat16 while
    gradients are reduced in fp32 into the fp32 master shards; else everything in its own dtype."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if not bf16:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def shard_model(model: nn.Module, *, bf16: bool = False, mesh=None) -> nn.Module:
    """FSDP2: ``fully_shard`` each of :func:`decoder_blocks`, then the root (which keeps the rest:
    embeddings, final norm, head, ``modules_to_save`` copies). In place; returns ``model``.

    ``mesh``: FSDP's device mesh; default, all ranks on the device type of ``model``'s parameters.

    Inject or load adapters *before* sharding, so each block's factors are sharded with it. (A
    factor may also be a unit of its own: lorakit calls factors as modules, so their hooks run.)
    A bitsandbytes 4-bit base is sharded too: its packed bytes split across ranks.

    Raises:
        ValueError: no process group is running, or torch has no ``fully_shard`` (< 2.6).
    """
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        raise ValueError(f"FSDP2 needs torch >= 2.6 (torch.distributed.fsdp.fully_shard); this is torch "
                         f"{torch.__version__}. Use DDP (no --fsdp) instead") from None
    if not is_distributed() and mesh is None:
        raise ValueError("shard_model needs a running process group with 2+ ranks: launch with torchrun "
                         "--nproc_per_node N and call torch.distributed.init_process_group first")
    if mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(next(model.parameters()).device.type, (world_size(),))
    kw = {"mp_policy": mixed_precision(bf16), "mesh": mesh}
    for block in reversed(decoder_blocks(model)):  # inner units before the units around them
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    return model


class _RootForward(nn.Module):
    """Calls a sharded model through its own forward, so FSDP's root hooks run (they gather the
    root's parameters: embeddings, final norm, head). ``losses.split_lm`` would call a bare
    ``*ForCausalLM``'s backbone and head directly, past those hooks; through this wrapper the
    loss takes the model's logits instead."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)


class Parallel:
    """What :func:`lorakit.train.fit` does per rank. With one process every method is the
    identity, so the single-process loop is unchanged.

    Args:
        fsdp: shard with FSDP2 (:func:`shard_model`) instead of replicating with DDP.
    """

    def __init__(self, fsdp: bool = False, device: torch.device | None = None) -> None:
        self.rank, self.world = rank(), world_size()
        self.device = device or torch.device("cpu")  # where the small collectives' tensors live
        self.is_main = self.rank == 0
        self.fsdp = fsdp and self.world > 1
        if fsdp and self.world == 1 and "RANK" in os.environ:
            print("lorakit: --fsdp on a single process: nothing to shard, training unsharded", file=sys.stderr)

    # ------------------------------------------------------------------ model
    def wrap(self, model: nn.Module, bf16: bool, device: torch.device) -> nn.Module:
        """Shard (FSDP2, in place) or replicate (DDP) ``model``; returns the module to run the
        loss through. Every rank starts from rank 0's trainable weights."""
        if self.world == 1:
            return model
        self._broadcast_trainable(model)
        if self.fsdp:
            return _RootForward(shard_model(model, bf16=bf16))
        import inspect

        from torch.nn.parallel import DistributedDataParallel

        # no broadcast of the whole (frozen) base at start (the trainable part was synced above), nor of the
        # buffers at each forward (they are constants here); the flags' names depend on the torch version
        known = inspect.signature(DistributedDataParallel).parameters
        flags = {k: False for k in ("init_sync", "forward_sync_buffers") if k in known}
        if "forward_sync_buffers" not in known:
            flags["broadcast_buffers"] = False
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None, **flags)

    def _broadcast_trainable(self, model: nn.Module) -> None:
        """Rank 0's trainable parameters to all ranks (the base is loaded identically everywhere;
        a seeded random init is too, but this makes sure)."""
        import torch.distributed as dist

        with torch.no_grad():
            for _, p in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad):
                dist.broadcast(p.data, src=0)

    def no_sync(self, fwd: nn.Module, last: bool):
        """Skip the gradient reduction on all but the last micro-batch of a step (gradients
        accumulate locally, then the last backward reduces their sum)."""
        if self.world == 1 or last:
            if self.fsdp:
                fwd.model.set_requires_gradient_sync(True)
            return contextlib.nullcontext()
        if self.fsdp:
            fwd.model.set_requires_gradient_sync(False)
            return contextlib.nullcontext()
        return fwd.no_sync()

    # ------------------------------------------------------------------- data
    def global_config(self, cfg: TrainConfig) -> TrainConfig:
        """``cfg`` with the global batch size ``batch_size · N`` (what one process would use)."""
        return cfg if self.world == 1 else dataclasses.replace(cfg, batch_size=cfg.batch_size * self.world)

    def local_batch(self, indices: Sequence[int], ds: TokenDataset, packed: bool = False) -> dict[str, torch.Tensor]:
        """This rank's slice of a global batch, collated (see the module docstring for an empty slice);
        ``packed``: causal-LM examples end to end in one row (:func:`collate_packed`)."""
        n, k = len(indices), self.rank
        mine = [ds[i] for i in indices[k * n // self.world:(k + 1) * n // self.world]]
        if not mine:
            dummy = dict(ds[indices[0]])
            dummy["labels"] = [IGNORE_INDEX] * len(dummy["input_ids"]) if ds.task == "causal-lm" else IGNORE_INDEX
            mine = [dummy]
        return collate_packed(mine) if packed else collate(mine, ds.task, ds.pad_id)

    def total_count(self, n: int) -> int:
        """``Σ_ranks n`` (an ``all_reduce``)."""
        return int(self._all_reduce([n], "sum")[0])

    def reduce_step(self, loss: float, tokens: int) -> tuple[float, int]:
        """The step's loss (each rank's ``N·Σ_local/N_step`` summed, over ``N``) and tokens (summed)."""
        loss_sum, tokens_sum = self._all_reduce([loss, tokens], "sum")
        return loss_sum / self.world, int(tokens_sum)

    def run_callbacks(self, callbacks: Sequence, step: int, logs: dict[str, Any], stop_requested: bool) -> bool:
        """Run ``callbacks`` (on rank 0 only under torchrun); returns whether any rank asked to stop
        (Ctrl-C, or a callback raising KeyboardInterrupt), so that all ranks stop at the same step."""
        if self.world == 1:
            for cb in callbacks:
                cb(step, logs)
            return stop_requested
        if self.is_main:
            try:
                for cb in callbacks:
                    cb(step, logs)
            except KeyboardInterrupt:
                stop_requested = True
        return self._all_reduce([float(stop_requested)], "max")[0] > 0

    def _all_reduce(self, values: list[float], op: str) -> list[float]:
        if self.world == 1:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)  # (len(values),)
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return t.tolist()

    def announce(self, cfg: TrainConfig) -> None:
        """Print (rank 0) how the batch is spread: ``B per rank × N ranks × accumulation``."""
        if self.world == 1 or not self.is_main:
            return
        how = "FSDP2 (fully_shard per decoder block, then the root)" if self.fsdp else "DDP"
        eff = cfg.batch_size * self.world * cfg.grad_accum
        print(f"lorakit: {how} over {self.world} ranks: effective batch {eff} = "
              f"{cfg.batch_size} per rank × {self.world} ranks × {cfg.grad_accum} micro-batch(es)",
              file=sys.stderr, flush=True)

    # ------------------------------------------------------------ checkpoints
    def save_checkpoint(self, run_dir: str, step: int, model: nn.Module, optimizer, scheduler,
                        rng: dict[str, Any], extra: dict[str, Any], keep: int = 2) -> str | None:
        """Collective: gather the trainable tensors, optimizer state and every rank's RNG state
        to rank 0, which writes the checkpoint (the single-process layout; the optimizer state
        keyed by parameter name, ``world_size`` recorded). One process: the plain save."""
        if self.world == 1:
            from lorakit.train.checkpoint import save_checkpoint

            return save_checkpoint(run_dir, step, model, optimizer, scheduler, rng, extra, keep)
        import torch.distributed as dist
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        full = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        tensors = {k: v.contiguous() for k, v in get_model_state_dict(model, options=full).items() if k in trainable}
        optim = get_optimizer_state_dict(model, optimizer, options=full)
        rngs: list[Any] | None = [None] * self.world if self.is_main else None
        dist.gather_object(rng, rngs, dst=0)
        state = {"step": step, "optimizer": optim, "scheduler": scheduler.state_dict(), "rng": rngs,
                 "world_size": self.world, **extra}
        return on_main_process(lambda: write_checkpoint(run_dir, step, tensors, state, keep), sync=True)

    def load_checkpoint(self, resume: str, model: nn.Module, optimizer, scheduler) -> dict[str, Any]:
        """Collective: rank 0 finds and reads the newest checkpoint under ``resume`` and broadcasts
        it (trainable tensors and optimizer state: small); each rank keeps its shard of every full
        tensor, and gets its own RNG state back in ``state["rng"]``.

        Raises:
            ValueError: the checkpoint was written by another number of ranks, or does not match
                the model's trainable parameters. FileNotFoundError: no checkpoint.
        """
        if self.world == 1:
            from lorakit.train.checkpoint import load_checkpoint

            return load_checkpoint(find_checkpoint(resume), model, optimizer, scheduler)
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)

        def read() -> dict[str, Any]:
            ckpt = find_checkpoint(resume)
            tensors, state = read_checkpoint(ckpt, trainable)
            check_world_size(state, self.world, ckpt)
            return {**state, "tensors": tensors}

        state = on_main_process(read, sync=True)  # rank 0 reads; every rank receives the (small) full state
        opts = StateDictOptions(full_state_dict=True, strict=False)  # full tensors -> this rank's shards
        set_model_state_dict(model, state.pop("tensors"), options=opts)
        set_optimizer_state_dict(model, optimizer, state.pop("optimizer"), options=opts)
        scheduler.load_state_dict(state["scheduler"])
        return {**state, "rng": state["rng"][self.rank]}
