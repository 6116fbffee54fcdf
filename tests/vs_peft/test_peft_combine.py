"""combine_adapters against PEFT's add_weighted_adapter: every combination type, on Linear, GPT-2
Conv1D, nn.Embedding and Conv2d layers, negative weights, both sign methods, SVD clamping — the same
inputs (and, for DARE, the same seed) give PEFT's update in every layer.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch

import lorakit as lk
import peft_models as pm
from lorakit.combine import COMBINATION_TYPES

import models

pytestmark = [pytest.mark.filterwarnings(w) for w in [*pm.PEFT_WARNINGS, "ignore:fan_in_fan_out is set to True"]]

# model id -> (target_modules, an SVD rank every layer allows: PEFT breaks above min(out, in))
MODELS = {"MLP": (["lin0", "lin1"], 2), "EmbConv1D": (["emb", "conv1d", "lin0"], 1),
          "Conv2d": (["conv2d", "lin0"], 2)}


def _pair(model_id: str, alphas=(8, 16)):
    """(lorakit model, PEFT model), adapters "one" and "two" with PEFT's random weights in both."""
    targets, _ = MODELS[model_id]
    base = pm.build(model_id)
    ours = copy.deepcopy(base)
    torch.manual_seed(1)
    ref = peft.get_peft_model(base, peft.LoraConfig(target_modules=targets, r=4, lora_alpha=alphas[0],
                                                    init_lora_weights=False), "one")
    ref.add_adapter("two", peft.LoraConfig(target_modules=targets, r=4, lora_alpha=alphas[1], init_lora_weights=False))
    for name, alpha in zip(("one", "two"), alphas):
        lk.inject(ours, lk.LoraConfig(target_modules=targets, r=4, lora_alpha=alpha, init_lora_weights=False), name)
    assert models.copy_from_peft(ours, ref) > 0
    return ours, ref


def _assert_same_deltas(ours, ref, name: str, targets: list[str]) -> None:
    for t in targets:
        theirs = ref.base_model.model.get_submodule(t).get_delta_weight(name)
        torch.testing.assert_close(ours.get_submodule(t).delta_weight(name), theirs, atol=1e-5, rtol=1e-5, msg=t)


@pytest.mark.parametrize("kind", COMBINATION_TYPES)
@pytest.mark.parametrize("model_id", list(MODELS))
def test_combination_equals_peft(model_id, kind):
    """Same ΔW in every layer and the same outputs as PEFT (weights 0.7 and -0.4, density 0.5)."""
    targets, svd_rank = MODELS[model_id]
    ours, ref = _pair(model_id)
    kw = {"density": 0.5} if kind not in ("cat", "linear", "svd") else {}
    if kind.endswith("svd"):
        kw["svd_rank"] = svd_rank
    torch.manual_seed(7)
    ref.add_weighted_adapter(["one", "two"], [0.7, -0.4], "m", combination_type=kind, **kw)
    torch.manual_seed(7)
    lk.combine_adapters(ours, ["one", "two"], [0.7, -0.4], "m", combination_type=kind, **kw)
    _assert_same_deltas(ours, ref, "m", targets)
    lk.set_adapter(ours, "m")
    ref.set_adapter("m")
    X = pm.inputs()
    torch.testing.assert_close(ours.eval()(X), ref.eval()(X), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind, method, clamp", [("ties", "frequency", None), ("dare_ties_svd", "frequency", None),
                                                 ("svd", "total", 0.9), ("magnitude_prune_svd", "total", 0.8)])
def test_sign_method_and_clamp_equal_peft(kind, method, clamp):
    ours, ref = _pair("MLP", alphas=(4, 32))
    kw = dict(majority_sign_method=method, svd_clamp=clamp)
    if kind != "svd":
        kw["density"] = 0.3
    torch.manual_seed(3)
    ref.add_weighted_adapter(["one", "two"], [1.5, 0.5], "m", combination_type=kind, svd_rank=2, **kw)
    torch.manual_seed(3)
    lk.combine_adapters(ours, ["one", "two"], [1.5, 0.5], "m", combination_type=kind, svd_rank=2, **kw)
    _assert_same_deltas(ours, ref, "m", ["lin0", "lin1"])


def test_factor_merges_give_peft_factors():
    """linear/ties merge the factors themselves: lorakit's A and B are PEFT's."""
    ours, ref = _pair("MLP")
    ref.add_weighted_adapter(["one", "two"], [0.7, -0.4], "m", combination_type="ties", density=0.5)
    lk.combine_adapters(ours, ["one", "two"], [0.7, -0.4], "m", combination_type="ties", density=0.5)
    for t in ("lin0", "lin1"):
        for factor in ("lora_A", "lora_B"):
            torch.testing.assert_close(getattr(ours.get_submodule(t), factor)["m"].weight,
                                       getattr(ref.base_model.model.get_submodule(t), factor)["m"].weight)


