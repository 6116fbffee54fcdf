"""LoRA layers whose adapters change *how* the wrapped module computes instead of adding a term to
its output: a parameter adapter (``target_parameters``: the module runs with ``W + ΔW``) and
trainable token rows (the module runs with some rows of W replaced). Each subclass supplies
``_call(names, x, ...)`` (the module's output with those adapters applied) and ``no_split``
(why rows cannot be split, for the mixed-batch error).
"""

from __future__ import annotations

import torch

from lorakit.layers.base import LoraLayer
from lorakit.layers.routing import blocks_open, route_for


class ReplacingLayer(LoraLayer):
    """Base of the weight-replacing layers (see the module docstring)."""

    no_split = "this layer"

    def forward(self, x: torch.Tensor, *args, **kwargs):
        """The wrapped module with the active, unmerged adapters applied; inside ``mixed_batch``,
        each row's own."""
        return self._replacing_forward(x, args, kwargs, self.no_split)

    def _call(self, names: list[str], x: torch.Tensor, *args, **kwargs):  # pragma: no cover - abstract
        raise NotImplementedError

    def _replacing_forward(self, x: torch.Tensor, args: tuple, kwargs: dict, no_split: str) -> torch.Tensor:
        """The forward of a layer whose adapters change how the wrapped module computes (``_call``)
        instead of adding a term (parameter and token layers): the base module with the active,
        unmerged adapters applied; in a mixed batch, each row's own. ``no_split`` says why rows
        cannot be split when the module gets more than its one input (or rows off dimension 0)."""
        if self.disabled:
            return self.base_layer(x, *args, **kwargs)
        route = route_for(self) if blocks_open() else None  # no ContextVar read (graph break) outside a block
        if route is not None:
            if args or kwargs or route.batch_dim != 0:
                raise ValueError(f"mixed_batch cannot split the rows of {no_split}; run the adapters in separate "
                                 "batches")
            return self._routed(x, self.base_layer(x))
        names = self.unmerged_active()
        if not names:
            return self.base_layer(x, *args, **kwargs)
        return self._call(names, x, *args, **kwargs)
