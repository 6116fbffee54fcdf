"""Mixed-batch LoRA kernels: one adapter per batch row, in batched matmuls instead of a loop.

The idea of punica's BGMV kernel (Chen et al., 2023), in plain PyTorch. For the n adapters a batch
uses, a layer stacks its factors once, zero-padded to the largest rank and with each adapter's
scaling folded into B:

    A_stack: (n + 1, K, r_max)      B_stack: (n + 1, r_max, M)      slot 0 = zeros ("__base__")
    A_stack[j, :, :r_j] = A_jᵀ      B_stack[j, :r_j] = s_j · B_jᵀ

(for Linear K = in, M = out; Embedding K = num_embeddings, M = dim; Conv K = in·∏kernel, M = out).
Row i with slot j_i then gets ``y_i = base(x_i) + x_i · A_stack[j_i] · B_stack[j_i]`` in one
``torch.bmm`` and one ``baddbmm`` over rows (the transposed layout lets ``index_select`` gather
contiguous blocks; an embedding reads A_stack as its lookup table). Zero padding adds exact zeros,
so adapters of different ranks mix freely, and a "__base__" row adds exactly 0.

Stacks are built once per layer over all the model's adapters, in the model's order (the
``order`` of a :class:`~lorakit.layers.routing.Route`, so one row-slot index serves every layer and
any mix of adapters in the rows uses the same stack), and reused by every forward and every block.
A stack is rebuilt only when the adapters may have changed:
a global epoch counter is bumped by lorakit's own operations (add, delete, load, hot swap, a new
alpha, ``.to()``, ``load_state_dict``), by every optimizer step (a global optimizer hook), and by
:func:`adapters_updated` — call it after changing factors in place yourself inside a block. Entering
a block also re-validates each layer's stack against the layer's *current* adapter parameters,
looked up through the layer (so a parameter replaced by ``load_state_dict(..., assign=True)`` on a
factor module is seen), by identity, storage, version counter and content: a checksum
``Σ_i t_i·p_i`` against a fixed pseudo-random probe ``p`` catches writes through ``param.data``,
which have a version counter of their own. So changes made between blocks are always seen.
Slot and rank counts are padded to multiples of 8, so a compiled model sees few distinct shapes as
adapters come and go. Each row's gathered blocks (``A_stack[j_i]``, ``B_stack[j_i]``) are kept with
the stack too: every decoding step of a block reuses them instead of gathering again.

Each layer type calls the kernel that fits it (``Linear.mixed_forward`` and so on); this module
knows nothing about the layer classes. For Linear layers the kernel is the gather (BGMV): each
row's A and B gathered from the stacks, one ``bmm`` + one ``bmm``. (A segment kernel — rows grouped
by adapter, one 2-D matmul per adapter — was slower in prefill on this CPU, 1.54× the base against
the gather's 1.23× (``lorakit bench``, 2 threads), was never chosen by default, and had no public
switch: it was removed. Whether a GPU SGMV kernel pays is for a GPU measurement to decide.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from lorakit.layers.routing import Route

Factors = tuple[torch.Tensor, torch.Tensor]  # A (r, K), B (M, r) as 2-D matrices

_EPOCH = [0]


def adapters_updated() -> None:
    """Mark every mixed-batch stack as stale (they are rebuilt on next use). lorakit calls this
    itself on every change it makes to adapters, and after every optimizer step; call it after
    changing adapter tensors in place yourself while inside a ``mixed_batch`` block."""
    _EPOCH[0] += 1


register_optimizer_step_post_hook(lambda optimizer, args, kwargs: adapters_updated())


class Stack(NamedTuple):
    """A layer's stacked factors for one route."""

    A: torch.Tensor  # (slots, K, r_max): A_jᵀ, slot 0 zeros
    B: torch.Tensor  # (slots, r_max, M): s_j·B_jᵀ, slot 0 zeros


