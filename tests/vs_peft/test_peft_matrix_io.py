"""PEFT's LoRA test matrix, part 2: saving, loading and deleting adapters, per supported case of
``TEST_CASES`` (tests/peft_models.py), both ways against PEFT's own files; and, per case that
uses a feature lorakit lacks, a check that PEFT's file for it is refused with a clear error.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from safetensors.torch import load_file

import lorakit as lk
import peft_models as pm
from peft_models import cases

import models

pytestmark = [pytest.mark.filterwarnings(w) for w in pm.PEFT_WARNINGS]


def _trained(case: str, **over) -> torch.nn.Module:
    """lorakit's adapter for ``case`` with random (non-identity) weights."""
    return pm.make(case, init_lora_weights=False, **over).eval()


def _zero_mha_out_proj(model: torch.nn.Module) -> None:
    """PEFT 0.21.2 adds nn.MultiheadAttention's out_proj update twice (huggingface/peft#3774): with
    that factor zero both libraries compute the same function."""
    for n, p in model.named_parameters():
        if "out_proj.lora_B" in n:
            torch.nn.init.zeros_(p.data)


def _peft_model(model_id: str, kwargs: dict) -> torch.nn.Module:
    """PEFT's adapter for a row, random (non-identity) weights, in eval mode."""
    ref = peft.get_peft_model(pm.build(model_id), pm.peft_config(kwargs, init_lora_weights=False)).eval()
    if model_id == "MHA":
        _zero_mha_out_proj(ref)
    return ref


