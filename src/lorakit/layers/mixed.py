"""Mixed-batch LoRA: one adapter per batch row, in batched matmuls instead of a loop over adapters.

The idea of punica's BGMV kernel (Chen et al., 2023), in plain PyTorch. For the n adapters a batch
uses, a layer stacks its factors once, zero-padded to the largest rank and with each adapter's
scaling folded into B:

    A_stack: (n + 1, r_max, K)      B_stack: (n + 1, M, r_max)      slot 0 = zeros ("__base__")
    A_stack[j, :r_j] = A_j          B_stack[j, :, :r_j] = s_j · B_j

(for Linear K = in, M = out; Embedding K = num_embeddings, M = dim; Conv K = in·∏kernel, M = out).
Row i with slot j_i then gets ``y_i = base(x_i) + B_stack[j_i] · A_stack[j_i] · x_i`` in one
``torch.bmm``/``baddbmm`` over rows. Zero padding adds exact zeros, so adapters of different ranks
mix freely, and a "__base__" row adds exactly 0.

The stacks are cached on the layer and rebuilt only when something they depend on changes: the
adapter names, their scalings, or any factor's identity, storage (``data_ptr``) or in-place version
counter (``tensor._version``, bumped by ``copy_``, optimizer steps and every other in-place write,
including lorakit's hot swap). Checking that costs a few attribute reads per factor.

Two strategies are implemented for Linear layers and chosen by measurement (``benchmarks/``):

* ``"gather"`` (BGMV): gather each row's A and B from the stacks, one ``bmm`` + one ``baddbmm``;
* ``"segment"`` (SGMV): sort rows by adapter, run each adapter's contiguous segment as one 2-D
  matmul on the un-padded factors, scatter back with one ``index_add_``.

DoRA adapters, and dropout while training, fall back to the per-adapter loop (``loop_forward``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from lorakit.layers.base import LoraLayer

BASE_ROW = "__base__"  # a mixed-batch row that uses no adapter (same value as lorakit.layers.base)

# Linear strategy; "gather" measured faster on CPU for 8 rows x 4 adapters (benchmarks/results/).
STRATEGY = "gather"
STRATEGIES = ("gather", "segment")


class Stack(NamedTuple):
    """A layer's stacked factors for one set of adapters."""

    slots: dict[str, int]  # adapter name -> slot (BASE_ROW -> 0)
    A: torch.Tensor  # (n + 1, r_max, K), slot 0 zeros; Embedding: transposed, (n + 1, K, r_max)
    B: torch.Tensor  # (n + 1, M, r_max), scaling folded in, slot 0 zeros


def _factor_key(t: torch.Tensor) -> tuple:
    try:
        version = t._version
    except RuntimeError:  # an inference tensor has no version counter: never cache on it
        version = object()
    return id(t), t.data_ptr(), version


