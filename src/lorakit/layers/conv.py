"""LoRA around ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d``.

A is a convolution with the base layer's kernel, stride, padding and dilation (in → r channels),
B a 1×1 convolution (r → out) with the base layer's ``groups`` (PEFT's layout), so with
``groups == 1``, for every kernel offset k:

    ΔW[o, i, k] = scaling · Σ_r B[o, r] · A[r, i, k]          y = conv(x, W0) + scaling · B(A(dropout(x)))

With ``groups = G > 1`` (``r`` divisible by G) output channel o reads only the r/G channels of its
group: the update is a dense (out, in, k) kernel, which no grouped base weight (out, in/G, k) can
hold — the forward works, merging is refused (as PEFT refuses it).

DoRA (PEFT's ``DoraConvNdLayer``), with norms per output channel over (in, *k):

    n = ‖W0 + scaling·ΔW₁‖        y = conv(x, W0) + b + (m/n - 1)·conv(x, W0) + (m/n)·scaling·B(A(x))

``m`` (``lora_magnitude_vector``) has PEFT's shape ``(1, out, 1, ...)``. ``ΔW₁`` is PEFT's
``B.view(-1, r) @ A.view(r, -1)`` reshaped to W0's shape: ΔW/scaling for ``groups == 1``, PEFT's own
definition otherwise. The norm is read off the factor weights, as PEFT does (the factors are
called for the term itself).
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.config import WEIGHT_INITS, LoraConfig
from lorakit.layers import mixed_kernels
from lorakit.layers.base import LoraLayer, init_lora_pair
from lorakit.layers.factors import CONV_FACTORS
from lorakit.layers.registry import LayerKind, register
from lorakit.layers.routing import Route

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class Conv(LoraLayer):
    """LoRA wrapper of a Conv1d/2d/3d (any ``groups``; see the module docstring)."""

    adapter_attrs = ("lora_A", "lora_B", "lora_magnitude_vector")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA: m, (1, out, 1, ...)

    def _create(self, name: str, r: int, cfg: LoraConfig) -> None:
        if cfg.init_lora_weights in WEIGHT_INITS:
            raise ValueError(f"init_lora_weights={cfg.init_lora_weights!r} is implemented for Linear layers only")
        b = self.base_layer
        if r % b.groups != 0:
            raise ValueError(f"a {type(b).__name__} with groups={b.groups} needs a rank divisible by {b.groups} "
                             f"(each group of output channels gets r/groups of the rank), got r={r}; choose another "
                             "rank (rank_pattern) or exclude this layer")
        conv = CONV_FACTORS[next(t for t in CONV_TYPES if isinstance(b, t))]
        ones = (1,) * (b.weight.dim() - 2)
        self.lora_A[name] = conv(b.in_channels, r, b.kernel_size, b.stride, b.padding, b.dilation,
                                 bias=False, padding_mode=b.padding_mode)
        self.lora_B[name] = conv(r, b.out_channels, ones, ones, groups=b.groups, bias=cfg.lora_bias)

    def _init(self, name: str, cfg: LoraConfig) -> None:
        B = self.lora_B[name]
        init_lora_pair(self.lora_A[name].weight, B.weight, cfg.init_lora_weights, self.r[name], B.bias)
        if cfg.use_dora:
            m = self._norm(name, self.base_weight(), torch.promote_types(B.weight.dtype, torch.float32))
            self.lora_magnitude_vector[name] = nn.Parameter(m.to(B.weight.dtype))

    # ------------------------------------------------------------------ maths
    def merge_refusal(self, name: str) -> str | None:
        if self.base_layer.groups > 1:
            return (f"cannot merge into a {type(self.base_layer).__name__} with groups={self.base_layer.groups}: the "
                    "LoRA update of a grouped convolution is a dense kernel the grouped weight cannot hold (PEFT "
                    "refuses this merge too); use the adapter unmerged")
        return super().merge_refusal(name)

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW = scaling·B·A per kernel offset, (out, in, *k) (``groups == 1`` only).

        Raises:
            ValueError: a grouped base convolution (see ``merge_refusal``).
        """
        refusal = self.merge_refusal(name) if self.base_layer.groups > 1 else None
        if refusal is not None:
            raise ValueError(refusal)
        A = self.lora_A[name].weight  # (r, in, *k)
        B = self.lora_B[name].weight.flatten(1)  # (out, r)
        return torch.einsum("or,ri...->oi...", B, A) * self.scaling[name]  # (out, in, *k)

    def _norm(self, name: str, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """PEFT's DoRA norm ‖W + s·ΔW₁‖ per output channel, detached, in ``dtype``: (1, out, 1, ...)."""
        A, B = self.lora_A[name].weight.detach(), self.lora_B[name].weight.detach()
        r = A.shape[0]
        lora_weight = (B.reshape(-1, r).to(dtype) @ A.reshape(r, -1).to(dtype)).reshape(weight.shape)
        w = weight.detach().to(dtype) + self.scaling[name] * lora_weight
        return w.norm(p=2, dim=tuple(range(1, w.dim())), keepdim=True).transpose(1, 0)

    @property
    def rank_groups(self) -> int:  # type: ignore[override]
        return self.base_layer.groups

    def delta_matrix(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.flatten(start_dim=1)  # (out, in·∏k)

    def factors_from_matrices(self, A: torch.Tensor, B: torch.Tensor, like: str) -> tuple[torch.Tensor, torch.Tensor]:
        A0, B0 = self.factors(like)
        return A.reshape(A.shape[0], *A0.shape[1:]), B.reshape(B0.shape[0], B.shape[1], *B0.shape[2:])

    def _channel(self, v: torch.Tensor) -> torch.Tensor:
        """A per-output-channel vector (1, out, 1, ...) as (out, 1, 1, ...), the weight's layout."""
        return v.reshape(-1, *(1,) * (self.base_layer.weight.dim() - 1))

    # ------------------------------------------------------------------ forward
    def _add_term(self, x: torch.Tensor, name: str, result: torch.Tensor) -> torch.Tensor:
        """``result + s·B(A(dropout(x)))`` in x's dtype (PEFT's numerics: x cast to the factors'). DoRA: below."""
        A, B = self.lora_A[name], self.lora_B[name]
        if name in self.lora_magnitude_vector:
            return self._apply_dora(x, name, result)
        x = self._input(self._dropout(x, name), A.weight.dtype)  # (N, in, *spatial)
        return result + B(A(x)) * self.scaling[name]  # (N, out, *spatial')

    def _apply_dora(self, x: torch.Tensor, name: str, result: torch.Tensor) -> torch.Tensor:
        """``result + (m/n - 1)·conv(x, W0) + (m/n)·s·B(A(x))`` (PEFT's ``DoraConvNdLayer``); ``conv(x, W0)``
        is ``result - b`` unless dropout is live, when it is recomputed on the dropped-out input."""
        A, B, s = self.lora_A[name], self.lora_B[name], self.scaling[name]
        x = self._input(x, A.weight.dtype)  # (N, in, *spatial)
        base = self.base_layer
        with torch.no_grad():
            norm = self._norm(name, base.weight, torch.promote_types(x.dtype, torch.float32))  # (1, out, 1, ...)
        scale = (self.lora_magnitude_vector[name] / norm).to(x.dtype)  # (1, out, 1, ...)
        dropout = self.lora_dropout[name]
        if isinstance(dropout, nn.Identity) or not self.training:
            bias = base.bias
            shape = (1, -1, *(1,) * (result.dim() - 2))
            plain = result.to(x.dtype) - (0 if bias is None else bias.view(shape).to(x.dtype))  # conv(x, W0)
        else:
            x = dropout(x)
            plain = base._conv_forward(x, base.weight.to(x.dtype), None)  # conv(x, W0), no bias
        return result + (scale - 1) * plain + scale * B(A(x)) * s

    def stack_pairs(self, route: Route) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        return [(self.lora_A[n].weight, self._dense_B(n)) if n in self.r else None for n in route.order]

    def mixed_forward(self, x: torch.Tensor, result: torch.Tensor, route: Route) -> torch.Tensor:
        """Per-row A as one grouped convolution, per-row B as one bmm (a grouped B as its block-diagonal
        dense form); DoRA, a lora_bias or live dropout take the reference loop."""
        if self._route_flag(route, "loop", lambda: any(
                n in self.lora_magnitude_vector or self.lora_B[n].bias is not None
                or (self.training and not isinstance(self.lora_dropout[n], nn.Identity))
                for n in route.names if n in self.r)):
            return super().mixed_forward(x, result, route)
        dtype = self.lora_A[next(n for n in route.names if n in self.r)].weight.dtype if self.peft_numerics \
            else x.dtype
        return mixed_kernels.conv_gather(self.base_layer, x, result, self._row_blocks(route, dtype, x.device))

    def _dense_B(self, name: str) -> torch.Tensor:
        """lora_B as a dense (out, r) matrix: for groups G, output o's block of r/G columns, zeros elsewhere."""
        B = self.lora_B[name].weight.flatten(1)  # (out, r/G)
        groups = self.base_layer.groups
        if groups == 1:
            return B
        out, per = B.shape
        mask = torch.block_diag(*[B.new_ones(out // groups, per) for _ in range(groups)])  # (out, r)
        return B.repeat(1, groups) * mask  # (out, r)

    # ------------------------------------------------------------------ merging (DoRA)
    def _dora_norm(self, name: str, w0: torch.Tensor) -> torch.Tensor:
        return self._norm(name, w0, w0.dtype)  # (1, out, 1, ...)

    def _dora_scale(self, factor: torch.Tensor) -> torch.Tensor:
        return self._channel(factor)  # (out, 1, 1, ...)


register(LayerKind("nn.Conv1d/2d/3d", lambda m: isinstance(m, CONV_TYPES), lambda m, **_: Conv(m)))