def bucket(n: int) -> int:
    """n rounded up to a multiple of 8: few distinct shapes for a compiled model, little padding."""
    return -(-n // 8) * 8


_PROBES: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _probe(n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A fixed pseudo-random vector of at least ``n`` entries in [1, 2) (per device and dtype, grown on demand)."""
    probe = _PROBES.get((device, dtype))
    if probe is None or probe.numel() < n:
        g = torch.Generator().manual_seed(0x10AA)
        probe = (1 + torch.rand(max(n, 1 << 16), generator=g, dtype=torch.float64)).to(device=device, dtype=dtype)
        _PROBES[(device, dtype)] = probe
    return probe[:n]


def fingerprint(tensors: Sequence[torch.Tensor]) -> tuple:
    """What a stack was built from: each factor's identity, storage and in-place version, and a
    content checksum of all of them (``Σ t·p`` per tensor, one comparison for the lot). The
    checksum is what sees a write through ``param.data``, whose version counter is not the
    parameter's; the rest sees a replaced or re-pointed parameter without reading it."""
    key, sums = [], []
    with torch.no_grad():
        for t in tensors:
            try:
                version = t._version
            except RuntimeError:  # an inference tensor has no version counter: never equal
                version = object()
            key.append((id(t), t.data_ptr(), version))
            flat = t.detach().reshape(-1)
            sums.append(torch.dot(flat, _probe(flat.numel(), flat.device, flat.dtype)).float()
                        if flat.numel() and flat.is_floating_point() else flat.new_zeros((), dtype=torch.float32))
    return tuple(key), (torch.stack(sums) if sums else None)


def _same(a: tuple, b: tuple) -> bool:
    if a[0] != b[0]:
        return False
    if a[1] is None or b[1] is None:
        return a[1] is b[1]
    return a[1].device == b[1].device and bool(torch.equal(a[1], b[1]))


def check(owner: nn.Module, sources: Sequence[torch.Tensor]) -> None:
    """At the start of a block: drop ``owner``'s stack unless ``sources`` — the layer's adapter
    parameters as they are now, looked up through the layer — are those it was built from, with
    the same storage, version and content (see :func:`fingerprint`)."""
    cached = owner.__dict__.get("_mixed_stack")
    if cached is not None and not _same(fingerprint(sources), cached[4]):
        del owner.__dict__["_mixed_stack"]


def stacked(owner: nn.Module, route: Route, pairs: Callable[[], list[Factors | None]],
            scalings: Callable[[], list[float]], dtype: torch.dtype,
            sources: Callable[[], list[torch.Tensor]]) -> Stack:
    """``owner``'s factors for ``route.order`` (``pairs()[j]`` for slot ``j + 1``, flattened to
    A (r, K), B (M, r); None where the layer lacks that adapter) stacked as in the module
    docstring, in ``dtype`` (the activations': fp32 masters are cast once per build, activations
    never). Cached on ``owner`` (see the module docstring); built in the autograd graph,
    uncached, when grad is on and a factor requires it, so a mixed batch can be differentiated.
    ``sources()`` are the parameters the factors are computed from (a grouped convolution's dense
    B is derived from its ``lora_B``): what :func:`check` re-validates.
    """
    key = (route.order, dtype, _EPOCH[0])
    cached = owner.__dict__.get("_mixed_stack")
    if not torch.is_grad_enabled() and cached is not None and cached[0] == key:
        return cached[1]
    factors = [None if p is None else (p[0].flatten(1), p[1].flatten(1)) for p in pairs()]  # conv: (r, in·∏k)
    scale = scalings()
    grad = torch.is_grad_enabled() and any(t.requires_grad for p in factors if p for t in p)
    if not grad and cached is not None and cached[0] == key:
        return cached[1]
    present = [p for p in factors if p is not None]
    A0, B0 = present[0]
    slots, r_max = bucket(len(factors) + 1), bucket(max(a.shape[0] for a, _ in present))
    with torch.set_grad_enabled(grad):
        if grad:  # out-of-place, so autograd sees every factor
            zA, zB = A0.new_zeros((A0.shape[1], r_max), dtype=dtype), B0.new_zeros((r_max, B0.shape[0]), dtype=dtype)
            As, Bs = [zA], [zB]
            for p, s in zip(factors, scale):
                As.append(zA if p is None else F.pad(p[0].T.to(dtype), (0, r_max - p[0].shape[0])))
                Bs.append(zB if p is None else F.pad((p[1] * s).T.to(dtype), (0, 0, 0, r_max - p[1].shape[1])))
            As += [zA] * (slots - len(As))
            Bs += [zB] * (slots - len(Bs))
            A, B = torch.stack(As), torch.stack(Bs)
        else:
            A = A0.new_zeros((slots, A0.shape[1], r_max), dtype=dtype)  # (slots, K, r_max)
            B = B0.new_zeros((slots, r_max, B0.shape[0]), dtype=dtype)  # (slots, r_max, M)
            for j, (p, s) in enumerate(zip(factors, scale), start=1):
                if p is not None:
                    A[j, :, : p[0].shape[0]].copy_(p[0].T)
                    B[j, : p[1].shape[1]].copy_((p[1] * s).T)  # scaled in the masters' precision, then cast
    stack = Stack(A, B)
    if not grad:
        owner.__dict__["_mixed_stack"] = (key, stack, {}, None, fingerprint(sources()))  # for check()
    return stack


def row_blocks(owner: nn.Module, stack: Stack, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's blocks ``(A_stack[idx], B_stack[idx])``: (N, K, r_max), (N, r_max, M); kept with
    ``owner``'s cached stack for the route's index tensor ``idx`` (reused by every decoding step)."""
    cached = owner.__dict__.get("_mixed_stack")
    if cached is None or cached[1] is not stack:  # a stack built in the autograd graph: not cached
        return stack.A.index_select(0, idx), stack.B.index_select(0, idx)
    rows = cached[2]
    if id(idx) not in rows:
        rows.clear()  # one route's index at a time
        rows[id(idx)] = (idx, stack.A.index_select(0, idx), stack.B.index_select(0, idx))
    return rows[id(idx)][1:]


def add_into(result: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``result + delta`` in result's dtype; in place when autograd does not need result."""
    delta = delta.to(result.dtype)
    if _needs_graph(result, delta):
        return result + delta
    return result.add_(delta)


def _needs_graph(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _accumulate(result: torch.Tensor, ax: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``result + ax·B`` over rows: ax (N, L, r), B (N, r, M), result (N, ..., M) — one ``baddbmm``
    (in place when autograd allows) where the dtypes agree, else a ``bmm`` added in result's dtype."""
    n = result.shape[0]
    r3 = result.reshape(n, -1, result.shape[-1])  # (N, L, M), a view of a contiguous result
    if result.dtype != ax.dtype or (result.dtype in (torch.float16, torch.bfloat16) and _needs_graph(ax, B)):
        return add_into(result, torch.bmm(ax, B).view(result.shape))  # half precision with grads: as factors.Up
    if _needs_graph(result, ax, B):
        return torch.baddbmm(r3, ax, B).view(result.shape)
    return r3.baddbmm_(ax, B).view(result.shape)  # r3 is result itself (a view) or a copy of it


def linear_gather(x: torch.Tensor, result: torch.Tensor, blocks: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """BGMV: each row's ``x·A_i·B_i`` with its blocks from :func:`row_blocks`."""
    A, B = blocks  # (N, in, r_max), (N, r_max, out)
    n = x.shape[0]
    x3 = x.reshape(n, -1, x.shape[-1]).to(A.dtype)  # (N, L, in); a no-op unless PEFT's numerics
    return _accumulate(result, torch.bmm(x3, A), B)  # (N, ..., out)


def embedding_gather(x: torch.Tensor, result: torch.Tensor, stack: Stack, idx: torch.Tensor,
                     B: torch.Tensor) -> torch.Tensor:
    """Row i's ``s·(A_i^T)[x_i]·B_i^T``: one lookup in the flattened A stack (row j·num + t is
    A_jᵀ[t]), one ``baddbmm`` with the rows' B blocks ``B`` (N, r_max, dim)."""
    n, num = x.shape[0], stack.A.shape[1]
    table = stack.A.view(-1, stack.A.shape[2])  # (slots·num, r_max)
    ids = (x.reshape(n, -1) + idx[:, None] * num)  # (N, L) rows of the flat table
    after_a = F.embedding(ids, table)  # (N, L, r_max)
    return _accumulate(result, after_a, B)  # (N, ..., dim)


def conv_gather(base: nn.Module, x: torch.Tensor, result: torch.Tensor,
                blocks: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Per-row A as one grouped convolution (groups = N), per-row 1×1 B as one ``bmm``.

    ``base`` is the wrapped Conv1d/2d/3d, whose stride, padding, dilation and padding mode A shares.
    """
    A, B = blocks  # (N, in·∏k, r_max), (N, r_max, out)
    n, c = x.shape[:2]
    r_max = A.shape[2]
    kernel = base.weight.shape[2:]
    weight = A.transpose(1, 2).reshape(n * r_max, c, *kernel)  # (N·r_max, in, *k)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(kernel)]
    xg = x.to(weight.dtype).reshape(1, n * c, *x.shape[2:])  # (1, N·in, *spatial)
    padding = base.padding
    if base.padding_mode != "zeros":
        xg = F.pad(xg, base._reversed_padding_repeated_twice, mode=base.padding_mode)
        padding = 0
    after_a = conv(xg, weight, None, base.stride, padding, base.dilation, groups=n)  # (1, N·r_max, *out)
    delta = torch.bmm(B.transpose(1, 2), after_a.reshape(n, r_max, -1))  # (N, out, ∏out spatial)
    return add_into(result, delta.view(result.shape))
