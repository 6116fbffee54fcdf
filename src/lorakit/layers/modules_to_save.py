"""``modules_to_save``: a module trained in full, one trainable copy per adapter.

Structure and state-dict keys follow PEFT's ``ModulesToSaveWrapper``: the frozen original in
``original_module`` and a copy per adapter in ``modules_to_save[adapter]``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from lorakit.layers.routing import BASE_ROW, blocks_open, route_for


class ModulesToSave(nn.Module):
    """Routes calls to the active adapter's copy; to the original when disabled or no copy is active."""

    adapter_attrs = ("modules_to_save",)

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.disabled = False

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            orig = self.__dict__.get("_modules", {}).get("original_module")
            if orig is None or name == "original_module":
                raise
            return getattr(self._current(), name)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save)

    def add_adapter(self, name: str) -> None:
        """A copy of the original module for adapter ``name`` (its trainability is set by the caller)."""
        self.modules_to_save[name] = copy.deepcopy(self.original_module)

    def release(self) -> nn.Module:
        return self.original_module

    def delete_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def set_active(self, names: list[str]) -> None:
        self.active_adapters = [n for n in names if n in self.modules_to_save]

    def adapter_parameters(self, name: str):
        if name in self.modules_to_save:
            yield from self.modules_to_save[name].parameters()

    def b_parameters(self, name: str):
        """A trained copy has no B side (LoRA+ leaves it at the base learning rate)."""
        return iter(())

    def _current(self) -> nn.Module:
        if self.disabled or not self.active_adapters:
            return self.original_module
        return self.modules_to_save[self.active_adapters[0]]

    def forward(self, x: torch.Tensor, *args, **kwargs):
        route = None if self.disabled or not blocks_open() else route_for(self)
        if route is None:
            return self._current()(x, *args, **kwargs)
        rows, dim = list(route.rows), route.batch_dim
        if x.dim() <= dim or x.shape[dim] != len(rows):
            rows_found = x.shape[dim] if x.dim() > dim else 0
            raise ValueError(f"mixed_batch was given {len(rows)} adapter names but the batch has {rows_found} rows "
                             f"(input of shape {tuple(x.shape)}, rows on dimension batch_dim={dim})")
        out = None
        for name in dict.fromkeys(rows):
            module = self.modules_to_save[name] if name in self.modules_to_save else self.original_module
            idx = torch.tensor([i for i, n in enumerate(rows) if n == name], device=x.device)
            part = module(x.index_select(dim, idx), *args, **kwargs)
            if not isinstance(part, torch.Tensor):
                raise TypeError(f"mixed_batch cannot route rows through this {type(module).__name__} "
                                f"(modules_to_save): it returns a {type(part).__name__}, not one tensor with a row "
                                "per batch item; run the adapters in separate batches")
            if out is None:
                shape = list(part.shape)
                shape[dim] = x.shape[dim]
                out = part.new_empty(shape)
            out.index_copy_(dim, idx, part)
        return out

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names}, active={self.active_adapters}, base_row={BASE_ROW!r}"
