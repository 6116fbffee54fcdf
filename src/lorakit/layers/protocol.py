"""What model-level code (``lorakit.state``, ``lorakit.adapters``, ``lorakit.merge``, ``lorakit.io``)
may ask of a wrapper: the :class:`AdapterLayer` protocol. The LoRA layers (``LoraLayer`` and its
kinds: additive — Linear, Embedding, Conv, MultiheadAttention, quantized Linear; weight-replacing —
``nn.Parameter`` targets, trainable token rows) and ``ModulesToSave`` all satisfy it; nothing outside
``lorakit.layers`` needs to know which class a wrapper is.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

from torch import nn


@runtime_checkable
class AdapterLayer(Protocol):
    """A module that holds named adapters around a wrapped module."""

    adapter_attrs: tuple[str, ...]  # attributes holding per-adapter tensors, keyed by adapter name (file keys)
    active_adapters: list[str]  # written by lorakit.state only
    disabled: bool  # written by lorakit.state only

    @property
    def adapter_names(self) -> list[str]: ...

    def set_active(self, names: Sequence[str]) -> None:
        """Called by :class:`lorakit.state.AdapterState` only."""

    def adapter_parameters(self, name: str) -> Iterable[nn.Parameter]:
        """The parameters adapter ``name`` owns here (what lorakit may toggle)."""

    def delete_adapter(self, name: str) -> None: ...

    def release(self) -> nn.Module:
        """The wrapped module, as it was before wrapping (what takes this wrapper's place on unload)."""

    def b_parameters(self, name: str) -> Iterable[nn.Parameter]:
        """The parameters LoRA+ gives the larger learning rate (the "B" side); none for a saved copy."""
