"""Identities of the layer kinds issue 16 added: DoRA on convolutions and embeddings (merge then
unmerge restores W; merged = unmerged, also stacked with a plain adapter; PEFT's magnitude shape),
lora_bias (folded into the base bias and back; refused without one), grouped convolutions (the
batched mixed-batch kernel equals each row's own adapter)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit as lk

CONVS = {"conv1d": (lambda: nn.Conv1d(4, 6, 3, padding=1), (2, 4, 9)),
         "conv2d": (lambda: nn.Conv2d(4, 6, 3, stride=2), (2, 4, 7, 7)),
         "conv3d": (lambda: nn.Conv3d(4, 6, 2), (2, 4, 4, 4, 4)), "emb": (lambda: nn.Embedding(20, 6), None)}


def _model(kind: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    layer, shape = CONVS[kind][0](), CONVS[kind][1]
    x = torch.randint(0, 20, (2, 5)) if shape is None else torch.randn(shape)
    return nn.Sequential(layer), x


@pytest.mark.parametrize("kind", list(CONVS))
def test_dora_merge_unmerge_is_exact(kind):
    model, x = _model(kind)
    w0 = model[0].weight.detach().clone()
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["0"], use_dora=True, init_lora_weights=False), "dora")
    lk.inject(model, lk.LoraConfig(r=3, target_modules=["0"], init_lora_weights=False), "plain")
    m = model[0].lora_magnitude_vector["dora"]
    assert m.shape == ((6,) if kind == "emb" else (1, 6) + (1,) * (w0.dim() - 2))  # PEFT's shapes
    with torch.no_grad():
        m.mul_(1.5)  # a trained magnitude
    lk.set_adapter(model, ["dora", "plain"])
    out = model(x)
    lk.merge(model)
    torch.testing.assert_close(model(x), out, atol=1e-5, rtol=1e-5)
    lk.unmerge(model)
    torch.testing.assert_close(model[0].base_layer.weight, w0, atol=1e-5, rtol=1e-5)  # fp32 rounding of W·m/n
    torch.testing.assert_close(model(x), out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["conv2d", "linear"])
def test_lora_bias_folds_into_the_base_bias(kind):
    torch.manual_seed(0)
    conv = kind == "conv2d"
    layer, x = (nn.Conv2d(3, 5, 3), torch.randn(2, 3, 6, 6)) if conv else (nn.Linear(4, 5), torch.randn(3, 4))
    model = lk.inject(nn.Sequential(layer), lk.LoraConfig(r=2, target_modules=["0"], lora_bias=True, lora_alpha=4))
    b0 = model[0].base_layer.bias.detach().clone()
    with torch.no_grad():
        model[0].lora_B["default"].bias.normal_()  # trained; A and B stay as initialised (B = 0)
    out = model(x)
    lk.merge(model)
    torch.testing.assert_close(model[0].base_layer.bias, b0 + 2.0 * model[0].lora_B["default"].bias)  # scaling 4/2
    torch.testing.assert_close(model(x), out, atol=1e-6, rtol=1e-6)
    lk.unmerge(model)
    torch.testing.assert_close(model[0].base_layer.bias, b0, atol=1e-7, rtol=0)


def test_lora_bias_without_a_base_bias_warns_then_refuses_merging():
    model = nn.Sequential(nn.Linear(4, 5, bias=False))
    with pytest.warns(UserWarning, match="without a bias"):
        lk.inject(model, lk.LoraConfig(r=2, target_modules=["0"], lora_bias=True))
    w = model[0].base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="no bias to merge"):
        lk.merge(model)
    assert torch.equal(model[0].base_layer.weight, w) and not model[0].merged


def test_grouped_conv_mixed_batch_equals_each_rows_adapter():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 12, 3, padding=1, groups=4))
    lk.inject(model, lk.LoraConfig(r=4, target_modules=["0"], init_lora_weights=False), "a")
    lk.inject(model, lk.LoraConfig(r=8, target_modules=["0"], init_lora_weights=False), "b")
    x = torch.randn(3, 8, 5, 5)
    rows = ["b", "__base__", "a"]
    expected = []
    for i, name in enumerate(rows):
        if name == "__base__":
            with lk.disable_adapters(model):
                expected.append(model(x)[i])
        else:
            lk.set_adapter(model, name)
            expected.append(model(x)[i])
    with torch.no_grad(), lk.mixed_batch(model, rows):
        torch.testing.assert_close(model(x), torch.stack(expected), atol=1e-5, rtol=1e-5)


def test_grouped_conv_rank_must_divide_groups():
    model = nn.Sequential(nn.Conv2d(8, 12, 3, groups=4))
    with pytest.raises(ValueError, match="divisible by 4"):
        lk.inject(model, lk.LoraConfig(r=6, target_modules=["0"]))
    assert type(model[0]) is nn.Conv2d
