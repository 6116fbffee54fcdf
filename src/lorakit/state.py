"""The adapter registry lorakit keeps on a model: configs, targets and which adapters are active."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from torch import nn

from lorakit.config import LoraConfig


@dataclass
class LorakitState:
    configs: dict[str, LoraConfig] = field(default_factory=dict)  # adapter name -> its config
    targets: dict[str, list[str]] = field(default_factory=dict)  # adapter name -> adapted module names
    active: list[str] = field(default_factory=list)
    # adapter name -> names of the base biases its ``bias`` mode unfroze (re-frozen when it is deleted)
    bias_params: dict[str, list[str]] = field(default_factory=dict)

    def copy(self) -> LorakitState:
        """A copy whose lists and dicts are independent of this one (configs are immutable in use)."""
        return LorakitState(dict(self.configs), copy.deepcopy(self.targets), list(self.active),
                            copy.deepcopy(self.bias_params))


def get_state(model: nn.Module, create: bool = False) -> LorakitState | None:
    """The model's registry (``model._lorakit``); created on first inject when ``create``."""
    state = model.__dict__.get("_lorakit")
    if state is None and create:
        state = LorakitState()
        model.__dict__["_lorakit"] = state
    return state


def require_state(model: nn.Module) -> LorakitState:
    """The registry, or a ValueError saying the model has no lorakit adapters."""
    state = get_state(model)
    if state is None or not state.configs:
        raise ValueError(f"this {type(model).__name__} has no lorakit adapters; call lorakit.inject(model, cfg) first")
    return state
