"""Hand-derived identities, parametrized over layer type × dtype × adapter count.

* injected == base (B = 0 at init)          * merged == unmerged
* unmerge restores W (dtype tolerance)      * disabled == base (also while merged)
* switching gives each adapter its output   * gradients reach only what should train
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.adapters import wrappers
from lorakit.layers import LoraLayer
from lorakit.state import require_state

import models

TOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 2e-2, torch.float16: 3e-3}


class Tiny(nn.Module):
    """One layer of each supported type, in sequence."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(models.VOCAB, 16)
        self.lin = nn.Linear(16, 16)
        self.conv = nn.Conv1d(16, 16, 3, padding=1)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.out = nn.Linear(16, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)  # (B, T, 16)
        x = torch.tanh(self.lin(x))
        x = self.conv(x.transpose(1, 2)).transpose(1, 2)  # (B, T, 16)
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return self.out(x)  # (B, T, 5)


LAYER_TARGETS = {"linear": ["lin"], "embedding": ["emb"], "conv": ["conv"], "mha": ["attn"],
                 "all": ["emb", "lin", "conv", "attn", "out"]}


def _model(dtype: torch.dtype) -> Tiny:
    torch.manual_seed(0)
    return Tiny().to(dtype).eval()


def _inject(model: nn.Module, targets: list[str], n_adapters: int) -> list[str]:
    names = [f"a{i}" for i in range(n_adapters)]
    for i, name in enumerate(names):
        lk.inject(model, lk.LoraConfig(r=2 + i, lora_alpha=4, target_modules=targets), adapter_name=name)
    return names


