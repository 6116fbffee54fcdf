"""The one list of module types lorakit can put LoRA on. Each layer module registers its kind here
(:func:`register`); wrapping, "is this supported", "all-linear" and every error message naming the
supported types read this list and nothing else. A new layer type is a new file with its class and
one ``register`` call (plus an import in ``lorakit.layers``, which loads the files).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class LayerKind:
    """A module type LoRA can wrap.

    Attributes:
        name: what the user reads, e.g. ``"nn.Linear / transformers Conv1D"``.
        matches: is a module of this kind?
        build: ``build(module, fan_in_fan_out=...)`` -> the wrapper (no adapters yet).
        linear: counts as a linear layer for ``target_modules="all-linear"``.
        priority: kinds are tried highest first (a quantized Linear before ``nn.Linear``, whose
            subclass it is).
    """

    name: str
    matches: Callable[[nn.Module], bool]
    build: Callable[..., nn.Module]
    linear: bool = False
    priority: int = 0


_KINDS: list[LayerKind] = []


def register(kind: LayerKind) -> LayerKind:
    """Add a layer kind (called once by the module that defines its wrapper)."""
    if any(k.name == kind.name for k in _KINDS):
        raise ValueError(f"layer kind {kind.name!r} is registered already")
    _KINDS.append(kind)
    _KINDS.sort(key=lambda k: -k.priority)
    return kind


def kinds() -> list[LayerKind]:
    return list(_KINDS)


def kind_of(module: nn.Module) -> LayerKind | None:
    """The registered kind of ``module``, or None."""
    return next((k for k in _KINDS if k.matches(module)), None)


def supported_names() -> str:
    """``"nn.Linear / transformers Conv1D, nn.Embedding, ..."``: every error message's list."""
    return ", ".join(k.name for k in sorted(_KINDS, key=lambda k: (k.priority, k.name.lower())))
