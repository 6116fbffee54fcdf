"""Named adapters on a model: list, switch, delete, disable, mix per batch row, count parameters."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Union

from torch import nn

from lorakit.layers import BASE_ROW, LoraLayer
from lorakit.layers.saved import ModulesToSave
from lorakit.state import get_state, require_state

Wrapper = Union[LoraLayer, ModulesToSave]


def wrappers(model: nn.Module) -> Iterator[tuple[str, Wrapper]]:
    """Every lorakit wrapper in ``model`` (nested ones too, e.g. an attention's out_proj)."""
    for name, module in model.named_modules():
        if isinstance(module, (LoraLayer, ModulesToSave)):
            yield name, module


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters on ``model``, in the order they were added."""
    state = get_state(model)
    return list(state.configs) if state else []


def active_adapters(model: nn.Module) -> list[str]:
    return list(require_state(model).active)


def _check_names(model: nn.Module, names: Sequence[str], what: str) -> None:
    known = adapter_names(model)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"{what}: unknown adapter(s) {unknown}; this model has {known}")


def set_adapter(model: nn.Module, name: Union[str, Sequence[str]]) -> None:
    """Make ``name`` (or several names, whose updates add up) the active adapter(s).

    Only the active adapters' parameters keep ``requires_grad``.

    Raises:
        ValueError: an unknown name.
    """
    names = [name] if isinstance(name, str) else list(name)
    if not names:
        raise ValueError("set_adapter needs at least one adapter name")
    _check_names(model, names, "set_adapter")
    require_state(model).active = names
    for _, w in wrappers(model):
        w.set_active(names)
    refresh_trainable(model)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` everywhere. If it was active, the first remaining adapter becomes active.

    Raises:
        ValueError: an unknown name, or the adapter is merged into the base weights.
    """
    _check_names(model, [name], "delete_adapter")
    state = require_state(model)
    merged = [n for n, w in wrappers(model) if isinstance(w, LoraLayer) and name in w.merged_adapters]
    if merged:
        raise ValueError(f"adapter {name!r} is merged into {merged[:3]}...; call lorakit.unmerge(model) first")
    for _, w in wrappers(model):
        w.delete_adapter(name)
    del state.configs[name]
    state.targets.pop(name, None)
    state.active = [a for a in state.active if a != name] or list(state.configs)[:1]
    for _, w in wrappers(model):
        w.set_active(state.active)
    refresh_trainable(model)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model computes exactly its base function.

    Merged adapters are taken out of the weights on entry and merged back on exit.
    """
    require_state(model)
    layers = [w for _, w in wrappers(model)]
    remerge = {id(w): list(w.merged_adapters) for w in layers if isinstance(w, LoraLayer) and w.merged}
    for w in layers:
        if isinstance(w, LoraLayer):
            w.unmerge()
        w.disabled = True
    try:
        yield model
    finally:
        for w in layers:
            w.disabled = False
            if id(w) in remerge:
                w.merge(remerge[id(w)])


@contextlib.contextmanager
def mixed_batch(model: nn.Module, names: Sequence[str]) -> Iterator[nn.Module]:
    """Run each batch row through its own adapter (``"__base__"``: none). For inference.

    ``names[i]`` is the adapter of row ``i``; every forward inside the block must have
    ``len(names)`` rows (it holds across ``generate()`` steps without beam search).

    Raises:
        ValueError: an unknown name, an empty list, or merged adapters.
    """
    names = list(names)
    if not names:
        raise ValueError("mixed_batch needs one adapter name per batch row; got an empty list")
    _check_names(model, [n for n in names if n != BASE_ROW], "mixed_batch")
    layers = [w for _, w in wrappers(model)]
    if any(isinstance(w, LoraLayer) and w.merged for w in layers):
        raise ValueError("mixed_batch needs unmerged adapters; call lorakit.unmerge(model) first")
    for w in layers:
        w.row_adapters = names
    try:
        yield model
    finally:
        for w in layers:
            w.row_adapters = None


def refresh_trainable(model: nn.Module) -> None:
    """Freeze everything, then unfreeze the active adapters' parameters, their ``modules_to_save``
    copies, and the biases their ``bias`` mode names (``"all"``: every ``*.bias``;
    ``"lora_only"``: biases of adapted layers)."""
    state = get_state(model)
    for p in model.parameters():
        p.requires_grad_(False)
    if state is None:
        return
    for _, w in wrappers(model):
        for name in state.active:
            for p in w.adapter_parameters(name):
                p.requires_grad_(True)
    modes = {state.configs[a].bias for a in state.active}
    if "all" in modes:
        for n, p in model.named_parameters():
            if n == "bias" or n.endswith(".bias"):
                p.requires_grad_(True)
    if "lora_only" in modes:
        for _, w in wrappers(model):
            bias = getattr(w.base_layer, "bias", None) if isinstance(w, LoraLayer) else None
            if isinstance(bias, nn.Parameter) and any(a in w.r for a in state.active):
                bias.requires_grad_(True)


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts; ``total`` includes adapters and saved copies."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def summary(model: nn.Module) -> str:
    """``"trainable params: 74,498 || all params: 22,788,484 || trainable%: 0.3269"``."""
    t, n = trainable_parameters(model)
    return f"trainable params: {t:,d} || all params: {n:,d} || trainable%: {100 * t / max(n, 1):.4f}"


def print_trainable_parameters(model: nn.Module) -> None:
    print(summary(model))
