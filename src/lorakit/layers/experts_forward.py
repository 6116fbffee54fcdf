"""The routed expert MLP of a transformers v5 experts module, with LoRA terms on the routed tokens.

A fused experts module (``@use_experts_implementation``: Qwen3-MoE, Mixtral, gpt-oss, DeepSeek...)
holds every expert's weights in one 3-D tensor per projection. For the tokens the router sends to
expert e (``x_e``: (n_e, in)) an adapted projection computes

    y_e = x_e·W_eᵀ (+ b_e) + Σ_a s_a · (x_e·A_{a,e}ᵀ)·B_{a,e}ᵀ          A_{a,e}: (r, in), B_{a,e}: (out, r)

— the LoRA term beside the expert's own matmul ("split LoRA"), never the product B_e·A_e: the
extra work and memory scale with the routed tokens times r, not with the size of the expert stack.
The expert MLP around the two projections is the module's own (its ``_apply_gate`` or ``act_fn``,
biases, ``post_expert_norm``, the routing weights), in one of the two forms transformers runs:

* :func:`eager_forward`, the model's eager loop: per hit expert, its tokens through the two
  projections (2-D matmuls with that expert's weights), ``index_add_`` into the output;
* :func:`grouped_forward`, transformers' ``grouped_mm`` implementation: the (token, expert) pairs
  sorted by expert, each projection one grouped matmul over contiguous segments (``torch.nn.functional
  .grouped_mm`` where it exists and the strides suit it, else a loop over the segments), unsorted
  and summed over the top-k at the end.

In both, each projection's LoRA terms are two grouped matmuls over the sorted pairs,
``(S, in) -> (S, r) -> (S, out)`` (the eager loop adds each expert's slice of the result).

PEFT's factor layout (kept for file compatibility): A is ``(r·E, in)`` with expert e's rows at
``e·r ... e·r + r - 1``; B is ``(out, r·E)`` with expert e's column k at ``k·E + e``, so

    A_e = A.view(E, r, in)[e]            B_e = B.view(out, r, E)[:, :, e]

Backward runs through the same route: autograd differentiates these ops, so A and B get their
gradients (of their own size) from the routed activations, and a frozen expert weight gets none:
no (E, out, in) tensor is formed in either direction.

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


def _b_rows(B: torch.Tensor, experts: int) -> torch.Tensor:
    """Bᵀ with its rows grouped: (r, E, out), ``[k, e] = B[:, k·E + e]``. One blocked 2-D transpose
    (a copy of B's size; 2.5x cheaper forward and backward than permuting B's strided columns), so
    each expert's block (r, out) is row-major with rows E·out apart, as a grouped matmul takes it."""
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
    ends = offs.tolist()
    sizes = [b - a for a, b in zip([0] + ends[:-1], ends)] + [x.shape[0] - ends[-1]]  # the last: rows past all groups
    ws = w.unbind(0)  # one backward node each for w and x (split): no full-size gradient per group
    pieces = [xs @ ws[g] if g < len(ws) else xs.new_zeros(xs.shape[0], w.shape[-1])
              for g, xs in enumerate(x.split(sizes)) if xs.shape[0]]
    if not pieces:
        return x.new_zeros(0, w.shape[-1])
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]  # (S, n)


def _offsets(ids_sorted: torch.Tensor, experts: int) -> torch.Tensor:
    return torch.bincount(ids_sorted, minlength=experts).cumsum(0, dtype=torch.int32)  # (E,)


