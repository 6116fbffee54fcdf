"""CorDA (Yang et al., 2024, "CorDA: Context-Oriented Decomposition Adaptation of Large Language Models").

The weight is decomposed *in the context of its inputs*: with ``C = E[x·xᵀ]`` the covariance of the
layer's inputs on some calibration data (each sample's activations divided by their largest value),

    C' = C + δ·mean(diag C)·I          δ = 0.01, doubled until ‖C'·C'⁻¹ - I‖ < 0.05
    W·C' = U·S·Vhᵀ                      (SVD, W: (out, in))
    V = (Vh·C'⁻¹)ᵀ                      so that U·S·Vᵀ = W exactly

and the adapter takes ``r`` of those components — the largest (``corda_method="ipm"``, instruction-
previewed: what the task's inputs use most) or the smallest (``"kpm"``, knowledge-preserved: leave what
the inputs use to W) — as ``A = √(S_r/s)·V_rᵀ`` (r, in), ``B = U_r·√(S_r/s)`` (out, r), and W keeps the
rest: ``W ← W - s·B·A``, so the model's output is unchanged at step 0. PEFT's ``preprocess_corda`` and
``corda_init``, step for step (the cache and covariance files too: a dict of tensors, ``torch.save``'d as
PEFT does, and read back with ``torch.load(weights_only=True)``).

lorakit's only departure: PEFT's hook requires one sample per forward call (it transposes a 2-D input);
here a call's input is flattened to ``(tokens, in)`` first, which for one sample per call is the same.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from lorakit.inits import CORDA_ATTR
from lorakit.inits.targets import linear_targets

if TYPE_CHECKING:  # pragma: no cover
    from lorakit.config import LoraConfig
    from lorakit.layers.linear import Linear


@dataclass
class CordaEigens:
    """What ``preprocess_corda`` attaches to a Linear: ``S_WC`` (r,), ``U_WC`` (out, r), ``V_WC`` (in, r)."""

    S_WC: torch.Tensor
    U_WC: torch.Tensor
    V_WC: torch.Tensor


def _load(path: str | None, device: torch.device) -> dict[str, torch.Tensor] | None:
    if path is None or not os.path.exists(path) or os.path.getsize(path) == 0:
        return None
    return torch.load(path, map_location=device, weights_only=True)  # tensors only: never unpickles objects


def _save(path: str, tensors: dict[str, torch.Tensor]) -> None:
    """``torch.save`` (PEFT's format), written to a temporary and renamed into place."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        torch.save(tensors, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@torch.no_grad()
def preprocess_corda(model: nn.Module, lora_config: LoraConfig, run_model: Callable[[], None] | None = None,
                     hooked_model: nn.Module | None = None) -> None:
    """Attach CorDA's decomposition (:class:`CordaEigens`) to every Linear ``lora_config`` targets;
    ``lorakit.inject(model, lora_config)`` with ``init_lora_weights="corda"`` then uses (and drops) it.

    Args:
        model: the model to adapt (plain, or already holding lorakit adapters).
        lora_config: its ``r`` / ``rank_pattern``, targets and ``corda_config`` are used.
        run_model: runs the model on the calibration data (forward passes; PEFT's recipe: a few
            hundred samples, one per call). Not needed when ``corda_config``'s cache or covariance
            file exists.
        hooked_model: a different model to record the inputs of (PEFT's option); default ``model``.

    Raises:
        ValueError: no ``corda_config``, a target that is not a Linear, no ``run_model`` and no cache,
            inputs with NaN/inf, or a target no calibration sample reached. The model is unchanged then.
    """
    cc = lora_config.corda_config
    if cc is None:
        raise ValueError("preprocess_corda needs a LoraConfig with init_lora_weights='corda' (and corda_config)")
    targets = linear_targets(model, lora_config, "CorDA")
    device = next(model.parameters()).device
    cache = _load(cc["cache_file"], device)
    if cache is not None:
        missing = [n for n in targets if f"{n}.eigens.S_WC" not in cache]
        if missing:
            raise ValueError(f"CorDA cache {cc['cache_file']!r} has no entry for {missing[:3]}; it was built for "
                             "another model or target set (delete it to rebuild)")
        eigens = {n: CordaEigens(cache[f"{n}.eigens.S_WC"], cache[f"{n}.eigens.U_WC"], cache[f"{n}.eigens.V_WC"])
                  for n in targets}
    else:
        covariances = _covariances(model, lora_config, targets, run_model, hooked_model)
        eigens = {}
        for n, linear in targets.items():
            full = collect_eigens_for_layer(linear, covariances[n])
            eigens[n] = crop(full, lora_config.rank_for(n), cc["corda_method"], device)
        if cc["cache_file"] is not None:
            _save(cc["cache_file"], {f"{n}.eigens.{k}": getattr(e, k) for n, e in eigens.items()
                                     for k in ("S_WC", "U_WC", "V_WC")})
    for n, linear in targets.items():  # only now: a refused preprocessing attaches nothing
        setattr(linear, CORDA_ATTR, eigens[n])


def _covariances(model: nn.Module, cfg: LoraConfig, targets: dict[str, nn.Module],
                 run_model: Callable[[], None] | None, hooked_model: nn.Module | None) -> dict[str, torch.Tensor]:
    """``C = mean over calls of xᵀx / max(x)`` per target (PEFT's ``calib_cov_distribution``)."""
    cc = cfg.corda_config
    device = next(model.parameters()).device
    stored = _load(cc["covariance_file"], device)
    if stored is not None:
        missing = [n for n in targets if n not in stored]
        if missing:
            raise ValueError(f"CorDA covariance file {cc['covariance_file']!r} has no entry for {missing[:3]}")
        return {n: stored[n] for n in targets}
    if run_model is None:
        raise ValueError("preprocess_corda needs run_model (forward passes over calibration data) when "
                         "corda_config has no existing cache_file or covariance_file")
    hooked = targets if hooked_model is None else linear_targets(hooked_model, cfg, "CorDA")
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(hooked, 0)

    def hook_for(name: str):
        def hook(module: nn.Module, inputs: tuple, output) -> None:
            x = inputs[0].detach().squeeze(0)
            x = x.reshape(-1, x.shape[-1])  # (tokens, in)
            if not cc["use_float16_for_covariance"]:
                x = x.float()
            x = x / torch.max(x).abs()
            if not torch.isfinite(x).all():
                raise ValueError(f"CorDA: the input of {name} holds NaN or inf; check the calibration data")
            cov = x.t().matmul(x)  # (in, in)
            counts[name] += 1
            sums[name] = cov if name not in sums else sums[name] + cov
        return hook

    handles = [m.register_forward_hook(hook_for(n)) for n, m in hooked.items()]
    was_training = (hooked_model or model).training
    (hooked_model or model).eval()
    try:
        run_model()
    finally:
        for h in handles:
            h.remove()
        (hooked_model or model).train(was_training)
    unseen = [n for n in targets if counts.get(n, 0) == 0]
    if unseen:
        raise ValueError(f"CorDA: run_model never reached {unseen[:3]}; the calibration pass must run the model "
                         "through every target layer")
    covariances = {n: sums[n] / counts[n] for n in targets}
    if cc["covariance_file"] is not None:
        _save(cc["covariance_file"], covariances)
    return covariances


@torch.no_grad()
def collect_eigens_for_layer(linear: nn.Module, covariance: torch.Tensor) -> CordaEigens:
    """The full context-oriented SVD of one Linear (see the module docstring); all ``min(out, in)`` components."""
    from lorakit.layers.linear import is_conv1d

    w = linear.weight.data.float()
    if is_conv1d(linear):
        w = w.T  # (out, in)
    cov = covariance.float()  # (in, in)
    eye = torch.eye(cov.size(0), device=cov.device)
    damp = 0.01
    while True:
        fixed = cov + torch.diag(torch.ones(cov.size(0), device=cov.device) * torch.mean(torch.diag(cov)) * damp)
        inv = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inv, eye).item() < 0.05:
            break
        damp *= 2
    U, S, Vh = torch.linalg.svd(w @ fixed, full_matrices=False)  # (out, k), (k,), (k, in)
    V = (Vh @ inv).transpose(0, 1)  # (in, k)
    return CordaEigens(S_WC=S, U_WC=U.cpu(), V_WC=V.cpu())


