"""LoRA around ``nn.Embedding``.

    y = E0[x] + scaling · (A^T)[x] · B^T        A: (r, num_embeddings), B: (embedding_dim, r)

so ΔE = scaling · (B·A)^T, shape (num_embeddings, embedding_dim). As in PEFT, A starts at zero and
B ~ N(0, 1) (the transpose of the Linear convention), and no dropout is applied to token ids.

Scaled embeddings (Gemma, Gemma 3, BART with ``scale_embedding``: the module multiplies its lookup
by ``embed_scale``, so the base output is ``c·E0[x]``) get the LoRA term scaled by ``c`` too, as PEFT
does: ``y = c·E0[x] + c·scaling·(A^T)[x]·B^T``, which is what the merged weight ``E0 + ΔE`` computes.

DoRA (PEFT's ``DoraEmbeddingLayer``) normalises per embedding dimension d, over the vocabulary:

    n_d = ‖E0[:, d] + ΔE[:, d]‖        y = (m/n) ⊙ (E0[x] + s·(A^T)[x]·B^T)

with ``m`` (``lora_magnitude_vector``, shape (embedding_dim,)) learnt and ``n`` detached. As in PEFT,
the running output (base plus any adapter added before this one) is what gets rescaled.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.config import WEIGHT_INITS, LoraConfig
from lorakit.layers import mixed_kernels
from lorakit.layers.base import LoraLayer
from lorakit.layers.registry import LayerKind, register
from lorakit.layers.routing import Route


class Embedding(LoraLayer):
    """LoRA wrapper of an ``nn.Embedding``; factors in ``lora_embedding_A/B`` (PEFT's names)."""

    adapter_attrs = ("lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
    b_attrs = ("lora_embedding_B",)
    factor_attrs = ("lora_embedding_A", "lora_embedding_B")

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA: m, (embedding_dim,)

    def _create(self, name: str, r: int, cfg: LoraConfig) -> None:
        if cfg.lora_bias:
            raise ValueError("lora_bias=True is not supported on nn.Embedding (as in PEFT); exclude the embedding "
                             "or set lora_bias=False")
        if cfg.init_lora_weights in WEIGHT_INITS:
            raise ValueError(f"init_lora_weights={cfg.init_lora_weights!r} is implemented for Linear layers only, "
                             "not nn.Embedding")
        num, dim = self.base_layer.num_embeddings, self.base_layer.embedding_dim
        self.lora_embedding_A[name] = nn.Parameter(torch.randn(r, num))
        self.lora_embedding_B[name] = nn.Parameter(torch.randn(dim, r))

    def _init(self, name: str, cfg: LoraConfig) -> None:
        if cfg.init_lora_weights is not False:
            with torch.no_grad():
                nn.init.zeros_(self.lora_embedding_A[name])
                nn.init.normal_(self.lora_embedding_B[name])
        if cfg.use_dora:
            A = self.lora_embedding_A[name]
            m = self._norm(name, self.base_layer.weight, torch.promote_types(A.dtype, torch.float32))
            self.lora_magnitude_vector[name] = nn.Parameter(m.to(A.dtype))

    def _norm(self, name: str, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """‖E + ΔE‖ per embedding dimension (over the vocabulary), detached, in ``dtype``: (dim,)."""
        delta = self.delta_weight(name).detach().to(dtype)  # (num, dim)
        return torch.linalg.norm(weight.detach().to(dtype) + delta, dim=0)

    def delta_weight(self, name: str) -> torch.Tensor:
        A, B = self.lora_embedding_A[name], self.lora_embedding_B[name]  # (r, num), (dim, r)
        return (B @ A).T * self.scaling[name]  # (num, dim)

    def delta_matrix(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.T  # ΔE (num, dim) = (B·A)ᵀ

    def embed_scale(self) -> torch.Tensor | float | None:
        """The factor the base module multiplies its lookup by (``embed_scale``: a number or a
        one-element tensor, PEFT's rule), or None.

        Raises:
            ValueError: an ``embed_scale`` of more than one element.
        """
        c = getattr(self.base_layer, "embed_scale", None)
        if isinstance(c, torch.Tensor) and c.numel() != 1:
            raise ValueError(f"{type(self.base_layer).__name__}.embed_scale has shape {tuple(c.shape)}; a scaled "
                             "embedding needs a scalar scale")
        return c

    def term_scale(self, name: str) -> float:
        c = self.embed_scale()
        return self.scaling[name] if c is None else self.scaling[name] * float(c)

    def _add_term(self, x: torch.Tensor, name: str, result: torch.Tensor) -> torch.Tensor:
        """``result + s·(A^T)[x]·B^T``, looked up with the base layer's own embedding options; DoRA:
        ``(m/n) ⊙ (result + s·(A^T)[x]·B^T)``."""
        A, B = self.lora_embedding_A[name], self.lora_embedding_B[name]  # (r, num), (dim, r)
        e = self.base_layer
        after_a = F.embedding(x, A.T, e.padding_idx, e.max_norm, e.norm_type,
                              e.scale_grad_by_freq, e.sparse)  # (..., r), the factors' dtype
        dtype = A.dtype if self.peft_numerics else result.dtype  # an r-wide cast, never an activation's
        term = (after_a.to(dtype) @ B.T.to(dtype)) * self.scaling[name]  # (..., dim)
        c = self.embed_scale()
        if c is not None:  # a scaled embedding: the base output is c·E0[x]
            term = term * (c.to(dtype) if isinstance(c, torch.Tensor) else c)
        if name not in self.lora_magnitude_vector:
            return result + term
        with torch.no_grad():
            norm = self._norm(name, e.weight, torch.promote_types(dtype, torch.float32))  # (dim,)
        scale = (self.lora_magnitude_vector[name] / norm).to(dtype)  # (dim,)
        return scale * result + scale * term

    def stack_pairs(self, route: Route) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        return [(self.lora_embedding_A[n], self.lora_embedding_B[n]) if n in self.r else None for n in route.order]

    def mixed_forward(self, x: torch.Tensor, result: torch.Tensor, route: Route) -> torch.Tensor:
        """One lookup in the stacked A^T tables; ``max_norm`` (which renormalises in place) and DoRA take the loop."""
        if self.base_layer.max_norm is not None or self._route_flag(
                route, "loop", lambda: any(n in self.lora_magnitude_vector for n in route.names if n in self.r)):
            return super().mixed_forward(x, result, route)
        dtype = self.lora_embedding_A[next(n for n in route.names if n in self.r)].dtype if self.peft_numerics \
            else result.dtype
        stack, idx = self._stack(route, dtype), route.slots(x.device)
        return mixed_kernels.embedding_gather(x, result, stack, idx, self._row_blocks(route, dtype, x.device)[1])

    # ------------------------------------------------------------------ merging (DoRA)
    def _dora_norm(self, name: str, w0: torch.Tensor) -> torch.Tensor:
        return self._norm(name, w0, w0.dtype)  # (dim,), over the vocabulary

    def _dora_scale(self, factor: torch.Tensor) -> torch.Tensor:
        return factor[None, :]  # (1, dim) over E (num, dim)


register(LayerKind("nn.Embedding", lambda m: isinstance(m, nn.Embedding), lambda m, **_: Embedding(m)))