def test_cat_is_exact_with_per_layer_ranks():
    """The default ("cat") is the exact weighted sum; a layer only one adapter has keeps that rank."""
    model = lk.inject(pm.build("MLP"), lk.LoraConfig(target_modules=["lin0", "lin1"], r=2, init_lora_weights=False),
                      "one")
    lk.inject(model, lk.LoraConfig(target_modules=["lin0"], r=3, lora_alpha=6, init_lora_weights=False), "two")
    lk.combine_adapters(model, ["one", "two"], [0.5, -2.0], "m")
    assert model.lin0.r["m"] == 5 and model.lin1.r["m"] == 2 and model.lin0.scaling["m"] == 1.0
    torch.testing.assert_close(model.lin0.delta_weight("m"),
                               0.5 * model.lin0.delta_weight("one") - 2.0 * model.lin0.delta_weight("two"))
    torch.testing.assert_close(model.lin1.delta_weight("m"), 0.5 * model.lin1.delta_weight("one"))


def test_grouped_conv_cat_is_exact_and_svd_refused():
    """A grouped conv's cat keeps each group's rank block together (its update is not one matrix,
    so the SVD types are refused)."""
    model = lk.inject(pm.build("Conv2dGroups"), lk.LoraConfig(target_modules=["conv2d"], init_lora_weights=False),
                      "one")
    lk.inject(model, lk.LoraConfig(target_modules=["conv2d"], lora_alpha=16, init_lora_weights=False), "two")
    X = pm.inputs()
    outs = {}
    for name in ("one", "two"):
        lk.set_adapter(model, name)
        outs[name] = model.conv2d(torch.randn(2, 16, 3, 3, generator=torch.Generator().manual_seed(0)))
    with lk.disable_adapters(model):
        base = model.conv2d(torch.randn(2, 16, 3, 3, generator=torch.Generator().manual_seed(0)))
    lk.combine_adapters(model, ["one", "two"], [0.5, 2.0], "m")
    lk.set_adapter(model, "m")
    mixed = model.conv2d(torch.randn(2, 16, 3, 3, generator=torch.Generator().manual_seed(0)))
    expected = 0.5 * (outs["one"] - base) + 2.0 * (outs["two"] - base)
    torch.testing.assert_close(mixed - base, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="grouped"):
        lk.combine_adapters(model, ["one", "two"], [0.5, 2.0], "s", combination_type="svd")
    assert "s" not in lk.adapter_names(model)
    model(X)


def test_lora_bias_combines_exactly():
    model = lk.inject(pm.build("MLP"), lk.LoraConfig(target_modules=["lin0"], lora_bias=True, init_lora_weights=False),
                      "one")
    lk.inject(model, lk.LoraConfig(target_modules=["lin0"], lora_bias=True, init_lora_weights=False), "two")
    lk.combine_adapters(model, ["one", "two"], [0.5, -1.0], "m")
    x = torch.randn(4, 10)
    terms = {}
    for name in ("one", "two", "m"):
        lk.set_adapter(model, name)
        terms[name] = model.lin0(x)
    with lk.disable_adapters(model):
        base = model.lin0(x)
    torch.testing.assert_close(terms["m"] - base, 0.5 * (terms["one"] - base) - (terms["two"] - base))


@pytest.mark.parametrize("kwargs, match", [
    (dict(combination_type="average"), "combination_type must be one of"),
    (dict(combination_type="ties"), "needs density"),
    (dict(combination_type="dare_linear", density=1.5), "needs density"),
    (dict(combination_type="ties", density=0.5, majority_sign_method="mean"), "majority_sign_method"),
])
def test_bad_arguments_raise_and_change_nothing(kwargs, match):
    ours, _ = _pair("MLP")
    with pytest.raises(ValueError, match=match):
        lk.combine_adapters(ours, ["one", "two"], [1.0, 1.0], "m", **kwargs)
    assert lk.adapter_names(ours) == ["one", "two"]


def test_factor_merge_needs_equal_ranks():
    model = lk.inject(pm.build("MLP"), lk.LoraConfig(target_modules=["lin0"], r=2), "one")
    lk.inject(model, lk.LoraConfig(target_modules=["lin0"], r=4), "two")
    with pytest.raises(ValueError, match="same rank"):
        lk.combine_adapters(model, ["one", "two"], [1.0, 1.0], "m", combination_type="linear")
    assert lk.adapter_names(model) == ["one", "two"] and "m" not in model.lin0.r


def test_combined_adapter_file_loads_in_peft(tmp_path):
    """An SVD combination saved by lorakit is read by PEFT with the same outputs."""
    ours, _ = _pair("EmbConv1D")
    lk.combine_adapters(ours, ["one", "two"], [1.0, 1.0], "m", combination_type="svd", svd_rank=1)
    lk.set_adapter(ours, "m")
    lk.save_adapter(ours, tmp_path, "m")
    ref = peft.PeftModel.from_pretrained(pm.build("EmbConv1D"), tmp_path / "m").eval()
    X = pm.inputs()
    torch.testing.assert_close(ref(X), ours.eval()(X), atol=1e-5, rtol=1e-5)