def _close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    torch.testing.assert_close(a.float(), b.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("layer", list(LAYER_TARGETS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_adapters", [1, 3])
def test_identities(layer, dtype, n_adapters):
    model = _model(dtype)
    base = copy.deepcopy(model)
    x = models.ids()
    names = _inject(model, LAYER_TARGETS[layer], n_adapters)
    with torch.no_grad():
        ref = base(x)
        _close(model(x), ref, dtype)  # injected == base
        models.randomize_adapters(model, std=0.2)
        weights = {n: w.base_weight().detach().clone() for n, w in wrappers(model) if isinstance(w, LoraLayer)}

        outs = {}
        for name in names:  # each adapter gives its own output after switching
            lk.set_adapter(model, name)
            outs[name] = model(x)
            assert not torch.allclose(outs[name].float(), ref.float(), atol=1e-3)
            lk.merge(model)
            _close(model(x), outs[name], dtype)  # merged == unmerged
            lk.merge(model)  # merging twice changes nothing
            _close(model(x), outs[name], dtype)
            with lk.disable_adapters(model):  # disabled == base, even while merged
                _close(model(x), ref, dtype)
            _close(model(x), outs[name], dtype)  # ...and merged again after the block
            lk.unmerge(model)
            lk.unmerge(model)  # nothing merged: changes nothing
            for n, w in wrappers(model):
                if isinstance(w, LoraLayer):
                    _close(w.base_weight(), weights[n], dtype)  # unmerge restores W
            _close(model(x), outs[name], dtype)
        if n_adapters > 1:
            assert not torch.allclose(outs[names[0]].float(), outs[names[1]].float(), atol=1e-3)
        with lk.disable_adapters(model):
            _close(model(x), ref, dtype)


def test_unmerge_restores_fp32_weight_closely():
    model = _model(torch.float32)
    _inject(model, LAYER_TARGETS["all"], 1)
    models.randomize_adapters(model)
    before = {n: w.base_weight().detach().clone() for n, w in wrappers(model) if isinstance(w, LoraLayer)}
    for _ in range(3):
        lk.merge(model)
        lk.unmerge(model)
    for n, w in wrappers(model):
        if isinstance(w, LoraLayer):
            torch.testing.assert_close(w.base_weight(), before[n], atol=1e-6, rtol=0)


def test_stacked_merge_of_two_adapters_unmerges_in_reverse():
    model = _model(torch.float64)
    base = copy.deepcopy(model)
    _inject(model, LAYER_TARGETS["all"], 2)
    models.randomize_adapters(model)
    x = models.ids()
    lk.set_adapter(model, ["a0", "a1"])  # both active: updates add up
    with torch.no_grad():
        both = model(x)
        lk.merge(model)
        torch.testing.assert_close(model(x), both)
        lk.unmerge(model)
        for (_, a), (_, b) in zip(base.named_parameters(), [(n, p) for n, p in model.named_parameters()
                                                            if ".lora_" not in n and "_lora" not in n]):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_two_active_adapters_add_up():
    """On one Linear: y = W0·x + b + s0·B0·A0·x + s1·B1·A1·x."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6)).double()
    lk.inject(model, lk.LoraConfig(r=2, lora_alpha=4, target_modules=["0"]), adapter_name="a0")
    lk.inject(model, lk.LoraConfig(r=3, lora_alpha=9, target_modules=["0"]), adapter_name="a1")
    models.randomize_adapters(model)
    lk.set_adapter(model, ["a0", "a1"])
    layer = model[0]
    x = torch.randn(5, 8, dtype=torch.float64)
    expect = x @ layer.base_layer.weight.T + layer.base_layer.bias
    for name, s in (("a0", 4 / 2), ("a1", 9 / 3)):
        expect = expect + s * x @ layer.lora_A[name].weight.T @ layer.lora_B[name].weight.T
    with torch.no_grad():
        torch.testing.assert_close(model(x), expect)


@pytest.mark.parametrize("layer", ["linear", "embedding", "conv", "mha", "all"])
def test_gradients_reach_only_active_adapter(layer):
    model = _model(torch.float32).train()
    _inject(model, LAYER_TARGETS[layer], 2)
    models.randomize_adapters(model)
    model(models.ids()).square().mean().backward()
    for n, p in model.named_parameters():
        is_active = any(f".{attr}.a0" in n for attr in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"))
        assert p.requires_grad == is_active, n
        assert (p.grad is not None) == is_active, n
        if is_active:
            assert p.grad.abs().sum() > 0, n


def test_switching_moves_trainability():
    model = _model(torch.float32)
    _inject(model, ["lin"], 2)
    lk.set_adapter(model, "a1")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lin.lora_A.a1.weight", "lin.lora_B.a1.weight"}


def test_delete_adapter():
    model = _model(torch.float32)
    base = copy.deepcopy(model)
    _inject(model, ["lin", "attn"], 2)
    models.randomize_adapters(model)
    lk.set_adapter(model, "a1")
    lk.delete_adapter(model, "a1")
    assert lk.adapter_names(model) == ["a0"]
    assert lk.active_adapters(model) == ["a0"]
    assert not any(".a1" in n for n, _ in model.named_parameters())
    lk.delete_adapter(model, "a0")
    x = models.ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x), base(x))
    with pytest.raises(ValueError, match="unknown adapter"):
        lk.delete_adapter(model, "a0")


def test_delete_merged_adapter_refused():
    model = _model(torch.float32)
    _inject(model, ["lin"], 1)
    lk.merge(model)
    with pytest.raises(ValueError, match="merged"):
        lk.delete_adapter(model, "a0")


def test_safe_merge_detects_non_finite_before_touching_weights():
    model = _model(torch.float32)
    _inject(model, ["lin", "out"], 1)
    models.randomize_adapters(model)
    with torch.no_grad():
        model.out.lora_B["a0"].weight[0, 0] = float("nan")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="non-finite"):
        lk.merge(model, safe_merge=True)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, before[n], equal_nan=True)
    assert not any(w.merged for _, w in wrappers(model) if isinstance(w, LoraLayer))


def test_train_eval_never_merge():
    model = _model(torch.float32)
    _inject(model, ["lin"], 1)
    models.randomize_adapters(model)
    w = model.lin.base_layer.weight.detach().clone()
    model.eval()
    model.train()
    model.eval()
    assert not model.lin.merged
    torch.testing.assert_close(model.lin.base_layer.weight, w, atol=0, rtol=0)


def test_combine_adapters_is_exact():
    model = _model(torch.float64)
    _inject(model, LAYER_TARGETS["all"], 2)
    models.randomize_adapters(model)
    x = models.ids()
    with torch.no_grad():
        with lk.disable_adapters(model):
            base = model.lin(model.emb(x))
        deltas = {}
        for n in ("a0", "a1"):
            lk.set_adapter(model, n)
            deltas[n] = model.lin(model.emb(x)) - base
        lk.combine_adapters(model, ["a0", "a1"], [0.5, 2.0], "mix")
        lk.set_adapter(model, "mix")
        # the embedding's update changes the input of lin too, so compare layer by layer on lin only
        emb = model.emb(x)
        with lk.disable_adapters(model):
            lin_base = model.lin(emb)
        lin_mix = model.lin(emb)
        d0 = model.lin.delta_weight("a0")
        d1 = model.lin.delta_weight("a1")
        torch.testing.assert_close(lin_mix - lin_base, emb @ (0.5 * d0 + 2.0 * d1).T)
        torch.testing.assert_close(model.emb.delta_weight("mix"),
                                   0.5 * model.emb.delta_weight("a0") + 2.0 * model.emb.delta_weight("a1"))


def test_repr_shows_adapters():
    model = _model(torch.float32)
    _inject(model, ["lin"], 2)
    text = repr(model.lin)
    assert "a0(r=2, alpha=4)" in text and "a1(r=3, alpha=4)" in text and "active=['a0']" in text


def test_combined_config_rebuilds_the_same_shapes():
    """The recorded config of a combined adapter, injected into a fresh model, gives the same ranks."""
    model = _model(torch.float32)
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["lin", "attn"]), adapter_name="a0")
    lk.inject(model, lk.LoraConfig(r=3, target_modules=["lin", "emb"]), adapter_name="a1")
    lk.combine_adapters(model, ["a0", "a1"], [1.0, 1.0], "mix")
    cfg = require_state(model).configs["mix"]
    fresh = lk.inject(_model(torch.float32), cfg)
    for path in ("lin", "attn", "emb"):
        assert fresh.get_submodule(path).r["default"] == model.get_submodule(path).r["mix"], path
        assert fresh.get_submodule(path).scaling["default"] == 1.0
    assert model.lin.r["mix"] == 5 and model.attn.r["mix"] == 2 and model.emb.r["mix"] == 3
