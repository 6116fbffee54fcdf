"""What ``lorakit compare`` measures besides accuracy: training memory, size on disk, inference latency.

Training memory is *accounted from the real tensors* of one training step rather than read from the
process's resident set (on a CPU the resident set only grows and mixes every run of the process):

    memory = weights + gradients + AdamW state + activations saved for backward (one batch)

Each term is the byte size of the tensors that exist at that moment: gradients after ``backward``,
the optimizer's ``exp_avg``/``exp_avg_sq``/``step`` after one ``step``, the activations through
``torch.autograd.graph.saved_tensors_hooks`` (storages counted once, parameters excluded). This is
what dominates an accelerator's peak memory, which is where the LoRA paper's savings come from.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
from safetensors.torch import save_file
from torch import nn

MiB = 2**20


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def training_memory(model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor]) -> dict[str, float]:
    """Bytes (in MiB) of one AdamW training step of ``model``, term by term.

    Runs one forward/backward and one AdamW step with ``lr=0`` (the weights do not move), then
    drops the gradients and optimizer. Call it after training: it consumes random numbers (dropout).

    Args:
        model: the model with its trainable parameters marked ``requires_grad``.
        loss_fn: ``loss_fn(model) -> scalar loss`` on one training batch.

    Returns:
        ``weights_mb``, ``grads_mb``, ``optimizer_mb``, ``activations_mb`` and their sum ``total_mb``.
    """
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in param_ptrs and ptr != 0:
            saved[ptr] = max(saved.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    was_training = model.training
    model.train()
    for p in trainable:
        p.grad = None
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = loss_fn(model)
        loss.backward()
        grads = sum(_nbytes(p.grad) for p in trainable if p.grad is not None)
        opt = torch.optim.AdamW(trainable, lr=0.0, weight_decay=0.0)
        opt.step()
        state = sum(_nbytes(v) for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    finally:
        for p in trainable:
            p.grad = None
        model.train(was_training)
    weights = sum(_nbytes(p) for p in params)
    terms = {"weights_mb": weights / MiB, "grads_mb": grads / MiB, "optimizer_mb": state / MiB,
             "activations_mb": sum(saved.values()) / MiB}
    return {**terms, "total_mb": sum(terms.values())}


def size_on_disk(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes of ``tensors`` written as one safetensors file (what a user would store per task)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "stored.safetensors")
        save_file({k: v.contiguous() for k, v in tensors.items()}, path)
        return os.path.getsize(path)


@torch.no_grad()
def paired_latency(base: nn.Module, other: nn.Module, batch: dict[str, torch.Tensor],
                   reps: int = 30, warmup: int = 3) -> tuple[float, float]:
    """Median forward latency in milliseconds of ``base`` and ``other`` on ``batch``, in eval mode.

    Calls alternate (base, other, base, ...) so that load from other processes on a shared machine
    hits both alike; the medians ignore the odd slow call.
    """
    modes = (base.training, other.training)
    base.eval()
    other.eval()
    times: tuple[list[float], list[float]] = ([], [])
    try:
        for i in range(warmup + reps):
            for k, model in enumerate((base, other)):
                t0 = time.perf_counter()
                model(**batch)
                if i >= warmup:
                    times[k].append(1000 * (time.perf_counter() - t0))
    finally:
        base.train(modes[0])
        other.train(modes[1])
    return statistics.median(times[0]), statistics.median(times[1])
