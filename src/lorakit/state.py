"""The one owner of adapter state: which adapters a model has, with which configs and targets, which
are active, and whether they are switched off.

That state lives in two places: the registry on the model (``model._lorakit``, an
:class:`AdapterState`) and, in each wrapper, a copy of the active list and the ``disabled`` flag (read
on every forward, so a layer never looks the registry up). :class:`AdapterState` is the only code
that writes either: every public operation (inject, load, hot swap, combine, set, delete, disable,
unload) calls its methods, and a :class:`~lorakit.transaction.Transaction` restores it through
:meth:`AdapterState.restore` — so the two places cannot disagree.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from torch import nn

from lorakit.config import LoraConfig

_ATTR = "_lorakit"


@dataclass
class AdapterState:
    """The registry; change it only through its methods (they keep the wrappers' copies in step)."""

    configs: dict[str, LoraConfig] = field(default_factory=dict)  # adapter name -> its config
    targets: dict[str, list[str]] = field(default_factory=dict)  # adapter name -> adapted module names
    active: list[str] = field(default_factory=list)
    # adapter name -> names of the base biases its ``bias`` mode unfroze (re-frozen when it is deleted)
    bias_params: dict[str, list[str]] = field(default_factory=dict)

    def copy(self) -> AdapterState:
        """A copy whose lists and dicts are independent of this one (configs are immutable in use)."""
        return AdapterState(dict(self.configs), copy.deepcopy(self.targets), list(self.active),
                            copy.deepcopy(self.bias_params))

    # ------------------------------------------------------------------ the writers
    def add(self, model: nn.Module, name: str, cfg: LoraConfig, targets: list[str],
            bias_params: list[str] | None = None) -> None:
        """Register adapter ``name``; the first adapter of a model becomes active."""
        self.configs[name] = cfg
        self.targets[name] = list(targets)
        self.bias_params[name] = list(bias_params or [])
        self.activate(model, self.active or [name])

    def set_config(self, name: str, cfg: LoraConfig) -> None:
        """A new config for an existing adapter (a hot swap's new alpha, EVA's ranks, a file's recorded init)."""
        self.configs[name] = cfg

    def set_targets(self, name: str, targets: Sequence[str]) -> None:
        """The modules an existing adapter adapts (EVA drops the layers it gave rank 0)."""
        self.targets[name] = list(targets)

    def remove(self, model: nn.Module, name: str) -> list[str]:
        """Forget adapter ``name``; if it was active the first remaining adapter becomes active.

        Returns:
            The base biases its ``bias`` mode had unfrozen (the caller re-freezes them).
        """
        biases = self.bias_params.pop(name, [])
        del self.configs[name]
        self.targets.pop(name, None)
        self.activate(model, [a for a in self.active if a != name] or list(self.configs)[:1])
        return biases

    def activate(self, model: nn.Module, names: Sequence[str]) -> None:
        """``names`` become the active adapters, in the registry and in every wrapper."""
        self.active = list(names)
        self._push(model)

    def restore(self, model: nn.Module, saved: AdapterState) -> None:
        """Back to ``saved`` (a :meth:`copy`), in place so that holders of this object see it."""
        self.__dict__.update(saved.copy().__dict__)
        self._push(model)

    def _push(self, model: nn.Module) -> None:
        from lorakit.layers import wrappers  # layers import config only; state is imported by them lazily

        for _, w in wrappers(model):
            w.set_active(self.active)

    # ------------------------------------------------------------------ switched off
    @staticmethod
    def set_disabled(layers: Iterable[nn.Module], disabled: bool | Sequence[bool]) -> None:
        """The wrappers' ``disabled`` flag (one value for all, or one per layer)."""
        layers = list(layers)
        flags = [disabled] * len(layers) if isinstance(disabled, bool) else list(disabled)
        for w, flag in zip(layers, flags):
            w.disabled = flag


# the name other modules know
LorakitState = AdapterState


def get_state(model: nn.Module, create: bool = False) -> AdapterState | None:
    """The model's registry (``model._lorakit``); created on first inject when ``create``."""
    state = model.__dict__.get(_ATTR)
    if state is None and create:
        state = AdapterState()
        model.__dict__[_ATTR] = state
    return state


def drop_state(model: nn.Module) -> None:
    """The model has no adapters any more (``unload``, a rolled-back first inject)."""
    model.__dict__.pop(_ATTR, None)


def put_state(model: nn.Module, state: AdapterState) -> None:
    model.__dict__[_ATTR] = state


def require_state(model: nn.Module) -> AdapterState:
    """The registry, or a ValueError saying the model has no lorakit adapters."""
    state = get_state(model)
    if state is None or not state.configs:
        raise ValueError(f"this {type(model).__name__} has no lorakit adapters; call lorakit.inject(model, cfg) first")
    return state
