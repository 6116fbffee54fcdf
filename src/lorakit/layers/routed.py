"""One adapter per batch row (``lorakit.mixed_batch``): how a LoRA layer finds its rows' routing and
calls its batched kernel (``lorakit.layers.mixed_kernels``), with the stack of its factors cached and checked.

The routing is per thread (``lorakit.layers.routing``); a layer asks for it only while a block is
open, so outside ``mixed_batch`` a forward costs one integer test.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lorakit.layers import mixed_kernels
from lorakit.layers.routing import Route, route_for


class Routed:
    """Mixed-batch support of a LoRA layer (mixed into :class:`~lorakit.layers.base.LoraLayer`):
    the reference per-adapter loop (``mixed_forward``), the stacked factors a batched kernel uses
    (``stack_pairs`` → ``_stack`` / ``_row_blocks``), and their validation at block entry."""

    @torch.compiler.disable
    def _routed(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor | None:
        """Inside a ``mixed_batch`` block of this thread: checks, then ``mixed_forward`` with rows on
        dimension 0; None when this layer is not routed. Runs outside torch.compile: the routing is
        Python state, and a compiled graph around it sees only tensors of fixed shapes, so changing
        the rows' adapters never recompiles."""
        route = route_for(self)
        if route is None:
            return None
        if self.merged_adapters:
            raise ValueError("mixed_batch needs unmerged adapters; call lorakit.unmerge(model) first")
        dim = route.batch_dim
        if x.dim() <= dim or x.shape[dim] != len(route.rows):
            rows_found = x.shape[dim] if x.dim() > dim else 0
            raise ValueError(f"mixed_batch was given {len(route.rows)} adapter names but the batch has {rows_found} "
                             f"rows ({type(self.base_layer).__name__} input of shape {tuple(x.shape)}, rows on "
                             f"dimension batch_dim={dim})")
        if not any(n in self.r for n in route.names):
            return result
        if dim == 0:
            return self.mixed_forward(x, result, route)
        return self.mixed_forward(x.movedim(dim, 0), result.movedim(dim, 0), route).movedim(0, dim)

    def mixed_forward(self, x: torch.Tensor, result: torch.Tensor, route: Route) -> torch.Tensor:
        """One adapter per row (x: (N, ...), ``len(route.rows) == N``); the reference implementation:
        rows sharing an adapter go through ``_add_term`` together. Layer types override it with a
        batched kernel (``lorakit.layers.mixed_kernels``) where one computes the same function."""
        out = result.clone()
        for name in route.names:
            if name not in self.r:
                continue
            idx = torch.tensor([i for i, n in enumerate(route.rows) if n == name], device=x.device)
            part = result.index_select(0, idx)
            out.index_copy_(0, idx, self._add_term(x.index_select(0, idx), name, part).to(out.dtype))
        return out

    def stack_pairs(self, route: Route) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Per adapter of ``route.order``, the factors a batched kernel stacks (A, B), or None where
        this layer lacks the adapter; [] for layer types without a batched kernel."""
        return []

    def _stack(self, route: Route, dtype: torch.dtype) -> mixed_kernels.Stack:
        """This layer's stacked factors for ``route`` in ``dtype`` (cached; see ``lorakit.layers.mixed_kernels``)."""
        return mixed_kernels.stacked(self, route, lambda: self.stack_pairs(route),
                             lambda: [self.term_scale(n) if n in self.r else 0.0 for n in route.order], dtype,
                             lambda: self._stack_sources(route.order))

    def term_scale(self, name: str) -> float:
        """The factor adapter ``name``'s ``B·A`` term is multiplied by: its scaling (a layer whose base
        module scales its own output, e.g. a scaled embedding, multiplies it in too)."""
        return self.scaling[name]

    def _row_blocks(self, route: Route, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's (A, B) blocks for ``route``: (N, K, r), (N, r, M) with r padded to a multiple of 8."""
        return mixed_kernels.row_blocks(self, self._stack(route, dtype), route.slots(device))

    def _stack_sources(self, order: Sequence[str]) -> list[torch.Tensor]:
        """The parameters a stack over ``order`` is built from, looked up now (not kept references)."""
        return [p for n in order if n in self.r for p in self.adapter_parameters(n)]

    def check_stack(self, order: Sequence[str]) -> None:
        """Entering a mixed-batch block over adapters ``order``: drop a cached stack whose factors
        changed since it was built — replaced, re-pointed, written in place or through ``.data``."""
        mixed_kernels.check(self, self._stack_sources(order))

    def _route_flag(self, route: Route, what: str, compute) -> bool:
        """A per-layer fact about a route (e.g. "needs the loop"), computed once per block."""
        key = (what, id(self), self.training)
        if key not in route._cache:
            route._cache[key] = compute()
        return route._cache[key]
