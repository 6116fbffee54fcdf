"""Houlsby adapters (Houlsby et al., 2019): a residual bottleneck after attention and after the feed-forward.

In every transformer block the output projection of the attention and of the feed-forward is followed by

    a(h) = h + W_up·σ(W_down·h + b_down) + b_up        W_down: m×d, W_up: d×m, m ≪ d

before the block's residual sum and LayerNorm. ``W_up`` and ``b_up`` start at zero, so ``a`` is the
identity and the adapted model computes exactly the base model until training moves them. As in the
paper, the LayerNorms train too (``train_layernorm``). Each adapter adds ``2·d·m + m + d`` parameters and
two small matrix products at inference, which cannot be merged away.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lorakit.inject import replace_module
from lorakit.methods.base import freeze_all_but, head_names, trainable_state

# model_type -> regex (full match) of the sub-layer outputs an adapter follows: attention out, feed-forward out.
HOULSBY_SITES: dict[str, str] = {
    **dict.fromkeys(["bert", "roberta", "xlm-roberta", "electra", "camembert"],
                    r".*layer\.\d+\.(attention\.output|output)\.dense"),
    "distilbert": r".*layer\.\d+\.(attention\.out_proj|ffn\.lin2)",
    "gpt2": r".*h\.\d+\.(attn|mlp)\.c_proj",
    **dict.fromkeys(["llama", "mistral", "qwen2", "gemma"], r".*layers\.\d+\.(self_attn\.o_proj|mlp\.down_proj)"),
}

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh, "silu": nn.SiLU}


class Bottleneck(nn.Module):
    """``h ↦ h + up(σ(down(h)))`` on the last dimension; ``up`` is zero-initialised (the identity at start)."""

    def __init__(self, dim: int, bottleneck: int, activation: str = "gelu") -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r}; valid: {sorted(ACTIVATIONS)}")
        self.down = nn.Linear(dim, bottleneck)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (..., d)
        return h + self.up(self.act(self.down(h)))  # (..., d)


class AdapterAfter(nn.Module):
    """Runs ``base_layer`` and then its bottleneck adapter: ``y = a(base_layer(x))``."""

    def __init__(self, base_layer: nn.Module, adapter: Bottleneck) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter
        self.train(base_layer.training)  # a new module starts in training mode; follow the model's mode

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.adapter(self.base_layer(x, *args, **kwargs))


def _out_features(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    if hasattr(module, "nf"):  # transformers' GPT-2 Conv1D
        return int(module.nf)
    raise TypeError(f"a Houlsby adapter follows a linear layer; got a {type(module).__name__}")


def adapter_sites(model: nn.Module, sites: str | None) -> list[str]:
    """Names of the modules an adapter follows: ``sites`` (regex, full match) or the model type's default.

    Raises:
        ValueError: no default for this model type, or nothing matches.
    """
    if sites is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in HOULSBY_SITES:
            raise ValueError(f"no default adapter sites for model_type={model_type!r} (known: "
                             f"{sorted(HOULSBY_SITES)}); pass sites=<regex of the attention and feed-forward "
                             "output projections>")
        sites = HOULSBY_SITES[model_type]
    found = [n for n, _ in model.named_modules() if re.fullmatch(sites, n)]
    if not found:
        raise ValueError(f"adapter sites {sites!r} match no module of this {type(model).__name__}; module names "
                         f"include {[n for n, _ in model.named_modules()][1:8]}")
    return found


@dataclass
class HoulsbyAdapters:
    """Bottleneck adapters of width ``bottleneck`` after each attention and feed-forward output projection.

    Args:
        bottleneck: the adapter's inner width ``m``.
        activation: the nonlinearity σ (``gelu``, ``relu``, ``tanh``, ``silu``).
        sites: regex (full match) of the projections to follow; default per ``config.model_type``.
        train_layernorm: train every nn.LayerNorm as well, as Houlsby et al. do.
        head: the task head's module names (default: ``classifier`` / ``score``).
    """

    bottleneck: int = 16
    activation: str = "gelu"
    sites: str | None = None
    train_layernorm: bool = True
    head: Sequence[str] | None = None
    name: str = "adapter"
    inference: str = "+2 bottleneck layers per block (extra latency, cannot be merged)"

    def apply(self, model: nn.Module) -> nn.Module:
        if not isinstance(self.bottleneck, int) or self.bottleneck < 1:
            raise ValueError(f"bottleneck must be a positive int, got {self.bottleneck!r}")
        heads = head_names(model, self.head)
        for name in adapter_sites(model, self.sites):
            base = model.get_submodule(name)
            weight = next(base.parameters())
            adapter = Bottleneck(_out_features(base), self.bottleneck, self.activation).to(weight.device)
            replace_module(model, name, AdapterAfter(base, adapter))
        freeze_all_but(model, heads)
        for m in model.modules():
            if isinstance(m, Bottleneck) or (self.train_layernorm and isinstance(m, nn.LayerNorm)):
                for p in m.parameters():
                    p.requires_grad_(True)
        return model

    def stored_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return trainable_state(model)

    def for_inference(self, model: nn.Module) -> nn.Module:
        return model