# ------------------------------------------------------------------ save / load
@pytest.mark.parametrize("case", cases("save_pretrained"))
def test_save_pretrained(case, tmp_path):
    model = _trained(case)
    lk.save_adapter(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    loaded = lk.load_adapter(pm.build(pm.SUPPORTED[case][0]), tmp_path)
    sd, sd_loaded = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd_loaded.keys()
    for k, v in sd.items():
        torch.testing.assert_close(sd_loaded[k], v, atol=0, rtol=0, msg=k)


@pytest.mark.parametrize("case", cases("save_pretrained_pickle"))
def test_save_pretrained_pickle(case, tmp_path):
    """PEFT's ``safe_serialization=False`` file (adapter_model.bin) loads into lorakit with PEFT's outputs."""
    model_id, kwargs = pm.SUPPORTED[case]
    ref = _peft_model(model_id, kwargs)
    ref.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").is_file() and not (tmp_path / "adapter_model.safetensors").exists()
    ours = lk.load_adapter(pm.build(model_id), tmp_path)
    X = pm.inputs()
    torch.testing.assert_close(ours(X), ref(X), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", cases("save_pretrained_adapter_name_substring"))
def test_save_pretrained_adapter_name_substring(case, tmp_path):
    """Saving "default" writes only its tensors, though other adapters' names contain it or it them."""
    model = pm.make(case)
    expected = len(load_file(str(lk.save_adapter(model, tmp_path / "alone") / "adapter_model.safetensors")))
    cfg = pm.lk_config(pm.SUPPORTED[case][1])
    for name in ("default2", "other_default", "foodefault_bar", "efaul"):
        lk.inject(model, cfg, name)
    out = lk.save_adapter(model, tmp_path / "many")
    assert len(load_file(str(out / "adapter_model.safetensors"))) == expected


@pytest.mark.parametrize("case", cases("load_multiple_adapters"))
def test_load_multiple_adapters(case, tmp_path):
    model_id, _ = pm.SUPPORTED[case]
    lk.save_adapter(_trained(case), tmp_path)
    model = lk.load_adapter(pm.build(model_id), tmp_path)
    lk.load_adapter(model, tmp_path, adapter_name="other")
    lk.load_adapter(model, tmp_path, adapter_name="yet-another")
    assert lk.adapter_names(model) == ["default", "other", "yet-another"]
    X = pm.inputs()
    out = model(X)
    for name in ("other", "yet-another"):
        lk.set_adapter(model, name)
        torch.testing.assert_close(model(X), out, atol=0, rtol=0)


@pytest.mark.parametrize("case", cases("inference_safetensors"))
def test_inference_safetensors(case, tmp_path):
    model = pm.make(case)
    X = pm.inputs()
    model(X).sum().backward()
    model.eval()
    out = model(X)
    lk.save_adapter(model, tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file() and not (tmp_path / "adapter_model.bin").exists()
    loaded = lk.load_adapter(pm.build(pm.SUPPORTED[case][0]), tmp_path)
    torch.testing.assert_close(loaded(X), out, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("case", cases("save_load_roundtrip"))
def test_save_load_roundtrip(case, tmp_path):
    model_id, _ = pm.SUPPORTED[case]
    X = pm.inputs()
    out_base = pm.build(model_id).eval()(X)
    model = _trained(case)
    out = model(X)
    assert not torch.allclose(out, out_base, atol=1e-5, rtol=1e-5)
    lk.save_adapter(model, tmp_path)
    torch.manual_seed(54321)  # another seed than at inject
    loaded = lk.load_adapter(pm.build(model_id), tmp_path)
    torch.testing.assert_close(loaded(X), out, atol=0, rtol=0)


@pytest.mark.parametrize("case", cases("parameters_after_loading_model"))
def test_parameters_after_loading_model(case, tmp_path):
    """Trained weights (3 SGD steps) come back exactly, every parameter of the model."""
    model_id, kwargs = pm.SUPPORTED[case]
    model = pm.make(case)
    model.train()
    lr = 1e-3 if model_id == "MHA" else 0.1 if kwargs.get("use_dora") else 0.5
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    X = pm.inputs()
    for _ in range(3):
        opt.zero_grad()
        model(X).sum().backward()
        opt.step()
    lk.save_adapter(model, tmp_path)
    loaded = lk.load_adapter(pm.build(model_id), tmp_path)
    before, after = dict(model.named_parameters()), dict(loaded.named_parameters())
    assert before.keys() == after.keys()
    for n, p in before.items():
        torch.testing.assert_close(after[n], p, atol=1e-4, rtol=1e-4, msg=n)


@pytest.mark.parametrize("case", cases("peft_file_in_lorakit"))
def test_peft_file_in_lorakit(case, tmp_path):
    """PEFT's save_pretrained -> lk.load_adapter: PEFT's outputs, unmerged and merged."""
    model_id, kwargs = pm.SUPPORTED[case]
    ref = _peft_model(model_id, kwargs)
    ref.save_pretrained(tmp_path)
    ours = lk.load_adapter(pm.build(model_id), tmp_path)
    X = pm.inputs()
    torch.testing.assert_close(ours(X), ref(X), atol=1e-5, rtol=1e-5)
    if case in pm.MERGE_REFUSED:
        return pm.assert_merge_refused(ours)
    torch.testing.assert_close(lk.merge_and_unload(ours)(X), ref(X), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", cases("lorakit_file_in_peft"))
def test_lorakit_file_in_peft(case, tmp_path):
    """lk.save_adapter -> PeftModel.from_pretrained: lorakit's outputs."""
    model_id, _ = pm.SUPPORTED[case]
    model = _trained(case)
    if model_id == "MHA":
        _zero_mha_out_proj(model)
    lk.save_adapter(model, tmp_path)
    ref = peft.PeftModel.from_pretrained(pm.build(model_id), tmp_path).eval()
    X = pm.inputs()
    torch.testing.assert_close(ref(X), model(X), atol=1e-5, rtol=1e-5)
    assert models.copy_from_peft(copy.deepcopy(model), ref) > 0  # the same tensor names


# ------------------------------------------------------------------ deleting
def _assert_gone(model: torch.nn.Module, name: str) -> None:
    assert name not in lk.adapter_names(model)
    assert not any(f".{name}." in k or k.endswith(f".{name}") for k in model.state_dict())


@pytest.mark.parametrize("case", cases("delete_adapter"))
def test_delete_adapter(case):
    model_id, kwargs = pm.SUPPORTED[case]
    model = pm.make(case)
    lk.inject(model, pm.lk_config(kwargs), "delete_me")
    lk.set_adapter(model, "delete_me")
    lk.delete_adapter(model, "delete_me")
    _assert_gone(model, "delete_me")
    assert lk.active_adapters(model) == ["default"]
    lk.delete_adapter(model, "default")
    _assert_gone(model, "default")
    assert lk.adapter_names(model) == []
    X = pm.inputs()
    torch.testing.assert_close(model.eval()(X), pm.build(model_id).eval()(X), atol=0, rtol=0)


@pytest.mark.parametrize("case", cases("delete_inactive_adapter"))
def test_delete_inactive_adapter(case):
    model = pm.make(case)
    lk.inject(model, pm.lk_config(pm.SUPPORTED[case][1]), "delete_me")  # added, not activated
    lk.delete_adapter(model, "delete_me")
    _assert_gone(model, "delete_me")
    assert lk.active_adapters(model) == ["default"]
    lk.delete_adapter(model, "default")
    assert lk.adapter_names(model) == []
    model(pm.inputs())


@pytest.mark.parametrize("case", cases("delete_unknown_adapter_raises"))
def test_delete_unknown_adapter_raises(case):
    model = pm.make(case)
    with pytest.raises(ValueError, match="unknown-adapter"):
        lk.delete_adapter(model, "unknown-adapter")


@pytest.mark.parametrize("case", cases("delete_merged_adapter_raises_without_mutation"))
def test_delete_merged_adapter_raises_without_mutation(case):
    model = _trained(case)
    if case in pm.MERGE_REFUSED:
        return pm.assert_merge_refused(model)
    lk.merge(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="merged"):
        lk.delete_adapter(model, "default")
    assert lk.adapter_names(model) == ["default"]
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    lk.unmerge(model)
    lk.delete_adapter(model, "default")
    assert lk.adapter_names(model) == []


@pytest.mark.parametrize("case", cases("delete_merged_adapter_only_rejects_the_merged_one"))
def test_delete_merged_adapter_only_rejects_the_merged_one(case):
    model = pm.make(case, adapter_name="adapter0", init_lora_weights=False).eval()
    lk.inject(model, pm.lk_config(pm.SUPPORTED[case][1], init_lora_weights=False), "adapter1")
    lk.set_adapter(model, "adapter1")
    if case in pm.MERGE_REFUSED:
        return pm.assert_merge_refused(model)
    lk.merge(model)
    X = pm.inputs()
    out = model(X)
    with pytest.raises(ValueError, match="merged"):
        lk.delete_adapter(model, "adapter1")
    assert lk.adapter_names(model) == ["adapter0", "adapter1"]
    lk.delete_adapter(model, "adapter0")  # the unmerged one may go; the merge stays
    assert lk.adapter_names(model) == ["adapter1"]
    torch.testing.assert_close(model(X), out, atol=0, rtol=0)
    lk.unmerge(model)
    lk.delete_adapter(model, "adapter1")
    assert lk.adapter_names(model) == []


@pytest.mark.parametrize("case", cases("delete_adapter_properly_cleans_up_after_itself"))
def test_delete_adapter_properly_cleans_up_after_itself(case):
    """No dict-like attribute of the model or of any module still holds the deleted name."""
    model = pm.make(case, adapter_name="foobar")

    def holders(obj):
        for attr in [*vars(obj), *vars(obj).get("_modules", {}), *vars(obj).get("_parameters", {})]:
            try:
                value = getattr(obj, attr)
            except AttributeError:
                continue
            if callable(getattr(value, "keys", None)) and hasattr(value, "__contains__") and "foobar" in value:
                yield attr, value

    found = [h for m in model.modules() for h in holders(m)]
    assert found
    lk.delete_adapter(model, "foobar")
    assert [a for a, v in found if "foobar" in v] == []


# ------------------------------------------------------------------ features lorakit lacks
# The LoRA rows of PEFT's TEST_CASES that lorakit does not implement: case id -> missing feature.
UNSUPPORTED_FEATURES = {cid: row[3] for cid, row in pm.UNSUPPORTED.items()}
MULTI_UNSUPPORTED_FEATURES = {cid: row[3] for cid, row in pm.MULTI_UNSUPPORTED.items()}


def _assert_refused(model_id: str, peft_cfg, word: str, tmp_path) -> None:
    """PEFT builds and saves the case; lorakit's load_adapter refuses the file, naming the
    feature, and leaves the fresh model exactly as it was."""
    ref = peft.get_peft_model(pm.build(model_id), peft_cfg)
    ref.save_pretrained(tmp_path)
    fresh = pm.build(model_id)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    types, grads = pm.module_types(fresh), [p.requires_grad for p in fresh.parameters()]
    with pytest.raises(ValueError, match=f"(?i){word}"):
        lk.load_adapter(fresh, tmp_path)
    assert pm.module_types(fresh) == types
    assert [p.requires_grad for p in fresh.parameters()] == grads
    after = fresh.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(v, after[k]) for k, v in before.items())


@pytest.mark.parametrize("case", cases("unsupported_refused", pm.UNSUPPORTED))
def test_unsupported_case_refused(case, tmp_path):
    model_id, kwargs, extra, _feature, word = pm.UNSUPPORTED[case]
    _assert_refused(model_id, pm.peft_config(kwargs, extra), word, tmp_path)


def test_only_the_nine_other_methods_are_unsupported():
    """Issue 16: every LoRA row of PEFT's matrix runs, except the 9 rows of methods lorakit does not
    implement (KaSA, MiCA, VeLoRA, MonteCLoRA, BD-LoRA); every multi-adapter row runs."""
    methods = {f.split(" ")[0] for f in UNSUPPORTED_FEATURES.values()}
    assert len(UNSUPPORTED_FEATURES) == 9 and methods == {"KaSA", "MiCA", "VeLoRA", "MonteCLoRA", "BD-LoRA"}
    assert MULTI_UNSUPPORTED_FEATURES == {} and len(pm.MULTI) == 6


@pytest.mark.parametrize("case", cases("unsupported_config_refused", pm.UNSUPPORTED))
def test_unsupported_case_refused_by_lorakit_config(case):
    """The same row written as a lorakit.LoraConfig (PEFT's field names, sub-configs as dicts) is
    refused on construction, naming the field; inject never sees it."""
    import dataclasses

    model_id, kwargs, extra, _feature, word = pm.UNSUPPORTED[case]
    d = pm.peft_config(kwargs, extra).to_dict()
    fields = {f.name for f in dataclasses.fields(lk.LoraConfig)}
    with pytest.raises(ValueError, match=f"(?i){word}"):
        lk.LoraConfig(**{k: v for k, v in d.items() if k in fields})
