"""LoRA around ``nn.MultiheadAttention`` (packed q/k/v projection, ``_qkv_same_embed_dim``).

PyTorch's attention reads its projection weights directly instead of calling Linear modules, so
the adapted weights are formed and passed to ``F.multi_head_attention_forward``:

    W_in'  = W_in  + scaling · B_in·A_in         A_in: (r, E), B_in: (r → 3E)
    W_out' = W_out + scaling · B_out·A_out       (out_proj is wrapped as a lorakit Linear)

The gradient reaches A and B through W'. This is the same function as PEFT's (which merges and
unmerges around each call) without mutating the base weights. Like PEFT, lora_dropout is not
applied here: the update acts on weights, not on one input. In the forward, each ΔW is formed by
calling the factors on the identity (``B(A(I))ᵀ·s``), so hooks on the factors run (FSDP2, ZeRO-3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.config import WEIGHT_INITS, LoraConfig
from lorakit.layers.base import LoraLayer, init_lora_pair
from lorakit.layers.linear import Linear
from lorakit.layers.registry import LayerKind, register
from lorakit.layers.routing import blocks_open, route_for


class MultiheadAttention(LoraLayer):
    """LoRA wrapper of an ``nn.MultiheadAttention``: in_proj via ``lora_A/B``, out_proj via its own wrapper."""

    mixed_refusal = ("an adapted nn.MultiheadAttention's update acts on weights the whole batch shares; run the "
                     "adapters in separate batches")

    def __init__(self, base_layer: nn.MultiheadAttention) -> None:
        if not base_layer._qkv_same_embed_dim:
            raise ValueError("LoRA on nn.MultiheadAttention needs kdim == vdim == embed_dim (one packed in_proj); "
                             f"got kdim={base_layer.kdim}, vdim={base_layer.vdim}, embed_dim={base_layer.embed_dim}")
        super().__init__(base_layer)
        if not isinstance(base_layer.out_proj, Linear):
            base_layer.out_proj = Linear(base_layer.out_proj)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    @property
    def out_proj_lora(self) -> Linear:
        return self.base_layer.out_proj

    def base_weight(self) -> torch.Tensor:
        return self.base_layer.in_proj_weight

    def weight_owner(self) -> tuple[nn.Module, str]:
        return self.base_layer, "in_proj_weight"

    def sub_layers(self) -> list[LoraLayer]:
        return [self, self.out_proj_lora]

    def release(self) -> nn.MultiheadAttention:
        """The attention module with its original out_proj back in place."""
        base = self.base_layer
        if isinstance(base.out_proj, Linear):
            self.__dict__["_out_proj_wrapper"] = base.out_proj  # for reattach
            base.out_proj = base.out_proj.release()
        return base

    def reattach(self) -> None:
        """Undo :meth:`release` (a rolled-back unload): the out_proj wrapper goes back in place."""
        wrapper = self.__dict__.pop("_out_proj_wrapper", None)
        if wrapper is not None:
            self.base_layer.out_proj = wrapper

    def set_scale(self, name: str, lora_alpha: float, cfg: LoraConfig) -> None:
        """in_proj and out_proj share the attention module's rank and alpha."""
        super().set_scale(name, lora_alpha, cfg)
        self.out_proj_lora.set_scale(name, lora_alpha, cfg)

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        self.out_proj_lora.delete_adapter(name)

    def set_active(self, names) -> None:
        super().set_active(names)
        self.out_proj_lora.set_active(names)

    def add_adapter(self, name: str, r: int, lora_alpha: float, cfg: LoraConfig, *, dtype=None) -> None:
        if cfg.use_dora or cfg.lora_bias:
            which = "use_dora" if cfg.use_dora else "lora_bias"
            raise ValueError(f"{which} is not supported on nn.MultiheadAttention; set {which}=False")
        if cfg.init_lora_weights in WEIGHT_INITS:
            raise ValueError(f"init_lora_weights={cfg.init_lora_weights!r} is not supported on nn.MultiheadAttention")
        super().add_adapter(name, r, lora_alpha, cfg, dtype=dtype)
        self.out_proj_lora.add_adapter(name, r, lora_alpha, cfg, dtype=dtype)

    def _create(self, name: str, r: int, cfg: LoraConfig) -> None:
        e = self.base_layer.embed_dim
        self.lora_A[name] = nn.Linear(e, r, bias=False)
        self.lora_B[name] = nn.Linear(r, 3 * e, bias=False)

    def _init(self, name: str, cfg: LoraConfig) -> None:
        init_lora_pair(self.lora_A[name].weight, self.lora_B[name].weight, cfg.init_lora_weights, self.r[name])

    def delta_weight(self, name: str) -> torch.Tensor:
        return (self.lora_B[name].weight @ self.lora_A[name].weight) * self.scaling[name]  # (3E, E)

    def called_delta(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """ΔW_in (3E, E) by calling the factors on the identity: ``B(A(I))ᵀ·s`` (hooks run)."""
        A = self.lora_A[name]
        eye = torch.eye(self.base_layer.embed_dim, device=A.weight.device, dtype=dtype)  # (E, E)
        return self.lora_B[name](A(eye)).T * self.scaling[name]  # (3E, E)

    @staticmethod
    def _adapted(layer: LoraLayer, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` plus the updates of ``layer``'s active, unmerged adapters."""
        for name in layer.unmerged_active():
            dtype = layer.lora_A[name].weight.dtype
            weight = weight + layer.called_delta(name, dtype).to(weight.dtype)
        return weight

    def mixed_forward(self, x, result, route):
        raise ValueError("mixed_batch does not support nn.MultiheadAttention layers (their update acts on "
                         "weights shared by the whole batch); target its sub-layers' Linear modules instead")

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_padding_mask=None,
                need_weights: bool = True, attn_mask=None, average_attn_weights: bool = True, is_causal: bool = False):
        if blocks_open() and route_for(self) is not None:
            self.mixed_forward(query, None, route_for(self))
        m = self.base_layer
        out = self.out_proj_lora
        if not self.unmerged_active() and not out.unmerged_active():
            return m(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                     attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
        key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                             other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                             target_type=query.dtype)
        attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                      target_type=query.dtype, check_other=False)
        batched = query.dim() == 3
        if m.batch_first and batched:  # (N, L, E) -> (L, N, E)
            query, key, value = (t.transpose(1, 0) for t in (query, key, value))
        in_w = self._adapted(self, m.in_proj_weight)  # (3E, E)
        out_w = self._adapted(out, out.base_layer.weight)  # (E, E)
        attn, weights = F.multi_head_attention_forward(
            query, key, value, m.embed_dim, m.num_heads, in_w, m.in_proj_bias, m.bias_k, m.bias_v,
            m.add_zero_attn, m.dropout, out_w, out.base_layer.bias, training=self.training,
            key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
            average_attn_weights=average_attn_weights, is_causal=is_causal)
        if m.batch_first and batched:
            attn = attn.transpose(1, 0)
        return attn, weights


register(LayerKind("nn.MultiheadAttention", lambda m: isinstance(m, nn.MultiheadAttention),
                   lambda m, **_: MultiheadAttention(m)))
