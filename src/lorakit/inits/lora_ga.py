"""LoRA-GA (Wang et al., 2024, "LoRA-GA: Low-Rank Adaptation with Gradient Approximation").

At step 0 a LoRA update's gradient is a low-rank projection of the full gradient ``G = ∂L/∂W``; LoRA-GA
chooses A and B so that the first LoRA step moves W as close as possible to the first full fine-tuning
step. With ``G ≈ U·S·Vᵀ`` (a randomized top-2r SVD, ``torch.svd_lowrank(G, q=min(4r, ...), niter=4)``,
G averaged over the backward passes of ``preprocess_loraga``'s ``train_step``):

    direction "ArB2r" (default): A = V[:, :r]ᵀ (r, in),      B = U[:, r:2r]·diag(S[r:2r]) (out, r)
              "A2rBr":           A = V[:, r:2r]ᵀ,            B = U[:, :r]·diag(S[:r])
              "ArBr":            A = V[:, 1:2r:2]ᵀ,          B = U[:, 0:2r:2]·diag(S[0:2r:2])
              "random":          r of the 2r components, drawn with torch.randperm
    scale     "stable" (default): B ·= out^¼ / √stable_gamma
              "weight_svd":       B ·= σ₁(W) / S_B[0]            (σ₁ from a rank-r svd_lowrank of W)
              "gd_scale":         A /= s, B /= s
              "unit":             as is

The factors are rounded to the base weight's dtype, and W ← W - s·B·A (computed in fp32 from the rounded
factors), so the adapted model's output equals the base model's at step 0. This is PEFT 0.21.2's
``preprocess_loraga`` + ``lora_ga_init``, with the same random draws given the same seed; for a GPT-2
``Conv1D`` the "stable" scale uses the layer's true out_features (PEFT reads ``weight.shape[0]``, which
for Conv1D is in_features).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from lorakit.inits import LORA_GA_ATTR
from lorakit.inits.targets import linear_targets

if TYPE_CHECKING:  # pragma: no cover
    from lorakit.config import LoraConfig
    from lorakit.layers.linear import Linear


@torch.no_grad()
def preprocess_loraga(model: nn.Module, lora_config: LoraConfig, train_step: Callable[[], None],
                      cache_file: str | None = None) -> None:
    """Attach the mean gradient of every targeted Linear's weight (PEFT's ``preprocess_loraga``);
    ``lorakit.inject(model, lora_config)`` with ``init_lora_weights="lora_ga"`` then uses (and drops) it.

    Only the targeted weights require grad while ``train_step`` runs (forward and ``backward()`` on
    some batches); each weight's gradient is divided by the number of backward passes through its
    layer. Every parameter's ``requires_grad`` and ``.grad``, and the model's train/eval mode, are
    restored afterwards.

    Args:
        cache_file: if it exists, the gradients are read from it (``torch.load(weights_only=True)``);
            otherwise they are computed and written there (PEFT's format: ``{"<name>._peft_loraga_grad": G}``).

    Raises:
        ValueError: no ``lora_ga_config``, a target that is not a full-precision Linear, or a target
            that ``train_step`` never back-propagated through. Nothing is attached then.
    """
    if lora_config.lora_ga_config is None:
        raise ValueError("preprocess_loraga needs a LoraConfig with init_lora_weights='lora_ga' (and lora_ga_config)")
    targets = linear_targets(model, lora_config, "LoRA-GA")
    device = next(model.parameters()).device
    if cache_file is not None and os.path.exists(cache_file) and os.path.getsize(cache_file) > 0:
        cache = torch.load(cache_file, map_location=device, weights_only=True)
        missing = [n for n in targets if f"{n}.{LORA_GA_ATTR}" not in cache]
        if missing:
            raise ValueError(f"LoRA-GA cache {cache_file!r} has no gradient for {missing[:3]}")
        grads = {n: cache[f"{n}.{LORA_GA_ATTR}"] for n in targets}
    else:
        grads = estimate_gradients(model, targets, train_step)
        if cache_file is not None:
            from lorakit.inits.corda import _save

            _save(cache_file, {f"{n}.{LORA_GA_ATTR}": g for n, g in grads.items()})
    for n, linear in targets.items():
        setattr(linear, LORA_GA_ATTR, grads[n])


def estimate_gradients(model: nn.Module, targets: dict[str, nn.Module],
                       train_step: Callable[[], None]) -> dict[str, torch.Tensor]:
    """``{name: Σ ∂L/∂W / (backward passes through the layer)}`` for the target Linears
    (PEFT's ``estimate_gradients``)."""
    was_training = model.training
    flags = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    counts = dict.fromkeys(targets, 0)
    hooks = []
    try:
        model.train()
        for p, _, _ in flags:
            p.requires_grad_(False)
            p.grad = None
        for name, linear in targets.items():
            linear.weight.requires_grad_(True)

            def count(module, grad_in, grad_out, name=name) -> None:
                counts[name] += 1

            hooks.append(linear.register_full_backward_hook(count))
        with torch.enable_grad(), warnings.catch_warnings():
            # the counting hooks need no input gradients; torch says so once per layer
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            train_step()
        unseen = [n for n, c in counts.items() if c == 0 or targets[n].weight.grad is None]
        if unseen:
            raise ValueError(f"LoRA-GA: train_step never back-propagated through {unseen[:3]}; it must run forward "
                             "and loss.backward() on training batches")
        return {n: targets[n].weight.grad.detach() / counts[n] for n in targets}
    finally:
        for h in hooks:
            h.remove()
        for p, flag, grad in flags:
            p.requires_grad_(flag)
            p.grad = grad
        model.train(was_training)


def init_layer(layer: Linear, name: str, cfg: LoraConfig) -> None:
    """``init_lora_weights="lora_ga"``: A, B from the attached gradient; W ← W - s·B·A (PEFT's ``lora_ga_init``).

    Raises:
        ValueError: no gradient (``preprocess_loraga`` was not run for this layer), one of another
            shape, or a rank above what the gradient's SVD gives (2r components are needed).
    """
    from lorakit.inits import set_factors, write_base

    base = layer.base_layer
    grad = base.__dict__.get(LORA_GA_ATTR)
    if grad is None:
        raise ValueError(f"init_lora_weights='lora_ga' needs the gradient of this {type(base).__name__}'s weight; "
                         "run lorakit.inits.preprocess_loraga(model, cfg, train_step) on training batches first")
    weight = layer.base_weight()
    if tuple(grad.shape) != tuple(weight.shape):
        raise ValueError(f"LoRA-GA's gradient has shape {tuple(grad.shape)} but the weight is {tuple(weight.shape)}; "
                         "run preprocess_loraga on the same model")
    gc = cfg.lora_ga_config
    r, s = layer.r[name], layer.scaling[name]
    if 2 * r > min(layer.in_features, layer.out_features):
        raise ValueError(f"LoRA-GA takes 2r = {2 * r} singular vectors of a {layer.out_features}x{layer.in_features} "
                         f"gradient, which has at most {min(layer.in_features, layer.out_features)}; use r <= "
                         f"{min(layer.in_features, layer.out_features) // 2} for this layer (rank_pattern)")
    dtype = weight.dtype
    g = grad.to(torch.float32)
    g = g.T if layer.fan_in_fan_out else g  # (out, in)
    U, S, V = torch.svd_lowrank(g, q=min(4 * r, min(g.shape)), niter=4)  # (out, q), (q,), (in, q)
    Vh = V.t()[: 2 * r]  # (2r, in)
    U, S = U[:, : 2 * r], S[: 2 * r]
    direction = gc["direction"]
    if direction == "ArBr":
        A, B_idx = Vh[1: 2 * r: 2], slice(0, 2 * r, 2)
    elif direction == "A2rBr":
        A, B_idx = Vh[r: 2 * r], slice(0, r)
    elif direction == "ArB2r":
        A, B_idx = Vh[:r], slice(r, 2 * r)
    else:  # random
        B_idx = torch.randperm(2 * r)[:r]
        A = Vh[B_idx]
    S_B = S[B_idx]
    B = U[:, B_idx] @ torch.diag(S_B)  # (out, r)
    if gc["scale"] == "stable":
        B = B * (layer.out_features ** 0.25 / gc["stable_gamma"] ** 0.5)
    elif gc["scale"] == "weight_svd":
        w = layer._weight_out_in().detach().to(torch.float32)
        _, w_S, _ = torch.svd_lowrank(w, q=r, niter=4)
        if S_B[0] > 0:
            B = B * (w_S[0] / S_B[0])
    elif gc["scale"] == "gd_scale":
        A, B = A / s, B / s
    A, B = A.to(dtype), B.to(dtype)  # the weight offset below uses the factors as stored
    set_factors(layer, name, A, B)
    w = layer._weight_out_in().detach().to(torch.float32)  # (out, in)
    write_base(layer, w - s * (B.float() @ A.float()))
