"""LoRA around ``nn.Linear`` and transformers' GPT-2 ``Conv1D`` (weight stored ``(in, out)``).

    y = W0·x + b + scaling · B·A·dropout(x)            A: (r, in), B: (out, r)

DoRA (Liu et al., 2024) re-normalises the adapted weight row by row and learns the row norms m:

    W' = m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖_row
    y  = W'·x + b = W0·x + b + (m/‖·‖ - 1) ⊙ W0·x + (m/‖·‖) ⊙ s·B·A·x

with the norm detached from the graph, as in the paper and PEFT.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.config import LoraConfig
from lorakit.layers.base import LoraLayer, init_lora_pair


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

    def _create(self, name: str, r: int, cfg: LoraConfig) -> None:
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False)

    def _init(self, name: str, cfg: LoraConfig) -> None:
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        init = cfg.init_lora_weights
        if init in ("pissa", "olora"):
            with torch.no_grad():
                self._init_from_weight(name, init)
        else:  # init False keeps nn.Linear's own (non-zero) init: the adapter is not a no-op
            init_lora_pair(A, B, init, self.r[name])
        if cfg.use_dora:
            self.lora_magnitude_vector[name] = nn.Parameter(self._row_norm(name).to(A.dtype))

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

    def _row_norm(self, name: str) -> torch.Tensor:
        """‖W0 + s·B·A‖ per output row, detached, in fp32 or wider: (out,)."""
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        acc = torch.promote_types(A.dtype, torch.float32)
        w = self._weight_out_in().detach().to(acc) + self.scaling[name] * (B.detach().to(acc) @ A.detach().to(acc))
        return torch.linalg.norm(w, dim=1)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``y = W0·x + b + Σ_a s_a·B_a·(A_a·dropout(x))``, each term accumulated into the base
        output by one ``addmm`` with ``alpha = s_a`` (no dropout call when p = 0, no ``(..., out)``
        temporaries); DoRA, mixed batches, autocast and mixed dtypes take the general path."""
        names = self._lean_adapters(x, args, kwargs)
        if names is None:
            return super().forward(x, *args, **kwargs)
        x2 = x.reshape(-1, x.shape[-1])  # (T, in), a view for contiguous x
        out = self.base_layer(x2)  # (T, out)
        inplace = out._base is None  # Conv1D returns a view: in place would make autograd copy the grad
        for name in names:
            dropout = self.lora_dropout[name]
            h = x2 if isinstance(dropout, nn.Identity) else dropout(x2)
            ax = F.linear(h, self.lora_A[name].weight)  # (T, r)
            bt = self.lora_B[name].weight.T  # (r, out)
            s = self.scaling[name]
            out = out.addmm_(ax, bt, alpha=s) if inplace else torch.addmm(out, ax, bt, alpha=s)  # (T, out)
        return out.view(*x.shape[:-1], out.shape[-1])

    def _lean_adapters(self, x: torch.Tensor, args: tuple, kwargs: dict) -> list[str] | None:
        """The adapters for the lean path, or None when the general path is needed."""
        if self.disabled or self.row_adapters is not None or args or kwargs or torch.is_autocast_enabled(x.device.type):
            return None
        base = self.base_layer
        if not (type(base) is nn.Linear or is_conv1d(base)) or base.weight.dtype != x.dtype:
            return None
        names = self.unmerged_active()
        for name in names:
            if name in self.lora_magnitude_vector or self.lora_A[name].weight.dtype != x.dtype:
                return None
        return names

    def _lora_out(self, x: torch.Tensor, name: str, base_out: torch.Tensor) -> torch.Tensor:
        A, B = self.lora_A[name], self.lora_B[name]
        dropout = self.lora_dropout[name]
        x = x.to(A.weight.dtype)  # (..., in)
        if name not in self.lora_magnitude_vector:
            if not isinstance(dropout, nn.Identity):
                x = dropout(x)
            return B(A(x)) * self.scaling[name]  # (..., out)
        # DoRA
        s = self.scaling[name]
        scale = self.lora_magnitude_vector[name] / self._row_norm(name).to(A.weight.dtype)  # (out,)
        if isinstance(dropout, nn.Identity) or not self.training:
            bias = getattr(self.base_layer, "bias", None)
            plain = base_out.to(x.dtype) - (bias.to(x.dtype) if bias is not None else 0)  # W0·x, (..., out)
        else:
            x = dropout(x)
            plain = F.linear(x, self._weight_out_in().to(x.dtype))
        return (scale - 1) * plain + scale * B(A(x)) * s

    def _merged_weight(self, weight: torch.Tensor, name: str) -> torch.Tensor:
        if name not in self.lora_magnitude_vector:
            return super()._merged_weight(weight, name)
        # DoRA: W' = (m / ‖W0 + ΔW‖) ⊙ (W0 + ΔW), row-wise in (out, in) layout
        norm = self._row_norm(name)
        self._merge_cache[name] = norm  # ‖W0 + ΔW‖, for an exact unmerge
        factor = (self.lora_magnitude_vector[name].detach().to(norm.dtype) / norm)  # (out,)
        w = weight.to(norm.dtype) + self.delta_weight(name).to(norm.dtype)
        w = w * (factor[None, :] if self.fan_in_fan_out else factor[:, None])
        return w.to(weight.dtype)

    def _unmerged_weight(self, weight: torch.Tensor, name: str) -> torch.Tensor:
        if name not in self.lora_magnitude_vector:
            return super()._unmerged_weight(weight, name)
        norm = self._merge_cache.pop(name)
        factor = self.lora_magnitude_vector[name].detach().to(norm.dtype) / norm
        w = weight.to(norm.dtype) / (factor[None, :] if self.fan_in_fan_out else factor[:, None])
        return super()._unmerged_weight(w, name).to(weight.dtype)
