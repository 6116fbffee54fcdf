"""Target matching (PEFT's rules), the dry run, and injection errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.layers import LoraLayer

import models


def _adapted(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, LoraLayer) and ".base_layer." not in n]


def test_find_targets_is_pure_and_equals_inject():
    model = models.llama()
    before = copy.deepcopy(model.state_dict())
    cfg = lk.LoraConfig(target_modules=["q_proj", "v_proj"])
    names = lk.find_targets(model, cfg)
    assert names == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    lk.inject(model, cfg)
    assert _adapted(model) == names


def test_exact_suffix_regex_and_layers():
    model = models.llama(layers=3)
    find = lambda **kw: lk.find_targets(model, lk.LoraConfig(**kw))  # noqa: E731
    assert find(target_modules=["model.layers.1.mlp.up_proj"]) == ["model.layers.1.mlp.up_proj"]
    assert find(target_modules=["mlp.up_proj"]) == [f"model.layers.{i}.mlp.up_proj" for i in range(3)]
    with pytest.raises(ValueError):
        find(target_modules=["p_proj"])  # "up_proj" does not end in ".p_proj"
    assert find(target_modules=r"model\.layers\.[02]\.self_attn\.k_proj") == [
        "model.layers.0.self_attn.k_proj", "model.layers.2.self_attn.k_proj"]
    assert find(target_modules=["k_proj"], layers_to_transform=[2, 0], layers_pattern="layers") == [
        "model.layers.0.self_attn.k_proj", "model.layers.2.self_attn.k_proj"]
    assert find(target_modules=["k_proj"], layers_to_transform=1) == ["model.layers.1.self_attn.k_proj"]
    assert find(target_modules=["q_proj", "k_proj"], exclude_modules=r".*layers\.1\..*") == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
        "model.layers.2.self_attn.q_proj", "model.layers.2.self_attn.k_proj"]


def test_all_linear_skips_head_and_modules_to_save():
    model = models.llama()
    names = lk.find_targets(model, lk.LoraConfig(target_modules="all-linear"))
    assert "lm_head" not in names and len(names) == 2 * 7
    bert = models.bert_cls()
    names = lk.find_targets(bert, lk.LoraConfig(target_modules="all-linear", modules_to_save=["classifier"]))
    assert "classifier" not in names and "bert.pooler.dense" in names
    gpt = models.gpt2()
    assert lk.find_targets(gpt, lk.LoraConfig(target_modules="all-linear"))[:2] == [
        "transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj"]


def test_all_linear_skips_mha_out_proj_and_explicit_target_is_explained():
    block = models.TransformerBlock()
    names = lk.find_targets(block, lk.LoraConfig(target_modules="all-linear"))
    assert "attn.out_proj" not in names
    with pytest.raises(ValueError, match="target the attention module itself"):
        lk.find_targets(block, lk.LoraConfig(target_modules=["attn.out_proj"]))


def test_nothing_matched_lists_patterns_and_real_names():
    with pytest.raises(ValueError) as info:
        lk.inject(models.llama(), lk.LoraConfig(target_modules=["query", "value"]))
    msg = str(info.value)
    assert "['query', 'value']" in msg and "q_proj" in msg and "LlamaForCausalLM" in msg


def test_layers_out_of_range_is_reported():
    with pytest.raises(ValueError, match="layers_to_transform=7"):
        lk.inject(models.llama(), lk.LoraConfig(target_modules=["q_proj"], layers_to_transform=7))


def test_unsupported_module_type():
    with pytest.raises(TypeError, match="LlamaAttention.*q_proj"):
        lk.inject(models.llama(), lk.LoraConfig(target_modules=["self_attn"]))


def test_target_modules_missing():
    with pytest.raises(ValueError, match="target_modules is not set"):
        lk.inject(models.llama(), lk.LoraConfig())


@pytest.mark.parametrize("name", ["", "a.b", "__base__", 3])
def test_bad_adapter_names(name):
    with pytest.raises(ValueError, match="adapter_name"):
        lk.inject(models.llama(), lk.LoraConfig(target_modules=["q_proj"]), adapter_name=name)


def test_duplicate_adapter_and_bad_cfg():
    model = models.llama()
    lk.inject(model, lk.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="'default' already exists"):
        lk.inject(model, lk.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(TypeError, match="LoraConfig"):
        lk.inject(model, {"r": 8}, adapter_name="x")


def test_modules_to_save_not_found():
    with pytest.raises(ValueError, match="modules_to_save=\\['classifierx'\\]"):
        lk.inject(models.bert_cls(), lk.LoraConfig(target_modules=["query"], modules_to_save=["classifierx"]))


def test_second_adapter_on_other_layers_is_inactive():
    model = models.llama()
    base = copy.deepcopy(model)
    lk.inject(model, lk.LoraConfig(target_modules=["q_proj"]))
    lk.inject(model, lk.LoraConfig(target_modules=["v_proj"], init_lora_weights=False), adapter_name="b")
    assert lk.adapter_names(model) == ["default", "b"] and lk.active_adapters(model) == ["default"]
    x = models.ids()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, base(input_ids=x).logits)  # "b" inactive
        lk.set_adapter(model, "b")
        assert not torch.allclose(model(input_ids=x).logits, base(input_ids=x).logits)
    with pytest.raises(ValueError, match="unknown adapter.*'c'"):
        lk.set_adapter(model, "c")


def test_unload_restores_plain_architecture():
    model = models.llama()
    base = copy.deepcopy(model)
    lk.inject(model, lk.LoraConfig(target_modules="all-linear", init_lora_weights=False))
    plain = lk.unload(model)
    assert type(plain.model.layers[0].self_attn.q_proj) is nn.Linear
    assert plain.state_dict().keys() == base.state_dict().keys()
    x = models.ids()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=x).logits, base(input_ids=x).logits)
    with pytest.raises(ValueError, match="no lorakit adapters"):
        lk.merge(plain)


def test_trainable_summary_line():
    model = models.llama()
    lk.inject(model, lk.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    t, n = lk.trainable_parameters(model)
    # per layer: q_proj 32->32 gives A 4x32 + B 32x4; v_proj 32->16 (2 kv heads of 8) gives A 4x32 + B 16x4
    assert t == 2 * ((4 * 32 + 32 * 4) + (4 * 32 + 16 * 4))
    assert lk.summary(model) == f"trainable params: {t:,d} || all params: {n:,d} || trainable%: {100 * t / n:.4f}"


def test_wrappers_follow_the_model_mode():
    model = models.llama().eval()
    lk.inject(model, lk.LoraConfig(target_modules=["q_proj"], lora_dropout=0.5, modules_to_save=["lm_head"]))
    assert not any(m.training for m in model.modules())
    model.train()
    assert all(m.training for m in model.modules())
