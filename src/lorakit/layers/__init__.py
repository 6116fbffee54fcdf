"""LoRA wrappers around existing layers, and the dispatch from a module to its wrapper."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Union

from torch import nn

from lorakit.layers.base import LoraLayer
from lorakit.layers.conv import CONV_TYPES, Conv
from lorakit.layers.embedding import Embedding
from lorakit.layers.linear import Linear, is_conv1d
from lorakit.layers.mha import MultiheadAttention
from lorakit.layers.param import ParamWrapper
from lorakit.layers.quant_formats import check_quantized, quant_format, unsupported_quantization
from lorakit.layers.quantized import QuantizedLinear
from lorakit.layers.routing import BASE_ROW
from lorakit.layers.saved import ModulesToSave
from lorakit.layers.tokens import TokensWrapper, TrainableTokens

Wrapper = Union[LoraLayer, ModulesToSave]

__all__ = ["BASE_ROW", "LoraLayer", "ModulesToSave", "Wrapper", "Linear", "Embedding", "Conv", "MultiheadAttention",
           "QuantizedLinear", "ParamWrapper", "TrainableTokens", "TokensWrapper", "wrap", "is_supported",
           "is_linear_like", "wrappers", "check_quantized", "unsupported_quantization"]


def wrappers(model: nn.Module) -> Iterator[tuple[str, Wrapper]]:
    """Every lorakit wrapper in ``model`` with its path (nested ones too, e.g. an attention's out_proj)."""
    for name, module in model.named_modules():
        if isinstance(module, (LoraLayer, ModulesToSave)):
            yield name, module


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear (and subclasses) or transformers' GPT-2 Conv1D."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def is_supported(module: nn.Module) -> bool:
    if unsupported_quantization(module) is not None:
        return False
    return (is_linear_like(module) or isinstance(module, (nn.Embedding, nn.MultiheadAttention, *CONV_TYPES))
            or isinstance(module, LoraLayer))


def wrap(module: nn.Module, fan_in_fan_out: bool = False) -> LoraLayer:
    """A new LoRA wrapper around ``module`` (no adapters yet).

    Raises:
        TypeError: the module's type has no LoRA wrapper (a quantized layer: which quantization).
    """
    fmt = quant_format(module)  # before Linear: bitsandbytes' Linear4bit subclasses nn.Linear
    if fmt is not None:
        return QuantizedLinear(module, fmt)
    check_quantized(type(module).__name__, module)
    if isinstance(module, nn.MultiheadAttention):
        return MultiheadAttention(module)
    if is_linear_like(module):
        return Linear(module, fan_in_fan_out=fan_in_fan_out)
    if isinstance(module, nn.Embedding):
        return Embedding(module)
    if isinstance(module, CONV_TYPES):
        return Conv(module)
    raise TypeError(f"lorakit cannot adapt a {type(module).__name__}; supported: nn.Linear, transformers Conv1D, "
                    "nn.Embedding, nn.Conv1d/2d/3d, nn.MultiheadAttention, bitsandbytes Linear4bit/Linear8bitLt, "
                    "nn.Linear with a torchao NF4 weight")
