"""Weighted combinations of adapters: PEFT's ``add_weighted_adapter``, every combination type.

For adapters ``i`` with weights ``w_i`` (negative allowed) and scalings ``s_i``, the new adapter
(scaling 1) of each layer is:

- ``cat`` (exact): ``A = [w_1 s_1 A_1; w_2 s_2 A_2; ...]``, ``B = [B_1, B_2, ...]``, so
  ``B·A = Σ w_i s_i B_i·A_i``; the rank is the sum of the ranks present in the layer.
- ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune`` (same ranks): the
  factors themselves are merged, A with weights ``sign(w_i s_i)·√|w_i s_i|``, B with ``√|w_i s_i|``:
  ``linear`` sums them; ``magnitude_prune`` keeps each tensor's ``density`` largest entries first;
  ``ties`` then also elects a sign per entry (``majority_sign_method``) and averages the entries that
  agree; ``dare_*`` drops entries at random (kept with probability ``density``, rescaled by
  ``1/density``) instead of by magnitude. (Merging factors is not merging updates: only
  ``linear`` of a single adapter is exact.)
- ``svd``, ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``: the same
  merges applied to the full updates ``ΔW_i`` (weights ``w_i``), then a rank-``svd_rank`` truncated
  SVD ``ΔW ≈ U·S·Vh``: ``B = U·S``, ``A = Vh`` (optionally clamped at the ``svd_clamp`` quantile).

The maths and the order of random draws are PEFT 0.21's (``peft.utils.merge_utils``), so with the
same ``torch.manual_seed`` the result is PEFT's. A ``lora_bias`` combines exactly, ``Σ w_i s_i b_i``
(PEFT drops it).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch

from lorakit.layers import LoraLayer

COMBINATION_TYPES = ("cat", "linear", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
                     "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")
FACTOR_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SIGN_METHODS = ("total", "frequency")


# ---------------------------------------------------------------------- PEFT's merge_utils, same ops
def prune(t: torch.Tensor, density: float, method: str, rescale: bool = False) -> torch.Tensor:
    """Keep a fraction ``density`` of ``t``'s entries: the largest by magnitude, or at random
    (``torch.bernoulli``; ``rescale`` divides the kept ones by ``density``)."""
    if density >= 1:
        warnings.warn(f"density {density} >= 1: nothing is pruned", stacklevel=3)
        return t
    if method == "magnitude":
        mask = torch.zeros_like(t).reshape(-1)
        top = torch.topk(t.abs().reshape(-1), k=int(density * t.numel()), largest=True)
        mask[top[1]] = 1
        return t * mask.reshape(t.shape)
    pruned = t * torch.bernoulli(torch.full_like(input=t, fill_value=density))
    return pruned / density if rescale else pruned


def _weighted(tensors: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``tensors`` (n, ...) times ``weights`` (n,) broadcast over the trailing dimensions."""
    return tensors * weights.view(weights.shape + (1,) * (tensors.dim() - weights.dim()))


def _disjoint(tensors: torch.Tensor, weighted: torch.Tensor, method: str) -> torch.Tensor:
    """TIES: per entry, the mean of the weighted entries whose sign is the (unweighted) majority sign."""
    sign = tensors.sign()
    magnitude = tensors.sum(dim=0) if method == "total" else sign.sum(dim=0)
    mask = sign == torch.where(magnitude >= 0, 1, -1)
    return (weighted * mask).sum(dim=0) / torch.clamp(mask.sum(dim=0), min=1.0)


def merge_tensors(kind: str, tensors: list[torch.Tensor], weights: torch.Tensor, density: float | None,
                  method: str) -> torch.Tensor:
    """One merge of PEFT's ``merge_utils`` (``kind`` without an ``_svd`` suffix; ``svd`` is ``linear``)."""
    kind = "linear" if kind in ("svd", "linear") else kind.removesuffix("_svd")
    if kind in ("ties", "magnitude_prune"):
        tensors = [prune(t, density, "magnitude") for t in tensors]
    elif kind in ("dare_linear", "dare_ties"):
        tensors = [prune(t, density, "random", rescale=True) for t in tensors]
    stacked = torch.stack(tensors, dim=0)
    weighted = _weighted(stacked, weights)
    if kind in ("ties", "dare_ties"):
        return _disjoint(stacked, weighted, method)
    return weighted.sum(dim=0)


