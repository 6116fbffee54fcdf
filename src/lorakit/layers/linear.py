"""LoRA around ``nn.Linear`` and transformers' GPT-2 ``Conv1D`` (weight stored ``(in, out)``).

    y = W0·x + b + scaling · B·A·dropout(x)            A: (r, in), B: (out, r)

DoRA (Liu et al., 2024) re-normalises the adapted weight row by row and learns the row norms m:

    W' = m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖_row
    y  = W'·x + b = W0·x + b + (m/‖·‖ - 1) ⊙ W0·x + (m/‖·‖) ⊙ s·B·A·x

with the norm detached from the graph, as in the paper and PEFT. The factors are always *called*
(``lora_A(x)``, ``lora_B(h, acc, s)``), never read as ``.weight`` in a forward, so hooks on them run:
FSDP2 / ZeRO-3 gather a factor that is its own shard unit, user hooks see its input.

Precision: the term is computed in the activation's dtype from fp32 master factors
(``lorakit.layers.factors``); with ``peft_numerics`` the input is cast to the factors' dtype
instead, as PEFT does (an fp32 copy of the activation on a half-precision base).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.config import WEIGHT_INITS, LoraConfig
from lorakit.layers import mixed_kernels
from lorakit.layers.base import LoraLayer, init_lora_pair
from lorakit.layers.factors import Down, Up
from lorakit.layers.registry import LayerKind, register
from lorakit.layers.routing import Route, blocks_open


def is_conv1d(module: nn.Module) -> bool:
    """True for transformers' ``Conv1D`` (GPT-2 style: ``weight`` of shape (in, out))."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or Conv1D."""
    if is_conv1d(module):
        in_f, out_f = module.weight.shape  # (in, out)
        return in_f, out_f
    return module.in_features, module.out_features


