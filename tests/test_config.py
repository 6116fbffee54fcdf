"""LoraConfig validation: every bad value raises from lorakit, naming the field and the problem."""

from __future__ import annotations

import json
import math

import pytest

import lorakit as lk


@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(r=0), ValueError, ["r", "positive", "0"]),
    (dict(r=-3), ValueError, ["r", "-3"]),
    (dict(r=2.5), TypeError, ["r", "2.5"]),
    (dict(r=True), TypeError, ["r"]),
    (dict(lora_alpha=0), ValueError, ["lora_alpha"]),
    (dict(lora_alpha=math.nan), ValueError, ["lora_alpha"]),
    (dict(lora_alpha="16"), TypeError, ["lora_alpha"]),
    (dict(lora_dropout=1.0), ValueError, ["lora_dropout", "[0, 1)"]),
    (dict(lora_dropout=-0.1), ValueError, ["lora_dropout"]),
    (dict(lora_dropout="0.1"), TypeError, ["lora_dropout"]),
    (dict(target_modules=7), TypeError, ["target_modules", "int"]),
    (dict(target_modules=[]), ValueError, ["target_modules", "empty"]),
    (dict(target_modules=["q", 3]), TypeError, ["target_modules", "3"]),
    (dict(target_modules=""), ValueError, ["target_modules", "empty"]),
    (dict(target_modules="q_proj(("), ValueError, ["target_modules", "regular expression"]),
    (dict(exclude_modules=5), TypeError, ["exclude_modules"]),
    (dict(target_modules=".*q", layers_to_transform=[0]), ValueError, ["layers_to_transform", "regex"]),
    (dict(layers_to_transform=[-1]), ValueError, ["layers_to_transform", "-1"]),
    (dict(layers_to_transform="0"), ValueError, ["layers_to_transform"]),
    (dict(layers_pattern="layers"), ValueError, ["layers_pattern", "layers_to_transform"]),
    (dict(layers_to_transform=[0], layers_pattern=3), TypeError, ["layers_pattern"]),
    (dict(rank_pattern={"q_proj": 0}), ValueError, ["rank_pattern", "q_proj", "positive"]),
    (dict(rank_pattern={"q_proj": 2.0}), ValueError, ["rank_pattern"]),
    (dict(rank_pattern=["q_proj"]), TypeError, ["rank_pattern", "dict"]),
    (dict(rank_pattern={"(": 2}), ValueError, ["rank_pattern", "regular expression"]),
    (dict(alpha_pattern={"v_proj": -1}), ValueError, ["alpha_pattern", "v_proj"]),
    (dict(bias="some"), ValueError, ["bias", "none", "lora_only", "some"]),
    (dict(modules_to_save=[1]), TypeError, ["modules_to_save"]),
    (dict(init_lora_weights="xavier"), ValueError, ["init_lora_weights", "pissa", "xavier"]),
    (dict(use_dora="yes"), TypeError, ["use_dora"]),
    (dict(use_rslora=1), TypeError, ["use_rslora"]),
])
def test_bad_values_raise_with_a_message(kwargs, exc, words):
    with pytest.raises(exc) as info:
        lk.LoraConfig(**kwargs)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_valid_forms_accepted():
    lk.LoraConfig(target_modules=["q_proj", "v_proj"])
    lk.LoraConfig(target_modules=r".*\.(q|v)_proj")
    lk.LoraConfig(target_modules="all-linear", exclude_modules=["lm_head"])
    lk.LoraConfig(target_modules=["q"], layers_to_transform=3)
    lk.LoraConfig(target_modules=["q"], layers_to_transform=[0, 2], layers_pattern=["layers", "h"])
    for init in (True, False, "gaussian", "pissa", "olora"):
        lk.LoraConfig(init_lora_weights=init)


def test_scaling_and_patterns():
    cfg = lk.LoraConfig(r=8, lora_alpha=16, rank_pattern={r"layers\.0\.q_proj": 2}, alpha_pattern={"v_proj": 4})
    assert cfg.scaling(8, 16) == 2.0
    assert lk.LoraConfig(use_rslora=True).scaling(16, 16) == 4.0
    assert cfg.rank_for("model.layers.0.q_proj") == 2
    assert cfg.rank_for("model.layers.1.q_proj") == 8
    assert cfg.alpha_for("model.layers.1.v_proj") == 4
    assert cfg.alpha_for("model.layers.1.xv_proj") == 16  # whole-component match only


def test_peft_dict_round_trip():
    cfg = lk.LoraConfig(r=4, lora_alpha=8, target_modules=["v", "q"], rank_pattern={"q": 2}, use_dora=True)
    d = cfg.to_peft_dict()
    assert d["peft_type"] == "LORA" and d["target_modules"] == ["q", "v"]
    back = lk.LoraConfig.from_peft_dict(d)
    assert back.r == 4 and back.rank_pattern == {"q": 2} and back.use_dora


