"""Checkpoints that survive a crash mid-write, and resuming from them.

A checkpoint is a directory ``<run>/checkpoints/step-000123/`` holding

* ``trainable.safetensors`` — every parameter with ``requires_grad`` (by its name in the model);
* ``state.pt`` — optimizer and scheduler state, the RNG states (torch CPU/CUDA, Python), the
  step, the loss/eval history and the training time so far. Under torchrun (written by rank 0,
  see :mod:`lorakit.train.distributed`): the gathered full tensors, the optimizer state keyed by
  parameter name, one RNG state per rank and ``world_size``.

It is written into a temporary sibling directory and moved into place with ``os.replace``, so
a reader sees either the whole previous checkpoint or the whole new one, never half a write.
The data position is implied by the step (batches are a pure function of seed and epoch).
"""

from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

_STEP_DIR = re.compile(r"step-(\d+)$")


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def save_checkpoint(run_dir: str, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                    rng: dict[str, Any], extra: dict[str, Any], keep: int = 2) -> str:
    """Write ``<run_dir>/checkpoints/step-<step>`` atomically; prune all but the ``keep`` newest.

    Returns:
        The checkpoint directory.
    """
    tensors = {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}
    state = {"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng,
             **extra}
    return write_checkpoint(run_dir, step, tensors, state, keep)


def write_checkpoint(run_dir: str, step: int, tensors: dict[str, torch.Tensor], state: dict[str, Any],
                     keep: int = 2) -> str:
    """Write ``tensors`` (CPU) and ``state`` as ``<run_dir>/checkpoints/step-<step>``, atomically;
    prune all but the ``keep`` newest. (Under torchrun, rank 0 calls it with gathered tensors.)

    Returns:
        The checkpoint directory.
    """
    root = os.path.join(run_dir, "checkpoints")
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step-{step:06d}")
    tmp = tempfile.mkdtemp(prefix=f".step-{step:06d}-", dir=root)
    try:
        save_file(tensors, os.path.join(tmp, "trainable.safetensors"))
        torch.save(state, os.path.join(tmp, "state.pt"))
        default_modes(tmp)
        if os.path.exists(final):  # the same step saved again (e.g. interrupted right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def default_modes(path: str) -> None:
    """Give ``path`` (a file, or a directory and the files in it) the mode ``open()`` / ``makedirs``
    would: ``mkdtemp`` makes 0700 and safetensors' ``save_file`` 0600, unreadable by a team's group."""
    mask = os.umask(0)
    os.umask(mask)
    if os.path.isdir(path):
        os.chmod(path, 0o777 & ~mask)
        for name in os.listdir(path):
            if os.path.isfile(os.path.join(path, name)):
                os.chmod(os.path.join(path, name), 0o666 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


def list_checkpoints(run_dir: str) -> list[str]:
    """Complete checkpoint directories of a run, oldest first."""
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), os.path.join(root, d)) for d in os.listdir(root) if (m := _STEP_DIR.match(d))]
    return [p for _, p in sorted(found) if os.path.isfile(os.path.join(p, "state.pt"))]


def find_checkpoint(path: str) -> str:
    """The checkpoint to resume from: ``path`` itself if it is one, else the run's newest.

    Raises:
        FileNotFoundError: no checkpoint at or under ``path``.
    """
    if os.path.isfile(os.path.join(path, "state.pt")):
        return path
    found = list_checkpoints(path)
    if not found:
        raise FileNotFoundError(f"no checkpoint in {path!r} (expected {path}/checkpoints/step-*/state.pt); "
                                "was the run started with this --out?")
    return found[-1]


def read_checkpoint(ckpt: str, trainable: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, state)`` of checkpoint ``ckpt``, checked against the model's ``trainable`` names.

    Raises:
        ValueError: the checkpoint's parameters do not match the model's trainable ones.
    """
    tensors = load_file(os.path.join(ckpt, "trainable.safetensors"))
    if set(tensors) != set(trainable):
        missing, unexpected = sorted(set(trainable) - set(tensors)), sorted(set(tensors) - set(trainable))
        raise ValueError(f"checkpoint {ckpt} does not match the model: missing {missing[:4]}, unexpected "
                         f"{unexpected[:4]}; resume with the same model and adapter settings")
    state = torch.load(os.path.join(ckpt, "state.pt"), map_location="cpu", weights_only=True)
    return tensors, state


def check_world_size(state: dict[str, Any], world: int, ckpt: str) -> None:
    """Data order and RNG states depend on the number of ranks, so a run resumes with the same one.

    Raises:
        ValueError: ``ckpt`` was written by another number of processes.
    """
    saved = int(state.get("world_size", 1))
    if saved != world:
        how = f"torchrun with {saved} ranks in all" if saved > 1 else "a single process, without torchrun"
        raise ValueError(f"checkpoint {ckpt} was written by {saved} process(es) but this run has {world}; "
                         f"resume it with {how}")


def load_checkpoint(ckpt: str, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler) -> dict[str, Any]:
    """Restore the trainable parameters, optimizer and scheduler from ``ckpt``; returns the state
    dict (``step``, ``rng``, history...). The caller restores the RNG when it resumes the loop.

    Raises:
        ValueError: the checkpoint's parameters do not match the model's trainable ones, or it
            was written by several processes (torchrun).
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    tensors, state = read_checkpoint(ckpt, list(params))
    check_world_size(state, 1, ckpt)
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[n])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state
