"""PEFT's LoRA tests outside the three case lists (huggingface/peft tests/test_custom_models.py:
``TestPeftCustomModel``'s multi-adapter tests run for ``LoraConfig``, ``TestRequiresGrad``'s LoRA
tests and the ``requires_grad`` checks after loading), written with lorakit's API.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch

import lorakit as lk
import peft_models as pm

import models

LIN0 = {"target_modules": ["lin0"]}
LIN0_SAVE_LIN1 = {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}


def _mlp(*configs: tuple[str, dict]) -> torch.nn.Module:
    torch.manual_seed(0)
    model = pm.MLP()
    for name, kw in configs:
        lk.inject(model, pm.lk_config(kw), name)
    return model


def _trainable(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _lora(layer: str, name: str) -> set[str]:
    return {f"{layer}.lora_A.{name}.weight", f"{layer}.lora_B.{name}.weight"}


def _saved(layer: str, name: str) -> set[str]:
    return {f"{layer}.modules_to_save.{name}.weight", f"{layer}.modules_to_save.{name}.bias"}


# ------------------------------------------------------------------ deleting with several adapters
def test_delete_adapter_with_multiple_adapters_works():
    model = _mlp(("adapter0", LIN0), ("adapter1", LIN0), ("adapter2", LIN0))
    X = pm.inputs()
    assert lk.active_adapters(model) == ["adapter0"]
    model(X)
    lk.delete_adapter(model, "adapter0")  # the active one: the next one becomes active
    assert lk.active_adapters(model) == ["adapter1"]
    model(X)
    lk.delete_adapter(model, "adapter2")  # an inactive one: the active one stays
    assert lk.active_adapters(model) == ["adapter1"]
    model(X)


def test_delete_adapter_multiple_adapters_with_modules_to_save():
    model = _mlp(("adapter0", LIN0_SAVE_LIN1), ("adapter1", LIN0), ("adapter2", LIN0_SAVE_LIN1))
    X = pm.inputs()
    assert set(model.lin1.modules_to_save) == {"adapter0", "adapter2"}
    model(X)
    lk.delete_adapter(model, "adapter0")
    assert lk.active_adapters(model) == ["adapter1"] and set(model.lin1.modules_to_save) == {"adapter2"}
    model(X)
    lk.delete_adapter(model, "adapter1")
    assert lk.active_adapters(model) == ["adapter2"] and set(model.lin1.modules_to_save) == {"adapter2"}
    model(X)
    lk.delete_adapter(model, "adapter2")
    assert lk.adapter_names(model) == [] and set(model.lin1.modules_to_save) == set()
    model(X)


def test_active_adapters_after_deleting_all():
    model = _mlp(("adapter0", LIN0))
    lk.delete_adapter(model, "adapter0")
    assert lk.active_adapters(model) == []


# ------------------------------------------------------------------ modules_to_save with several adapters
def _deep(kw0: dict, kw1: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    model = pm.DeepMLP(size=256)
    lk.inject(model, pm.lk_config(kw0))
    lk.inject(model, pm.lk_config(kw1), "other")
    return model


@pytest.mark.parametrize("saves", [(["layers.0.lin1"], ["layers.0.lin1"]),
                                   (["layers.0.lin1", "layers.1.lin1"], ["layers.2.lin1", "layers.1.lin1"])],
                         ids=["same", "overlapping"])
def test_multiple_active_adapters_with_same_modules_to_save_raises(saves):
    """A saved module is not additive: two active adapters may not both have a copy of it."""
    model = _deep({"target_modules": ["layers.0.lin0"], "modules_to_save": saves[0]},
                  {"target_modules": ["layers.0.lin0"], "modules_to_save": saves[1]})
    with pytest.raises(ValueError, match="modules_to_save|layers.[01].lin1"):
        lk.set_adapter(model, ["default", "other"])


def test_multiple_active_adapters_with_different_modules_to_save_works():
    model = _deep({"target_modules": ["layers.0.lin0"], "modules_to_save": ["layers.0.lin1"]},
                  {"target_modules": ["layers.0.lin0"], "modules_to_save": ["layers.1.lin1"]})
    lk.set_adapter(model, ["default", "other"])
    assert model.layers[0].lin1.active_adapters == ["default"]
    assert model.layers[1].lin1.active_adapters == ["other"]


def test_set_adapter_non_overlapping_modules_to_save():
    """Adding an adapter with modules_to_save does not activate (unfreeze) its copy."""
    model = _deep({"target_modules": ["layers.0.lin0"]},
                  {"target_modules": ["layers.0.lin0"], "modules_to_save": ["layers.0.lin1"]})
    copy_other = model.layers[0].lin1.modules_to_save["other"].weight
    for active, saved_active, grad in ((None, [], False), ("other", ["other"], True), ("default", [], False),
                                       (["other"], ["other"], True), (["default"], [], False)):
        if active is not None:
            lk.set_adapter(model, active)
        assert model.layers[0].lin1.active_adapters == saved_active
        assert copy_other.requires_grad is grad


@pytest.mark.parametrize("order", ["first_saves", "second_saves"])
def test_multiple_adapters_mixed_modules_to_save(order):
    """One adapter saves lin1, the other does not: each uses its own lin1 (the other: the original)."""
    configs = [("default", LIN0_SAVE_LIN1), ("other", LIN0)]
    model = _mlp(*(configs if order == "first_saves" else [(configs[0][0], LIN0), (configs[1][0], LIN0_SAVE_LIN1)]))
    saver = "default" if order == "first_saves" else "other"
    assert set(model.lin1.modules_to_save) == {saver}
    X = pm.inputs()
    model.eval()
    outs = {}
    for name in ("default", "other"):
        lk.set_adapter(model, name)
        outs[name] = model(X)
    with torch.no_grad():
        model.lin1.modules_to_save[saver].weight[0].add_(1.0)  # perturb the copy: only its adapter sees it
    for name in ("default", "other"):
        lk.set_adapter(model, name)
        assert torch.equal(model(X), outs[name]) is (name != saver)


# ------------------------------------------------------------------ weighted combinations
def test_multiple_adapters_mixed_modules_to_save_merging_adapters():
    model = _mlp(("default", LIN0_SAVE_LIN1), ("other", LIN0))
    lk.combine_adapters(model, ["default", "other"], [1.0, 1.0], "merged")
    assert set(model.lin1.modules_to_save) == {"default", "merged"}
    lk.set_adapter(model, "merged")
    model(pm.inputs())


def test_multiple_adapters_same_modules_to_save_merging_adapters_raises():
    model = _mlp(("default", LIN0_SAVE_LIN1), ("other", LIN0_SAVE_LIN1))
    with pytest.raises(ValueError, match="modules_to_save"):
        lk.combine_adapters(model, ["default", "other"], [1.0, 1.0], "merged")
    assert lk.adapter_names(model) == ["default", "other"]


def _delta(model: torch.nn.Module, name: str) -> torch.Tensor:
    """ΔW of adapter ``name`` on lin0, read off a merge (W + ΔW) minus the base weight."""
    base = model.lin0.base_layer.weight.detach().clone()
    lk.merge(model, [name])
    delta = model.lin0.base_layer.weight.detach() - base
    lk.unmerge(model)
    return delta


def test_add_weighted_adapter_cat_with_rank_pattern():
    model = _mlp(("default", {"target_modules": ["lin0", "lin1"], "r": 8, "rank_pattern": {"lin0": 2}}),
                 ("other", {"target_modules": ["lin0", "lin1"], "r": 8, "rank_pattern": {"lin0": 16}}))
    lk.combine_adapters(model, ["default", "other"], [1.0, 1.0], "merged")
    assert model.lin0.r["merged"] == 18 and model.lin1.r["merged"] == 16


def test_add_weighted_adapter_negative_weight_negates_adapter():
    torch.manual_seed(42)
    model = lk.inject(pm.MLP(), pm.lk_config({**LIN0, "init_lora_weights": False}), "adapter1")
    lk.combine_adapters(model, ["adapter1"], [-1.0], "merged_negative")
    torch.testing.assert_close(_delta(model, "merged_negative"), -_delta(model, "adapter1"), atol=1e-6, rtol=1e-6)


def test_add_weighted_adapter_subtraction_with_negative_weights():
    model = pm.MLP()
    cfg = pm.lk_config({**LIN0, "init_lora_weights": False})
    torch.manual_seed(42)
    lk.inject(model, cfg, "adapter1")
    torch.manual_seed(42)
    lk.inject(model, cfg, "adapter2")
    lk.combine_adapters(model, ["adapter1", "adapter2"], [1.0, -1.0], "cancelled")
    torch.testing.assert_close(_delta(model, "cancelled"), torch.zeros(20, 10), atol=1e-6, rtol=0)


def test_add_weighted_adapter_negative_weight_with_different_scaling():
    torch.manual_seed(42)
    model = pm.MLP()
    lk.inject(model, pm.lk_config({**LIN0, "r": 8, "lora_alpha": 16, "init_lora_weights": False}), "adapter1")
    lk.inject(model, pm.lk_config({**LIN0, "r": 8, "lora_alpha": 32, "init_lora_weights": False}), "adapter2")
    lk.combine_adapters(model, ["adapter1", "adapter2"], [0.5, -0.3], "merged_diff_scaling")
    expected = 0.5 * _delta(model, "adapter1") - 0.3 * _delta(model, "adapter2")
    torch.testing.assert_close(_delta(model, "merged_diff_scaling"), expected, atol=1e-5, rtol=1e-5)
    lk.set_adapter(model, "merged_diff_scaling")
    assert torch.isfinite(model(torch.randn(2, 10))).all()


# ------------------------------------------------------------------ TestRequiresGrad (LoRA)
REQUIRES_GRAD = {
    # id: (config of "default", config of "adapter1", trainable with default active, with adapter1 active)
    "lora_different_targets": (LIN0, {"target_modules": ["lin1"]}, _lora("lin0", "default"),
                               _lora("lin1", "adapter1")),
    "lora_same_targets": (LIN0, LIN0, _lora("lin0", "default"), _lora("lin0", "adapter1")),
    "modules_to_save_multiple_adapters": (LIN0_SAVE_LIN1, LIN0_SAVE_LIN1,
                                          _lora("lin0", "default") | _saved("lin1", "default"),
                                          _lora("lin0", "adapter1") | _saved("lin1", "adapter1")),
}


@pytest.mark.parametrize("case", list(REQUIRES_GRAD))
def test_requires_grad(case):
    kw0, kw1, default, adapter1 = REQUIRES_GRAD[case]
    model = _mlp(("default", kw0), ("adapter1", kw1))
    assert _trainable(model) == default  # adding an adapter does not activate it
    lk.set_adapter(model, "default")
    assert _trainable(model) == default
    lk.set_adapter(model, "adapter1")
    assert _trainable(model) == adapter1


@pytest.mark.parametrize("case", list(REQUIRES_GRAD))
def test_requires_grad_disabled(case):
    kw0, kw1, _default, adapter1 = REQUIRES_GRAD[case]
    model = _mlp(("default", kw0), ("adapter1", kw1))
    lk.set_adapter(model, "adapter1")
    with lk.disable_adapters(model):
        assert _trainable(model) == set()
    assert _trainable(model) == adapter1


@pytest.mark.parametrize("is_trainable", [False, True])
@pytest.mark.parametrize("save", [None, ["layers.0.lin1"]], ids=["plain", "modules_to_save"])
def test_loading_model_requires_grad_set_correctly(is_trainable, save, tmp_path):
    """``is_trainable`` decides whether a loaded adapter trains; a second loaded adapter is not
    activated, so the trainable set does not change."""
    cfg = pm.lk_config({"target_modules": ["layers.0.lin0"], "modules_to_save": save})
    lk.save_adapter(lk.inject(pm.DeepMLP(size=256), cfg), tmp_path)
    model = lk.load_adapter(pm.DeepMLP(size=256), tmp_path, is_trainable=is_trainable)

    def check():
        for n, p in model.named_parameters():
            assert p.requires_grad is (is_trainable and ".default" in n), n

    check()
    lk.load_adapter(model, tmp_path, adapter_name="other", is_trainable=is_trainable)
    check()


# ------------------------------------------------------------------ unloading, adapter names, DoRA + LoRA
def test_adapter_name_makes_no_difference():
    X = pm.inputs()
    torch.manual_seed(0)
    out_base = pm.MLP().eval()(X)
    outs, sds = [], []
    for name in ("default", "adapter", "other-name"):
        torch.manual_seed(0)
        model = pm.MLP().eval()
        torch.manual_seed(0)
        lk.inject(model, pm.lk_config({**LIN0, "init_lora_weights": False}), name)
        outs.append(model(X))
        sds.append({k.replace(f".{name}.", ".NAME."): v for k, v in model.state_dict().items()})
    assert sds[0].keys() == sds[1].keys() == sds[2].keys()
    assert all(torch.equal(sds[0][k], sd[k]) for sd in sds[1:] for k in sds[0])
    assert not torch.allclose(outs[0], out_base)
    torch.testing.assert_close(outs[1], outs[0], atol=0, rtol=0)
    torch.testing.assert_close(outs[2], outs[0], atol=0, rtol=0)


def test_unload_adapter_multihead_attention():
    """testing_common's _test_unload_adapter on PEFT's MHA model: the base function and parameter
    count come back, every wrapper is gone."""
    base = pm.build("MHA").eval()
    X = pm.inputs()
    out_base, n_keys, types = base(X), len(base.state_dict()), pm.module_types(base)
    model = lk.inject(base, pm.lk_config({"target_modules": ["mha"], "init_lora_weights": False}))
    out_adapter = model(X)
    model = lk.unload(model.eval())
    assert pm.module_types(model) == types and len(model.state_dict()) == n_keys
    assert not torch.allclose(out_adapter, model(X), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(model(X), out_base, atol=1e-4, rtol=1e-4)


def test_unload_keeps_trained_modules_to_save_like_peft():
    torch.manual_seed(0)
    base = pm.MLP().eval()
    ours = lk.inject(copy.deepcopy(base), pm.lk_config(LIN0_SAVE_LIN1))
    ref = peft.get_peft_model(base, pm.peft_config(LIN0_SAVE_LIN1))
    with torch.no_grad():  # "train" the saved copy the same way in both (one class: log-softmax sees it)
        ours.lin1.modules_to_save["default"].weight[0].add_(1.0)
        ref.base_model.model.lin1.modules_to_save["default"].weight[0].add_(1.0)
    X = pm.inputs()
    torch.testing.assert_close(lk.unload(ours).eval()(X), ref.unload().eval()(X), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("order", ["dora_first", "lora_first"])
def test_merge_dora_and_lora_adapters_on_one_layer(order):
    """Two active adapters on lin0, one DoRA: merging both gives the unmerged output (and PEFT's)."""
    dora = {**LIN0, "use_dora": True, "init_lora_weights": False}
    plain = {**LIN0, "init_lora_weights": False}
    kws = (dora, plain) if order == "dora_first" else (plain, dora)
    torch.manual_seed(0)
    base = pm.MLP().eval()
    ours = lk.inject(copy.deepcopy(base), pm.lk_config(kws[0]), "first")
    lk.inject(ours, pm.lk_config(kws[1]), "second")
    ref = peft.get_peft_model(base, pm.peft_config(kws[0]), "first")
    ref.add_adapter("second", pm.peft_config(kws[1]))
    assert models.copy_from_peft(ours, ref) > 0
    ref.base_model.set_adapter(["first", "second"])
    lk.set_adapter(ours, ["first", "second"])
    ours.eval(), ref.eval()
    X = pm.inputs()
    unmerged = ours(X)
    torch.testing.assert_close(unmerged, ref(X), atol=1e-5, rtol=1e-5)
    ref.merge_adapter()
    torch.testing.assert_close(ref(X), unmerged, atol=1e-4, rtol=1e-4)  # PEFT merges this right
    lk.merge(ours)
    torch.testing.assert_close(ours(X), unmerged, atol=1e-4, rtol=1e-4)