def crop(e: CordaEigens, r: int, method: str, device: torch.device) -> CordaEigens:
    """The ``r`` largest (``"ipm"``) or smallest (``"kpm"``) components, copied (PEFT's ``crop_corda_eigens``)."""
    part = slice(None, r) if method == "ipm" else slice(-r, None)
    return CordaEigens(S_WC=e.S_WC[part].clone(), U_WC=e.U_WC[:, part].clone().to(device),
                       V_WC=e.V_WC[:, part].clone().to(device))


def init_layer(layer: Linear, name: str, cfg: LoraConfig) -> None:
    """``init_lora_weights="corda"``: A, B from the attached eigens; W ← W - s·B·A (PEFT's ``corda_init``).

    Raises:
        ValueError: no eigens (``preprocess_corda`` was not run for this layer), eigens of another
            shape or rank, NaN/inf in them, or a weight that is not floating point.
    """
    from lorakit.inits import set_factors, write_base

    base = layer.base_layer
    e = base.__dict__.get(CORDA_ATTR)
    if e is None:
        raise ValueError(f"init_lora_weights='corda' needs CorDA's decomposition of this "
                         f"{type(base).__name__} ({layer.out_features}x{layer.in_features}); run "
                         "lorakit.inits.preprocess_corda(model, cfg, run_model) on calibration data first")
    weight = layer.base_weight()
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"CorDA initialises float32/float16/bfloat16 weights, got {weight.dtype}")
    r, s = layer.r[name], layer.scaling[name]
    U, S, V = e.U_WC, e.S_WC, e.V_WC
    for what, t in (("S", S), ("U", U), ("V", V)):
        if not torch.isfinite(t).all():
            raise ValueError(f"CorDA's {what} for this layer holds NaN or inf; rebuild it with other calibration data")
    want = {"U": (layer.out_features, r), "S": (r,), "V": (layer.in_features, r)}
    for what, t in (("U", U), ("S", S), ("V", V)):
        if tuple(t.shape) != want[what]:
            raise ValueError(f"CorDA's {what} has shape {tuple(t.shape)} but this layer with r={r} needs {want[what]}; "
                             "run preprocess_corda with the same model and LoRA config (rank) as inject")
    S = S / s
    A = V.t().mul(S.sqrt().view(-1, 1))  # (r, in)
    B = U.mul(S.sqrt())  # (out, r)
    w = layer._weight_out_in().detach().to(torch.float32)  # (out, in)
    set_factors(layer, name, A, B)
    write_base(layer, w - s * B.to(w.device) @ A.to(w.device))
