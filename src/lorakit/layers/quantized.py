"""LoRA on a quantized Linear (QLoRA, Dettmers et al. 2023): bitsandbytes 4-bit / 8-bit, torchao NF4.

    y = Q(W)·x + b + scaling · B·A·dropout(x)            A: (r, in), B: (out, r)

The base forward is the quantized layer's own (bitsandbytes' ``matmul_4bit`` / ``MatMul8bitLt``,
torchao's ``linear_nf4``): W stays quantized and frozen, its bytes untouched by training. The
factors are fp32 master weights created on the base's device (never in the storage dtype, uint8 /
int8); as for every Linear adapter they are cast to the activation's dtype when called, so with a
bf16 activation (the usual QLoRA load, ``dtype = bnb_4bit_compute_dtype = bf16``) the LoRA term is
computed in bf16, and with fp32 activations (norms upcast for k-bit training) in fp32 — in both
cases the dtype the activation already has, so no activation copy is made. Dropout, rsLoRA,
rank/alpha patterns, DoRA, several adapters, mixed batches and hot swap are the Linear wrapper's.

Merging is lossy, and says so:

* in place (``lorakit.merge``): ``W ← Q(deq(W) + ΔW)`` — dequantize, add ΔW in fp32, re-quantize.
  The rounding error ``Q(W + ΔW) − (W + ΔW)`` is measured and reported (40–64% of ‖ΔW‖ for the
  adapters of the tiny 4-bit test runs); ``unmerge`` is refused, since ``Q(W + ΔW) − ΔW`` is not W.
* ``merged_linear`` (used by ``merge_and_unload`` / ``save_merged``): a plain ``nn.Linear`` in
  the compute dtype holding ``deq(W) + ΔW`` summed in fp32 — exactly the function the adapted
  layer computes, up to that dtype's rounding.
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from lorakit.config import WEIGHT_INITS, LoraConfig
from lorakit.layers.linear import Linear
from lorakit.layers.quant_formats import QuantFormat

# inside ``requantization_report``: where layers record their measured rounding errors
_REPORT: contextvars.ContextVar[list | None] = contextvars.ContextVar("lorakit_requantization_report", default=None)


class QuantizedLinear(Linear):
    """LoRA wrapper of a quantized ``nn.Linear`` (see the module docstring).

    Raises:
        ValueError: (``add_adapter``) an init that writes into W (PiSSA, OLoRA, LoftQ, CorDA, LoRA-GA): W is quantized.
    """

    def __init__(self, base_layer: nn.Module, fmt: QuantFormat) -> None:
        super().__init__(base_layer, fan_in_fan_out=False)
        self.quant = fmt
        self._restore = fmt.hold(base_layer)  # bitsandbytes' in-place CPU repacking off while wrapped
        self._fresh_output = False  # never add in place into a quantized kernel's output
        self.rounding_errors: dict[str, dict[str, float]] = {}  # merged adapter -> measured error

    def add_adapter(self, name: str, r: int, lora_alpha: float, cfg: LoraConfig, *,
                    dtype: torch.dtype | None = None) -> None:
        """As :meth:`LoraLayer.add_adapter`, with float factors: fp32 by default; a non-float
        ``dtype`` (the storage dtype, asked for by ``autocast_adapter_dtype=False``) becomes the
        compute dtype."""
        if cfg.init_lora_weights in WEIGHT_INITS:
            hint = ("LoftQ needs the full-precision W: inject it into the unquantized model (its base then holds "
                    "Q(W'), which quantizes to NF4 exactly)" if cfg.init_lora_weights == "loftq"
                    else "use True or 'gaussian'")
            what = self.quant.describe(self.base_layer)
            raise ValueError(f"init_lora_weights={cfg.init_lora_weights!r} writes the residual W - s·B·A (LoftQ: "
                             f"Q(W')) into the base weight, which is {what} here; {hint}")
        if dtype is None:
            dtype = torch.float32
        elif not dtype.is_floating_point:
            dtype = self.quant.compute_dtype(self.base_layer)
        super().add_adapter(name, r, lora_alpha, cfg, dtype=dtype)

    def release(self) -> nn.Module:
        for attr, value in self._restore.items():
            setattr(self.base_layer, attr, value)
        return self.base_layer

    # ------------------------------------------------------------------ the weight
    def dequantized(self) -> torch.Tensor:
        """deq(W): the base weight the layer computes with, fp32 (out, in)."""
        return self.quant.dequantize(self.base_layer)

    def _weight_out_in(self) -> torch.Tensor:
        return self.dequantized()  # DoRA's row norms need W itself

    def unmerged_base_weight(self) -> torch.Tensor:
        w = self.dequantized()
        for name in reversed(self.merged_adapters):  # approximate: merged ones were re-quantized
            w = self._unmerged_weight(w, name, keep_cache=True)
        return w

    def merged_weight_is_finite(self, name: str) -> bool:
        with torch.no_grad():
            ok = bool(torch.isfinite(self._merged_weight(self.dequantized(), name)).all())
        self.merge_cache.pop(name)
        return ok

    # ------------------------------------------------------------------ merging
    def merge(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        """``W ← Q(deq(W) + ΔW)`` per adapter, ΔW added in fp32; the rounding error is measured
        (``rounding_errors``) and reported (see :func:`requantization_report`).

        Raises:
            ValueError: with ``safe_merge``, if the merged weight would hold NaN or inf.
        """
        names = self.active_adapters if adapter_names is None else adapter_names
        for name in names:
            if name not in self.r or name in self.merged_adapters:
                continue
            with torch.no_grad():
                w = self.dequantized()  # (out, in) fp32
                new = self._merged_weight(w, name)
                if safe_merge and not torch.isfinite(new).all():
                    self.merge_cache.pop(name)
                    raise ValueError(f"merging adapter {name!r} into {type(self.base_layer).__name__} gives "
                                     "non-finite weights; the adapter is broken. The base weights were left unchanged.")
                self.quant.requantize(self.base_layer, new)
                error = self.dequantized() - new  # (out, in)
                delta = new - w
            self.rounding_errors[name] = {"max_abs_error": float(error.abs().max()),
                                          "error_over_delta": float(error.norm() / delta.norm().clamp_min(1e-30)),
                                          "max_abs_delta": float(delta.abs().max())}
            self.merged_adapters.append(name)
            _record(self, name)

    def unmerge(self) -> None:
        """Refused: a merge re-quantized W, so ``Q(W + ΔW) − ΔW`` is not W.

        Raises:
            ValueError: an adapter is merged into this layer.
        """
        if self.merged_adapters:
            raise ValueError(unmerge_refusal(self))

    def merged_linear(self, adapter_names: Sequence[str], dtype: torch.dtype) -> nn.Linear:
        """A plain ``nn.Linear`` (in ``dtype``, frozen) computing ``deq(W) + Σ ΔW`` over the
        adapters in ``adapter_names`` not merged yet, summed in fp32: the dequantized merge."""
        with torch.no_grad():
            w = self.dequantized()  # (out, in) fp32
            for name in adapter_names:
                if name in self.r and name not in self.merged_adapters:
                    w = self._merged_weight(w, name)
                    self.merge_cache.pop(name)
        return plain_linear(self.base_layer, w, dtype)

    def extra_repr(self) -> str:
        return f"{self.quant.describe(self.base_layer)}, {super().extra_repr()}"


def plain_linear(base: nn.Module, w: torch.Tensor, dtype: torch.dtype) -> nn.Linear:
    """A frozen ``nn.Linear`` in ``dtype`` with weight ``w`` (out, in) and ``base``'s bias and mode."""
    bias = getattr(base, "bias", None)
    with torch.no_grad():
        out = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device=w.device, dtype=dtype)
        out.weight = nn.Parameter(w.to(dtype), requires_grad=False)
        if bias is not None:
            out.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=False)
    return out.train(base.training)


