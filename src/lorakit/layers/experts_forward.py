"""The routed expert MLP of a transformers v5 experts module, with LoRA terms on the routed tokens.

A fused experts module (``@use_experts_implementation``: Qwen3-MoE, Mixtral, gpt-oss, DeepSeek...)
holds every expert's weights in one 3-D tensor per projection. For the tokens the router sends to
expert e (``x_e``: (n_e, in)) an adapted projection computes

    y_e = x_e·W_eᵀ (+ b_e) + Σ_a s_a · (x_e·A_{a,e}ᵀ)·B_{a,e}ᵀ          A_{a,e}: (r, in), B_{a,e}: (out, r)

— the LoRA term beside the expert's own matmul ("split LoRA"), never the product B_e·A_e: the
extra work and memory scale with the routed tokens times r, not with the size of the expert stack.
The expert MLP around the two projections is the module's own (its ``_apply_gate`` or ``act_fn``,
biases, ``post_expert_norm``, the routing weights), in one of the two forms transformers runs:

* :func:`eager_forward`, the model's eager loop: per hit expert, its tokens gathered, the two
  projections, ``index_add_`` into the output;
* :func:`grouped_forward`, transformers' ``grouped_mm`` implementation: the (token, expert) pairs
  sorted by expert, each projection one grouped matmul over contiguous segments (``torch.nn.functional
  .grouped_mm`` where it exists and the strides suit it, else a loop over the segments), unsorted
  and summed over the top-k at the end.

PEFT's factor layout (kept for file compatibility): A is ``(r·E, in)`` with expert e's rows at
``e·r ... e·r + r - 1``; B is ``(out, r·E)`` with expert e's column k at ``k·E + e``, so

    A_e = A.view(E, r, in)[e]            B_e = B.view(out, r, E)[:, :, e]

Backward runs through the same route: autograd differentiates these ops, so A and B get their
gradients from the routed activations, and a frozen expert weight gets none (no (E, out, in) tensor
is formed in either direction). Per-expert factor views come from one ``unbind`` per forward, so
their gradients land in one tensor of A's (B's) size, not one per expert.

Which tokens an adapter acts on is a ``rows`` mask (mixed batches: one adapter per batch row);
``None`` is every token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


@dataclass
class Term:
    """One adapter's LoRA term on one projection: factors in PEFT's layout, fetched per dtype.

    ``factors(dtype)`` returns ``(A (r·E, in), B (out, r·E))`` in ``dtype`` (calling the factor
    modules, so their hooks run); ``cast_input``: the adapter's input is cast to the factors' own
    dtype first (PEFT's numerics) instead of the factors to the input's.
    """

    factors: Callable[[torch.dtype], tuple[torch.Tensor, torch.Tensor]]
    scaling: float
    experts: int
    master_dtype: torch.dtype
    cast_input: bool = False
    rows: torch.Tensor | None = None  # (T,) bool over tokens, None = all tokens
    _cache: dict = field(default_factory=dict, repr=False)

    def _get(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if dtype not in self._cache:
            self._cache[dtype] = self.factors(dtype)
        return self._cache[dtype]

    def input_dtype(self, x: torch.Tensor) -> torch.dtype:
        return self.master_dtype if self.cast_input else x.dtype

    def grouped(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Aᵀ per expert (E, in, r), Bᵀ per expert (E, r, out))`` for a grouped matmul."""
        key = ("grouped", dtype)
        if key not in self._cache:
            A, B = self._get(dtype)
            E = self.experts
            At = A.view(E, -1, A.shape[-1]).transpose(1, 2)  # (E, in, r)
            self._cache[key] = (At, _b_rows(B, E).permute(1, 0, 2))  # (E, r, out)
        return self._cache[key]

    def per_expert(self, dtype: torch.dtype) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """``(A_e (r, in) for each e, B_eᵀ (r, out) for each e)``, views from one ``unbind`` each."""
        key = ("loop", dtype)
        if key not in self._cache:
            A, B = self._get(dtype)
            E = self.experts
            self._cache[key] = (A.view(E, -1, A.shape[-1]).unbind(0), _b_rows(B, E).unbind(1))
        return self._cache[key]


def _b_rows(B: torch.Tensor, experts: int) -> torch.Tensor:
    """Bᵀ with its rows grouped: (r, E, out), ``[k, e] = B[:, k·E + e]``. One blocked 2-D transpose
    (a copy of B's size), so each expert's block (r, out) is row-major with rows E·out apart —
    instead of gathering B's columns k·E + e with a stride of E elements."""
    return B.t().contiguous().view(-1, experts, B.shape[0])  # (r, E, out)


@dataclass
class Projection:
    """One projection of the expert MLP (``gate_up_proj``/``up_proj``, or ``down_proj``)."""

    weight: torch.Tensor  # (E, out, in), or (E, in, out) when transposed
    bias: torch.Tensor | None  # (E, out)
    transposed: bool
    terms: list[Term]


# ---------------------------------------------------------------------- grouped matmul
def _aligned(t: torch.Tensor) -> bool:
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and all(st * size % 16 == 0 for st, n in zip(t.stride(), t.shape)
                                          if st != 1 and n > 1)


def grouped_mm_usable(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Can ``torch``'s grouped matmul compute ``x (S, k) @ w (G, k, n)`` here, forward and backward?
    (It exists from torch 2.9 on CPU, needs sm80+ on CUDA, fp32/bf16, and 16-byte-aligned strides;
    the backward's operands share the forward's row lengths, so the same check covers them.)"""
    if _GROUPED_MM is None or x.dtype != w.dtype or x.dtype not in (torch.float32, torch.bfloat16):
        return False
    if x.device.type == "cuda" and torch.cuda.get_device_capability(x.device) < (8, 0):
        return False
    if x.device.type not in ("cpu", "cuda"):
        return False
    return _aligned(x) and _aligned(w) and all(d * x.element_size() % 16 == 0 for d in w.shape[1:])


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``out[s] = x[s] @ w[g]`` for row s in group g (rows sorted by group, ``offs`` the groups' ends,
    int32). Shapes: x (S, k), w (G, k, n) -> (S, n)."""
    if grouped_mm_usable(x, w):
        return _GROUPED_MM(x, w, offs=offs)
    pieces, start = [], 0
    ws = w.unbind(0)  # one backward node: the gradient of w is one stack, not one full tensor per group
    for g, end in enumerate(offs.tolist()):
        if end > start:
            pieces.append(x[start:end] @ ws[g])  # (n_g, n)
        start = end
    if start < x.shape[0] or not pieces:  # rows past the last group (none from a router) get zeros
        pieces.append(x.new_zeros(x.shape[0] - start, w.shape[-1]))
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


def _offsets(ids_sorted: torch.Tensor, experts: int) -> torch.Tensor:
    return torch.bincount(ids_sorted, minlength=experts).cumsum(0, dtype=torch.int32)  # (E,)


# ---------------------------------------------------------------------- the two forms
def _gate(module: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return module._apply_gate(h) if module.has_gate else module.act_fn(h)


def grouped_forward(module: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor, up: Projection, down: Projection) -> torch.Tensor:
    """transformers' ``grouped_mm_experts_forward`` with the LoRA terms: (T, H) -> (T, H)."""
    T, K = top_k_index.shape
    E = module.num_experts
    ids_g, perm = torch.sort(top_k_index.reshape(-1))  # (S,) pairs sorted by expert
    token_g = perm // K  # (S,) each pair's token
    x = hidden[token_g]  # (S, H)
    w_g = top_k_weights.reshape(-1)[perm]  # (S,)
    offs = _offsets(ids_g, E)

    def project(p: Projection, h: torch.Tensor) -> torch.Tensor:
        w = p.weight if p.transposed else p.weight.transpose(-2, -1)  # (E, in, out)
        y = grouped_mm(h.to(w.dtype), w, offs)  # (S, out)
        if p.bias is not None:
            y = y + p.bias[ids_g]
        for t in p.terms:
            dtype = t.input_dtype(h)
            At, Bt = t.grouped(dtype)
            if t.rows is None:
                z = grouped_mm(grouped_mm(h.to(dtype), At, offs), Bt, offs)  # (S, r) -> (S, out)
                y = y.add_(z.to(y.dtype), alpha=t.scaling)  # in place: the matmul's backward never reads y
                continue
            sel = t.rows[token_g].nonzero().squeeze(1)  # (n,) pairs of this adapter's rows, still sorted
            if sel.numel():
                o = _offsets(ids_g[sel], E)
                z = grouped_mm(grouped_mm(h[sel].to(dtype), At, o), Bt, o)  # (n, out)
                y = y.index_add(0, sel, z.to(y.dtype), alpha=t.scaling)
        return y

    h = _gate(module, project(up, x))  # (S, I)
    y = project(down, h)  # (S, H)
    if module.has_post_expert_norm:
        y = module.post_expert_norm(y)
    y = y * w_g.unsqueeze(-1)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return y[inv].view(T, K, -1).sum(dim=1).to(hidden.dtype)  # (T, H)


def eager_forward(module: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor,
                  top_k_weights: torch.Tensor, up: Projection, down: Projection) -> torch.Tensor:
    """The experts' eager loop (as transformers writes it) with the LoRA terms: (T, H) -> (T, H)."""
    E = module.num_experts
    out = torch.zeros_like(hidden)
    with torch.no_grad():
        mask = F.one_hot(top_k_index, num_classes=E + 1).permute(2, 1, 0)  # (E+1, K, T)
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()

    def project(p: Projection, e: int, h: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        y = h @ p.weight[e] if p.transposed else F.linear(h, p.weight[e])  # (n, out)
        if p.bias is not None:
            y = y + p.bias[e]
        for t in p.terms:
            dtype = t.input_dtype(h)
            As, Bs = t.per_expert(dtype)
            if t.rows is None:
                z = F.linear(h.to(dtype), As[e]) @ Bs[e]  # (n, r) -> (n, out)
                y = y.add_(z.to(y.dtype), alpha=t.scaling)
                continue
            sel = t.rows[tokens].nonzero().squeeze(1)
            if sel.numel():
                z = F.linear(h[sel].to(dtype), As[e]) @ Bs[e]
                y = y.index_add(0, sel, z.to(y.dtype), alpha=t.scaling)
        return y

    for e in hit.flatten().tolist():
        if e == E:
            continue
        pos, tokens = torch.where(mask[e])
        h = _gate(module, project(up, e, hidden[tokens], tokens))  # (n, I)
        y = project(down, e, h, tokens)  # (n, H)
        if module.has_post_expert_norm:
            y = module.post_expert_norm(y)
        y = y * top_k_weights[tokens, pos, None]
        out.index_add_(0, tokens, y.to(out.dtype))
    return out
