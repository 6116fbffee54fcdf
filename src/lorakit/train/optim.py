"""The optimizers ``lorakit train`` builds, by transformers' ``optim`` names.

=====================  ==========================================================================
``adamw_torch``        ``torch.optim.AdamW`` (fused on a CUDA device) — the default
``adamw_torch_fused``  ``torch.optim.AdamW(fused=True)``
``adamw_bnb_8bit``     bitsandbytes ``AdamW(optim_bits=8)``: 8-bit moments (block-wise quantized),
``adamw_8bit``         a quarter of AdamW's state memory (needs ``lorakit[quant]``)
``paged_adamw_8bit``   bitsandbytes ``AdamW(optim_bits=8, is_paged=True)``: state in paged memory
``paged_adamw_32bit``  bitsandbytes ``AdamW(optim_bits=32, is_paged=True)`` (GPU memory spikes go to the host)
``sgd``                ``torch.optim.SGD``
``adafactor``          transformers' ``Adafactor(scale_parameter=False, relative_step=False)``
=====================  ==========================================================================

Classes and keywords are those ``transformers.Trainer`` builds for the same name (tested against
``Trainer.get_optimizer_cls_and_kwargs``); ``weight_decay`` applies to every trained parameter.
"""

from __future__ import annotations

from typing import Any

import torch

ADAMW = ("adamw_torch", "adamw_torch_fused")
BNB = ("adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")
OPTIMIZERS = (*ADAMW, *BNB, "sgd", "adafactor")
# transformers' other optim names, grouped by why lorakit does not build them
_WHY_NOT = {
    ("galore", "apollo", "lomo", "adalomo"): "it projects or fuses gradients layer by layer inside backward, which "
                                             "lorakit's loop does not do (and LoRA already trains a low-rank update)",
    ("schedule_free",): "it needs optimizer.train()/eval() switches around evaluation, which lorakit's loop does "
                        "not make",
    ("xla", "npu"): "it needs torch_xla / torch_npu; lorakit trains on CPU, CUDA and MPS",
}


def check_optim(name: str) -> None:
    """Raises ValueError for a name lorakit does not build, saying why and what it builds."""
    if name in OPTIMIZERS:
        return
    why = next((reason for keys, reason in _WHY_NOT.items() if any(k in name for k in keys)),
               "lorakit does not build it")
    raise ValueError(f"optim {name!r} is not supported: {why}; choose from {list(OPTIMIZERS)}")


def optimizer_cls_and_kwargs(name: str, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                             device: torch.device | None = None) -> tuple[type, dict[str, Any]]:
    """The optimizer class and its keywords for ``name`` (without the parameter groups).

    Raises:
        ValueError: see :func:`check_optim`.
        lorakit.extras.MissingDependency: bitsandbytes (or transformers, for Adafactor) is not installed.
    """
    check_optim(name)
    kwargs: dict[str, Any] = {"lr": lr}
    if name in ADAMW:
        kwargs.update(betas=betas, eps=eps)
        if name == "adamw_torch_fused":
            kwargs["fused"] = True
        elif device is not None and device.type == "cuda":
            kwargs["fused"] = True  # one kernel per step
        return torch.optim.AdamW, kwargs
    if name in BNB:
        from lorakit.extras import require

        bnb = require("bitsandbytes", f"optim {name}")
        kwargs.update(betas=betas, eps=eps, optim_bits=8 if "8bit" in name else 32, is_paged="paged" in name)
        return bnb.optim.AdamW, kwargs
    if name == "sgd":
        return torch.optim.SGD, kwargs
    from lorakit.extras import require

    require("transformers", "optim adafactor")
    from transformers.optimization import Adafactor

    kwargs.update(scale_parameter=False, relative_step=False)
    return Adafactor, kwargs


def make_optimizer(groups: list[dict[str, Any]], cfg, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer of ``cfg.optim`` over ``groups`` (each with its own ``lr``), with ``cfg.weight_decay``."""
    cls, kwargs = optimizer_cls_and_kwargs(cfg.optim, cfg.lr, (cfg.adam_beta1, cfg.adam_beta2), cfg.adam_epsilon,
                                           device)
    if kwargs.get("fused") and cfg.optim == "adamw_torch" and not all(
            p.is_floating_point() for g in groups for p in g["params"]):
        kwargs.pop("fused")
    return cls(groups, weight_decay=cfg.weight_decay, **kwargs)
