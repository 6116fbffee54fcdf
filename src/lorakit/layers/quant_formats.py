"""The quantized weight formats lorakit can put LoRA on, and the ones it recognises but refuses.

Supported (each a :class:`QuantFormat`: dequantize, re-quantize, compute dtype):

* bitsandbytes ``Linear4bit`` (and ``LinearNF4`` / ``LinearFP4``): NF4 or FP4 codes in blocks of 64
  with an absmax per block, optionally double-quantized (the absmaxes themselves 8-bit);
  ``W ≈ code[q] · absmax_block``.
* bitsandbytes ``Linear8bitLt`` (LLM.int8()): int8 rows with one scale per row,
  ``W ≈ CB · SCB / 127``.
* an ``nn.Linear`` whose weight is a torchao ``NF4Tensor`` (torchtune's QLoRA base).

Detection is by class name, so ``import lorakit`` never imports bitsandbytes or torchao; their
functions are imported when a format is used. Other quantized layers (GPTQ, AWQ, HQQ, EETQ, AQLM,
quanto, torchao's other tensor subclasses, FP8 ...) are recognised by their module or class name
and refused with a message naming the module, its type and what is supported.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from lorakit.layers.bnb_cpu_packing import is_packed, unpack

SUPPORTED = ("bitsandbytes Linear4bit (nf4/fp4, with or without double quantization), bitsandbytes "
             "Linear8bitLt, and nn.Linear with a torchao NF4Tensor weight")


class QuantFormat:
    """How one kind of quantized Linear stores W (out, in): the interface the LoRA wrapper uses."""

    name = "quantized"

    def describe(self, layer: nn.Module) -> str:
        """A short human name, e.g. ``"bitsandbytes 4-bit nf4 (double quant)"``."""
        return self.name

    def hold(self, layer: nn.Module) -> dict[str, Any]:
        """Keep the layer's stored bytes as they are while it is wrapped; returns the layer
        attributes to set back when it is released."""
        return {}

    def dequantize(self, layer: nn.Module) -> torch.Tensor:
        """The weight W the layer computes with, as an fp32 (out, in) tensor on the layer's device."""
        raise NotImplementedError  # pragma: no cover - every format overrides it

    def requantize(self, layer: nn.Module, w: torch.Tensor) -> None:
        """Replace the layer's stored weight by the quantization of ``w`` (fp32, (out, in))."""
        raise NotImplementedError  # pragma: no cover - every format overrides it

    def check_readable(self, layer: nn.Module) -> None:
        """Raise ValueError now if :meth:`dequantize` would (a check before a model changes)."""

    def compute_dtype(self, layer: nn.Module) -> torch.dtype:
        """The float dtype the layer computes in; a merged (dequantized) copy is stored in it."""
        return torch.bfloat16

    def storage(self, layer: nn.Module) -> list[torch.Tensor]:
        """The tensors holding the quantized weight and its statistics (bias excluded)."""
        raise NotImplementedError  # pragma: no cover - every format overrides it


