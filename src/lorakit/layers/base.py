"""Adapter bookkeeping shared by every LoRA wrapper, and the one forward path they follow.

A wrapper holds the original module as ``base_layer`` (never a subclass of it) and, per named
adapter, its low-rank factors in ``nn.ModuleDict``/``nn.ParameterDict`` attributes keyed by the
adapter name — the same attribute names as PEFT (``lora_A``, ``lora_B``, ``lora_embedding_A``,
``lora_magnitude_vector``...), so state-dict keys map one to one onto PEFT's. Each wrapper type
lists those attributes in ``adapter_attrs``; ``lorakit.io.keymap`` derives every file key from it.

The output of an unmerged wrapper is ``y = base(x) + Σ_a scaling_a · B_a·A_a·dropout(x)`` over the
active adapters ``a``; a merged adapter lives inside the base weight instead:
``W ← W + scaling·B·A`` and is taken out again, in reverse order, by ``unmerge``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from typing import Union

import torch
from torch import nn

from lorakit.config import LoraConfig
from lorakit.layers import mixed
from lorakit.layers.routing import Route, blocks_open, route_for


def init_lora_pair(A: torch.Tensor, B: torch.Tensor, init: Union[bool, str], r: int,
                   bias: torch.Tensor | None = None) -> None:
    """PEFT's default inits: ``True`` A Kaiming-uniform (a=√5), B = 0; ``"gaussian"`` A ~ N(0, 1/r),
    B = 0; a ``lora_bias`` bias of B = 0. Either way the adapted model starts exactly at the base
    model. ``False`` (and the SVD/QR inits, handled by the layer) leave the tensors as they are."""
    init = True if init == "eva" else init  # EVA: A is overwritten from the data (initialize_lora_eva_weights)
    with torch.no_grad():
        if init is True:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(A, std=1 / r)
        if init is True or init == "gaussian":
            nn.init.zeros_(B)
            if bias is not None:
                nn.init.zeros_(bias)


class BufferDict(nn.Module):
    """Tensors keyed by adapter name, held as non-persistent buffers: they follow ``.to()`` /
    ``.cuda()`` with the layer, and stay out of ``state_dict()`` (so file keys are unchanged)."""

    def __setitem__(self, name: str, t: torch.Tensor) -> None:
        self.register_buffer(name, t, persistent=False)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._buffers[name]

    def __contains__(self, name: object) -> bool:
        return name in self._buffers

    def pop(self, name: str, default=None):
        return self._buffers.pop(name, default)


class LoraLayer(nn.Module):
    """Base class of the wrappers: adapter names, activity, merging, the forward path.

    Subclasses implement ``_create(name, r, cfg)`` (allocate the factors), ``_init(name, cfg)``,
    ``delta_weight(name)`` (ΔW in the base weight's layout), ``_add_term(x, name, result)`` (``result``
    plus adapter ``name``'s term for input ``x``, calling the factor modules so their hooks run) and,
    where a batched kernel exists, ``mixed_forward``.
    """

    # attributes holding per-adapter tensors, keyed by adapter name (subclasses extend)
    adapter_attrs: tuple[str, ...] = ("lora_A", "lora_B")
    # r / lora_alpha come from the config's rank and alpha patterns (trainable tokens: no)
    ranked: bool = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.disabled: bool = False
        self.merged_adapters: list[str] = []  # a stack: unmerge pops in reverse order
        # False: the LoRA term in the activation's dtype (factors cast); True: PEFT's numerics
        # (the input cast to the factors' dtype: fp32 on a half-precision base)
        self.peft_numerics: bool = False
        self.merge_cache = BufferDict()  # per merged adapter, what an exact unmerge needs (DoRA norms)

    def __getattr__(self, name: str):
        """Fall back to the base layer's attributes (``weight``, ``in_features``...), so code that
        reads them off a wrapped module (tied embeddings, nn.MultiheadAttention) keeps working."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get("base_layer")
            if base is None or name == "base_layer":
                raise
            return getattr(base, name)

    # ------------------------------------------------------------------ adapters
    @property
    def adapter_names(self) -> list[str]:
        return list(self.r)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def add_adapter(self, name: str, r: int, lora_alpha: float, cfg: LoraConfig, *,
                    dtype: torch.dtype | None = None) -> None:
        """Create adapter ``name`` with rank ``r``; initialise it per ``cfg.init_lora_weights``."""
        self.r[name] = r
        self.lora_alpha[name] = lora_alpha
        self.scaling[name] = cfg.scaling(r, lora_alpha)
        self.lora_dropout[name] = nn.Dropout(cfg.lora_dropout) if cfg.lora_dropout > 0 else nn.Identity()
        self._create(name, r, cfg)
        if cfg.lora_bias and getattr(self.base_layer, "bias", None) is None:
            warnings.warn(f"lora_bias=True on a {type(self.base_layer).__name__} without a bias: the adapter works "
                          "unmerged, but merging it will be refused (nothing to fold its bias into)", stacklevel=3)
        weight = self.base_weight()
        device = weight.device if weight.device.type != "meta" else None
        if dtype is None:  # fp32 adapters on a half-precision base, as PEFT's autocast_adapter_dtype
            dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        for attr in self.adapter_attrs:
            holder = getattr(self, attr)
            if name in holder:
                holder[name] = holder[name].to(device=device, dtype=dtype) if isinstance(holder, nn.ModuleDict) else \
                    nn.Parameter(holder[name].detach().to(device=device, dtype=dtype))
        self._init(name, cfg)
        mixed.adapters_updated()

    def set_scale(self, name: str, lora_alpha: float, cfg: LoraConfig) -> None:
        """A new ``lora_alpha`` (and so scaling) for adapter ``name``, e.g. after a hot swap."""
        self.lora_alpha[name] = lora_alpha
        self.scaling[name] = cfg.scaling(self.r[name], lora_alpha)
        mixed.adapters_updated()

    def _apply(self, fn, recurse: bool = True):
        """``.to()`` / ``.cuda()`` / ``.half()``: the factors are new tensors, so cached stacks are stale."""
        out = super()._apply(fn, recurse)
        mixed.adapters_updated()
        return out

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        """``load_state_dict`` writes into the factors: cached stacks are stale."""
        super()._load_from_state_dict(*args, **kwargs)
        mixed.adapters_updated()

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged into the base weights; unmerge before deleting it")
        for attr in (*self.adapter_attrs, "lora_dropout"):
            holder = getattr(self, attr)
            if name in holder:
                del holder[name]
        for d in (self.r, self.lora_alpha, self.scaling):
            d.pop(name, None)
        self.active_adapters = [a for a in self.active_adapters if a != name]
        mixed.adapters_updated()

    def set_active(self, names: Sequence[str]) -> None:
        self.active_adapters = [n for n in names if n in self.r]

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        """The parameters of adapter ``name`` in this layer (what lorakit owns and may toggle)."""
        for attr in self.adapter_attrs:
            holder = getattr(self, attr)
            if name in holder:
                item = holder[name]
                yield from (item.parameters() if isinstance(item, nn.Module) else [item])

    def base_weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def config_key(self, path: str) -> str:
        """The name a config's ``rank_pattern``/``alpha_pattern`` is matched against for this layer."""
        return path

    def release(self) -> nn.Module:
        """The wrapped module, with anything this wrapper changed inside it undone (see MHA)."""
        return self.base_layer

    # ------------------------------------------------------------------ merging
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
            weight = self.base_weight()
            with torch.no_grad():
                new = self._merged_weight(weight, name)
                bias = self._merged_bias(name, +1)
                if safe_merge and not (torch.isfinite(new).all() and (bias is None or torch.isfinite(bias).all())):
                    self.merge_cache.pop(name)
                    raise ValueError(f"merging adapter {name!r} into {type(self.base_layer).__name__} gives non-finite "
                                     "weights; the adapter is broken. The base weights were left unchanged.")
                weight.copy_(new)
                if bias is not None:
                    self.base_layer.bias.copy_(bias)
            self.merged_adapters.append(name)

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

    def _merged_bias(self, name: str, sign: int) -> torch.Tensor | None:
        """The base bias ± ``scaling·b`` (summed in at least fp32, in the bias's dtype), or None."""
        delta = self.bias_delta(name)
        if delta is None:
            return None
        bias = self.base_layer.bias
        acc = torch.promote_types(bias.dtype, torch.float32)
        return (bias.to(acc) + sign * delta.detach().to(acc)).to(bias.dtype)

    def merged_weight_is_finite(self, name: str) -> bool:
        """Would merging ``name`` keep the base weight (and bias) finite? Changes nothing."""
        with torch.no_grad():
            ok = bool(torch.isfinite(self._merged_weight(self.base_weight(), name)).all())
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
        weight = self.base_weight().detach()
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

    # ------------------------------------------------------------------ forward
    def unmerged_active(self) -> list[str]:
        """Active adapters of this layer whose update is not already inside the base weight."""
        if self.disabled:
            return []
        return [a for a in self.active_adapters if a in self.r and a not in self.merged_adapters]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``y = base(x) + Σ_a term_a(x)`` over the active, unmerged adapters (``_add_term`` adds one
        term); inside ``lorakit.mixed_batch``, each row's own adapter instead (``mixed_forward``)."""
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        if blocks_open():
            routed = self._routed(x, result)
            if routed is not None:
                return routed
        out_dtype = result.dtype
        for name in self.unmerged_active():
            result = self._add_term(x, name, result)
        return result if result.dtype == out_dtype else result.to(out_dtype)

    def _replacing_forward(self, x: torch.Tensor, args: tuple, kwargs: dict, no_split: str) -> torch.Tensor:
        """The forward of a layer whose adapters change how the wrapped module computes (``_call``)
        instead of adding a term (parameter and token layers): the base module with the active,
        unmerged adapters applied; in a mixed batch, each row's own. ``no_split`` says why rows
        cannot be split when the module gets more than its one input (or rows off dimension 0)."""
        if self.disabled:
            return self.base_layer(x, *args, **kwargs)
        route = route_for(self) if blocks_open() else None  # no ContextVar read (graph break) outside a block
        if route is not None:
            if args or kwargs or route.batch_dim != 0:
                raise ValueError(f"mixed_batch cannot split the rows of {no_split}; run the adapters in separate "
                                 "batches")
            return self._routed(x, self.base_layer(x))
        names = self.unmerged_active()
        if not names:
            return self.base_layer(x, *args, **kwargs)
        return self._call(names, x, *args, **kwargs)

    @torch.compiler.disable
    def _routed(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor | None:
        """Inside a ``mixed_batch`` block of this thread: checks, then ``mixed_forward`` with rows on
        dimension 0; None when this layer is not routed. Runs outside torch.compile: the routing is
        Python state, and a compiled graph around it sees only tensors of fixed shapes, so changing
        the rows' adapters never recompiles."""
        route = route_for(self)
        if route is None:
            return None
        if self.merged_adapters:
            raise ValueError("mixed_batch needs unmerged adapters; call lorakit.unmerge(model) first")
        dim = route.batch_dim
        if x.dim() <= dim or x.shape[dim] != len(route.rows):
            rows_found = x.shape[dim] if x.dim() > dim else 0
            raise ValueError(f"mixed_batch was given {len(route.rows)} adapter names but the batch has {rows_found} "
                             f"rows ({type(self.base_layer).__name__} input of shape {tuple(x.shape)}, rows on "
                             f"dimension batch_dim={dim})")
        if not any(n in self.r for n in route.names):
            return result
        if dim == 0:
            return self.mixed_forward(x, result, route)
        return self.mixed_forward(x.movedim(dim, 0), result.movedim(dim, 0), route).movedim(0, dim)

    def mixed_forward(self, x: torch.Tensor, result: torch.Tensor, route: Route) -> torch.Tensor:
        """One adapter per row (x: (N, ...), ``len(route.rows) == N``); the reference implementation:
        rows sharing an adapter go through ``_add_term`` together. Layer types override it with a
        batched kernel (``lorakit.layers.mixed``) where one computes the same function."""
        out = result.clone()
        for name in route.names:
            if name not in self.r:
                continue
            idx = torch.tensor([i for i, n in enumerate(route.rows) if n == name], device=x.device)
            part = result.index_select(0, idx)
            out.index_copy_(0, idx, self._add_term(x.index_select(0, idx), name, part).to(out.dtype))
        return out

    def stack_pairs(self, route: Route) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Per adapter of ``route.order``, the factors a batched kernel stacks (A, B), or None where
        this layer lacks the adapter; [] for layer types without a batched kernel."""
        return []

    def _stack(self, route: Route, dtype: torch.dtype) -> mixed.Stack:
        """This layer's stacked factors for ``route`` in ``dtype`` (cached; see ``lorakit.layers.mixed``)."""
        return mixed.stacked(self, route, lambda: self.stack_pairs(route),
                             lambda: [self.scaling.get(n, 0.0) for n in route.order], dtype)

    def _row_blocks(self, route: Route, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's (A, B) blocks for ``route``: (N, K, r), (N, r, M) with r padded to a multiple of 8."""
        return mixed.row_blocks(self, self._stack(route, dtype), route.slots(device))

    def check_stack(self) -> None:
        """Entering a mixed-batch block: drop a cached stack whose factors changed since it was built."""
        mixed.check(self)

    def _route_flag(self, route: Route, what: str, compute) -> bool:
        """A per-layer fact about a route (e.g. "needs the loop"), computed once per block."""
        key = (what, id(self), self.training)
        if key not in route._cache:
            route._cache[key] = compute()
        return route._cache[key]

    def _input(self, x: torch.Tensor, factor_dtype: torch.dtype) -> torch.Tensor:
        """The adapter's input: x itself, or (``peft_numerics``) x cast to the factors' dtype."""
        return x.to(factor_dtype) if self.peft_numerics else x

    def _dropout(self, x: torch.Tensor, name: str) -> torch.Tensor:
        dropout = self.lora_dropout[name]
        return x if isinstance(dropout, nn.Identity) else dropout(x)

    # ------------------------------------------------------------------ subclass hooks
    def _create(self, name: str, r: int, cfg: LoraConfig) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _init(self, name: str, cfg: LoraConfig) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def delta_weight(self, name: str) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _add_term(self, x: torch.Tensor, name: str, result: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def extra_repr(self) -> str:
        parts = [f"{a}(r={self.r[a]}, alpha={self.lora_alpha[a]:g})" for a in self.r]
        state = "disabled" if self.disabled else f"active={self.active_adapters}"
        merged = f", merged={self.merged_adapters}" if self.merged_adapters else ""
        return f"adapters=[{', '.join(parts)}], {state}{merged}"
