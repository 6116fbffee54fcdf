"""Named adapters on a model: list, switch, delete, disable, mix per batch row, count parameters.

Trainability policy: lorakit only ever toggles ``requires_grad`` on what it owns — adapter factors,
``modules_to_save`` copies, and the base biases an adapter's ``bias`` mode asked for. ``inject``
freezes the base once, when the first adapter arrives; after that a parameter the user unfroze
(a final norm, say) stays as the user left it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Union

from torch import nn

from lorakit.layers import BASE_ROW, LoraLayer, ModulesToSave, Wrapper, wrappers
from lorakit.layers.routing import Route, routed
from lorakit.merge_quantized import refuse_inexact_unmerge
from lorakit.state import get_state, require_state
from lorakit.transaction import transaction

__all__ = ["adapter_names", "active_adapters", "set_adapter", "delete_adapter", "disable_adapters", "mixed_batch",
           "trainable_parameters", "summary", "print_trainable_parameters", "wrappers", "Wrapper",
           "set_adapter_grads"]


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters on ``model``, in the order they were added."""
    state = get_state(model)
    return list(state.configs) if state else []


def active_adapters(model: nn.Module) -> list[str]:
    """The active adapters' names ([] once every adapter is deleted)."""
    state = get_state(model)
    return list(state.active) if state else []


def _check_names(model: nn.Module, names: Sequence[str], what: str) -> None:
    known = adapter_names(model)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"{what}: unknown adapter(s) {unknown}; this model has {known}")


def set_adapter_grads(model: nn.Module, names: Sequence[str], trainable: Sequence[str]) -> None:
    """``requires_grad`` of the parameters adapters ``names`` own: True for those in ``trainable``,
    False for the others. Nothing else in the model is touched."""
    for _, w in wrappers(model):
        for name in names:
            for p in w.adapter_parameters(name):
                p.requires_grad_(name in trainable)