# ---------------------------------------------------------------------- per layer
def _cat(layer: LoraLayer, parts: list[tuple[str, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``A = [w_i s_i A_i]``, ``B = [B_i]``; for a grouped conv, A's channels ordered group by group."""
    groups = layer.rank_groups
    As, Bs = [], []
    for n, w in parts:
        A, B = layer.factors(n)
        As.append(A * w * layer.scaling[n])
        Bs.append(B)
    if groups > 1:  # group g of the new rank = group g of every adapter, in order
        As = [chunk for g in range(groups) for A in As for chunk in [A.chunk(groups, dim=0)[g]]]
    return torch.cat(As, dim=0), torch.cat(Bs, dim=1)


def _factor_merge(kind: str, layer: LoraLayer, parts: list[tuple[str, float]], density: float | None,
                  method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the A's and the B's (PEFT's ``_generalized_task_arithmetic_weighted_adapter``)."""
    shapes = {n: layer.factors(n)[0].shape[0] for n, _ in parts}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"combination_type={kind!r} merges the factors themselves, so every adapter needs the same "
                         f"rank in each layer; got ranks {shapes}. Use 'cat' or an '_svd' type")
    weights_a, weights_b, As, Bs = [], [], [], []
    for n, w in parts:
        ws = w * layer.scaling[n]
        weights_a.append(math.sqrt(abs(ws)) * (1 if ws >= 0 else -1))  # the sign on one side only
        weights_b.append(math.sqrt(abs(ws)))
        A, B = layer.factors(n)
        As.append(A)
        Bs.append(B)
    dtype = As[0].dtype
    A = merge_tensors(kind, As, torch.tensor(weights_a).to(As[0].device), density, method)
    B = merge_tensors(kind, Bs, torch.tensor(weights_b).to(Bs[0].device), density, method)
    return A.to(dtype), B.to(dtype)


def _svd_merge(kind: str, layer: LoraLayer, parts: list[tuple[str, float]], rank: int, density: float | None,
               method: str, clamp: float | None, full_matrices: bool, driver: str | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the updates, then a truncated SVD (PEFT's ``_svd_generalized_task_arithmetic_weighted_adapter``)."""
    deltas = [layer.delta_weight(n).detach() for n, _ in parts]
    delta = merge_tensors(kind, deltas, torch.tensor([w for _, w in parts]).to(deltas[0].device), density, method)
    A0, B0 = layer.factors(parts[0][0])
    delta = layer.delta_matrix(delta)  # (out, in): B·A's layout
    U, S, Vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    k = min(rank, S.numel())
    U, Vh = U[:, :k] @ torch.diag(S[:k]), Vh[:k, :]  # (out, k), (k, in)
    if clamp is not None:
        high = torch.quantile(torch.cat([U.flatten(), Vh.flatten()]), clamp)
        U, Vh = U.clamp(-high, high), Vh.clamp(-high, high)
    A, B = layer.factors_from_matrices(Vh, U, parts[0][0])  # a conv's (k, in, *kernel), (out, k, 1, ...)
    return A.to(A0.dtype), B.to(B0.dtype)


def combined_factors(layer: LoraLayer, parts: list[tuple[str, float]], kind: str, *, svd_rank: int,
                     density: float | None, majority_sign_method: str, svd_clamp: float | None,
                     svd_full_matrices: bool, svd_driver: str | None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(A, B, bias or None)`` of the combination of ``parts`` (adapter, weight) in one layer.

    Raises:
        ValueError: ranks differ for a factor merge, or an ``_svd`` type on a grouped convolution.
    """
    with torch.no_grad():
        if kind == "cat":
            A, B = _cat(layer, parts)
        elif kind in FACTOR_TYPES:
            A, B = _factor_merge(kind, layer, parts, density, majority_sign_method)
        else:
            if layer.rank_groups > 1:
                raise ValueError(f"combination_type={kind!r} needs each update as one matrix, which a grouped "
                                 "convolution's is not; use 'cat' or a factor merge ('linear', 'ties', ...)")
            A, B = _svd_merge(kind, layer, parts, svd_rank, density, majority_sign_method, svd_clamp,
                              svd_full_matrices, svd_driver)
        biases = [(layer.bias_delta(n), w) for n, w in parts]
        bias = None
        if any(b is not None for b, _ in biases):
            bias = sum(w * b.detach() for b, w in biases if b is not None)
    return A, B, bias


def check_combination(kind: str, n_adapters: int, density: float | None, majority_sign_method: str) -> str:
    """The combination type to use (PEFT: one adapter is always ``linear``).

    Raises:
        ValueError: an unknown type or sign method, or a pruning type without a ``density`` in [0, 1].
    """
    if kind not in COMBINATION_TYPES:
        raise ValueError(f"combination_type must be one of {COMBINATION_TYPES}, got {kind!r}")
    if majority_sign_method not in SIGN_METHODS:
        raise ValueError(f"majority_sign_method must be one of {SIGN_METHODS}, got {majority_sign_method!r}")
    kind = "linear" if n_adapters == 1 else kind
    prunes = kind not in ("cat", "linear", "svd")
    if prunes and (density is None or isinstance(density, bool) or not isinstance(density, (int, float))
                   or not 0 <= density <= 1):
        raise ValueError(f"combination_type={kind!r} prunes entries and needs density, the fraction kept, in [0, 1]; "
                         f"got density={density!r}")
    return kind


def peft_rank(kind: str, configs: Sequence) -> int:
    """The rank PEFT gives the new adapter: the sum of the adapters' ranks (``cat``), the largest
    (``_svd`` types' default), else the first's — each adapter's rank being the largest its config allows."""
    ranks = [max(c.r, *c.rank_pattern.values()) if c.rank_pattern else c.r for c in configs]
    return sum(ranks) if kind == "cat" else max(ranks) if kind.endswith("svd") else ranks[0]
