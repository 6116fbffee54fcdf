"""All-or-nothing model changes: ``inject``, ``load_adapter`` and ``hotswap_adapter`` run inside a
transaction, so that a failure anywhere leaves the model exactly as it was — its modules, its
tensors bit for bit, every parameter's ``requires_grad`` and lorakit's registry.

A transaction snapshots what is cheap to snapshot (flags, the registry) and journals everything
else as it happens: each module replacement, each adapter added to an existing wrapper, each
in-place write to an existing tensor (PiSSA's residual, a base tensor read from a file) records how
to undo itself; on an exception the journal is replayed backwards.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator

import torch
from torch import nn

from lorakit.state import drop_state, get_state, put_state


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the dotted ``name`` is in ``model`` (``""`` is not allowed: the root stays)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


class Transaction:
    """The undo journal of one model change (see the module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._flags = [(p, p.requires_grad) for p in model.parameters()]
        state = get_state(model)
        self._state = state.copy() if state is not None else None
        self._undo: list[Callable[[], None]] = []

    def on_undo(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` if the change fails (journal entries run last-in, first-out)."""
        self._undo.append(fn)

    def replace(self, name: str, new: nn.Module, restore: Callable[[], nn.Module]) -> None:
        """Put ``new`` at ``name``; on failure put back what ``restore()`` returns."""
        set_submodule(self.model, name, new)
        self.on_undo(lambda: set_submodule(self.model, name, restore()))

    def keep(self, t: torch.Tensor) -> None:
        """Call before writing into ``t`` in place: on failure its current values come back."""
        saved = t.detach().clone()

        def restore() -> None:
            with torch.no_grad():
                t.copy_(saved)

        self.on_undo(restore)

    def keep_layer(self, layer: nn.Module) -> None:
        """Call before changing a wrapper's adapters (delete, add): on failure its bookkeeping — the
        per-adapter dicts and lists, flags, and the entries of its per-adapter containers
        (``lora_A``, ``lora_dropout``...) — comes back as it was. References only: nothing is copied."""
        plain = {k: (copy.copy(v) if isinstance(v, (dict, list)) else v) for k, v in layer.__dict__.items()
                 if not k.startswith("_")}
        holders = [(m, {a: copy.copy(m.__dict__[a]) for a in _CONTAINERS if a in m.__dict__})
                   for m in [layer, *layer.children()] if m is layer or _is_container(m)]

        def restore() -> None:
            layer.__dict__.update(plain)
            for m, saved in holders:
                m.__dict__.update({a: copy.copy(v) for a, v in saved.items()})

        self.on_undo(restore)

    def rollback(self) -> None:
        for fn in reversed(self._undo):
            fn()
        for p, flag in self._flags:
            p.requires_grad_(flag)
        current = get_state(self.model)
        if self._state is None:
            if current is not None:
                current.activate(self.model, [])
            drop_state(self.model)
        elif current is not None:
            current.restore(self.model, self._state)  # in place: holders of the registry see it
        else:
            put_state(self.model, self._state)
            self._state.restore(self.model, self._state.copy())


# a module's own containers of children, parameters and buffers (and ParameterDict's key order)
_CONTAINERS = ("_modules", "_parameters", "_buffers", "_keys")


def _is_container(m: nn.Module) -> bool:
    """A per-adapter container: a ModuleDict / ParameterDict / lorakit's BufferDict."""
    return isinstance(m, (nn.ModuleDict, nn.ParameterDict)) or type(m).__name__ == "BufferDict"


@contextlib.contextmanager
def transaction(model: nn.Module, outer: Transaction | None = None) -> Iterator[Transaction]:
    """A transaction on ``model``; inside an ``outer`` one, its journal (the outer undoes all)."""
    if outer is not None:
        yield outer
        return
    txn = Transaction(model)
    try:
        yield txn
    except BaseException:
        txn.rollback()
        raise
