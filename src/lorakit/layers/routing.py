"""Per-call routing of a mixed batch: which adapter each batch row uses, in which layers.

The routing lives in a :class:`contextvars.ContextVar`, never on the layers themselves: every thread
(and asyncio task) sees only what its own ``lorakit.mixed_batch`` block set, and a nested block
restores the outer routing when it exits. A layer asks :func:`route_for` on each call; outside a
block the answer is ``None`` (one dictionary lookup).

A :class:`Route` is prepared once per block and shared by every layer and every forward inside it
(all decoding steps of a ``generate``): the distinct adapters in slot order, and, per device, each
row's slot.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from types import MappingProxyType

import torch
from torch import nn

BASE_ROW = "__base__"  # a mixed-batch row that uses no adapter (defined here only)


@dataclass(frozen=True, eq=False)
class Route:
    """One adapter name per batch row; ``batch_dim`` is the dimension of the layer's input that
    indexes rows (0 for batch-first inputs, 1 for sequence-first ones such as ``(L, N, E)``).

    ``order`` is every adapter of the model in a fixed order (the model's): adapter ``order[j]``
    is stack slot ``j + 1`` in every layer and every block, so a layer's stack serves all routes
    and is rebuilt only when the adapters change; slot 0 is the zero adapter (``"__base__"``, or an
    adapter a layer lacks). ``names`` are the distinct adapters the rows use, sorted.
    """

    rows: tuple[str, ...]
    batch_dim: int = 0
    order: tuple[str, ...] = ()
    names: tuple[str, ...] = field(init=False)
    _cache: dict = field(init=False, default_factory=dict, repr=False)  # device -> prepared index tensors

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", tuple(sorted({n for n in self.rows if n != BASE_ROW})))
        if not self.order:
            object.__setattr__(self, "order", self.names)

    def slots(self, device: torch.device) -> torch.Tensor:
        """Each row's slot: (N,) int64 on ``device``, built once per block and device."""
        key = ("slots", device)
        if key not in self._cache:
            index = {n: j for j, n in enumerate(self.order, start=1)}
            self._cache[key] = torch.tensor([index.get(n, 0) for n in self.rows], device=device)
        return self._cache[key]


_ROUTES: ContextVar[Mapping[int, Route]] = ContextVar("lorakit_routes", default=MappingProxyType({}))
# Blocks open in the whole process (all threads). While it is 0 no layer reads the context variable:
# a plain global int that torch.compile can guard on, where ContextVar.get would break every graph.
_OPEN = [0]
_LOCK = threading.Lock()


def blocks_open() -> bool:
    """Is any ``mixed_batch`` block open in this process? (Cheap, and traceable by torch.compile.)"""
    return _OPEN[0] > 0


def route_for(module: nn.Module) -> Route | None:
    """The routing this call of ``module`` must follow, or None (no mixed batch)."""
    if not _OPEN[0]:
        return None
    return _ROUTES.get().get(id(module))


@contextlib.contextmanager
def routed(modules: Iterable[nn.Module], route: Route) -> Iterator[None]:
    """Inside the block (and only in this thread / task), ``modules`` follow ``route``."""
    token = _ROUTES.set(MappingProxyType({**_ROUTES.get(), **{id(m): route for m in modules}}))
    with _LOCK:
        _OPEN[0] += 1
    try:
        yield
    finally:
        with _LOCK:
            _OPEN[0] -= 1
        _ROUTES.reset(token)
