"""LoRA around ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d``.

A is a convolution with the base layer's kernel, stride, padding and dilation (in → r channels),
B a 1×1 convolution (r → out), so for every kernel offset k:

    ΔW[o, i, k] = scaling · Σ_r B[o, r] · A[r, i, k]          y = conv(x, W0) + scaling · B(A(dropout(x)))
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.config import LoraConfig
from lorakit.layers import mixed
from lorakit.layers.base import LoraLayer, init_lora_pair
from lorakit.layers.factors import CONV_FACTORS
from lorakit.layers.routing import Route

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class Conv(LoraLayer):
    """LoRA wrapper of a Conv1d/2d/3d with ``groups == 1``."""

    def __init__(self, base_layer: nn.Module) -> None:
        if base_layer.groups != 1:
            raise ValueError(f"LoRA on a {type(base_layer).__name__} with groups={base_layer.groups} is not supported; "
                             "only groups=1 convolutions can be targeted (exclude this module)")
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def _create(self, name: str, r: int, cfg: LoraConfig) -> None:
        if cfg.use_dora:
            raise ValueError("use_dora is implemented for Linear and Conv1D layers only, not convolutions")
        if cfg.init_lora_weights in ("pissa", "olora"):
            raise ValueError(f"init_lora_weights={cfg.init_lora_weights!r} is implemented for Linear layers only")
        b = self.base_layer
        conv = CONV_FACTORS[next(t for t in CONV_TYPES if isinstance(b, t))]
        ones = (1,) * (b.weight.dim() - 2)
        self.lora_A[name] = conv(b.in_channels, r, b.kernel_size, b.stride, b.padding, b.dilation,
                                 bias=False, padding_mode=b.padding_mode)
        self.lora_B[name] = conv(r, b.out_channels, ones, ones, bias=False)

    def _init(self, name: str, cfg: LoraConfig) -> None:
        init_lora_pair(self.lora_A[name].weight, self.lora_B[name].weight, cfg.init_lora_weights, self.r[name])

    def delta_weight(self, name: str) -> torch.Tensor:
        A = self.lora_A[name].weight  # (r, in, *k)
        B = self.lora_B[name].weight.flatten(1)  # (out, r)
        return torch.einsum("or,ri...->oi...", B, A) * self.scaling[name]  # (out, in, *k)

    def _add_term(self, x: torch.Tensor, name: str, result: torch.Tensor) -> torch.Tensor:
        """``result + s·B(A(dropout(x)))`` in x's dtype (PEFT's numerics: x cast to the factors')."""
        A, B = self.lora_A[name], self.lora_B[name]
        x = self._input(self._dropout(x, name), A.weight.dtype)  # (N, in, *spatial)
        return result + B(A(x)) * self.scaling[name]  # (N, out, *spatial')

    def stack_pairs(self, route: Route) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        return [(self.lora_A[n].weight, self.lora_B[n].weight) if n in self.r else None for n in route.names]

    def mixed_forward(self, x: torch.Tensor, result: torch.Tensor, route: Route) -> torch.Tensor:
        """Per-row A as one grouped convolution, per-row B as one bmm; live dropout takes the loop."""
        if self._route_flag(route, "loop", lambda: self.training and any(
                not isinstance(self.lora_dropout[n], nn.Identity) for n in route.names if n in self.r)):
            return super().mixed_forward(x, result, route)
        dtype = self.lora_A[next(n for n in route.names if n in self.r)].weight.dtype if self.peft_numerics \
            else x.dtype
        return mixed.conv_gather(self.base_layer, x, result, self._row_blocks(route, dtype, x.device))
