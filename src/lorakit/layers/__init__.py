"""LoRA wrappers around existing layers, and the dispatch from a module to its wrapper.

Importing this package loads every layer file, and so registers every layer kind
(:mod:`lorakit.layers.registry`); :func:`wrap` and :func:`is_supported` read the registry only.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from lorakit.layers.base import LoraLayer
from lorakit.layers.conv import Conv
from lorakit.layers.embedding import Embedding
from lorakit.layers.linear import Linear
from lorakit.layers.mha import MultiheadAttention
from lorakit.layers.modules_to_save import ModulesToSave
from lorakit.layers.param import ParamWrapper
from lorakit.layers.protocol import AdapterLayer
from lorakit.layers.quant_formats import check_quantized, unsupported_quantization
from lorakit.layers.quantized import QuantizedLinear
from lorakit.layers.registry import kind_of, supported_names
from lorakit.layers.routing import BASE_ROW
from lorakit.layers.tokens import TokensWrapper, TrainableTokens

Wrapper = AdapterLayer  # LoraLayer (every kind) or ModulesToSave

__all__ = ["AdapterLayer", "BASE_ROW", "LoraLayer", "ModulesToSave", "Wrapper", "Linear", "Embedding", "Conv",
           "MultiheadAttention", "QuantizedLinear", "ParamWrapper", "TrainableTokens", "TokensWrapper", "wrap",
           "is_supported", "is_linear_like", "wrappers", "check_quantized", "unsupported_quantization"]


def wrappers(model: nn.Module) -> Iterator[tuple[str, Wrapper]]:
    """Every lorakit wrapper in ``model`` with its path (nested ones too, e.g. an attention's out_proj)."""
    for name, module in model.named_modules():
        if isinstance(module, (LoraLayer, ModulesToSave)):
            yield name, module


def is_linear_like(module: nn.Module) -> bool:
    """A linear kind (``"all-linear"``): nn.Linear and subclasses, GPT-2's Conv1D, quantized Linears."""
    kind = kind_of(module)
    return kind is not None and kind.linear


def is_supported(module: nn.Module) -> bool:
    """Can a LoRA wrapper be put around ``module`` (or is it one already)?"""
    if unsupported_quantization(module) is not None:
        return False
    return kind_of(module) is not None or isinstance(module, LoraLayer)


def wrap(module: nn.Module, fan_in_fan_out: bool = False) -> LoraLayer:
    """A new LoRA wrapper around ``module`` (no adapters yet), of its registered kind.

    Raises:
        TypeError: the module's type has no LoRA wrapper (a quantized layer: which quantization).
    """
    check_quantized(type(module).__name__, module)  # a recognised quantization lorakit refuses: say which
    kind = kind_of(module)
    if kind is None:
        raise TypeError(f"lorakit cannot adapt a {type(module).__name__}; supported: {supported_names()}")
    return kind.build(module, fan_in_fan_out=fan_in_fan_out)
