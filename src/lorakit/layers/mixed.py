"""Mixed-batch LoRA kernels: one adapter per batch row, in batched matmuls instead of a loop.

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
including lorakit's hot swap).

Each layer type calls the kernel that fits it (``Linear.mixed_forward`` and so on); this module
knows nothing about the layer classes. Two strategies exist for Linear layers, chosen by measurement:

* ``"gather"`` (BGMV): gather each row's A and B from the stacks, one ``bmm`` + one ``bmm``;
* ``"segment"`` (SGMV): sort rows by adapter, run each adapter's contiguous segment as one 2-D
  matmul on the un-padded factors, scatter back with one ``index_copy_``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.layers.routing import BASE_ROW

# Linear strategy; "gather" measured faster on CPU for 8 rows x 4 adapters (benchmarks/results/).
STRATEGY = "gather"
STRATEGIES = ("gather", "segment")

Factors = tuple[torch.Tensor, torch.Tensor]  # A (r, K), B (M, r) as 2-D matrices


class Stack(NamedTuple):
    """A layer's stacked factors for one set of adapters."""

    slots: dict[str, int]  # adapter name -> slot (BASE_ROW -> 0)
    A: torch.Tensor  # (n + 1, r_max, K), slot 0 zeros; lookup layout: (n + 1, K, r_max)
    B: torch.Tensor  # (n + 1, M, r_max), scaling folded in, slot 0 zeros


def _factor_key(t: torch.Tensor) -> tuple:
    try:
        version = t._version
    except RuntimeError:  # an inference tensor has no version counter: never cache on it
        version = object()
    return id(t), t.data_ptr(), version


def stacked(owner: nn.Module, names: Sequence[str], pairs: Sequence[Factors], scalings: Sequence[float],
            dtype: torch.dtype, lookup: bool = False) -> Stack:
    """The factors ``pairs`` of adapters ``names`` stacked as in the module docstring, in ``dtype``
    (the activations': fp32 masters are cast once per build, activations never); cached on
    ``owner`` until they change. ``lookup`` stores A transposed, as an embedding table.

    With autograd recording and a factor requiring grad the stack is built in the graph (and not
    cached), so a mixed batch can also be differentiated.
    """
    grad = torch.is_grad_enabled() and any(t.requires_grad for p in pairs for t in p)
    key = (tuple(names), tuple(scalings), dtype, tuple(_factor_key(t) for p in pairs for t in p))
    cached = owner.__dict__.get("_mixed_stack")
    if not grad and cached is not None and cached[0] == key:
        return cached[1]
    A0, B0 = pairs[0]
    r_max = max(a.shape[0] for a, _ in pairs)
    with torch.set_grad_enabled(grad):
        if grad:  # out-of-place, so autograd sees every factor
            A = torch.stack([F.pad(a.to(dtype), (0, 0, 0, r_max - a.shape[0])) for a, _ in pairs])
            B = torch.stack([F.pad((b * s).to(dtype), (0, r_max - b.shape[1])) for (_, b), s in zip(pairs, scalings)])
            A, B = F.pad(A, (0, 0, 0, 0, 1, 0)), F.pad(B, (0, 0, 0, 0, 1, 0))  # slot 0 = zeros
        else:
            A = A0.new_zeros((len(names) + 1, r_max, A0.shape[1]), dtype=dtype)  # (n+1, r_max, K)
            B = B0.new_zeros((len(names) + 1, B0.shape[0], r_max), dtype=dtype)  # (n+1, M, r_max)
            for j, ((a, b), s) in enumerate(zip(pairs, scalings), start=1):
                A[j, : a.shape[0]].copy_(a)
                B[j, :, : b.shape[1]].copy_(b * s)  # scaled in the masters' precision, then cast
    if lookup:  # lookup table layout: row j·num + t is A_j^T[t]
        A = A.transpose(1, 2).contiguous()  # (n+1, num, r_max)
    stack = Stack({BASE_ROW: 0, **{n: j for j, n in enumerate(names, start=1)}}, A, B)
    if not grad:
        owner.__dict__["_mixed_stack"] = (key, stack)
    return stack


