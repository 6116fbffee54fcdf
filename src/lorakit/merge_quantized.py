"""Model-level merging for quantized bases (used by ``lorakit.merge``; see layers/quantized.py).

``merge_and_unload`` / ``save_merged`` of a model with quantized adapted layers do not re-quantize:
each such layer becomes a plain ``nn.Linear`` holding ``deq(W) + ΔW`` and ``b + scaling·b_lora``
(summed in fp32, one layer at a time, so no fp32 copy of the whole model exists), stored in the
compute dtype (bf16 for the usual QLoRA load); the model's other floating parameters (norms and
head upcast for k-bit training, embeddings) are cast to the same dtype and a Hugging Face model
loses its quantization config, so ``save_pretrained`` writes an ordinary model of the base
architecture.

The replacement is split for an all-or-nothing ``merge_and_unload``: :func:`plan_dequantize`
checks every refusal and changes nothing; :func:`apply_dequantize` carries the plan out.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from lorakit.layers import LoraLayer, ModulesToSave, unsupported_quantization, wrappers
from lorakit.layers.quant_formats import QuantFormat, quant_format
from lorakit.layers.quantized import QuantizedLinear, plain_linear, unmerge_refusal
from lorakit.transaction import Transaction, transaction


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


@dataclasses.dataclass
class DequantizePlan:
    """What :func:`apply_dequantize` will do, all checked: replace ``adapted`` (quantized LoRA
    layers, by :meth:`QuantizedLinear.merged_linear` of ``names``) and ``bare`` (quantized layers
    no adapter holds, by their dequantized copy) with plain ``nn.Linear`` layers in ``dtype``."""

    dtype: torch.dtype | None
    names: list[str]
    adapted: list[tuple[str, QuantizedLinear]]
    bare: list[tuple[str, nn.Module, QuantFormat]]


def plan_dequantize(model: nn.Module, names: Sequence[str], safe_merge: bool,
                    dtype: torch.dtype | None) -> DequantizePlan:
    """Check everything the dequantizing merge and the merge after it would refuse, before any layer
    is replaced; changes nothing.

    Checked for every adapted layer, quantized or not, and each adapter of ``names`` not merged
    into it yet: ``merge_refusal`` (a ``lora_bias`` without a base bias, a grouped convolution...)
    and, with ``safe_merge``, finite merged weights; for every quantized layer: that its weight can
    be read (a bitsandbytes CPU-repacked weight whose way back does not verify is refused).

    Args:
        names: the adapters to merge (already validated).
        dtype: the dequantized layers' dtype; default: the first quantized layer's compute dtype.

    Raises:
        ValueError: a refused merge, a non-finite merged weight, or an unreadable quantized weight;
            the message ends "No weight was changed." (nothing was).
    """
    names = list(names)
    adapted = quantized_layers(model)
    bare = [(n, m, quant_format(m)) for n, m in bare_quantized(model)]
    for path, layer in wrappers(model):
        if not isinstance(layer, LoraLayer):
            continue
        for name in names:
            if name not in layer.r or name in layer.merged_adapters:
                continue
            refusal = layer.merge_refusal(name)
            if refusal is not None:
                raise ValueError(f"{refusal} ({path!r}). No weight was changed.")
            if safe_merge and not layer.merged_weight_is_finite(name):
                raise ValueError(f"merging adapter {name!r} gives non-finite weights in {path!r}; the adapter is "
                                 "broken. No weight was changed.")
    for path, module, fmt in bare:
        try:
            fmt.check_readable(module)
        except ValueError as e:
            raise ValueError(f"{path!r}: {e}. No weight was changed.") from None
    if (adapted or bare) and dtype is None:
        base, fmt = (adapted[0][1].base_layer, adapted[0][1].quant) if adapted else (bare[0][1], bare[0][2])
        dtype = fmt.compute_dtype(base)
    return DequantizePlan(dtype if adapted or bare else None, names, adapted, bare)


def apply_dequantize(model: nn.Module, plan: DequantizePlan, txn: Transaction | None = None) -> torch.dtype | None:
    """Carry out a checked :class:`DequantizePlan`, one layer at a time (so no fp32 copy of the
    whole model exists): the result holds no quantized weight, so it can be saved as a plain model.
    Each replacement is journaled in ``txn`` (a failure puts the quantized layers back).

    Returns:
        The dtype used, or ``None`` if the model has no quantized layer lorakit knows (nothing changed).
    """
    with transaction(model, txn) as t:
        for path, layer in plan.adapted:
            t.replace(path, layer.merged_linear(plan.names, plan.dtype), lambda layer=layer: layer)
        for path, module, fmt in plan.bare:
            t.replace(path, plain_linear(module, fmt.dequantize(module), plan.dtype), lambda module=module: module)
    return plan.dtype


def dequantizing_merge(model: nn.Module, names: Sequence[str], safe_merge: bool,
                       dtype: torch.dtype | None) -> torch.dtype | None:
    """:func:`plan_dequantize` then :func:`apply_dequantize`: every check before any replacement.

    Raises:
        ValueError: see :func:`plan_dequantize`; nothing was changed.
    """
    return apply_dequantize(model, plan_dequantize(model, names, safe_merge, dtype))


def finish_dequantized(model: nn.Module, dtype: torch.dtype, txn: Transaction | None = None) -> nn.Module:
    """Cast the floating parameters to ``dtype`` and drop a Hugging Face model's quantization
    metadata (as transformers' own ``dequantize`` does), so it saves and reloads as a plain model.
    A quantized layer lorakit cannot dequantize (GPTQ, AWQ... that no adapter targets) keeps the
    metadata, with a warning. Journaled in ``txn`` (the old tensors and attributes, by reference)."""
    with transaction(model, txn) as t:
        _finish(model, dtype, t)
    return model


def _finish(model: nn.Module, dtype: torch.dtype, txn: Transaction) -> None:
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            txn.on_undo(lambda p=p, old=p.data: setattr(p, "data", old))
            p.data = p.data.to(dtype)
    config = getattr(model, "config", None)
    kept = {k: model.__dict__[k] for k in ("hf_quantizer", "is_loaded_in_4bit", "is_loaded_in_8bit", "is_quantized",
                                           "quantization_method") if k in model.__dict__}
    config_dict = dict(config.__dict__) if config is not None else None

    def restore() -> None:
        model.__dict__.update(kept)
        if config is not None:
            config.__dict__.clear()
            config.__dict__.update(config_dict)

    txn.on_undo(restore)
    left = [n for n, m in model.named_modules() if unsupported_quantization(m) is not None]
    if left:
        warnings.warn(f"{left[:3]} stay quantized ({unsupported_quantization(model.get_submodule(left[0]))}): "
                      "lorakit cannot dequantize them, so the model keeps its quantization config", stacklevel=4)
        return
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