class Bnb4bit(QuantFormat):
    """bitsandbytes ``Params4bit`` weights: packed 4-bit codes plus a ``QuantState``."""

    name = "bitsandbytes 4-bit"

    @staticmethod
    def _state(layer: nn.Module):
        w = layer.weight
        qs = getattr(w, "quant_state", None) or getattr(layer, "quant_state", None)
        if qs is None:
            raise ValueError(f"{type(layer).__name__} is not quantized yet (its weight has no quant_state); move it to "
                             "a device (.to('cpu') or .cuda()) so bitsandbytes quantizes it before adding LoRA")
        return w, qs

    def hold(self, layer: nn.Module) -> dict[str, Any]:
        """bitsandbytes ≥ 0.48 repacks a 4-bit weight in place at its first CPU inference forward
        on AVX512-BF16 machines (absmax rounded to bf16; undone, with the double-quantized absmax
        re-quantized, at every ``state_dict()``; and failing when in_features is not a multiple of 64). While
        wrapped, that repacking is off: the bytes stay those loaded, deq(W) is what the forward
        uses, and merges are exact references. A weight repacked before wrapping is first brought
        back to the standard layout by :func:`lorakit.layers.bnb_cpu_packing.unpack`, which checks
        the way back (bitsandbytes' own inverse is wrong for a plain absmax and in_features > 64).

        Raises:
            ValueError: a repacked weight that no inverse reproduces; the layer is left as it was.
        """
        w, qs = self._state(layer)
        if is_packed(qs):
            w.data, w.quant_state = unpack(w.data, qs, _named(layer))
            if getattr(layer, "quant_state", None) is not None:
                layer.quant_state = w.quant_state
        flag = getattr(layer, "support_avx512bf16_for_cpu", None)
        if not flag:
            return {}
        layer.support_avx512bf16_for_cpu = False
        return {"support_avx512bf16_for_cpu": flag}

    def check_readable(self, layer: nn.Module) -> None:
        """A CPU-repacked weight must have a verified way back (:func:`unpack`, on copies)."""
        w, qs = self._state(layer)
        if is_packed(qs):
            unpack(w.data, qs, _named(layer))

    def describe(self, layer: nn.Module) -> str:
        w, qs = self._state(layer)
        nested = getattr(qs, "nested", False) or getattr(qs, "original_nested", False)
        return f"bitsandbytes 4-bit {qs.quant_type}" + (" (double quant)" if nested else "")

    def dequantize(self, layer: nn.Module) -> torch.Tensor:
        """``bitsandbytes.functional.dequantize_4bit`` (a weight in bitsandbytes' CPU-packed
        layout, see :meth:`hold`, is unpacked first, verified, on copies: the layer is left as it is).

        Raises:
            ValueError: a repacked weight that no inverse reproduces (see :meth:`hold`).
        """
        import bitsandbytes.functional as bf

        w, qs = self._state(layer)
        data = w.data
        if is_packed(qs):
            data, qs = unpack(data, qs, _named(layer))
        return bf.dequantize_4bit(data, qs).to(torch.float32)  # (out, in)

    def requantize(self, layer: nn.Module, w: torch.Tensor) -> None:
        import bitsandbytes as bnb

        old, qs = self._state(layer)
        dtype = getattr(qs, "original_dtype", None) if is_packed(qs) else qs.dtype
        new = bnb.nn.Params4bit(w.to(dtype or torch.float32).contiguous(), requires_grad=False,
                                blocksize=old.blocksize, compress_statistics=old.compress_statistics,
                                quant_type=old.quant_type, quant_storage=old.quant_storage, module=layer)
        layer.weight = new.to(w.device)  # quantizes (bitsandbytes does it on .to(device))

    def compute_dtype(self, layer: nn.Module) -> torch.dtype:
        dtype = getattr(layer, "compute_dtype", None)
        return dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.bfloat16

    def storage(self, layer: nn.Module) -> list[torch.Tensor]:
        w, qs = self._state(layer)
        state2 = getattr(qs, "state2", None)
        parts = [w.data, qs.absmax, qs.code, getattr(qs, "offset", None), getattr(state2, "absmax", None),
                 getattr(state2, "code", None)]
        return [t for t in parts if isinstance(t, torch.Tensor)]


class Bnb8bit(QuantFormat):
    """bitsandbytes ``Int8Params``: int8 rows ``CB`` and per-row scales ``SCB`` (LLM.int8())."""

    name = "bitsandbytes 8-bit"

    @staticmethod
    def _scales(layer: nn.Module) -> torch.Tensor | None:
        state = getattr(layer, "state", None)
        scb = getattr(state, "SCB", None)
        return scb if scb is not None else getattr(layer.weight, "SCB", None)

    def describe(self, layer: nn.Module) -> str:
        return "bitsandbytes 8-bit (LLM.int8)"

    def dequantize(self, layer: nn.Module) -> torch.Tensor:
        """``W = CB · SCB / 127`` (``bitsandbytes.functional.int8_vectorwise_dequant``); a layer
        kept with fp16 weights (``has_fp16_weights=True``) holds W itself."""
        w = layer.weight
        if w.dtype != torch.int8:
            return w.detach().to(torch.float32)
        import bitsandbytes.functional as bf

        scb = self._scales(layer)
        if scb is None:
            raise ValueError(f"{type(layer).__name__} holds int8 weights without row scales (SCB); it cannot be "
                             "dequantized")
        return bf.int8_vectorwise_dequant(w.data, scb.to(w.device)).to(torch.float32)  # (out, in)

    def requantize(self, layer: nn.Module, w: torch.Tensor) -> None:
        import bitsandbytes as bnb

        old = layer.weight
        if old.dtype != torch.int8:
            with torch.no_grad():
                old.copy_(w.to(old.dtype))
            return
        # Int8Params quantizes when it moves from the CPU to a device (as PEFT does it)
        new = bnb.nn.Int8Params(w.to("cpu"), requires_grad=False, has_fp16_weights=False)
        layer.weight = new.to(old.device)
        layer.state.reset_grads()  # the next forward takes CB / SCB from the new weight

    def storage(self, layer: nn.Module) -> list[torch.Tensor]:
        return [t for t in (layer.weight.data, self._scales(layer)) if isinstance(t, torch.Tensor)]


