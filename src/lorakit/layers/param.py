"""LoRA on an ``nn.Parameter`` of a module (``LoraConfig.target_parameters``), PEFT's ``ParamWrapper``.

For modules that use their weight directly instead of calling Linear layers — the fused expert
tensors of MoE models (Qwen3-MoE, Mixtral, gpt-oss in transformers v5: ``gate_up_proj`` of shape
``(experts, 2·inter, hidden)``, ``down_proj``), or any ``x @ self.weight`` — the module is called
with its parameter replaced by ``W + ΔW``:

    2-D W (d0, d1):           ΔW = s · B·A                      A: (r, d1), B: (d0, r)
    3-D W (E, d1, d2):        ΔW[e] = s · B_e·A_e (one rank-r update per expert)

PEFT's layout, kept for file compatibility: A is ``(r·E, in)`` with expert e's rows at
``e·r ... e·r + r - 1``; B is ``(out, r·E)`` with expert e's column k at ``k·E + e``. ``(in, out)`` is
``(d2, d1)`` — W[e] stored ``(out, in)`` as F.linear reads it — unless the module sets
``is_transposed`` (then ``(d1, d2)``). A 2-D W is read as ``(out, in) = (d0, d1)``.

Several parameters of one module nest: each wrapper adapts one parameter and wraps the previous
one (PEFT's nesting, which its file keys follow: ``experts.lora_A`` is the last parameter,
``experts.base_layer.lora_A`` the one before).

The factors are called to obtain their weights (``ParamFactor(dtype)``), so hooks on them run
(FSDP2 unshards a factor that is its own shard unit); the sum ``W + ΔW`` is formed in W's dtype
(fp32 masters cast to it), as PEFT does. The module's forward sees the new tensor through
``torch.func.functional_call``; gradients reach A and B through it. No dropout: it cannot act on
a weight (PEFT refuses it too).
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.config import WEIGHT_INITS, LoraConfig
from lorakit.layers.base import init_lora_pair
from lorakit.layers.replacing import ReplacingLayer


class ParamFactor(nn.Linear):
    """A factor of a parameter adapter (state-dict key ``weight``, as nn.Linear): calling it with a
    dtype returns its weight in that dtype, so that the call runs its hooks."""

    def forward(self, dtype: torch.dtype) -> torch.Tensor:  # type: ignore[override]
        return self.weight.to(dtype)


class ParamWrapper(ReplacingLayer):
    """LoRA wrapper of one ``nn.Parameter`` (``parameter_name``) of the module it wraps."""

    def __init__(self, base_layer: nn.Module, parameter_name: str) -> None:
        super().__init__(base_layer)
        self.parameter_name = parameter_name
        real = self.real_module()
        param = getattr(real, parameter_name, None)
        if not isinstance(param, nn.Parameter) or param.dim() not in (2, 3):
            shape = None if param is None else tuple(param.shape)
            raise ValueError(f"target_parameters: {type(real).__name__}.{parameter_name} must be a 2-D or 3-D "
                             f"nn.Parameter, got {type(param).__name__} of shape {shape}")
        if param.dim() == 3:
            experts, d1, d2 = param.shape
            transposed = bool(getattr(real, "is_transposed", False))
            self.in_features, self.out_features = (d1, d2) if transposed else (d2, d1)
            self.out_in = not transposed  # W[e] is (out, in)
        else:
            experts, (self.out_features, self.in_features), self.out_in = 1, param.shape, True
        self.num_experts = experts
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def real_module(self) -> nn.Module:
        """The module that holds the parameter (inside any nested wrappers)."""
        module = self.base_layer
        while isinstance(module, ParamWrapper):
            module = module.base_layer
        return module

    def base_weight(self) -> torch.Tensor:
        return getattr(self.real_module(), self.parameter_name)

    def weight_owner(self) -> tuple[nn.Module, str]:
        return self.real_module(), self.parameter_name

    def release(self) -> nn.Module:
        """The module holding the parameter, without this or any nested wrapper."""
        return self.real_module()

    def config_key(self, path: str) -> str:
        """The name PEFT matches rank/alpha patterns against: ``<module>.<parameter>``."""
        return f"{path.replace('.base_layer', '')}.{self.parameter_name}"

    # ------------------------------------------------------------------ adapters
    def _create(self, name: str, r: int, cfg: LoraConfig) -> None:
        for field, bad in (("lora_dropout", cfg.lora_dropout > 0), ("use_dora", cfg.use_dora),
                           ("lora_bias", cfg.lora_bias), ("fan_in_fan_out", cfg.fan_in_fan_out)):
            if bad:
                raise ValueError(f"target_parameters does not work with {field}={getattr(cfg, field)!r} (as in PEFT: "
                                 "the update acts on a weight, not on an input); set it to its default")
        if cfg.init_lora_weights in WEIGHT_INITS:
            raise ValueError(f"init_lora_weights={cfg.init_lora_weights!r} is not supported with target_parameters")
        self.lora_A[name] = ParamFactor(self.in_features, r * self.num_experts, bias=False)
        self.lora_B[name] = ParamFactor(r * self.num_experts, self.out_features, bias=False)

    def _init(self, name: str, cfg: LoraConfig) -> None:
        init_lora_pair(self.lora_A[name].weight, self.lora_B[name].weight, cfg.init_lora_weights, self.r[name])

    # ------------------------------------------------------------------ maths
    def _factors(self, A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(lhs, rhs) per expert with ``ΔW[e] = s·lhs[e]·rhs[e]`` in W's layout: (E, d1, r), (E, r, d2)."""
        E = self.num_experts
        A3 = A.reshape(E, -1, A.shape[-1])  # (E, r, in)
        B3 = B.reshape(B.shape[0], -1, E).permute(2, 0, 1)  # (E, out, r)
        return (B3, A3) if self.out_in else (A3.transpose(1, 2), B3.transpose(1, 2))

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW in the parameter's shape."""
        lhs, rhs = self._factors(self.lora_A[name].weight, self.lora_B[name].weight)
        delta = torch.bmm(lhs, rhs) * self.scaling[name]  # (E, d1, d2)
        return delta[0] if self.num_experts == 1 and self.base_weight().dim() == 2 else delta

    def adapted_weight(self, names: list[str]) -> torch.Tensor:
        """``W + Σ ΔW`` over ``names``, in W's dtype, the factors called (their hooks run)."""
        weight = self.base_weight()
        dtype = self.lora_A[names[0]].weight.dtype if self.peft_numerics else weight.dtype
        w3 = weight if weight.dim() == 3 else weight.unsqueeze(0)  # (E, d1, d2)
        out = w3.to(dtype)
        for name in names:
            lhs, rhs = self._factors(self.lora_A[name](dtype), self.lora_B[name](dtype))
            out = torch.baddbmm(out, lhs, rhs, alpha=self.scaling[name])  # (E, d1, d2)
        out = out.to(weight.dtype)
        return out if weight.dim() == 3 else out[0]

    def _param_path(self) -> str:
        """The parameter's name relative to ``base_layer`` (through nested wrappers)."""
        depth, module = 0, self.base_layer
        while isinstance(module, ParamWrapper):
            depth, module = depth + 1, module.base_layer
        return "base_layer." * depth + self.parameter_name

    def _call(self, names: list[str], x: torch.Tensor, *args, **kwargs):
        new = {self._param_path(): self.adapted_weight(names)}
        return torch.func.functional_call(self.base_layer, new, (x, *args), kwargs)

    # ------------------------------------------------------------------ forward
    @property
    def no_split(self) -> str:  # type: ignore[override]
        owner = type(self.real_module()).__name__
        return (f"{owner}.{self.parameter_name} (target_parameters): the module is called with more than one input "
                "or with rows off dimension 0")

    def _add_term(self, x: torch.Tensor, name: str, result: torch.Tensor) -> torch.Tensor:
        """Not additive: the output computed with ``W + ΔW_name`` replaces ``result`` (the mixed-batch
        reference loop calls this per group of rows)."""
        return self._call([name], x)

    def extra_repr(self) -> str:
        return f"parameter_name={self.parameter_name!r}, experts={self.num_experts}, " + super().extra_repr()
