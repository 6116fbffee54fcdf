"""PEFT's LoRA test matrix, part 3: several adapters on one model (PEFT's
``MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES`` and ``TestMultipleActiveAdapters``), mixed-adapter batches
(``MIXED_ADAPTER_TEST_CASES`` and the other ``TestMixedAdapterBatches`` LoRA rows), and the
LoRA-only multi-adapter tests of ``TestPeftCustomModel`` (deleting, modules_to_save, weighted
combinations), written with lorakit's API; PEFT gives the same numbers on the same weights.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper

import lorakit as lk
import peft_models as pm
from peft_models import cases

import models

BASE = "__base__"

pytestmark = [pytest.mark.filterwarnings(w) for w in pm.PEFT_WARNINGS]


def _base(case: str) -> torch.nn.Module:
    """PEFT's model of a multi-adapter row (seed 0, as its ``resolve_model_cls``)."""
    torch.manual_seed(0)
    return pm.MODELS[pm.MULTI[case][0]]().eval()


def _two(case: str, names=("adapter_1", "adapter_2"), model=None):
    """The row's base model with its two lorakit adapters (token rows randomised, as PEFT does)."""
    _, kw1, kw2 = pm.MULTI[case]
    model = (_base(case) if model is None else model).eval()
    lk.inject(model, pm.lk_config(kw1), names[0])
    lk.inject(model, pm.lk_config(kw2), names[1])
    pm.randomize_tokens(model)
    return model.eval()


def _mlp(kw1: dict, kw2: dict):
    """PEFT's ``MLP(bias=True)`` (seed 0) with two lorakit adapters."""
    torch.manual_seed(0)
    model = pm.MLP().eval()
    lk.inject(model, pm.lk_config(kw1), "adapter_1")
    lk.inject(model, pm.lk_config(kw2), "adapter_2")
    return model.eval()


