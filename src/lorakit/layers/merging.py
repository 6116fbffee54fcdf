"""Merging an adapter into the wrapped layer's weight, and taking it out again: one implementation
for every layer type (each supplies ``delta_weight``; DoRA layers their norm axis).

    merge:    W ← W + ΔW,   ΔW = scaling·B·A (in W's layout), summed in at least fp32
    DoRA:     W ← (m / ‖W0 + ΔW‖) ⊙ (W + ΔW)        (the norm kept for an exact unmerge)
    unmerge:  the inverse, last merged first (a stack per layer)
    lora_bias: b ← b + scaling·b_lora

A layer whose weight is not a plain tensor (a quantized one) supplies only how W is read as a float
tensor (``merge_source``) and written back (``store_merged``): the maths stays here (composition,
not a copy). Model-level operations call :meth:`Merging.merge_journal` first, so a failure partway
can be undone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


class Merging:
    """The merge stack of a LoRA layer (mixed into :class:`~lorakit.layers.base.LoraLayer`).

    Uses the layer's ``r``, ``scaling``, ``active_adapters``, ``merged_adapters``, ``merge_cache``,
    ``base_layer``, ``base_weight()`` and ``delta_weight(name)``.
    """

    def merge(self, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
        """Fold ``scaling·B·A`` of each adapter into the base weight (skips already-merged ones).

        Raises:
            ValueError: with ``safe_merge``, if the merged weight would hold NaN or inf.
        """
        names = self.active_adapters if adapter_names is None else adapter_names
        for name in names:
            if name not in self.r or name in self.merged_adapters:
                continue
            refusal = self.merge_refusal(name)
            if refusal is not None:
                raise ValueError(refusal)
            weight = self.merge_source()
            with torch.no_grad():
                new = self._merged_weight(weight, name)
                bias = self._merged_bias(name, +1)
                if safe_merge and not (torch.isfinite(new).all() and (bias is None or torch.isfinite(bias).all())):
                    self.merge_cache.pop(name)
                    raise ValueError(f"merging adapter {name!r} into {type(self.base_layer).__name__} gives non-finite "
                                     "weights; the adapter is broken. The base weights were left unchanged.")
                self.store_merged(new)
                if bias is not None:
                    self.base_layer.bias.copy_(bias)
            self.merged_adapters.append(name)

    def merge_journal(self) -> Callable[[], None]:
        """Call before merging into / unmerging from this layer: returns what undoes it (a failed
        model-level operation runs it). By default the inverse operations: every adapter merged
        since is taken out and those merged before go back in, in order — W as it was, to the
        rounding of its dtype (what ``unmerge`` guarantees), with no copy of W kept meanwhile."""
        before = list(self.merged_adapters)

        def undo() -> None:
            if self.merged_adapters != before:
                self.unmerge()
                self.merge(before)

        return undo

    def merge_source(self) -> torch.Tensor:
        """The weight merging reads and adds ΔW to: the base weight itself (a quantized layer: its
        dequantization, a float copy)."""
        return self.base_weight()

    def store_merged(self, weight: torch.Tensor) -> None:
        """Write a merged weight (``_merged_weight`` of ``merge_source``) into the base layer: in
        place (a quantized layer re-quantizes it)."""
        self.base_weight().copy_(weight)

    def merge_refusal(self, name: str) -> str | None:
        """Why adapter ``name`` cannot be merged into this layer's weights (None: it can). Callers
        check every layer first, so a refused merge changes nothing."""
        if self.bias_delta(name) is not None and getattr(self.base_layer, "bias", None) is None:
            return (f"adapter {name!r} has a lora_bias but {type(self.base_layer).__name__} has no bias to merge it "
                    "into; use it unmerged")
        return None

    def bias_delta(self, name: str) -> torch.Tensor | None:
        """``scaling·b`` of adapter ``name``'s ``lora_bias`` (the bias of its ``lora_B``), or None."""
        holder = getattr(self, "lora_B", None)
        bias = getattr(holder[name], "bias", None) if holder is not None and name in holder else None
        return None if bias is None else bias * self.scaling[name]

    def _merged_bias(self, name: str, sign: int, bias: torch.Tensor | None = None) -> torch.Tensor | None:
        """``bias`` (default: the base layer's) ± ``scaling·b`` (summed in at least fp32, in the
        bias's dtype), or None when adapter ``name`` has no ``lora_bias``."""
        delta = self.bias_delta(name)
        if delta is None:
            return None
        bias = self.base_layer.bias if bias is None else bias
        acc = torch.promote_types(bias.dtype, torch.float32)
        return (bias.to(acc) + sign * delta.detach().to(acc)).to(bias.dtype)

    def merged_weight_is_finite(self, name: str) -> bool:
        """Would merging ``name`` keep the base weight (and bias) finite? Changes nothing."""
        with torch.no_grad():
            ok = bool(torch.isfinite(self._merged_weight(self.merge_source(), name)).all())
            bias = self._merged_bias(name, +1) if self.merge_refusal(name) is None else None
            ok = ok and (bias is None or bool(torch.isfinite(bias).all()))
        self.merge_cache.pop(name)
        return ok

    def unmerge(self) -> None:
        """Take every merged adapter out of the base weight, last merged first."""
        weight = self.base_weight()
        with torch.no_grad():
            while self.merged_adapters:
                name = self.merged_adapters.pop()
                weight.copy_(self._unmerged_weight(weight, name))
                bias = self._merged_bias(name, -1)
                if bias is not None:
                    self.base_layer.bias.copy_(bias)

    def unmerged_base_weight(self) -> torch.Tensor:
        """W0: the base weight with every merged adapter taken out (a copy, fp32 or wider), the
        weight the unmerged forward computes with."""
        weight = self.merge_source().detach()
        w = weight.to(torch.promote_types(weight.dtype, torch.float32))
        for name in reversed(self.merged_adapters):
            w = self._unmerged_weight(w, name, keep_cache=True)
        return w

    def _is_dora(self, name: str) -> bool:
        return name in self.__dict__["_modules"].get("lora_magnitude_vector", ())

    def _merged_weight(self, weight: torch.Tensor, name: str) -> torch.Tensor:
        """``W + ΔW``, summed in at least fp32, returned in W's dtype. DoRA:

            W' = (m / ‖W0 + ΔW‖) ⊙ (W + ΔW)

        along the layer type's normalised axis (``_dora_norm``, broadcast by ``_dora_scale``), with W0
        the weight *without* adapters merged before this one — the norm the unmerged forward uses.
        The norm is kept (a buffer: it follows ``.to()``) for an exact unmerge.
        """
        acc = torch.promote_types(weight.dtype, torch.float32)
        if not self._is_dora(name):
            return (weight.to(acc) + self.delta_weight(name).to(acc)).to(weight.dtype)
        norm = self._dora_norm(name, self.unmerged_base_weight())
        self.merge_cache[name] = norm
        factor = self._dora_scale(self.lora_magnitude_vector[name].detach().to(norm.dtype) / norm)
        return (factor * (weight.to(norm.dtype) + self.delta_weight(name).to(norm.dtype))).to(weight.dtype)

    def _unmerged_weight(self, weight: torch.Tensor, name: str, keep_cache: bool = False) -> torch.Tensor:
        """``W - ΔW``, the inverse of ``_merged_weight`` (DoRA: divided by the kept factor first)."""
        acc = torch.promote_types(weight.dtype, torch.float32)
        if self._is_dora(name):
            norm = self.merge_cache[name] if keep_cache else self.merge_cache.pop(name)
            acc = torch.promote_types(acc, norm.dtype)
            factor = self._dora_scale(self.lora_magnitude_vector[name].detach().to(acc) / norm.to(acc))
            return (weight.to(acc) / factor - self.delta_weight(name).to(acc)).to(weight.dtype)
        return (weight.to(acc) - self.delta_weight(name).to(acc)).to(weight.dtype)

    def _dora_norm(self, name: str, w0: torch.Tensor) -> torch.Tensor:  # pragma: no cover - DoRA layers only
        """‖W0 + ΔW‖ along the axis DoRA normalises, fp32 or wider (``w0`` in the base weight's layout)."""
        raise NotImplementedError

    def _dora_scale(self, factor: torch.Tensor) -> torch.Tensor:  # pragma: no cover - DoRA layers only
        """A per-channel factor (the shape ``_dora_norm`` gives) broadcast over the base weight."""
        raise NotImplementedError
