"""Prefix tuning on a BERT encoder: explicit-attention reference, mask extension, padding, gradients.

Prefixes have no identity at initialisation (any prefix takes attention mass from the tokens), so the
tests pin what must hold instead: the wrapped layer equals softmax over the concatenated keys/values
written out by hand; padding does not change a sequence's output; eager and SDPA agree; only the prefix
(and the head) receive gradients.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_methods import D, H, L, tiny_bert

from lorakit.methods import PrefixSelfAttention, extend_mask, get_method

torch.set_num_threads(1)
P = 3


def test_layer_equals_explicit_attention_over_concatenated_keys_values():
    model = tiny_bert("eager")
    base = model.bert.encoder.layer[0].attention.self
    layer = PrefixSelfAttention(base, P, init_std=1.0).eval()
    x = torch.randn(2, 5, D)  # (B, T, D)
    pad = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    mask = torch.where(pad, 0.0, torch.finfo(torch.float32).min)[:, None, None, :].expand(2, 1, 5, 5)
    out, _ = layer(x, attention_mask=mask)

    d_h = D // H
    def heads(t):  # (B, T, D) -> (B, H, T, d_h)
        return t.view(2, -1, H, d_h).transpose(1, 2)
    q, k, v = heads(base.query(x)), heads(base.key(x)), heads(base.value(x))
    k = torch.cat([layer.prefix_key.expand(2, -1, -1, -1), k], 2)  # (B, H, P+T, d_h)
    v = torch.cat([layer.prefix_value.expand(2, -1, -1, -1), v], 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d_h)  # (B, H, T, P+T)
    visible = torch.cat([torch.ones(2, P, dtype=torch.bool), pad], 1)[:, None, None, :]
    ref = (scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v).transpose(1, 2).reshape(2, 5, D)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_extend_mask_makes_prefix_visible_in_every_format():
    boolean = torch.tensor([[True, False]])[:, None, None, :]  # (1, 1, 1, 2)
    assert extend_mask(boolean, 2).tolist() == [[[[True, True, True, False]]]]
    additive = torch.tensor([[0.0, -1e9]])[:, None, None, :]
    assert extend_mask(additive, 1).tolist() == [[[[0.0, 0.0, -1e9]]]]
    assert extend_mask(torch.tensor([[1, 0]]), 2).tolist() == [[1, 1, 1, 0]]
    assert extend_mask(None, 4) is None


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_padding_does_not_change_a_sequence(impl):
    model = tiny_bert(impl)
    get_method("prefix", num_prefix=P, init_std=1.0).apply(model)
    ids = torch.tensor([[5, 6, 7, 8, 9], [11, 12, 13, 0, 0]])
    with torch.no_grad():
        both = model(input_ids=ids, attention_mask=(ids != 0).long()).logits
        alone = model(input_ids=ids[1:, :3]).logits  # no padding, no mask
    torch.testing.assert_close(both[1:], alone, rtol=1e-5, atol=1e-6)


def test_eager_and_sdpa_agree():
    eager, sdpa = tiny_bert("eager"), tiny_bert("sdpa")
    for m in (eager, sdpa):
        torch.manual_seed(3)
        get_method("prefix", num_prefix=P, init_std=1.0).apply(m)
    ids = torch.tensor([[5, 6, 7, 8, 9], [11, 12, 13, 0, 0]])
    with torch.no_grad():
        a = eager(input_ids=ids, attention_mask=(ids != 0).long()).logits
        b = sdpa(input_ids=ids, attention_mask=(ids != 0).long()).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_prefix_changes_outputs_and_only_prefix_and_head_get_gradients():
    model = tiny_bert()
    ids = torch.tensor([[5, 6, 7, 8, 9], [11, 12, 13, 0, 0]])
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    get_method("prefix", num_prefix=P, init_std=1.0).apply(model)
    loss = model(input_ids=ids, labels=torch.tensor([0, 1])).loss
    assert not torch.allclose(model(input_ids=ids).logits, ref)  # no identity at init: it attends to the prefix
    loss.backward()
    graded = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    expected = {f"bert.encoder.layer.{i}.attention.self.prefix_{kv}" for i in range(L) for kv in ("key", "value")}
    assert graded == expected | {"classifier.weight", "classifier.bias"}


def test_decoder_cache_is_refused():
    model = tiny_bert()
    get_method("prefix", num_prefix=P).apply(model)
    layer = model.bert.encoder.layer[0].attention.self
    with pytest.raises(ValueError, match="encoders only"):
        layer(torch.randn(1, 2, D), past_key_values=object())