class Linear(LoraLayer):
    """LoRA wrapper of an ``nn.Linear`` or GPT-2 ``Conv1D``."""

    adapter_attrs = ("lora_A", "lora_B", "lora_magnitude_vector")

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = fan_in_fan_out or is_conv1d(base_layer)
        self.in_features, self.out_features = linear_features(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA: m, (out,)
        # the base output is a fresh tensor we may add into in place (Conv1D returns a view)
        self._fresh_output = type(base_layer) is nn.Linear

    def _create(self, name: str, r: int, cfg: LoraConfig) -> None:
        self.lora_A[name] = Down(self.in_features, r, bias=False)
        self.lora_B[name] = Up(r, self.out_features, bias=cfg.lora_bias)

    def _init(self, name: str, cfg: LoraConfig) -> None:
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        init = cfg.init_lora_weights
        if init in ("pissa", "olora"):
            if not self.base_weight().is_meta:  # on meta there is nothing to decompose: a later load fills both
                with torch.no_grad():
                    self._init_from_weight(name, init)
        elif init in WEIGHT_INITS:  # LoftQ, CorDA, LoRA-GA: lorakit.inits
            from lorakit.inits import init_linear

            init_linear(self, name, cfg)
        else:  # init False keeps nn.Linear's own (non-zero) init: the adapter is not a no-op
            init_lora_pair(A, B, init, self.r[name], self.lora_B[name].bias)
        if cfg.use_dora:
            self.lora_magnitude_vector[name] = nn.Parameter(self._row_norm(name, self._weight_out_in()).to(A.dtype))

    def _weight_out_in(self) -> torch.Tensor:
        """The base weight as (out, in), whatever its storage layout."""
        w = self.base_weight()
        return w.T if self.fan_in_fan_out else w

    def _init_from_weight(self, name: str, init: str) -> None:
        """PiSSA: A, B from the top-r SVD of W (W = U·S·Vh); OLoRA: from W = Q·R. W keeps the residual.

        PiSSA: B = U_r·√(S_r/s), A = √(S_r/s)·Vh_r, so s·B·A = U_r·S_r·Vh_r.
        OLoRA: B = Q_r, A = R_r. In both, W ← W - s·B·A, so the model's output is unchanged.
        """
        r, s = self.r[name], self.scaling[name]
        w = self._weight_out_in()
        wf = w.detach().to(torch.float32)  # (out, in)
        if init == "pissa":
            U, S, Vh = torch.linalg.svd(wf, full_matrices=False)
            Sr = S[:r] / s
            A = torch.diag(torch.sqrt(Sr)) @ Vh[:r]  # (r, in)
            B = U[:, :r] @ torch.diag(torch.sqrt(Sr))  # (out, r)
        else:
            Q, R = torch.linalg.qr(wf)
            A, B = R[:r].contiguous(), Q[:, :r].contiguous()
        self.lora_A[name].weight.data = A.to(self.lora_A[name].weight.dtype)
        self.lora_B[name].weight.data = B.to(self.lora_B[name].weight.dtype)
        residual = (wf - s * B @ A).to(w.dtype)
        self.base_weight().data.copy_(residual.T if self.fan_in_fan_out else residual)

    # ------------------------------------------------------------------ maths
    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW = scaling·B·A in the base weight's layout ((in, out) for Conv1D)."""
        A, B = self.lora_A[name].weight, self.lora_B[name].weight  # (r, in), (out, r)
        delta = (B @ A) * self.scaling[name]  # (out, in)
        return delta.T if self.fan_in_fan_out else delta

    def called_delta(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """ΔW (out, in) computed by *calling* the factors on the identity, ``B(A(I))ᵀ·s``, as PEFT's
        DoRA does: the factors' hooks run, so it works when a factor is its own FSDP2 shard unit."""
        A = self.lora_A[name]
        eye = torch.eye(self.in_features, device=A.weight.device, dtype=dtype)  # (in, in)
        return self.lora_B[name](A(eye)).T * self.scaling[name]  # (out, in)

    def _row_norm(self, name: str, w_out_in: torch.Tensor) -> torch.Tensor:
        """‖W0 + s·B·A‖ per output row for the given W0 (out, in), detached, fp32 or wider: (out,)."""
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        acc = torch.promote_types(A.dtype, torch.float32)
        w = w_out_in.detach().to(acc) + self.scaling[name] * (B.detach().to(acc) @ A.detach().to(acc))
        return torch.linalg.norm(w, dim=1)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """As ``LoraLayer.forward``; for a plain nn.Linear outside a mixed batch, the direct path: the
        input taken as (T, in), so each adapter's ``addmm_`` writes into the base output itself, not
        into a view of it (autograd would copy the whole gradient for that: ~4% of a train step),
        with no generic dispatch around it (a few µs per call). Not with ``peft_numerics``, whose
        promise is PEFT's operations exactly."""
        if (args or kwargs or x.dim() < 2 or self.disabled or not self._fresh_output or self.peft_numerics
                or blocks_open() or self.lora_magnitude_vector):
            return super().forward(x, *args, **kwargs)
        x2 = x.reshape(-1, x.shape[-1])  # (T, in)
        out = self.base_layer(x2)  # (T, out), a fresh tensor of our own
        for name in self.unmerged_active():
            dropout = self.lora_dropout[name]
            h = x2 if isinstance(dropout, nn.Identity) else dropout(x2)
            out = self.lora_B[name](self.lora_A[name](h), out, self.scaling[name], True)  # out += s·B·A·h
        return out.view(*x.shape[:-1], out.shape[-1])

    def _add_term(self, x: torch.Tensor, name: str, result: torch.Tensor) -> torch.Tensor:
        """``result + s·B(A(dropout(x)))``: one addmm into the base output (in place when it is a
        fresh tensor of our own), in x's dtype (PEFT's numerics: x cast to the factors'). DoRA: below."""
        A = self.lora_A[name]
        if name in self.lora_magnitude_vector:
            return self._apply_dora(x, name, result)
        h = self._input(self._dropout(x, name), A.weight.dtype)  # (..., in)
        inplace = self._fresh_output and result._base is None and result.is_contiguous()
        return self.lora_B[name](A(h), result, self.scaling[name], inplace)  # (..., out)

    def _apply_dora(self, x: torch.Tensor, name: str, result: torch.Tensor) -> torch.Tensor:
        """``result + (m/‖W0 + ΔW‖ - 1) ⊙ W0·x + (m/‖W0 + ΔW‖) ⊙ s·B·A·x`` (PEFT's DoraLinearLayer).

        ``W0·x`` is ``result - b`` (the running output, as PEFT) unless dropout is live, when it
        is recomputed on the dropped-out input."""
        A, B, s = self.lora_A[name], self.lora_B[name], self.scaling[name]
        x = self._input(x, A.weight.dtype)  # (..., in)
        acc = torch.promote_types(x.dtype, torch.float32)  # the norm in fp32 or wider
        with torch.no_grad():
            norm = torch.linalg.norm(self._weight_out_in().to(acc) + self.called_delta(name, acc), dim=1)  # (out,)
        scale = (self.lora_magnitude_vector[name] / norm).to(x.dtype)  # (out,)
        weight = self._weight_out_in().to(x.dtype)  # (out, in)
        dropout = self.lora_dropout[name]
        if isinstance(dropout, nn.Identity) or not self.training:
            bias = getattr(self.base_layer, "bias", None)
            plain = result.to(x.dtype) - (bias.to(x.dtype) if bias is not None else 0)  # W0·x, (..., out)
        else:
            x = dropout(x)
            plain = F.linear(x, weight)
        return result + (scale - 1) * plain + scale * B(A(x)) * s

    def stack_pairs(self, route: Route) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        return [(self.lora_A[n].weight, self.lora_B[n].weight) if n in self.r else None for n in route.order]

    def mixed_forward(self, x: torch.Tensor, result: torch.Tensor, route: Route) -> torch.Tensor:
        """BGMV gather (each row's blocks gathered, two batched matmuls) for prefill and decoding;
        DoRA, a lora_bias or live dropout take the reference loop."""
        if self._route_flag(route, "loop", lambda: any(
                n in self.lora_magnitude_vector or self.lora_B[n].bias is not None
                or (self.training and not isinstance(self.lora_dropout[n], nn.Identity))
                for n in route.names if n in self.r)):
            return super().mixed_forward(x, result, route)
        dtype = self.lora_A[next(n for n in route.names if n in self.r)].weight.dtype if self.peft_numerics else x.dtype
        return mixed_kernels.linear_gather(x, result, self._row_blocks(route, dtype, x.device))

    # ------------------------------------------------------------------ merging (DoRA)
    def _dora_norm(self, name: str, w0: torch.Tensor) -> torch.Tensor:
        return self._row_norm(name, w0.T if self.fan_in_fan_out else w0)  # (out,)

    def _dora_scale(self, factor: torch.Tensor) -> torch.Tensor:
        return factor[None, :] if self.fan_in_fan_out else factor[:, None]  # rows of W (out, in), columns of W^T


register(LayerKind("nn.Linear / transformers Conv1D", lambda m: isinstance(m, nn.Linear) or is_conv1d(m),
                   lambda m, fan_in_fan_out=False: Linear(m, fan_in_fan_out=fan_in_fan_out), linear=True))