# ------------------------------------------------------------------ TestMultipleActiveAdapters
@pytest.mark.parametrize("case", cases("multiple_active_adapters_forward", pm.MULTI))
def test_multiple_active_adapters_forward(case):
    _, kw1, kw2 = pm.MULTI[case]
    model = _two(case)
    X = pm.inputs()
    lk.set_adapter(model, "adapter_1")
    out1 = model(X)
    lk.set_adapter(model, "adapter_2")
    out2 = model(X)
    lk.set_adapter(model, ["adapter_1", "adapter_2"])
    both = model(X)
    assert not torch.allclose(out1, out2, atol=1e-5)
    assert not torch.allclose(out1, both, atol=1e-5)
    assert not torch.allclose(out2, both, atol=1e-5)
    if kw1.get("target_parameters"):  # refused, as PEFT refuses it: per-parameter updates are not one B·A
        with pytest.raises(ValueError, match="target_parameters"):
            lk.combine_adapters(model, ["adapter_1", "adapter_2"], [1.0, 1.0], "new_combined_adapter")
        assert lk.adapter_names(model) == ["adapter_1", "adapter_2"]
        return
    # the exact (rank-concatenating) weighted sum equals both adapters active
    lk.combine_adapters(model, ["adapter_1", "adapter_2"], [1.0, 1.0], "new_combined_adapter")
    lk.set_adapter(model, "new_combined_adapter")
    torch.testing.assert_close(model(X), both, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", cases("multiple_active_adapters_same_as_peft", pm.MULTI))
def test_multiple_active_adapters_same_as_peft(case):
    """Both adapters active: PEFT's output on the same weights, unmerged and merged."""
    _, kw1, kw2 = pm.MULTI[case]
    base = _base(case)
    ours = _two(case, model=copy.deepcopy(base))
    if case == "LoRA_targeting_nnParameter_Different":
        # PEFT refuses adapters with different target_parameters; both active on different layers are
        # one PEFT adapter on both layers, adapter_1's factors on lin0 and adapter_2's on lin1
        ref = peft.get_peft_model(base, pm.peft_config({**kw1, "target_parameters": ["lin0.weight", "lin1.weight"]}))
        with torch.no_grad():
            for layer, name in (("lin0", "adapter_1"), ("lin1", "adapter_2")):
                for factor in ("lora_A", "lora_B"):
                    getattr(ref.base_model.model.get_submodule(layer), factor)["default"].weight.copy_(
                        getattr(ours.get_submodule(layer), factor)[name].weight)
    else:
        ref = peft.get_peft_model(base, pm.peft_config(kw1), adapter_name="adapter_1")
        ref.add_adapter("adapter_2", pm.peft_config(kw2))
        pm.randomize_tokens(ref)
        assert models.copy_from_peft(ours, ref) > 0
        for module in ref.modules():  # PEFT's test helper: its set_adapter refuses two token adapters on a layer
            if isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
                module.set_adapter(["adapter_1", "adapter_2"])
    lk.set_adapter(ours, ["adapter_1", "adapter_2"])
    ref.eval()
    X = pm.inputs()
    torch.testing.assert_close(ours(X), ref(X), atol=1e-5, rtol=1e-5)
    lk.merge(ours)
    ref.merge_adapter()
    torch.testing.assert_close(ours(X), ref(X), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", cases("multiple_active_adapters_merge_and_unmerge", pm.MULTI))
def test_multiple_active_adapters_merge_and_unmerge(case):
    X = pm.inputs()
    base_out = _base(case)(X)
    model = _two(case)
    lk.set_adapter(model, ["adapter_1", "adapter_2"])
    both = model(X)
    lk.merge(model)
    torch.testing.assert_close(model(X), both, atol=1e-5, rtol=1e-5)
    lk.unmerge(model)
    with lk.disable_adapters(model):
        torch.testing.assert_close(model(X), base_out, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("case", cases("merge_layers_multi", pm.MULTI))
def test_merge_layers_multi(case):
    model = _two(case, names=("default", "adapter-2"))
    X = pm.inputs()
    out1 = model(X)
    lk.set_adapter(model, "adapter-2")
    out2 = model(X)
    assert not torch.allclose(out1, out2, atol=1e-3, rtol=1e-3)
    lk.set_adapter(model, "default")
    torch.testing.assert_close(model(X), out1, atol=0, rtol=0)
    copy1, copy2 = copy.deepcopy(model), copy.deepcopy(model)
    merged_all = lk.merge_and_unload(model, adapter_names=["adapter-2", "default"])(X)
    assert not torch.allclose(merged_all, out1, atol=1e-3, rtol=1e-3)
    assert not torch.allclose(merged_all, out2, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(lk.merge_and_unload(copy1, adapter_names=["adapter-2"])(X), out2, atol=1e-5,
                               rtol=1e-5)
    torch.testing.assert_close(lk.merge_and_unload(copy2, adapter_names=["default"])(X), out1, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", cases("sequential_merge_matches_batch_merge", pm.MULTI))
def test_sequential_merge_matches_batch_merge(case):
    model = _two(case)
    sequential = copy.deepcopy(model)
    X = pm.inputs()
    lk.merge(model, ["adapter_1", "adapter_2"])
    lk.merge(sequential, ["adapter_1"])
    lk.merge(sequential, ["adapter_2"])
    torch.testing.assert_close(sequential(X), model(X), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", cases("unmerge_after_sequential_merge_restores_base", pm.MULTI))
def test_unmerge_after_sequential_merge_restores_base(case):
    base = _base(case)
    X = pm.inputs()
    base_out, base_sd = base(X), {k: v.clone() for k, v in base.state_dict().items()}
    model = _two(case)
    lk.merge(model, ["adapter_1"])
    lk.merge(model, ["adapter_2"])
    lk.unmerge(model)
    with lk.disable_adapters(model):
        torch.testing.assert_close(model(X), base_out, atol=1e-6, rtol=1e-6)
    restored = lk.unload(model).state_dict()
    for k, v in base_sd.items():
        torch.testing.assert_close(restored[k], v, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------ TestMixedAdapterBatches
_FALSE = {"init_lora_weights": False}
MIXED = {
    # id: (model id, adapter0 kwargs, adapter1 kwargs) — PEFT's names
    "LoRA_mixed_adapter": ("MLP", {"target_modules": ["lin0"]}, {"target_modules": ["lin0"], "r": 16}),
    "LoRA_mixed_adapter_with_different_target_layers": ("MLP", {"target_modules": ["lin0"]},
                                                        {"target_modules": ["lin1"]}),
    "LoRA_mixed_adapter_with_modules_to_save": ("MLP", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]},
                                                {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    "LoRA_mixed_adapter_with_overlapping_layers": ("MLP", {"target_modules": ["lin0"]},
                                                   {"target_modules": ["lin0", "lin1"]}),
    "LoRA_mixed_adapter_with_conv1d": ("EmbConv1D", {"target_modules": ["emb", "conv1d"]},
                                       {"target_modules": ["emb", "conv1d"], "r": 16}),
    "LoRA_mixed_adapter_with_conv1d_and_emb_and_modules_to_save": (
        "EmbConv1D", {"target_modules": ["emb", "conv1d"], "modules_to_save": ["lin0"]},
        {"target_modules": ["emb", "conv1d"], "modules_to_save": ["lin0"]}),
    "LoRA_mixed_adapter_with_conv2d": ("Conv2d", {"target_modules": ["conv2d"]},
                                       {"target_modules": ["conv2d"], "r": 16}),
}
_MIXED_MODELS = {**pm.MODELS, "MLPWithGRU": pm.MLPWithGRU}


def _mixed_inputs(model_id: str) -> torch.Tensor:
    return torch.arange(270).view(6, 5, 3, 3) if model_id == "Conv2d" else torch.arange(90).view(-1, 10)


def _mixed_model(model_id: str, kw0: dict, kw1: dict, base=None):
    torch.manual_seed(0)
    model = (_MIXED_MODELS[model_id]() if base is None else base).eval()
    lk.inject(model, pm.lk_config({**kw0, **_FALSE}), "adapter0")
    lk.inject(model, pm.lk_config({**kw1, **_FALSE}), "adapter1")
    return model.eval()


def _run_checks(model, X):
    """PEFT's run_checks: rows alternate base / adapter0 / adapter1 and each row gets its own output."""
    with lk.disable_adapters(model):
        out_base = model(X)
    lk.set_adapter(model, "adapter0")
    out0 = model(X)
    lk.set_adapter(model, "adapter1")
    out1 = model(X)
    assert len(out_base) >= 3
    assert not torch.allclose(out_base, out0) and not torch.allclose(out_base, out1)
    rows = [[BASE, "adapter0", "adapter1"][i % 3] for i in range(len(X))]
    with lk.mixed_batch(model, rows):
        mixed = model(X)
    torch.testing.assert_close(mixed[::3], out_base[::3])
    torch.testing.assert_close(mixed[1::3], out0[1::3])
    torch.testing.assert_close(mixed[2::3], out1[2::3])
    return mixed, rows


@pytest.mark.parametrize("case", cases("mixed_adapter_batches", MIXED))
def test_mixed_adapter_batches(case):
    model_id, kw0, kw1 = MIXED[case]
    _run_checks(_mixed_model(model_id, kw0, kw1), _mixed_inputs(model_id))


@pytest.mark.parametrize("case", cases("mixed_adapter_batches_same_as_peft", MIXED))
def test_mixed_adapter_batches_same_as_peft(case):
    """PEFT's ``forward(X, adapter_names=rows)`` on the same weights gives lorakit's mixed rows."""
    model_id, kw0, kw1 = MIXED[case]
    torch.manual_seed(0)
    base = _MIXED_MODELS[model_id]().eval()
    ours = _mixed_model(model_id, kw0, kw1, base=copy.deepcopy(base))
    ref = peft.get_peft_model(base, pm.peft_config({**kw0, **_FALSE}), "adapter0")
    ref.add_adapter("adapter1", pm.peft_config({**kw1, **_FALSE}))
    ref.eval()
    assert models.copy_from_peft(ours, ref) > 0
    mixed, rows = _run_checks(ours, _mixed_inputs(model_id))
    torch.testing.assert_close(mixed, ref(_mixed_inputs(model_id), adapter_names=rows), atol=1e-5, rtol=1e-5)


def test_mixed_adapter_batches_unsupported_layer_raises():
    """PEFT's row "LoRA mixed adapter with unsupported layer": a saved module whose output is not
    one batch-first tensor (a GRU returns (output, h_n), h_n batch-second) cannot be split by row;
    the mixed batch is refused with an error naming the module, as PEFT does (TypeError)."""
    kw = {"target_modules": ["lin0"], "modules_to_save": ["gru"]}
    model = _mixed_model("MLPWithGRU", kw, kw)
    with pytest.raises((TypeError, ValueError), match="GRU"):
        with lk.mixed_batch(model, [[BASE, "adapter0", "adapter1"][i % 3] for i in range(9)]):
            model(pm.inputs())


def test_mixed_adapter_batches_mha_raises():
    model = _mixed_model("MHA", {"target_modules": ["mha"]}, {"target_modules": ["mha"], "r": 16})
    with pytest.raises((TypeError, ValueError), match="MultiheadAttention"):
        with lk.mixed_batch(model, ["adapter0"] * 9):
            model(pm.inputs())


def _mlp_pair():
    return _mixed_model("MLP", *MIXED["LoRA_mixed_adapter"][1:])


def test_mixed_adapter_batches_length_mismatch_raises():
    model = _mlp_pair()
    with pytest.raises(ValueError, match="5 adapter names but the batch has 9 rows"):
        with lk.mixed_batch(model, [BASE] * 5):
            model(pm.inputs())


def test_mixed_adapter_batches_training_mode():
    """PEFT refuses mixed batches in training mode; lorakit documents them as differentiable. With
    the base model's dropout seeded alike, training-mode rows equal each adapter's own rows and
    the gradient reaches both adapters."""
    model = _mlp_pair().train()
    X = pm.inputs()
    rows = [[BASE, "adapter0", "adapter1"][i % 3] for i in range(9)]
    outs = {}
    for name in ("adapter0", "adapter1"):
        lk.set_adapter(model, name)
        torch.manual_seed(1)
        outs[name] = model(X)
    lk.set_adapter(model, ["adapter0", "adapter1"])  # both train (only active adapters' factors require grad)
    with lk.mixed_batch(model, rows):
        torch.manual_seed(1)
        mixed = model(X)
    torch.testing.assert_close(mixed[1::3], outs["adapter0"][1::3])
    torch.testing.assert_close(mixed[2::3], outs["adapter1"][2::3])
    mixed.sum().backward()
    assert model.lin0.lora_A["adapter0"].weight.grad is not None
    assert model.lin0.lora_A["adapter1"].weight.grad is not None


def test_mixed_adapter_batches_disabled():
    model = _mlp_pair()
    X = pm.inputs()
    with lk.disable_adapters(model):
        disabled = model(X)
        with lk.mixed_batch(model, [[BASE, "adapter0", "adapter1"][i % 3] for i in range(9)]):
            torch.testing.assert_close(model(X), disabled, atol=0, rtol=0)


def test_mixed_adapter_batches_merged_raises():
    model = _mlp_pair()
    lk.merge(model, ["adapter0"])
    with pytest.raises(ValueError, match="unmerge"):
        with lk.mixed_batch(model, ["adapter0"] * 9):
            model(pm.inputs())


def test_mixed_adapter_batches_lora_wrong_adapter_name_raises():
    torch.manual_seed(0)
    model = pm.MLP().eval()
    cfg = pm.lk_config({"target_modules": ["lin0"], **_FALSE})
    lk.inject(model, cfg)
    lk.inject(model, cfg, "other")
    X = pm.inputs()
    with lk.mixed_batch(model, ["default"] * 5 + ["other"] * 4):
        model(X)
    for rows, missing in ((["default"] * 5 + ["does-not-exist"] * 4, "does-not-exist"),
                          (["default"] * 3 + ["does-not-exist"] * 4 + ["other"] * 2, "does-not-exist"),
                          (["does-not-exist"] * 5 + ["other-does-not-exist"] * 4, "other-does-not-exist")):
        with pytest.raises(ValueError, match=missing):
            with lk.mixed_batch(model, rows):
                model(X)


@pytest.mark.parametrize("dora_rows", [True, False], ids=["dora_in_batch", "dora_not_in_batch"])
def test_mixed_adapter_batches_lora_with_dora(dora_rows):
    """PEFT refuses a DoRA adapter in a mixed batch (and allows one that is not used); lorakit
    computes DoRA rows too. Either way each row gets its own adapter's output."""
    torch.manual_seed(0)
    model = pm.MLP().eval()
    lk.inject(model, pm.lk_config({"target_modules": ["lin0"], "use_dora": True, **_FALSE}))
    lk.inject(model, pm.lk_config({"target_modules": ["lin0"], **_FALSE}), "other")
    X = pm.inputs()
    rows = ["default"] * 3 + ["other"] * 3 + [BASE] * 3 if dora_rows else ["other"] * 4 + [BASE] * 5
    expected = torch.empty(9, 2)
    for name in dict.fromkeys(rows):
        idx = [i for i, r in enumerate(rows) if r == name]
        if name == BASE:
            with lk.disable_adapters(model):
                expected[idx] = model(X)[idx]
        else:
            lk.set_adapter(model, name)
            expected[idx] = model(X)[idx]
    with lk.mixed_batch(model, rows):
        torch.testing.assert_close(model(X), expected, atol=1e-6, rtol=1e-6)
