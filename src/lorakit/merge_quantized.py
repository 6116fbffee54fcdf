"""Model-level merging for quantized bases (used by ``lorakit.merge``; see layers/quantized.py).

``merge_and_unload`` / ``save_merged`` of a model with quantized adapted layers do not re-quantize:
each such layer becomes a plain ``nn.Linear`` holding ``deq(W) + ΔW`` (summed in fp32, one layer
at a time, so no fp32 copy of the whole model exists), stored in the compute dtype (bf16 for the
usual QLoRA load); the model's other floating parameters (norms and head upcast for k-bit
training, embeddings) are cast to the same dtype and a Hugging Face model loses its quantization
config, so ``save_pretrained`` writes an ordinary model of the base architecture.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn

from lorakit.layers import LoraLayer, ModulesToSave, unsupported_quantization, wrappers
from lorakit.layers.quant_formats import quant_format
from lorakit.layers.quantized import QuantizedLinear, plain_linear, unmerge_refusal
from lorakit.transaction import set_submodule


def quantized_layers(model: nn.Module) -> list[tuple[str, QuantizedLinear]]:
    return [(p, w) for p, w in wrappers(model) if isinstance(w, QuantizedLinear)]


def bare_quantized(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Quantized layers of a supported format that no lorakit wrapper holds."""
    found, inside = [], []
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in inside):
            continue
        if isinstance(module, (LoraLayer, ModulesToSave)):
            inside.append(name + ".")
        elif quant_format(module) is not None:
            found.append((name, module))
    return found


def refuse_inexact_unmerge(model: nn.Module) -> None:
    """Raise before anything changes if an adapter was merged into a re-quantized weight.

    Raises:
        ValueError: naming the layer, its format and the measured rounding error.
    """
    for path, layer in quantized_layers(model):
        if layer.merged_adapters:
            raise ValueError(unmerge_refusal(layer, path))


def dequantizing_merge(model: nn.Module, names: Sequence[str], safe_merge: bool,
                       dtype: torch.dtype | None) -> torch.dtype | None:
    """Replace every quantized adapted layer by its dequantized merge (:meth:`QuantizedLinear.merged_linear`),
    and every quantized layer no adapter touches by its dequantized copy: the result holds no
    quantized weight, so it can be saved as a plain model.

    Args:
        names: the adapters to merge (already validated).
        safe_merge: first check every adapted layer (quantized or not) for non-finite merged weights.
        dtype: the dequantized layers' dtype; default: the first quantized layer's compute dtype.

    Returns:
        The dtype used, or ``None`` if the model has no quantized layer lorakit knows (nothing changed).

    Raises:
        ValueError: (safe_merge) a merged weight would be non-finite; nothing was changed.
    """
    layers = quantized_layers(model)
    bare = [(n, m, quant_format(m)) for n, m in bare_quantized(model)]
    if not layers and not bare:
        return None
    if dtype is None:
        base, fmt = (layers[0][1].base_layer, layers[0][1].quant) if layers else (bare[0][1], bare[0][2])
        dtype = fmt.compute_dtype(base)
    if safe_merge:
        for path, layer in wrappers(model):
            if not isinstance(layer, LoraLayer):
                continue
            for name in names:
                if name in layer.r and name not in layer.merged_adapters and not layer.merged_weight_is_finite(name):
                    raise ValueError(f"merging adapter {name!r} gives non-finite weights in {path!r}; the adapter is "
                                     "broken. No weight was changed.")
    for path, layer in layers:
        set_submodule(model, path, layer.merged_linear(names, dtype))
    for path, module, fmt in bare:
        set_submodule(model, path, plain_linear(module, fmt.dequantize(module), dtype))
    return dtype


def finish_dequantized(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast the floating parameters to ``dtype`` and drop a Hugging Face model's quantization
    metadata (as transformers' own ``dequantize`` does), so it saves and reloads as a plain model.
    A quantized layer lorakit cannot dequantize (GPTQ, AWQ... that no adapter targets) keeps the
    metadata, with a warning."""
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
    left = [n for n, m in model.named_modules() if unsupported_quantization(m) is not None]
    if left:
        warnings.warn(f"{left[:3]} stay quantized ({unsupported_quantization(model.get_submodule(left[0]))}): "
                      "lorakit cannot dequantize them, so the model keeps its quantization config", stacklevel=3)
        return model
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    config = getattr(model, "config", None)
    if config is not None:
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        if hasattr(config, "dtype"):
            config.dtype = dtype
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit", "is_quantized"):
        if getattr(model, flag, False):
            setattr(model, flag, False)
    return model
