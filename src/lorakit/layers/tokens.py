"""Trainable tokens (``LoraConfig.trainable_token_indices``): train a few rows of an embedding, PEFT's
``TrainableTokensLayer``.

An adapter holds the new values of rows ``idx`` of the weight (``trainable_tokens_delta``, shape
``(len(idx), dim)``, initialised to the current rows) and the layer computes with

    W'[i] = delta[k]  if i = idx[k],  else W[i]

(rows replaced, not added: a resized-then-reinitialised vocabulary still gets the trained rows).
For a plain nn.Embedding / nn.Linear the base output is computed with W and the adapter's rows put
in (the outputs of its tokens; an output layer's logits of its tokens), so no copy of W and no dense
gradient of it is made; any other module (a scaled embedding, say) runs its own forward with ``W'``
(``torch.func.functional_call``), so it behaves as the base. Merging writes the rows into W, keeping the
rows it overwrote for an exact unmerge. Adapters active together must use disjoint rows.

PEFT's structure, for its file keys: the embedding ``P`` becomes a ``TokensWrapper`` whose
``token_adapter`` is this layer (``P.token_adapter.trainable_tokens_delta``, the base weight at
``P.token_adapter.base_layer.weight``). An output layer whose weight is tied to the embedding gets
a *follower* layer that reads the embedding layer's rows and owns no tensors (PEFT's tied adapter;
nothing of it is saved).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.config import LoraConfig
from lorakit.layers.replacing import ReplacingLayer


class TrainableTokens(ReplacingLayer):
    """Trained rows of the wrapped embedding (or, as a follower, of a tied output layer)."""

    adapter_attrs = ("trainable_tokens_delta",)
    b_attrs = ()  # rows, not factors: no B side
    ranked = False  # rows, not a rank: no rank/alpha patterns apply

    def __init__(self, base_layer: nn.Module, source: TrainableTokens | None = None) -> None:
        super().__init__(base_layer)
        self.token_indices: dict[str, list[int]] = {}
        self.trainable_tokens_delta = nn.ParameterDict()
        if source is not None:
            self.__dict__["source"] = source  # not a submodule: its tensors are the source's
            self.adapter_attrs = ()
        else:
            self.__dict__["source"] = None

    @property
    def owner(self) -> TrainableTokens:
        """The layer that holds the rows: the source of a follower, else this one."""
        return self.source if self.source is not None else self

    def tied_group(self) -> object | None:
        return self.owner  # a follower and its source share the weight and the rows

    def add_tokens(self, name: str, indices: list[int], cfg: LoraConfig, *, dtype: torch.dtype | None = None) -> None:
        """Adapter ``name`` trains rows ``indices`` (a follower: the source's rows for ``name``).

        Raises:
            ValueError: an index outside the weight's rows.
        """
        rows = self.base_weight().shape[0]
        bad = [i for i in indices if not 0 <= i < rows]
        if bad:
            raise ValueError(f"trainable_token_indices {bad} are out of range for a {type(self.base_layer).__name__} "
                             f"with {rows} rows (token ids 0..{rows - 1})")
        self.token_indices[name] = list(indices)
        self.add_adapter(name, len(indices), 1.0, dataclasses.replace(cfg, lora_bias=False, lora_dropout=0.0),
                         dtype=dtype)
        self.scaling[name] = 1.0

    def _create(self, name: str, r: int, cfg: LoraConfig) -> None:
        if self.source is None:
            idx = torch.tensor(self.token_indices[name], device=self.base_weight().device)
            self.trainable_tokens_delta[name] = nn.Parameter(self.base_weight().detach().index_select(0, idx).clone())

    def _init(self, name: str, cfg: LoraConfig) -> None:
        """The rows start at the weight's own values: the adapter starts as a no-op (as PEFT)."""

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self.token_indices.pop(name, None)

    # ------------------------------------------------------------------ maths
    def _check_disjoint(self, names: list[str]) -> None:
        seen: dict[int, str] = {}
        for n in dict.fromkeys([*self.merged_adapters, *names]):
            for i in self.owner.token_indices[n]:
                if i in seen and seen[i] != n:
                    raise ValueError(f"adapters {seen[i]!r} and {n!r} both train token {i} of "
                                     f"{type(self.base_layer).__name__}; adapters used together need disjoint "
                                     "trainable_token_indices")
                seen[i] = n

    def _rows(self, name: str, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices, new rows in ``weight``'s dtype) of adapter ``name``."""
        owner = self.owner
        idx = torch.tensor(owner.token_indices[name], device=weight.device)
        return idx, owner.trainable_tokens_delta[name].to(device=weight.device, dtype=weight.dtype)

    def adapted_weight(self, names: list[str]) -> torch.Tensor:
        """W with the rows of adapters ``names`` replaced (differentiable in the rows)."""
        self._check_disjoint(names)
        weight = self.base_weight()
        for name in names:
            weight = weight.index_copy(0, *self._rows(name, weight))
        return weight

    def delta_weight(self, name: str) -> torch.Tensor:
        """``W' - W`` for adapter ``name`` alone (zero outside its rows)."""
        weight = self.base_weight().detach()
        idx, rows = self._rows(name, weight)
        return torch.zeros_like(weight).index_copy(0, idx, rows - weight.index_select(0, idx))

    def _shares_source_weight(self) -> bool:
        return self.source is not None and self.base_weight() is self.source.base_weight()

    def _merged_weight(self, weight: torch.Tensor, name: str) -> torch.Tensor:
        """W with adapter ``name``'s rows written in (the overwritten rows kept for unmerge); a
        follower whose weight is its source's leaves it to the source."""
        if self._shares_source_weight():
            return weight
        self._check_disjoint([name])
        idx, rows = self._rows(name, weight)
        self.merge_cache[name] = weight.detach().index_select(0, idx).clone()
        return weight.index_copy(0, idx, rows.detach())

    def _unmerged_weight(self, weight: torch.Tensor, name: str, keep_cache: bool = False) -> torch.Tensor:
        if self._shares_source_weight():
            return weight
        old = self.merge_cache[name] if keep_cache else self.merge_cache.pop(name)
        idx = torch.tensor(self.owner.token_indices[name], device=weight.device)
        return weight.index_copy(0, idx, old.to(weight.dtype))

    # ------------------------------------------------------------------ forward
    def _direct(self, names: list[str]) -> bool:
        """Can the rows be put into the base output directly (no (rows, dim) copy of W, no dense
        gradient of it)? A plain nn.Linear, or an nn.Embedding whose options only touch W's gradient
        or rows in place (padding_idx among the rows, max_norm, scale_grad_by_freq) — these take
        the general path, as does any subclass (a scaled embedding's forward is its own)."""
        base = self.base_layer
        if type(base) is nn.Linear:
            return True
        if type(base) is not nn.Embedding or base.max_norm is not None or base.scale_grad_by_freq:
            return False
        return all(base.padding_idx not in self.owner.token_indices[n] for n in names)

    def _put_rows(self, name: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out`` (the output with W) with adapter ``name``'s rows in place, computed in the
        activations' dtype: embedding outputs of its tokens replaced by its rows; an output layer's
        logits of its tokens by ``x·rowsᵀ (+ b)``."""
        owner = self.owner
        idx = torch.tensor(owner.token_indices[name], device=x.device)
        rows = owner.trainable_tokens_delta[name].to(out.dtype)  # (k, dim)
        if isinstance(self.base_layer, nn.Linear):
            bias = self.base_layer.bias
            cols = F.linear(x, rows, None if bias is None else bias.index_select(0, idx).to(out.dtype))  # (..., k)
            return out.index_copy(out.dim() - 1, idx, cols)
        slot = torch.full((self.base_weight().shape[0],), -1, dtype=torch.long, device=x.device)
        slot[idx] = torch.arange(len(idx), device=x.device)
        k = slot[x]  # (...,) row of each token in `rows`, -1 for the others
        return torch.where((k >= 0).unsqueeze(-1), F.embedding(k.clamp(min=0), rows), out)  # (..., dim)

    def _call(self, names: list[str], x: torch.Tensor, *args, **kwargs):
        if not args and not kwargs and self._direct(names):
            self._check_disjoint(names)
            out = self.base_layer(x)
            for name in names:
                out = self._put_rows(name, x, out)
            return out
        return torch.func.functional_call(self.base_layer, {"weight": self.adapted_weight(names)}, (x, *args), kwargs)

    @property
    def no_split(self) -> str:  # type: ignore[override]
        return f"a {type(self.base_layer).__name__} called with more than one input (trainable tokens)"

    def _add_term(self, x: torch.Tensor, name: str, result: torch.Tensor) -> torch.Tensor:
        """``result`` (these rows' base output) with adapter ``name``'s rows (the mixed-batch reference
        loop calls this per group of rows)."""
        return self._put_rows(name, x, result) if self._direct([name]) else self._call([name], x)

    def extra_repr(self) -> str:
        tied = ", tied to the input embedding's rows" if self.source is not None else ""
        rows = {n: len(self.owner.token_indices.get(n, [])) for n in self.r}
        return f"rows={rows}{tied}, active={self.active_adapters}, merged={self.merged_adapters}"


class TokensWrapper(nn.Module):
    """PEFT's ``TrainableTokensWrapper``: the layer under ``token_adapter``, so keys are PEFT's; every
    other attribute is the wrapped layer's (``weight``, ``num_embeddings``...)."""

    def __init__(self, layer: TrainableTokens) -> None:
        super().__init__()
        self.token_adapter = layer

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            layer = self.__dict__.get("_modules", {}).get("token_adapter")
            if layer is None or name == "token_adapter":
                raise
            return getattr(layer.base_layer, name)

    def forward(self, x: torch.Tensor, *args, **kwargs):
        return self.token_adapter(x, *args, **kwargs)

    def release(self) -> nn.Module:
        return self.token_adapter.base_layer