def test_peft_dict_refuses_other_methods_and_features():
    with pytest.raises(ValueError, match="peft_type is 'IA3'"):
        lk.LoraConfig.from_peft_dict({"peft_type": "IA3", "target_modules": ["q"]})
    with pytest.raises(ValueError, match="velora_config"):
        lk.LoraConfig.from_peft_dict({"peft_type": "LORA", "target_modules": ["q"], "velora_config": {"num_groups": 2}})
    with pytest.raises(ValueError, match="init_lora_weights='orthogonal'"):
        lk.LoraConfig.from_peft_dict({"peft_type": "LORA", "target_modules": ["q"], "init_lora_weights": "orthogonal"})


def test_peft_dict_warns_on_unknown_keys():
    with pytest.warns(UserWarning, match="some_future_key"):
        cfg = lk.LoraConfig.from_peft_dict({"peft_type": "LORA", "target_modules": ["q"], "some_future_key": None})
    assert cfg.target_modules == ["q"]


def test_every_peft_field_round_trips():
    """A config PEFT wrote (all of PEFT 0.21's fields) reads into lorakit, and what lorakit writes
    back rebuilds the same PEFT config; fields at PEFT's default are left out of the file, so that
    PEFT versions older than the field read it."""
    import peft

    ref = peft.LoraConfig(r=4, target_modules=["q"], lora_bias=True, target_parameters=["experts.gate_up_proj"],
                          trainable_token_indices={"embed_tokens": [1, 2]}, ensure_weight_tying=True,
                          task_type="CAUSAL_LM", base_model_name_or_path="some/model", revision="v1",
                          qalora_group_size=32)
    d = json.loads(json.dumps({k: v for k, v in ref.to_dict().items() if k != "runtime_config"}, default=sorted))
    cfg = lk.LoraConfig.from_peft_dict(d)
    written = cfg.to_peft_dict()
    assert "use_bdlora" not in written and "kasa_config" not in written and written["qalora_group_size"] == 32
    rebuilt = peft.LoraConfig(**{k: v for k, v in written.items() if k != "peft_type"}).to_dict()
    back = json.loads(json.dumps(rebuilt, default=sorted))  # sets (target_modules) as sorted lists, as PEFT saves
    skip = ("inference_mode", "runtime_config")
    assert {k: v for k, v in back.items() if k not in skip} == {k: v for k, v in d.items() if k not in skip}
    assert lk.LoraConfig.from_peft_dict({**written, "inference_mode": cfg.inference_mode}) == cfg


@pytest.mark.parametrize("field, value", [
    ("layer_replication", [[0, 2]]), ("megatron_config", {"a": 1}), ("use_qalora", True),
    ("velora_config", {"num_groups": 2}), ("alora_invocation_tokens", [1, 2]), ("monteclora_config", {"n": 1}),
    ("use_bdlora", {"nblocks": 2}), ("arrow_config", {"top_k": 2}), ("kasa_config", {"x": 1}),
    ("init_lora_weights", "mica"), ("init_lora_weights", "orthogonal"), ("init_lora_weights", "pissa_niter_4"),
])
def test_unimplemented_peft_methods_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"does not implement {field}="):
        lk.LoraConfig(target_modules=["q"], **{field: value})
    with pytest.raises(ValueError, match=f"does not implement {field}="):
        lk.LoraConfig.from_peft_dict({"peft_type": "LORA", "target_modules": ["q"], field: value})


@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(lora_bias=True, use_dora=True), ValueError, ["lora_bias", "use_dora"]),
    (dict(lora_bias=True, init_lora_weights="pissa"), ValueError, ["lora_bias", "pissa"]),
    (dict(target_parameters="experts.gate_up_proj"), TypeError, ["target_parameters"]),
    (dict(target_parameters=["nodot"]), ValueError, ["target_parameters", "nodot"]),
    (dict(trainable_token_indices=[1, -2]), ValueError, ["trainable_token_indices", "-2"]),
    (dict(trainable_token_indices={"emb": [1, 1]}), ValueError, ["trainable_token_indices", "twice"]),
    (dict(trainable_token_indices="emb"), TypeError, ["trainable_token_indices"]),
    (dict(ensure_weight_tying="yes"), TypeError, ["ensure_weight_tying"]),
])
def test_new_fields_are_validated(kwargs, exc, words):
    with pytest.raises(exc) as info:
        lk.LoraConfig(target_modules=["q"], **kwargs)
    assert all(w in str(info.value) for w in words), str(info.value)


def test_parameters_or_tokens_only_need_no_target_modules():
    assert lk.LoraConfig(target_parameters=["experts.down_proj"]).target_modules is None
    assert lk.LoraConfig(target_modules=[], trainable_token_indices=[3]).target_modules is None  # PEFT's spelling
