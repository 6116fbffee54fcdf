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
from lorakit.layers import mixed_kernels
from lorakit.layers.merging import Merging
from lorakit.layers.routed import Routed
from lorakit.layers.routing import blocks_open


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


class LoraLayer(Merging, Routed, nn.Module):
    """Base class of the wrappers: adapter names, activity, merging, the forward path.

    Subclasses implement ``_create(name, r, cfg)`` (allocate the factors), ``_init(name, cfg)``,
    ``delta_weight(name)`` (ΔW in the base weight's layout), ``_add_term(x, name, result)`` (``result``
    plus adapter ``name``'s term for input ``x``, calling the factor modules so their hooks run) and,
    where a batched kernel exists, ``mixed_forward``.
    """

    # attributes holding per-adapter tensors, keyed by adapter name (subclasses extend)
    adapter_attrs: tuple[str, ...] = ("lora_A", "lora_B")
    # the attributes holding the "B" side of each adapter (LoRA+'s faster learning rate)
    b_attrs: tuple[str, ...] = ("lora_B",)
    # why ``mixed_batch`` cannot route this layer's rows (None: it can)
    mixed_refusal: str | None = None
    # the attributes holding A and B (``factors``)
    factor_attrs: tuple[str, str] = ("lora_A", "lora_B")
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
        device = weight.device  # a base on the meta device gets meta factors, filled by a later load (as PEFT)
        if dtype is None:  # fp32 adapters on a half-precision base, as PEFT's autocast_adapter_dtype
            dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        for attr in self.adapter_attrs:
            holder = getattr(self, attr)
            if name in holder:
                holder[name] = holder[name].to(device=device, dtype=dtype) if isinstance(holder, nn.ModuleDict) else \
                    nn.Parameter(holder[name].detach().to(device=device, dtype=dtype))
        self._init(name, cfg)
        mixed_kernels.adapters_updated()

    def set_scale(self, name: str, lora_alpha: float, cfg: LoraConfig) -> None:
        """A new ``lora_alpha`` (and so scaling) for adapter ``name``, e.g. after a hot swap."""
        self.lora_alpha[name] = lora_alpha
        self.scaling[name] = cfg.scaling(self.r[name], lora_alpha)
        mixed_kernels.adapters_updated()

    def _apply(self, fn, recurse: bool = True):
        """``.to()`` / ``.cuda()`` / ``.half()``: the factors are new tensors, so cached stacks are stale."""
        out = super()._apply(fn, recurse)
        mixed_kernels.adapters_updated()
        return out

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        """``load_state_dict`` writes into the factors: cached stacks are stale."""
        super()._load_from_state_dict(*args, **kwargs)
        mixed_kernels.adapters_updated()

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
        mixed_kernels.adapters_updated()

    def set_active(self, names: Sequence[str]) -> None:
        self.active_adapters = [n for n in names if n in self.r]

    def adapter_parameters(self, name: str) -> Iterator[nn.Parameter]:
        """The parameters of adapter ``name`` in this layer (what lorakit owns and may toggle)."""
        for attr in self.adapter_attrs:
            holder = getattr(self, attr)
            if name in holder:
                item = holder[name]
                yield from (item.parameters() if isinstance(item, nn.Module) else [item])

    def b_parameters(self, name: str) -> Iterator[nn.Parameter]:
        """Adapter ``name``'s "B" side (``b_attrs``): what LoRA+ trains at a larger learning rate."""
        for attr in self.b_attrs:
            holder = getattr(self, attr)
            if name in holder:
                item = holder[name]
                yield from (item.parameters() if isinstance(item, nn.Module) else [item])

    # ------------------------------------------------------------------ factors, for combine / untie
    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Adapter ``name``'s (A, B) tensors as stored (detached): for most layers ``lora_A`` /
        ``lora_B`` weights, A (r, in, ...) and B (out, r, ...); an embedding's (r, num), (dim, r)."""
        A, B = (getattr(self, attr)[name] for attr in self.factor_attrs)
        A, B = (t.weight if isinstance(t, nn.Module) else t for t in (A, B))
        return A.detach(), B.detach()

    def set_factors(self, name: str, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Write (A, B) (the shapes :meth:`factors` gives) and a ``lora_bias`` into adapter ``name``."""
        holders = [getattr(self, attr)[name] for attr in self.factor_attrs]
        with torch.no_grad():
            for holder, value in zip(holders, (A, B)):
                (holder.weight if isinstance(holder, nn.Module) else holder).copy_(value)
            target = getattr(holders[1], "bias", None) if isinstance(holders[1], nn.Module) else None
            if target is not None:
                target.copy_(bias if bias is not None else torch.zeros_like(target))

    rank_groups = 1  # a grouped convolution: the rank splits into this many groups

    def delta_matrix(self, delta: torch.Tensor) -> torch.Tensor:
        """A ΔW of this layer (``delta_weight``'s layout) as the (out, in) matrix ``B·A`` is."""
        return delta.T if getattr(self, "fan_in_fan_out", False) else delta

    def factors_from_matrices(self, A: torch.Tensor, B: torch.Tensor, like: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (k, in), B (out, k)) reshaped to the factor shapes of adapter ``like`` (a conv's kernel axes)."""
        return A, B

    def sub_layers(self) -> list[LoraLayer]:
        """This layer and the wrappers inside it that carry the same adapters (an attention's out_proj)."""
        return [self]

    def weight_owner(self) -> tuple[nn.Module, str]:
        """The module and attribute holding the weight merges write (to untie a shared weight)."""
        return self.base_layer, "weight"

    def tied_group(self) -> object | None:
        """Layers that share one weight *and* the same adapter tensors (a tied output layer following
        the embedding's token rows) return the same object: merging into them needs no untying."""
        return None

    def base_weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def config_key(self, path: str) -> str:
        """The name a config's ``rank_pattern``/``alpha_pattern`` is matched against for this layer."""
        return path

    def release(self) -> nn.Module:
        """The wrapped module, with anything this wrapper changed inside it undone (see MHA)."""
        return self.base_layer

    def reattach(self) -> None:
        """Undo :meth:`release` when the wrapper goes back in place (a rolled-back unload)."""

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
