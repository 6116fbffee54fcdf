"""Learning-rate schedules: linear warm-up, then a decay named as transformers' ``lr_scheduler_type``.

With peak ``lr``, ``T`` optimizer steps, ``w`` warm-up steps and ``p = (t - w) / (T - w)`` the
progress after warm-up, the factor ``f(t)`` (``lr(t) = lr · f(t)``) is:

    warm-up              f = (t + 1) / (w + 1)                            for t < w
    cosine               f = ½ (1 + cos(π p))
    linear               f = 1 - p
    constant             f = 1                              (= constant_with_warmup)
    cosine_with_restarts f = ½ (1 + cos(π ((c · p) mod 1)))  c = num_cycles (1); 0 once p ≥ 1
    cosine_with_min_lr   f = m + (1 - m) · ½ (1 + cos(2π c p))  m = min_lr_rate (or min_lr / lr), c = num_cycles (½)
    polynomial           f = (e + (1 - e) (1 - p)^k)            k = power (1), e = lr_end / lr (lr_end 1e-7)
    inverse_sqrt         f = 1 / √((t - w + s) / s)             s = timescale (w, else 10,000)

After warm-up each formula is transformers' (``transformers.get_scheduler``, tested against it);
the warm-up differs on purpose: it starts at ``lr / (w + 1)`` rather than 0, so no step is wasted.
"""

from __future__ import annotations

import math
from typing import Any

import torch

# schedule -> the options it reads (transformers' lr_scheduler_kwargs)
SCHEDULES: dict[str, tuple[str, ...]] = {
    "cosine": (), "linear": (), "constant": (), "constant_with_warmup": (),
    "cosine_with_restarts": ("num_cycles",), "cosine_with_min_lr": ("num_cycles", "min_lr", "min_lr_rate"),
    "polynomial": ("power", "lr_end"), "inverse_sqrt": ("timescale",),
}
# transformers' other schedules, and why lorakit has not got them
UNSUPPORTED_SCHEDULES = {
    "reduce_lr_on_plateau": "it steps on an eval metric, and lorakit's schedule is a function of the step alone "
                            "(which is what makes --resume exact)",
    "warmup_stable_decay": "not implemented; cosine_with_min_lr or polynomial give a similar tail",
}


def check_schedule(kind: str, kwargs: dict[str, Any] | None = None) -> None:
    """Raises ValueError for an unknown schedule, or an option it does not read."""
    if kind in UNSUPPORTED_SCHEDULES:
        raise ValueError(f"schedule {kind!r} is not supported: {UNSUPPORTED_SCHEDULES[kind]}; "
                         f"choose from {list(SCHEDULES)}")
    if kind not in SCHEDULES:
        raise ValueError(f"schedule must be one of {list(SCHEDULES)}, got {kind!r}")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise ValueError(f"schedule_kwargs must be a mapping, got {kwargs!r}")
    extra = sorted(set(kwargs or {}) - set(SCHEDULES[kind]))
    if extra:
        raise ValueError(f"schedule {kind!r} reads {list(SCHEDULES[kind]) or 'no options'}; "
                         f"schedule_kwargs {extra} would be ignored")
    if kind == "cosine_with_min_lr" and (("min_lr" in (kwargs or {})) == ("min_lr_rate" in (kwargs or {}))):
        raise ValueError("schedule 'cosine_with_min_lr' needs exactly one of min_lr and min_lr_rate in schedule_kwargs")


def lr_factor(step: int, total: int, warmup: int, kind: str = "cosine", lr: float = 1.0,
              **kwargs: Any) -> float:
    """Multiplier of the peak ``lr`` at optimizer step ``step`` (0-based) of ``total``.

    ``lr`` is read only where an option is an absolute rate (``lr_end``, ``min_lr``).
    """
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind in ("constant", "constant_with_warmup"):
        return 1.0
    if kind == "inverse_sqrt":
        timescale = kwargs.get("timescale") or warmup or 10_000
        return 1.0 / math.sqrt((step - warmup + timescale) / timescale)
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    if kind == "cosine_with_restarts":
        if progress >= 1.0:
            return 0.0
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((float(kwargs.get("num_cycles", 1)) * progress) % 1.0))))
    if kind == "cosine_with_min_lr":
        rate = kwargs["min_lr_rate"] if "min_lr_rate" in kwargs else kwargs["min_lr"] / lr
        f = 0.5 * (1.0 + math.cos(math.pi * float(kwargs.get("num_cycles", 0.5)) * 2.0 * progress))
        return max(0.0, f * (1.0 - rate) + rate)
    if kind == "polynomial":
        end = kwargs.get("lr_end", 1e-7) / lr
        if step > total:
            return end
        return (1.0 - end) * (1.0 - progress) ** kwargs.get("power", 1.0) + end
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_scheduler(optimizer: torch.optim.Optimizer, total: int, warmup: int, kind: str = "cosine",
                   kwargs: dict[str, Any] | None = None, lr: float = 1.0):
    """A ``LambdaLR`` following :func:`lr_factor` (its state_dict resumes the step count).

    Raises:
        ValueError: see :func:`check_schedule`; a polynomial ``lr_end`` not below ``lr``.
    """
    check_schedule(kind, kwargs)
    kw = dict(kwargs or {})
    if kind == "polynomial" and not kw.get("lr_end", 1e-7) < lr:
        raise ValueError(f"schedule 'polynomial': lr_end ({kw.get('lr_end', 1e-7)}) must be below lr ({lr})")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup, kind, lr, **kw))
