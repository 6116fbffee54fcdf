"""Learning-rate schedules: linear warm-up, then cosine (or linear) decay to zero.

    lr(t) = lr · t / w                                   for t < w (warm-up)
    lr(t) = lr · ½ (1 + cos(π · (t - w) / (T - w)))      cosine, for w <= t <= T
"""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, total: int, warmup: int, kind: str = "cosine") -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based) of ``total``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_scheduler(optimizer: torch.optim.Optimizer, total: int, warmup: int, kind: str = "cosine"):
    """A ``LambdaLR`` following :func:`lr_factor` (its state_dict resumes the step count)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup, kind))
