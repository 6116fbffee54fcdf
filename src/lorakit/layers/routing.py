"""Per-call routing of a mixed batch: which adapter each batch row uses, in which layers.

The routing lives in a :class:`contextvars.ContextVar`, never on the layers themselves: every thread
(and asyncio task) sees only what its own ``lorakit.mixed_batch`` block set, and a nested block
restores the outer routing when it exits. A layer asks :func:`route_for` on each call; outside a
block the answer is ``None`` (one dictionary lookup).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from types import MappingProxyType

from torch import nn

BASE_ROW = "__base__"  # a mixed-batch row that uses no adapter (defined here only)


@dataclass(frozen=True)
class Route:
    """One adapter name per batch row; ``batch_dim`` is the dimension of the layer's input that
    indexes rows (0 for batch-first inputs, 1 for sequence-first ones such as ``(L, N, E)``)."""

    rows: tuple[str, ...]
    batch_dim: int = 0


_ROUTES: ContextVar[Mapping[int, Route]] = ContextVar("lorakit_routes", default=MappingProxyType({}))


def route_for(module: nn.Module) -> Route | None:
    """The routing this call of ``module`` must follow, or None (no mixed batch)."""
    return _ROUTES.get().get(id(module))


@contextlib.contextmanager
def routed(modules: Iterable[nn.Module], route: Route) -> Iterator[None]:
    """Inside the block (and only in this thread / task), ``modules`` follow ``route``."""
    token = _ROUTES.set(MappingProxyType({**_ROUTES.get(), **{id(m): route for m in modules}}))
    try:
        yield
    finally:
        _ROUTES.reset(token)