def set_adapter(model: nn.Module, name: Union[str, Sequence[str]], *, inference_mode: bool = False) -> None:
    """Make ``name`` (or several names, whose updates add up) the active adapter(s).

    As PEFT: the active adapters' parameters get ``requires_grad=True`` (False with
    ``inference_mode``), the other adapters' False. No other parameter is touched. Every check
    comes first; the change is a transaction.

    Raises:
        ValueError: an unknown name, or two of the names with their own trained copy of a module.
    """
    names = [name] if isinstance(name, str) else list(name)
    if not names:
        raise ValueError("set_adapter needs at least one adapter name")
    _check_names(model, names, "set_adapter")
    clash = [p for p, w in wrappers(model)
             if isinstance(w, ModulesToSave) and sum(n in w.modules_to_save for n in names) > 1]
    if clash:
        raise ValueError(f"set_adapter: adapters {names} each have their own trained copy of {clash[:3]} "
                         "(modules_to_save); copies do not add up, so at most one active adapter may have one")
    state = require_state(model)
    with transaction(model):
        state.activate(model, names)
        set_adapter_grads(model, list(state.configs), [] if inference_mode else names)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` everywhere. If it was active, the first remaining adapter becomes active.

    Base biases that its ``bias`` mode unfroze are frozen again. Every check comes first; the
    change is a transaction (on any error the model keeps the adapter, as it was).

    Raises:
        ValueError: an unknown name, or the adapter is merged into the base weights.
    """
    _check_names(model, [name], "delete_adapter")
    state = require_state(model)
    merged = [n for n, w in wrappers(model) if isinstance(w, LoraLayer) and name in w.merged_adapters]
    if merged:
        raise ValueError(f"adapter {name!r} is merged into {merged[:3]}...; call lorakit.unmerge(model) first")
    layers = [w for _, w in wrappers(model)]
    with transaction(model) as txn:
        for w in layers:
            txn.keep_layer(w)
            w.delete_adapter(name)
        was_active = name in state.active
        params = dict(model.named_parameters())
        for pname in state.remove(model, name):
            if pname in params:
                params[pname].requires_grad_(False)
        if was_active:
            set_adapter_grads(model, list(state.configs), state.active)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model computes exactly its base function.

    Merged adapters are taken out of the weights on entry and merged back on exit; adapter
    parameters do not require grad inside (as PEFT). On exit every wrapper and flag gets back the
    state it had on entry, so blocks nest.
    """
    state = require_state(model)
    refuse_inexact_unmerge(model)  # merged into a re-quantized weight: cannot be taken out exactly
    layers = [w for _, w in wrappers(model)]
    before = [(w, list(w.merged_adapters) if isinstance(w, LoraLayer) else []) for w in layers]
    disabled = [w.disabled for w in layers]
    flags = [(p, p.requires_grad) for w in layers for n in state.configs for p in w.adapter_parameters(n)]
    with transaction(model):
        for w in layers:
            if isinstance(w, LoraLayer):
                w.unmerge()
        state.set_disabled(layers, True)
        for p, _ in flags:
            p.requires_grad_(False)
    try:
        yield model
    finally:
        state.set_disabled(layers, disabled)
        for w, merged in before:
            if merged:
                w.merge(merged)
        for p, flag in flags:
            p.requires_grad_(flag)


def _layers_for_routing(model: nn.Module) -> tuple[list, list[str], list[str]]:
    """One pass over ``model``: its wrappers, the layers that refuse mixed batches (``mixed_refusal``), and the
    blocks whose adapted layers see sequence-first inputs ``(L, N, ...)`` — those holding a module
    that declares ``batch_first=False`` (nn.MultiheadAttention, RNNs, nn.Transformer — and so
    nn.TransformerEncoderLayer, whose linear1/linear2 get its attention's layout)."""
    layers, attn, declared = [], [], []
    for name, m in model.named_modules():
        if isinstance(m, (LoraLayer, ModulesToSave)):
            layers.append(m)
            if getattr(m, "mixed_refusal", None):
                attn.append((name, m.mixed_refusal))
            m = m.base_layer if isinstance(m, LoraLayer) else m
        if m.__dict__.get("batch_first", None) is False:  # an instance attribute where torch declares it
            declared.append(name)
    seq_first = []
    for name in declared:
        block_name = name.rpartition(".")[0]
        block = model.get_submodule(block_name) if block_name else model
        if any(isinstance(s, (LoraLayer, ModulesToSave)) for s in block.modules()):
            seq_first.append(block_name or type(block).__name__)
    return layers, attn, list(dict.fromkeys(seq_first))


@contextlib.contextmanager
def mixed_batch(model: nn.Module, names: Sequence[str], *, batch_dim: int = 0) -> Iterator[nn.Module]:
    """Run each batch row through its own adapter (``"__base__"``: none). For inference.

    ``names[i]`` is the adapter of row ``i``; every forward inside the block must have
    ``len(names)`` rows (it holds across ``generate()`` steps without beam search). The routing is
    per thread (a context variable): concurrent blocks in other threads do not see it, and a nested
    block restores the outer one.

    Args:
        batch_dim: the dimension of each adapted layer's input that indexes rows: 0 (batch-first,
            the default), or 1 for sequence-first models (``batch_first=False``, inputs ``(L, N, E)``).

    Raises:
        ValueError: an unknown name, an empty list, merged adapters, or sequence-first modules
            (``batch_first=False``) with ``batch_dim=0``.
    """
    names = list(names)
    if not names:
        raise ValueError("mixed_batch needs one adapter name per batch row; got an empty list")
    if batch_dim not in (0, 1):
        raise ValueError(f"batch_dim must be 0 (batch-first inputs) or 1 (sequence-first), got {batch_dim!r}")
    _check_names(model, [n for n in names if n != BASE_ROW], "mixed_batch")
    layers, attn, seq_first = _layers_for_routing(model)
    if any(isinstance(w, LoraLayer) and w.merged for w in layers):
        raise ValueError("mixed_batch needs unmerged adapters; call lorakit.unmerge(model) first")
    if attn:
        raise ValueError(f"mixed_batch does not support {[n for n, _ in attn[:3]]}: {attn[0][1]}")
    if batch_dim == 0 and seq_first:
        raise ValueError(f"mixed_batch: {seq_first[:3]} take sequence-first inputs (batch_first=False), so "
                         "batch rows are on dimension 1, not 0; pass batch_dim=1")
    route = Route(tuple(names), batch_dim, order=tuple(adapter_names(model)))
    for w in layers:
        if isinstance(w, LoraLayer):
            w.check_stack(route.order)  # once per block: catches factors changed since a stack was built
    with routed(layers, route):
        yield model


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
