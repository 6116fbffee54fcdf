"""Prefix tuning (Li & Liang, 2021) for BERT-style encoders: learned keys and values in every attention layer.

Each self-attention layer gets ``P`` trainable key vectors ``Pk`` and value vectors ``Pv`` per head,
prepended to the keys and values its tokens compute; queries are unchanged:

    head(X) = softmax(Q·[Pk; K]ᵀ / √d_h + [0; M]) · [Pv; V]        Pk, Pv: (H, P, d_h)

where ``M`` is the model's attention mask and every query may attend to every prefix position (the mask
is extended with "visible" columns). Adds ``2·P·d_model`` parameters per layer and ``P`` extra keys
to every attention at inference.

There is no initial identity as with zero-initialised adapters or LoRA: any prefix takes attention mass
from the real tokens (the output only stays the base one when the prefix is masked out). What holds, and
is tested, is that the layer equals an explicit attention over the concatenated keys/values, that padding
a sequence does not change its outputs, and that gradients reach only the prefix (and the head).

Supported: self-attention modules with ``query``/``key``/``value`` linears, ``attention_head_size`` and a
transformers ``config`` (BERT, RoBERTa, XLM-R, ELECTRA...), under the ``eager`` and ``sdpa`` attention
implementations. Decoders with a key/value cache are not supported.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lorakit.inject import replace_module
from lorakit.methods.base import freeze_all_but, head_names, trainable_state


def _is_bert_self_attention(module: nn.Module) -> bool:
    return all(hasattr(module, a) for a in ("query", "key", "value", "attention_head_size", "config")) \
        and type(module).__name__.endswith("SelfAttention")


def extend_mask(mask: torch.Tensor | None, prefix_len: int) -> torch.Tensor | None:
    """Prepend ``prefix_len`` always-visible key columns to an attention mask.

    ``None`` (everything visible) stays ``None``; a boolean mask gets ``True`` columns, an additive
    float mask ``0`` columns, an integer padding mask ``(B, T)`` columns of ones.
    """
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        fill = torch.ones((*mask.shape[:-1], prefix_len), dtype=torch.bool, device=mask.device)
    elif mask.is_floating_point():
        fill = torch.zeros((*mask.shape[:-1], prefix_len), dtype=mask.dtype, device=mask.device)
    else:
        fill = torch.ones((*mask.shape[:-1], prefix_len), dtype=mask.dtype, device=mask.device)
    return torch.cat([fill, mask], dim=-1)  # (..., P + T)


class PrefixSelfAttention(nn.Module):
    """A BERT-style self-attention with ``num_prefix`` learned key/value vectors per head.

    Args:
        base_layer: the model's self-attention module (its query/key/value stay as they are).
        num_prefix: the prefix length ``P``.
        init_std: the prefix vectors start as N(0, init_std²).
    """

    def __init__(self, base_layer: nn.Module, num_prefix: int, init_std: float = 0.02) -> None:
        super().__init__()
        if not _is_bert_self_attention(base_layer):
            raise TypeError(f"prefix tuning wraps a BERT-style self-attention (query/key/value linears, "
                            f"attention_head_size, config); got a {type(base_layer).__name__}")
        self.base_layer = base_layer
        heads = base_layer.query.out_features // base_layer.attention_head_size
        shape = (heads, num_prefix, base_layer.attention_head_size)
        weight = base_layer.query.weight
        self.prefix_key = nn.Parameter(torch.randn(shape, device=weight.device, dtype=weight.dtype) * init_std)
        self.prefix_value = nn.Parameter(torch.randn(shape, device=weight.device, dtype=weight.dtype) * init_std)
        self.train(base_layer.training)  # a new module starts in training mode; follow the model's mode

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                past_key_values=None, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        if past_key_values is not None:
            raise ValueError("prefix tuning in lorakit supports encoders only; got past_key_values (a decoder cache)")
        if kwargs.get("encoder_hidden_states") is not None:
            raise ValueError("prefix tuning wraps self-attention; got encoder_hidden_states (cross-attention)")
        kwargs.pop("encoder_hidden_states", None)
        base = self.base_layer
        b, t = hidden_states.shape[:2]
        shape = (b, t, -1, base.attention_head_size)
        q = base.query(hidden_states).view(shape).transpose(1, 2)  # (B, H, T, d_h)
        k = base.key(hidden_states).view(shape).transpose(1, 2)  # (B, H, T, d_h)
        v = base.value(hidden_states).view(shape).transpose(1, 2)  # (B, H, T, d_h)
        k = torch.cat([self.prefix_key.expand(b, -1, -1, -1), k], dim=2)  # (B, H, P+T, d_h)
        v = torch.cat([self.prefix_value.expand(b, -1, -1, -1), v], dim=2)  # (B, H, P+T, d_h)
        mask = extend_mask(attention_mask, self.prefix_key.shape[1])  # (B, 1, T, P+T) or None
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        eager = sys.modules[type(base).__module__].eager_attention_forward
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(base.config._attn_implementation, eager)
        out, weights = attend(base, q, k, v, mask, dropout=base.dropout.p if self.training else 0.0,
                              scaling=getattr(base, "scaling", base.attention_head_size ** -0.5), **kwargs)
        return out.reshape(b, t, -1).contiguous(), weights  # (B, T, H·d_h)


@dataclass
class PrefixTuning:
    """``num_prefix`` learned key/value vectors in every self-attention layer; the head trains too.

    Args:
        num_prefix: prefix length ``P``.
        init_std: initial N(0, init_std²) scale of the prefix vectors.
        head: the task head's module names (default: ``classifier`` / ``score``).
    """

    num_prefix: int = 10
    init_std: float = 0.02
    head: Sequence[str] | None = None
    name: str = "prefix"
    inference: str = "+P keys/values in every attention (slightly longer attention)"

    def apply(self, model: nn.Module) -> nn.Module:
        if not isinstance(self.num_prefix, int) or self.num_prefix < 1:
            raise ValueError(f"num_prefix must be a positive int, got {self.num_prefix!r}")
        heads = head_names(model, self.head)
        sites = [n for n, m in model.named_modules() if _is_bert_self_attention(m)]
        if not sites:
            raise TypeError(f"prefix tuning found no BERT-style self-attention in this {type(model).__name__} "
                            "(supported: BERT, RoBERTa, XLM-R, ELECTRA encoders)")
        for name in sites:
            replace_module(model, name, PrefixSelfAttention(model.get_submodule(name), self.num_prefix, self.init_std))
        freeze_all_but(model, heads)
        for m in model.modules():
            if isinstance(m, PrefixSelfAttention):
                m.prefix_key.requires_grad_(True)
                m.prefix_value.requires_grad_(True)
        return model

    def stored_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return trainable_state(model)

    def for_inference(self, model: nn.Module) -> nn.Module:
        return model