# ---------------------------------------------------------------------- the two forms
def _gate(module: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return module._apply_gate(h) if module.has_gate else module.act_fn(h)


class _Pairs:
    """The (token, expert) pairs sorted by expert (a stable sort: within an expert, by token)."""

    def __init__(self, top_k_index: torch.Tensor, experts: int) -> None:
        self.K = top_k_index.shape[1]
        self.ids, self.perm = torch.sort(top_k_index.reshape(-1), stable=True)  # (S,)
        self.tokens = self.perm // self.K  # (S,) each pair's token
        self.experts = experts
        self.offs = _offsets(self.ids, experts)  # (E,) int32

    def lora(self, terms: list[Term], h: torch.Tensor) -> torch.Tensor | None:
        """``Σ_a s_a·(h·A_aᵀ)·B_aᵀ`` per pair, each with its expert's factors: (S, in) -> (S, out), in
        the terms' compute dtype; None without terms. A term with ``rows`` acts on its tokens only."""
        acc = None
        for t in terms:
            dtype = t.input_dtype(h)
            At, Bt = t.grouped(dtype)
            if t.rows is None:  # the scaling on the (S, r) activations, not on the (S, out) term
                z = grouped_mm(grouped_mm(h.to(dtype), At, self.offs).mul_(t.scaling), Bt, self.offs)  # (S, out)
                acc = z if acc is None else acc.add_(z)  # z: no backward reads it
                continue
            sel = t.rows[self.tokens].nonzero().squeeze(1)  # (n,) pairs of this adapter's rows, still sorted
            if acc is None:
                acc = h.new_zeros(h.shape[0], Bt.shape[-1], dtype=dtype)
            if sel.numel():
                o = _offsets(self.ids[sel], self.experts)
                z = grouped_mm(grouped_mm(h[sel].to(dtype), At, o).mul_(t.scaling), Bt, o)  # (n, out)
                acc = acc.index_add(0, sel, z)
        return acc


def _add(y: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
    return y if z is None else y.add_(z.to(y.dtype))  # in place: the matmul's backward never reads y


def grouped_forward(module: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor, up: Projection, down: Projection) -> torch.Tensor:
    """transformers' ``grouped_mm_experts_forward`` with the LoRA terms: (T, H) -> (T, H)."""
    T, K = top_k_index.shape
    pairs = _Pairs(top_k_index, module.num_experts)
    x = hidden[pairs.tokens]  # (S, H)
    w_g = top_k_weights.reshape(-1)[pairs.perm]  # (S,)

    def project(p: Projection, h: torch.Tensor) -> torch.Tensor:
        w = p.weight if p.transposed else p.weight.transpose(-2, -1)  # (E, in, out)
        y = grouped_mm(h.to(w.dtype), w, pairs.offs)  # (S, out)
        if p.bias is not None:
            y = y + p.bias[pairs.ids]
        return _add(y, pairs.lora(p.terms, h))

    h = _gate(module, project(up, x))  # (S, I)
    y = project(down, h)  # (S, H)
    if module.has_post_expert_norm:
        y = module.post_expert_norm(y)
    y = y * w_g.unsqueeze(-1)
    inv = torch.empty_like(pairs.perm)
    inv[pairs.perm] = torch.arange(pairs.perm.numel(), device=pairs.perm.device)
    return y[inv].view(T, K, -1).sum(dim=1).to(hidden.dtype)  # (T, H)


def eager_forward(module: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor,
                  top_k_weights: torch.Tensor, up: Projection, down: Projection) -> torch.Tensor:
    """The experts' eager loop with the LoRA terms: (T, H) -> (T, H).

    As transformers writes it: per expert hit, its tokens through ``up``, the gate, ``down`` (each
    a 2-D matmul with that expert's weight), the routing weight, ``index_add_`` into the output, in
    expert order. Each projection's LoRA terms for all experts are computed together first (grouped
    matmuls over the pairs sorted by expert), and each expert adds its slice inside the loop; within
    an expert the tokens are in token order (transformers': top-k slot, then token — the same rows).
    Per-expert pieces come from one ``split`` per tensor: one backward node each, where a slice per
    expert would write a zero-filled full-size gradient per expert.
    """
    pairs = _Pairs(top_k_index, module.num_experts)
    sizes = torch.diff(pairs.offs, prepend=pairs.offs.new_zeros(1)).tolist()  # tokens per expert
    hit = [e for e, n in enumerate(sizes) if n]
    if not hit:
        return torch.zeros_like(hidden)

    def project(p: Projection, e: int, h: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        y = h @ p.weight[e] if p.transposed else F.linear(h, p.weight[e])  # (n, out)
        return _add(y if p.bias is None else y + p.bias[e], z)

    def pieces(t: torch.Tensor | None) -> list:
        return [None] * len(sizes) if t is None else list(t.split(sizes))

    x = hidden[pairs.tokens]  # (S, H)
    xs, zs = pieces(x), pieces(pairs.lora(up.terms, x))
    gated = pieces(None)
    for e in hit:
        gated[e] = _gate(module, project(up, e, xs[e], zs[e]))  # (n, I)
    zs = pieces(pairs.lora(down.terms, torch.cat([gated[e] for e in hit])))  # all S rows, in expert order
    tokens, slots = pieces(pairs.tokens), pieces(pairs.perm % pairs.K)
    out = torch.zeros_like(hidden)
    for e in hit:
        y = project(down, e, gated[e], zs[e])  # (n, H)
        if module.has_post_expert_norm:
            y = module.post_expert_norm(y)
        y = y * top_k_weights[tokens[e], slots[e], None]
        out.index_add_(0, tokens[e], y.to(out.dtype))
    return out
