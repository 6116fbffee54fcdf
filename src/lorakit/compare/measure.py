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
def paired_latency(base: nn.Module, other: nn.Module, batch: dict[str, torch.Tensor], reps: int = 30,
                   warmup: int = 3, max_reps: int | None = None, target_spread: float = 0.02) -> dict[str, float]:
    """Forward latency of ``other`` against ``base`` on ``batch``, in eval mode, honest about noise.

    Calls come in pairs, alternating which model goes first (base, other | other, base | ...), so
    load from other processes on a shared machine hits both alike. Each pair gives a ratio
    ``t_other / t_base``; pairs are added (``reps`` at least, ``max_reps`` at most, default
    ``4 · reps``) until the spread of the ratios — half their interquartile range, relative to
    their median — is at most ``target_spread``; whatever it is then is reported with the result.

    Returns:
        ``base_ms`` and ``other_ms`` (medians, milliseconds), ``ratio`` (median per-pair ratio),
        ``spread`` (half the IQR of the ratios / their median) and ``pairs`` (how many were timed).
    """
    max_reps = max(reps, max_reps if max_reps is not None else 4 * reps)
    modes = (base.training, other.training)
    base.eval()
    other.eval()
    times: tuple[list[float], list[float]] = ([], [])

    def timed(model: nn.Module) -> float:
        t0 = time.perf_counter()
        model(**batch)
        return 1000 * (time.perf_counter() - t0)

    try:
        for _ in range(warmup):
            timed(base), timed(other)
        while True:
            i = len(times[0])
            first, second = ((0, base), (1, other)) if i % 2 == 0 else ((1, other), (0, base))
            for k, model in (first, second):
                times[k].append(timed(model))
            n = len(times[0])
            if n >= reps:
                ratios = [o / b for b, o in zip(*times)]
                spread = _half_iqr(ratios) / statistics.median(ratios)
                if spread <= target_spread or n >= max_reps:
                    break
    finally:
        base.train(modes[0])
        other.train(modes[1])
    return {"base_ms": statistics.median(times[0]), "other_ms": statistics.median(times[1]),
            "ratio": statistics.median(ratios), "spread": spread, "pairs": n}


def _half_iqr(xs: list[float]) -> float:
    if len(xs) < 4:
        return (max(xs) - min(xs)) / 2
    q1, _, q3 = statistics.quantiles(xs, n=4)
    return (q3 - q1) / 2