def _factors(layer: LoraLayer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Adapter ``name``'s factors as 2-D matrices: A (r, K), B (M, r)."""
    if hasattr(layer, "lora_embedding_A") and name in layer.lora_embedding_A:
        return layer.lora_embedding_A[name], layer.lora_embedding_B[name]  # (r, num), (dim, r)
    A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
    return A.flatten(1), B.flatten(1)  # conv: (r, in·∏k), (out, r)


def stacked(layer: LoraLayer, names: list[str]) -> Stack:
    """``layer``'s factors of ``names`` stacked as in the module docstring; cached until they change.

    With autograd recording and a factor requiring grad the stack is built in the graph (and not
    cached), so a mixed batch can also be differentiated.
    """
    pairs = [_factors(layer, n) for n in names]
    scalings = tuple(layer.scaling[n] for n in names)
    grad = torch.is_grad_enabled() and any(t.requires_grad for p in pairs for t in p)
    key = (tuple(names), scalings, tuple(_factor_key(t) for p in pairs for t in p))
    cached = layer.__dict__.get("_mixed_stack")
    if not grad and cached is not None and cached[0] == key:
        return cached[1]
    A0, B0 = pairs[0]
    r_max = max(layer.r[n] for n in names)
    with torch.set_grad_enabled(grad):
        A = A0.new_zeros((len(names) + 1, r_max, A0.shape[1]))  # (n+1, r_max, K)
        B = B0.new_zeros((len(names) + 1, B0.shape[0], r_max))  # (n+1, M, r_max)
        if grad:  # out-of-place, so autograd sees every factor
            A = torch.stack([F.pad(a, (0, 0, 0, r_max - a.shape[0])) for a, _ in pairs])
            B = torch.stack([F.pad(b * s, (0, r_max - b.shape[1])) for (_, b), s in zip(pairs, scalings)])
            A, B = F.pad(A, (0, 0, 0, 0, 1, 0)), F.pad(B, (0, 0, 0, 0, 1, 0))  # slot 0 = zeros
        else:
            for j, ((a, b), s) in enumerate(zip(pairs, scalings), start=1):
                A[j, : a.shape[0]].copy_(a)
                B[j, :, : b.shape[1]].copy_(b).mul_(s)
    if hasattr(layer, "lora_embedding_A"):  # lookup table layout: row j·num + t is A_j^T[t]
        A = A.transpose(1, 2).contiguous()  # (n+1, num, r_max)
    stack = Stack({BASE_ROW: 0, **{n: j for j, n in enumerate(names, start=1)}}, A, B)
    if not grad:
        layer.__dict__["_mixed_stack"] = (key, stack)
    return stack


def row_slots(stack: Stack, rows: list[str], device: torch.device) -> torch.Tensor:
    """Slot index of every row: (N,) int64 on ``device``."""
    return torch.tensor([stack.slots.get(n, 0) for n in rows], device=device)


def can_batch(layer: LoraLayer, names: list[str]) -> bool:
    """The batched path computes the same function as the loop for these adapters."""
    dora = getattr(layer, "lora_magnitude_vector", {})
    if any(n in dora for n in names):
        return False
    if layer.training and any(not isinstance(layer.lora_dropout[n], nn.Identity) for n in names):
        return False
    base = layer.base_layer
    return not (isinstance(base, nn.Embedding) and base.max_norm is not None)  # max_norm renormalises in place


def _add(result: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``result + delta`` in result's dtype; in place when autograd does not need result."""
    delta = delta.to(result.dtype)
    if torch.is_grad_enabled() and (result.requires_grad or delta.requires_grad):
        return result + delta
    return result.add_(delta)


def linear_gather(x: torch.Tensor, result: torch.Tensor, stack: Stack, idx: torch.Tensor) -> torch.Tensor:
    """BGMV: each row's ``s·B·A`` gathered from the stacks, applied in two batched matmuls."""
    n = x.shape[0]
    x3 = x.reshape(n, -1, x.shape[-1]).to(stack.A.dtype)  # (N, L, in)
    ax = torch.bmm(x3, stack.A[idx].transpose(1, 2))  # (N, L, r_max)
    delta = torch.bmm(ax, stack.B[idx].transpose(1, 2))  # (N, L, out)
    return _add(result, delta.view(result.shape))


def linear_segment(layer: LoraLayer, x: torch.Tensor, result: torch.Tensor, rows: list[str]) -> torch.Tensor:
    """SGMV: rows sorted by adapter; each adapter's segment is one 2-D matmul on its own factors."""
    order = sorted(range(len(rows)), key=lambda i: rows[i])
    perm = torch.tensor(order, device=x.device)
    n = x.shape[0]
    xs = x.index_select(0, perm).reshape(n, -1, x.shape[-1])  # (N, L, in), rows sorted by adapter
    dtype = next(iter(layer.lora_A.values())).weight.dtype
    ys = xs.new_zeros((*xs.shape[:2], result.shape[-1]), dtype=dtype)  # (N, L, out)
    start = 0
    for name in sorted(dict.fromkeys(rows)):
        count = rows.count(name)
        if name != BASE_ROW and name in layer.r:
            A, B = layer.lora_A[name].weight, layer.lora_B[name].weight  # (r, in), (out, r)
            seg = xs[start : start + count].to(A.dtype)  # (c, L, in)
            torch.matmul(seg @ A.T, B.T, out=ys[start : start + count]).mul_(layer.scaling[name])
        start += count
    delta = torch.empty_like(ys).index_copy_(0, perm, ys)  # (N, L, out), original row order
    return _add(result, delta.view(result.shape))


def embedding_gather(layer: LoraLayer, x: torch.Tensor, result: torch.Tensor, stack: Stack,
                     idx: torch.Tensor) -> torch.Tensor:
    """Row i's ``s·(A_i^T)[x_i]·B_i^T``: one lookup in the flattened stack of all A^T, one ``bmm``."""
    n, num = x.shape[0], stack.A.shape[1]
    table = stack.A.view(-1, stack.A.shape[2])  # ((n+1)·num, r_max)
    ids = (x.reshape(n, -1) + idx[:, None] * num)  # (N, L) rows of the flat table
    after_a = F.embedding(ids, table)  # (N, L, r_max)
    delta = torch.bmm(after_a, stack.B[idx].transpose(1, 2))  # (N, L, dim)
    return _add(result, delta.view(result.shape))


def conv_gather(layer: LoraLayer, x: torch.Tensor, result: torch.Tensor, stack: Stack,
                idx: torch.Tensor) -> torch.Tensor:
    """Per-row A as one grouped convolution (groups = N), per-row 1×1 B as one ``bmm``."""
    base = layer.base_layer
    n, c = x.shape[:2]
    r_max = stack.A.shape[1]
    kernel = base.weight.shape[2:]
    weight = stack.A[idx].reshape(n * r_max, c, *kernel)  # (N·r_max, in, *k)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(kernel)]
    xg = x.to(weight.dtype).reshape(1, n * c, *x.shape[2:])  # (1, N·in, *spatial)
    padding = base.padding
    if base.padding_mode != "zeros":
        xg = F.pad(xg, base._reversed_padding_repeated_twice, mode=base.padding_mode)
        padding = 0
    after_a = conv(xg, weight, None, base.stride, padding, base.dilation, groups=n)  # (1, N·r_max, *out)
    delta = torch.bmm(stack.B[idx], after_a.reshape(n, r_max, -1))  # (N, out, ∏out spatial)
    return _add(result, delta.view(result.shape))


def loop_forward(layer: LoraLayer, x: torch.Tensor, result: torch.Tensor, rows: list[str]) -> torch.Tensor:
    """The reference: rows sharing an adapter go through ``layer._lora_out`` together."""
    out = result.clone()
    for name in dict.fromkeys(rows):
        if name == BASE_ROW or name not in layer.r:
            continue
        idx = torch.tensor([i for i, n in enumerate(rows) if n == name], device=x.device)
        sub = x.index_select(0, idx)
        out.index_add_(0, idx, layer._lora_out(sub, name, result.index_select(0, idx)).to(out.dtype))
    return out


def mixed_forward(layer: LoraLayer, x: torch.Tensor, result: torch.Tensor, rows: list[str]) -> torch.Tensor:
    """``result`` (the base output for ``x``) plus each row's own adapter update.

    Args:
        layer: a Linear, Embedding or Conv LoRA layer (others use the loop).
        x: the layer's input, (N, ...); result: ``base(x)``, (N, ...).
        rows: ``len(rows) == N`` adapter names; ``"__base__"`` or an adapter this layer lacks adds 0.
    """
    names = sorted(n for n in dict.fromkeys(rows) if n != BASE_ROW and n in layer.r)
    if not names:
        return result
    kind = type(layer).__name__
    if kind not in ("Linear", "Embedding", "Conv") or not can_batch(layer, names):
        return loop_forward(layer, x, result, rows)
    if kind == "Linear" and STRATEGY == "segment" and not torch.is_grad_enabled():  # out= has no autograd
        return linear_segment(layer, x, result, rows)
    stack = stacked(layer, names)
    idx = row_slots(stack, rows, x.device)
    if kind == "Linear":
        return linear_gather(x, result, stack, idx)
    if kind == "Embedding":
        return embedding_gather(layer, x, result, stack, idx)
    return conv_gather(layer, x, result, stack, idx)