class TorchaoNF4(QuantFormat):
    """A torchao ``NF4Tensor`` weight (NF4 codes, blockwise scalers, double-quantized)."""

    name = "torchao NF4"

    def describe(self, layer: nn.Module) -> str:
        w = layer.weight
        return f"torchao NF4 (block {w.block_size}, scaler block {w.scaler_block_size})"

    def dequantize(self, layer: nn.Module) -> torch.Tensor:
        return layer.weight.get_original_weight().to(torch.float32)  # (out, in)

    def requantize(self, layer: nn.Module, w: torch.Tensor) -> None:
        from torchao.quantization import to_nf4  # torchao >= 0.18 (before: torchao.dtypes.nf4tensor)

        old = layer.weight
        new = to_nf4(w.to(old.dtype), old.block_size, old.scaler_block_size)
        layer.weight = nn.Parameter(new, requires_grad=False)

    def compute_dtype(self, layer: nn.Module) -> torch.dtype:
        return layer.weight.dtype  # NF4Tensor reports the dtype it was quantized from

    def storage(self, layer: nn.Module) -> list[torch.Tensor]:
        w = layer.weight
        return [getattr(w, k) for k in w.__tensor_flatten__()[0]]


def _named(layer: nn.Module) -> str:
    return f"{type(layer).__name__}({getattr(layer, 'in_features', '?')}, {getattr(layer, 'out_features', '?')})"


def _weight(module: nn.Module):
    return module.__dict__.get("_parameters", {}).get("weight")


def quant_format(module: nn.Module) -> QuantFormat | None:
    """The supported quantized format of ``module``, or ``None`` for a plain (or unsupported) layer."""
    if not isinstance(module, nn.Linear):
        return None
    w = _weight(module)
    kind = type(w).__name__
    if kind == "Params4bit":
        return Bnb4bit()
    if kind == "Int8Params":
        return Bnb8bit()
    if kind == "NF4Tensor" and type(w).__module__.startswith("torchao"):
        return TorchaoNF4()
    return None


# (pattern on "<module path>.<class name>", lower case) -> the scheme's name, for the error message
_UNSUPPORTED = [
    (r"gptq|exllama|marlin|quantlinear", "GPTQ (or its Marlin/ExLlama kernels)"),
    (r"awq|wqlinear", "AWQ"),
    (r"hqq", "HQQ"),
    (r"eetq", "EETQ"),
    (r"aqlm", "AQLM"),
    (r"quanto", "optimum-quanto"),
    (r"vptq", "VPTQ"),
    (r"higgs", "HIGGS"),
    (r"bitnet|bitlinear", "BitNet"),
    (r"spqr", "SpQR"),
    (r"compressed_tensors|compressedlinear", "compressed-tensors"),
    (r"fp8linear|fbgemm|finegrained_fp8", "FP8"),
    (r"bitsandbytes.*(4bit|8bit|int8|fp4|nf4)", "bitsandbytes"),
]


def unsupported_quantization(module: nn.Module) -> str | None:
    """A description of the quantization of ``module`` if it is a quantized layer lorakit cannot
    adapt (e.g. ``"GPTQ (auto_gptq...QuantLinear)"``), else ``None``."""
    if quant_format(module) is not None:
        return None
    cls = type(module)
    where = f"{cls.__module__}.{cls.__qualname__}"
    w = _weight(module)
    if isinstance(w, torch.Tensor):
        wcls = type(w)  # a tensor subclass stays its own type inside nn.Parameter
        if wcls not in (torch.Tensor, nn.Parameter) and wcls.__module__.startswith("torchao"):
            return f"torchao {wcls.__name__} weight"
        if isinstance(module, nn.Linear) and not w.is_floating_point():
            return f"a {w.dtype} weight (an unknown quantization)"
        if isinstance(module, nn.Linear) and w.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            return f"an {w.dtype} weight (FP8)"
    if cls.__module__.startswith(("torch.nn", "transformers.models", "transformers.pytorch_utils", "lorakit.")):
        return None
    key = where.lower()
    for pattern, scheme in _UNSUPPORTED:
        if re.search(pattern, key):
            return f"{scheme} ({where})"
    return None


def check_quantized(name: str, module: nn.Module) -> None:
    """Raise for a quantized layer lorakit cannot adapt.

    Raises:
        TypeError: naming the module, its type and quantization, and what is supported.
    """
    what = unsupported_quantization(module)
    if what is not None:
        raise TypeError(f"module {name!r} is a {type(module).__name__} quantized with {what}, which lorakit cannot "
                        f"adapt. Supported quantized layers: {SUPPORTED}. Load the base with "
                        "transformers' BitsAndBytesConfig (lorakit train --quantize nf4|fp4|int8), or unquantized")
