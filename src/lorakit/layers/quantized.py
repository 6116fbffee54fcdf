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

Merging is LoraLayer's merge (its refusals, ``W + ΔW`` with DoRA, ``b + scaling·b_lora`` for a
``lora_bias``, ``safe_merge``); this layer only reads W as a float tensor (``merge_source``: deq(W))
and writes one back (``store_merged``: re-quantize). It is lossy, and says so:

* in place (``lorakit.merge``): ``W ← Q(deq(W) + ΔW)`` — dequantize, add ΔW in fp32, re-quantize;
  the bias (not quantized) gets ``scaling·b_lora`` exactly. The rounding error
  ``Q(W + ΔW) − (W + ΔW)`` is measured and reported (40–64% of ‖ΔW‖ for the adapters of the tiny
  4-bit test runs); ``unmerge`` is refused, since ``Q(W + ΔW) − ΔW`` is not W.
* ``merged_linear`` (used by ``merge_and_unload`` / ``save_merged``): a plain ``nn.Linear`` in
  the compute dtype holding ``deq(W) + ΔW`` and ``b + scaling·b_lora`` summed in fp32 — exactly
  the function the adapted layer computes, up to that dtype's rounding.
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from lorakit.config import WEIGHT_INITS, LoraConfig
from lorakit.layers.linear import Linear
from lorakit.layers.quant_formats import QuantFormat, quant_format
from lorakit.layers.registry import LayerKind, register

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

    def reattach(self) -> None:
        """Undo :meth:`release` (a rolled-back unload): the stored bytes are held again."""
        self._restore = self.quant.hold(self.base_layer)

    # ------------------------------------------------------------------ the weight
    def dequantized(self) -> torch.Tensor:
        """deq(W): the base weight the layer computes with, fp32 (out, in)."""
        return self.quant.dequantize(self.base_layer)

    def _weight_out_in(self) -> torch.Tensor:
        return self.dequantized()  # DoRA's row norms need W itself

    def merge_source(self) -> torch.Tensor:
        """What LoraLayer's merging reads and adds ΔW to: deq(W), fp32 (out, in)."""
        return self.dequantized()

    def store_merged(self, weight: torch.Tensor) -> None:
        """``W ← Q(weight)``: re-quantize, and measure the rounding error ``Q(weight) − weight``
        against the change ``weight − deq(W)`` (kept for :meth:`merge` to report)."""
        before = self.dequantized()  # (out, in) fp32
        self.quant.requantize(self.base_layer, weight)
        error = self.dequantized() - weight  # (out, in)
        delta = weight - before
        self._last_rounding = {"max_abs_error": float(error.abs().max()),
                               "error_over_delta": float(error.norm() / delta.norm().clamp_min(1e-30)),
                               "max_abs_delta": float(delta.abs().max())}

    # ------------------------------------------------------------------ merging
    def merge_journal(self) -> Callable[[], None]:
        """Exact undo of an in-place merge: the stored weight (a re-quantizing merge puts a new
        Parameter in place, so the old one is kept by reference, no copy), a copy of the bias (which
        ``b + s·b_lora`` writes in place) and the merge bookkeeping come back."""
        base = self.base_layer
        weight, state = base.weight, getattr(base, "state", None)
        # a format that re-quantizes in place (8-bit with fp16 weights kept) needs the values themselves
        values = weight.detach().clone() if _in_place(self) and weight.dtype != torch.int8 else None
        bias = None if getattr(base, "bias", None) is None else base.bias.detach().clone()
        merged, errors = list(self.merged_adapters), dict(self.rounding_errors)

        def undo() -> None:
            with torch.no_grad():
                if base.weight is not weight:
                    base.weight = weight
                elif values is not None:
                    weight.copy_(values)
                    if state is not None and hasattr(state, "reset_grads"):
                        state.reset_grads()  # 8-bit: CB / SCB read from the weight again
                if bias is not None:
                    base.bias.copy_(bias)
            self.merged_adapters[:] = merged
            self.rounding_errors.clear()
            self.rounding_errors.update(errors)

        return undo

    def merge(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        """LoraLayer's merge, one adapter at a time — its refusals, ``W + ΔW`` (DoRA included)
        and ``b + scaling·b_lora`` summed in fp32, its ``safe_merge`` check — on deq(W), written
        back re-quantized (:meth:`store_merged`): ``W ← Q(deq(W) + ΔW)``. The rounding error is
        kept per adapter (``rounding_errors``) and reported (see :func:`requantization_report`).

        Raises:
            ValueError: a refused merge (``merge_refusal``), or with ``safe_merge`` a merged
                weight or bias holding NaN or inf; this layer's weights are then unchanged.
        """
        names = self.active_adapters if adapter_names is None else adapter_names
        for name in names:
            done = len(self.merged_adapters)
            super().merge([name], safe_merge)
            if len(self.merged_adapters) > done:  # merged now (the base skips unknown and merged names)
                self.rounding_errors[name] = self.__dict__.pop("_last_rounding")
                _record(self, name)

    def unmerge(self) -> None:
        """Refused: a merge re-quantized W, so ``Q(W + ΔW) − ΔW`` is not W.

        Raises:
            ValueError: an adapter is merged into this layer.
        """
        if self.merged_adapters:
            raise ValueError(unmerge_refusal(self))

    def merged_linear(self, adapter_names: Sequence[str], dtype: torch.dtype) -> nn.Linear:
        """A plain ``nn.Linear`` (in ``dtype``, frozen) holding the dequantized merge of the
        adapters in ``adapter_names`` not merged yet: weight ``deq(W) + Σ ΔW`` and bias
        ``b + Σ scaling·b_lora``, each summed in fp32 by LoraLayer's ``_merged_weight`` /
        ``_merged_bias`` — the merge of :meth:`merge`, written to a new float layer instead of
        re-quantized. Changes nothing here.

        Raises:
            ValueError: a refused merge (``merge_refusal``: a ``lora_bias`` without a base bias).
        """
        bias = getattr(self.base_layer, "bias", None)
        with torch.no_grad():
            w = self.merge_source()  # (out, in) fp32
            b = None if bias is None else bias.detach().to(torch.promote_types(bias.dtype, torch.float32))  # (out,)
            for name in adapter_names:
                if name not in self.r or name in self.merged_adapters:
                    continue
                refusal = self.merge_refusal(name)
                if refusal is not None:
                    raise ValueError(refusal)
                w = self._merged_weight(w, name)
                self.merge_cache.pop(name)
                merged_b = self._merged_bias(name, +1, b)
                b = b if merged_b is None else merged_b
        return plain_linear(self.base_layer, w, dtype, bias=b)

    def extra_repr(self) -> str:
        return f"{self.quant.describe(self.base_layer)}, {super().extra_repr()}"


def _in_place(layer: QuantizedLinear) -> bool:
    """Does this layer's format re-quantize into the same tensor (8-bit weights kept in float)?"""
    return layer.quant.name == "bitsandbytes 8-bit"


def plain_linear(base: nn.Module, w: torch.Tensor, dtype: torch.dtype,
                 bias: torch.Tensor | None = None) -> nn.Linear:
    """A frozen ``nn.Linear`` in ``dtype`` with weight ``w`` (out, in), ``base``'s mode and
    ``bias`` (default: ``base``'s)."""
    if bias is None:
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


register(LayerKind("bitsandbytes Linear4bit/Linear8bitLt, nn.Linear with a torchao NF4 weight",
                   lambda m: quant_format(m) is not None, lambda m, **_: QuantizedLinear(m, quant_format(m)),
                   linear=True, priority=10))  # before nn.Linear: bitsandbytes' Linear4bit subclasses it
