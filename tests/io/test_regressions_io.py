"""Regression tests for the hardening issue (#11), files part: save, load, hot swap, merge, combine.

Each test names its defect number; each failed on main before the fix (see the issue's closing note).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import lorakit as lk

import models


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits


# ---------------------------------------------------------------- 1: keys assigned structurally
@pytest.mark.parametrize("names", [("0", "1"), ("default", "mlp"), ("mlp", "h")])
def test_01_adapter_names_that_look_like_module_names_save_every_tensor(tmp_path, names):
    base = models.gpt2()
    model = copy.deepcopy(base)
    for name in names:
        lk.inject(model, lk.LoraConfig(r=2, target_modules=["c_attn", "c_fc"], init_lora_weights=False),
                  adapter_name=name)
    x = models.ids()
    for name in names:
        lk.set_adapter(model, name)
        expected = _logits(model, x)
        out = lk.save_adapter(model, tmp_path, adapter_name=name)
        from safetensors.torch import load_file

        assert len(load_file(str(out / "adapter_model.safetensors"))) == 2 * 2 * 2  # layers × modules × (A, B)
        fresh = lk.load_adapter(copy.deepcopy(base), tmp_path, adapter_name=name)
        torch.testing.assert_close(_logits(fresh, x), expected)


def test_01_bias_all_adapter_named_like_a_module_saves_every_bias(tmp_path):
    model = models.gpt2()
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["c_attn"], bias="all"), adapter_name="mlp")
    biases = [n for n, p in model.named_parameters() if n.endswith(".bias") and p.requires_grad]
    from safetensors.torch import load_file

    saved = load_file(str(lk.save_adapter(model, tmp_path, adapter_name="mlp") / "adapter_model.safetensors"))
    assert len([k for k in saved if k.endswith(".bias")]) == len(biases) > 8


# ---------------------------------------------------------------- 2: a second PEFT adapter and base tensors
def _distilbert():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    cfg = DistilBertConfig(vocab_size=models.VOCAB, dim=32, hidden_dim=64, n_layers=2, n_heads=4,
                           max_position_embeddings=64, num_labels=3)
    torch.manual_seed(0)
    return DistilBertForSequenceClassification(cfg).eval()


def test_02_second_peft_adapter_never_changes_the_first_adapters_outputs(tmp_path):
    from peft import LoraConfig, get_peft_model

    base = _distilbert()
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["q_lin", "v_lin"],
                                                                 modules_to_save=["classifier"],
                                                                 init_lora_weights=False))
    with torch.no_grad():  # PEFT's suffix rule made pre_classifier a trained copy too
        for n, p in peft_model.named_parameters():
            if ".modules_to_save." in n:
                p.add_(torch.randn_like(p) * 0.5)
    peft_model.save_pretrained(tmp_path)
    x = models.ids()
    with torch.no_grad():
        peft_out = peft_model(input_ids=x).logits

    model = copy.deepcopy(base)
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["q_lin"], modules_to_save=["classifier"],
                                   init_lora_weights=False), adapter_name="first")
    first = _logits(model, x)
    lk.load_adapter(model, tmp_path, adapter_name="second")
    torch.testing.assert_close(_logits(model, x), first)  # "first" is still active and unchanged
    lk.set_adapter(model, "second")
    torch.testing.assert_close(_logits(model, x), peft_out, atol=1e-5, rtol=1e-5)
    lk.set_adapter(model, "first")
    torch.testing.assert_close(_logits(model, x), first)


def test_02_a_file_whose_base_tensors_differ_is_refused_on_an_adapted_model(tmp_path):
    model = models.llama()
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"]))  # PEFT then saves embeddings
    with torch.no_grad():
        model.model.embed_tokens.base_layer.weight.add_(1.0)  # e.g. a resized / trained embedding
    lk.save_adapter(model, tmp_path)
    other = models.llama()
    lk.inject(other, lk.LoraConfig(r=2, target_modules=["v_proj"]), adapter_name="mine")
    snap = models.snapshot(other)
    with pytest.raises(ValueError, match="embed_tokens"):
        lk.load_adapter(other, tmp_path, adapter_name="second")
    models.assert_unchanged(other, snap)
    assert lk.adapter_names(other) == ["mine"]


# ---------------------------------------------------------------- 4: combinations carry their heads
def test_04_combine_adapters_carries_modules_to_save():
    model = models.bert_cls()
    for i, name in enumerate(["a", "b"]):
        lk.inject(model, lk.LoraConfig(r=2, target_modules=["query", "value"], modules_to_save=["classifier"],
                                       init_lora_weights=False), adapter_name=name)
        with torch.no_grad():
            model.classifier.modules_to_save[name].weight.add_(float(i + 1))
    x = models.ids()
    lk.set_adapter(model, "a")
    a_out = _logits(model, x)
    lk.combine_adapters(model, ["a"], [1.0], "only_a")
    lk.set_adapter(model, "only_a")
    torch.testing.assert_close(_logits(model, x), a_out)
    lk.combine_adapters(model, ["a"], [0.5], "half_a")  # the head is carried as is; only ΔW is weighted
    torch.testing.assert_close(model.classifier.modules_to_save["half_a"].weight,
                               model.classifier.modules_to_save["a"].weight)
    with pytest.raises(ValueError, match="modules_to_save"):  # two trained heads do not add up (as PEFT)
        lk.combine_adapters(model, ["a", "b"], [0.5, 0.5], "mix")
    assert "mix" not in lk.adapter_names(model)


# ---------------------------------------------------------------- 5: save_merged leaves no stale shards
def test_05_save_merged_into_a_directory_with_an_older_sharded_save(tmp_path):
    from transformers import LlamaForCausalLM

    model = models.llama()
    model.save_pretrained(tmp_path, max_shard_size="20KB")  # an earlier save, many shards + an index
    assert (tmp_path / "model.safetensors.index.json").exists()
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    x = models.ids()
    expected = _logits(model, x)
    lk.save_merged(model, tmp_path)
    weight_files = sorted(p.name for p in tmp_path.iterdir() if "safetensors" in p.name or p.suffix == ".bin")
    assert weight_files == ["model.safetensors"]
    torch.testing.assert_close(_logits(LlamaForCausalLM.from_pretrained(tmp_path), x), expected,
                               atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- 7: a failed load leaves no trace
def test_07_failed_pissa_load_leaves_the_model_bit_identical(tmp_path):
    model = models.llama()
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa"))
    lk.save_adapter(model, tmp_path)
    from safetensors.torch import load_file, save_file

    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = sorted(k for k in tensors if "v_proj.lora_B" in k)[-1]
    tensors[key] = torch.zeros(3, 3)  # a wrong shape, found after PiSSA's init has changed W
    save_file(tensors, str(path))
    target = models.llama()
    target.model.norm.weight.requires_grad_(False)  # the user's flags must survive too
    snap = models.snapshot(target)
    with pytest.raises(ValueError, match="shape"):
        lk.load_adapter(target, tmp_path)
    models.assert_unchanged(target, snap)
    assert lk.adapter_names(target) == []


def test_07_failed_load_into_an_adapted_model_keeps_its_adapters(tmp_path):
    model = models.llama()
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="olora"))
    lk.save_adapter(model, tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    target = models.llama()
    lk.inject(target, lk.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False), adapter_name="mine")
    snap = models.snapshot(target)
    with pytest.raises(ValueError):
        lk.load_adapter(target, tmp_path, adapter_name="new")
    models.assert_unchanged(target, snap)


# ---------------------------------------------------------------- 11: hot swap, patterns, MHA
def test_11_hotswap_with_rank_and_alpha_patterns_on_multihead_attention(tmp_path):
    def build(seed: int) -> nn.Module:
        torch.manual_seed(0)
        model = models.TransformerBlock()
        torch.manual_seed(seed)
        lk.inject(model, lk.LoraConfig(r=2, lora_alpha=2, target_modules=["attn", "ff.0"], rank_pattern={"attn": 4},
                                       alpha_pattern={"attn": 16}, init_lora_weights=False))
        return model.eval()

    model = build(1)
    torch.manual_seed(0)
    donor = models.TransformerBlock()
    torch.manual_seed(2)  # other weights, and other alphas: the slot's scalings must follow the file's
    lk.inject(donor, lk.LoraConfig(r=2, lora_alpha=3, target_modules=["attn", "ff.0"], rank_pattern={"attn": 4},
                                   alpha_pattern={"attn": 8}, init_lora_weights=False))
    donor.eval()
    lk.save_adapter(donor, tmp_path)
    x = models.ids()
    with torch.no_grad():
        expected = donor(x)
        lk.hotswap_adapter(model, tmp_path)
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- 20: task type of GPT-2's LM head model
def test_20_gpt2_lm_head_model_is_a_causal_lm(tmp_path):
    model = models.gpt2()
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["c_attn"]))
    out = lk.save_adapter(model, tmp_path)
    assert json.loads((out / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
