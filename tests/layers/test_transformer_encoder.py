"""An adapted ``nn.TransformerEncoder`` in eval mode with a padding mask: torch would pack the input
into a nested tensor (its fast path), which adapted layers cannot take. lorakit keeps it padded; the
reference is the same model with the fast path turned off."""

from __future__ import annotations

import copy

import torch
from torch import nn

import lorakit as lk


def test_an_adapted_encoder_with_a_padding_mask_equals_the_slow_path():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    assert enc.use_nested_tensor
    lk.inject(enc, lk.LoraConfig(r=2, target_modules=["linear1", "linear2", "self_attn"], init_lora_weights=False))
    x = torch.randn(3, 5, 16)
    mask = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] * 4 + [True]])
    with torch.no_grad():
        out = enc(x, src_key_padding_mask=mask)
        merged = lk.merge_and_unload(copy.deepcopy(enc))
        assert merged.use_nested_tensor  # the plain model gets its own setting back
        merged.use_nested_tensor = False  # the reference: torch's slow path
        ref = merged(x, src_key_padding_mask=mask)
    keep = ~mask
    torch.testing.assert_close(out[keep], ref[keep], rtol=1e-5, atol=1e-5)