def unmerge_refusal(layer: QuantizedLinear, path: str | None = None) -> str:
    where = f"{path!r} ({type(layer.base_layer).__name__})" if path else type(layer.base_layer).__name__
    errs = [layer.rounding_errors.get(n, {}).get("error_over_delta") for n in layer.merged_adapters]
    measured = ", ".join(f"{n}: {e:.0%} of ‖ΔW‖" for n, e in zip(layer.merged_adapters, errs) if e is not None)
    return (f"cannot unmerge {layer.merged_adapters} from {where}: merging re-quantized its "
            f"{layer.quant.describe(layer.base_layer)} weight, so W cannot be recovered exactly (measured rounding "
            f"error {measured}). Reload the base model to get W back; to merge without re-quantizing use "
            "lorakit.merge_and_unload / save_merged, which dequantize to the compute dtype")


def _record(layer: QuantizedLinear, name: str) -> None:
    report = _REPORT.get()
    if report is not None:
        report.append((layer, name))
        return
    e = layer.rounding_errors[name]
    warnings.warn(f"merged adapter {name!r} into a {layer.quant.describe(layer.base_layer)} weight by re-quantizing "
                  f"it: measured rounding error max|Q(W+ΔW) − (W+ΔW)| = {e['max_abs_error']:.3g} "
                  f"(‖error‖/‖ΔW‖ = {e['error_over_delta']:.0%}); unmerge is refused", stacklevel=3)


@contextlib.contextmanager
def requantization_report(model: nn.Module) -> Iterator[None]:
    """Collect the rounding errors of the quantized layers merged inside the block and emit one
    warning naming the worst one (instead of one warning per layer)."""
    report: list = []
    token = _REPORT.set(report)
    try:
        yield
    finally:
        _REPORT.reset(token)
    if not report:
        return
    paths = {id(m): n for n, m in model.named_modules()}
    worst_layer, worst_name = max(report, key=lambda it: it[0].rounding_errors[it[1]]["error_over_delta"])
    e = worst_layer.rounding_errors[worst_name]
    ratios = sorted(layer.rounding_errors[n]["error_over_delta"] for layer, n in report)
    warnings.warn(
        f"merged into {len(report)} quantized weight(s) ({worst_layer.quant.describe(worst_layer.base_layer)}) by "
        f"re-quantizing them: W ← Q(W + ΔW) is not W + ΔW, so outputs differ from the unmerged model. Measured "
        f"rounding error ‖Q(W+ΔW) − (W+ΔW)‖/‖ΔW‖: median {ratios[len(ratios) // 2]:.0%}, worst {ratios[-1]:.0%} "
        f"(adapter {worst_name!r} in {paths.get(id(worst_layer), '?')!r}: max abs error {e['max_abs_error']:.3g} vs "
        f"max |ΔW| {e['max_abs_delta']:.3g}). unmerge is refused for these layers; merge_and_unload / save_merged "
        "dequantize instead (no rounding to 4/8 bits)", stacklevel=3)