def row_slots(stack: Stack, rows: Sequence[str], device: torch.device) -> torch.Tensor:
    """Slot index of every row: (N,) int64 on ``device``."""
    return torch.tensor([stack.slots.get(n, 0) for n in rows], device=device)


def add_into(result: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``result + delta`` in result's dtype; in place when autograd does not need result."""
    delta = delta.to(result.dtype)
    if torch.is_grad_enabled() and (result.requires_grad or delta.requires_grad):
        return result + delta
    return result.add_(delta)


def linear_gather(x: torch.Tensor, result: torch.Tensor, stack: Stack, idx: torch.Tensor) -> torch.Tensor:
    """BGMV: each row's ``s·B·A`` gathered from the stacks, applied in two batched matmuls."""
    n = x.shape[0]
    x3 = x.reshape(n, -1, x.shape[-1]).to(stack.A.dtype)  # (N, L, in); a no-op unless PEFT's numerics
    ax = torch.bmm(x3, stack.A[idx].transpose(1, 2))  # (N, L, r_max)
    delta = torch.bmm(ax, stack.B[idx].transpose(1, 2))  # (N, L, out)
    return add_into(result, delta.view(result.shape))


def linear_segment(x: torch.Tensor, result: torch.Tensor, rows: Sequence[str],
                   factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]]) -> torch.Tensor:
    """SGMV: rows sorted by adapter; each adapter's segment is one 2-D matmul on its own factors.

    Args:
        factors: adapter name -> (A (r, in), B (out, r), scaling) for every adapter in ``rows``,
            A and B in the dtype of ``x``.
    """
    order = sorted(range(len(rows)), key=lambda i: rows[i])
    perm = torch.tensor(order, device=x.device)
    n = x.shape[0]
    xs = x.index_select(0, perm).reshape(n, -1, x.shape[-1])  # (N, L, in), rows sorted by adapter
    ys = xs.new_zeros((*xs.shape[:2], result.shape[-1]))  # (N, L, out), the activations' dtype
    start = 0
    for name in sorted(dict.fromkeys(rows)):
        count = rows.count(name)
        if name in factors:
            A, B, s = factors[name]  # (r, in), (out, r), in the activations' dtype
            seg = xs[start : start + count]  # (c, L, in)
            torch.matmul(seg @ A.T, B.T, out=ys[start : start + count]).mul_(s)
        start += count
    delta = torch.empty_like(ys).index_copy_(0, perm, ys)  # (N, L, out), original row order
    return add_into(result, delta.view(result.shape))


def embedding_gather(x: torch.Tensor, result: torch.Tensor, stack: Stack, idx: torch.Tensor) -> torch.Tensor:
    """Row i's ``s·(A_i^T)[x_i]·B_i^T``: one lookup in the flattened stack of all A^T, one ``bmm``."""
    n, num = x.shape[0], stack.A.shape[1]
    table = stack.A.view(-1, stack.A.shape[2])  # ((n+1)·num, r_max)
    ids = (x.reshape(n, -1) + idx[:, None] * num)  # (N, L) rows of the flat table
    after_a = F.embedding(ids, table)  # (N, L, r_max)
    delta = torch.bmm(after_a, stack.B[idx].transpose(1, 2))  # (N, L, dim)
    return add_into(result, delta.view(result.shape))


def conv_gather(base: nn.Module, x: torch.Tensor, result: torch.Tensor, stack: Stack,
                idx: torch.Tensor) -> torch.Tensor:
    """Per-row A as one grouped convolution (groups = N), per-row 1×1 B as one ``bmm``.

    ``base`` is the wrapped Conv1d/2d/3d, whose stride, padding, dilation and padding mode A shares.
    """
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
    return add_into(result, delta.view(result.shape))
