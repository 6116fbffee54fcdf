"""Hugging Face models: dtypes, gradient checkpointing, merge_and_unload, tied weights."""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit as lk

import models

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_fp32_adapters(dtype):
    model = models.llama().to(dtype)
    base = copy.deepcopy(model)
    lk.inject(model, lk.LoraConfig(r=4, target_modules=TARGETS + ["embed_tokens"]))
    assert model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == torch.float32
    assert model.model.layers[0].self_attn.q_proj.base_layer.weight.dtype == dtype
    x = models.ids()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, base(input_ids=x).logits)
    model.train()
    out = model(input_ids=x, labels=x)
    assert out.logits.dtype == dtype
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 for g in grads)
    models.randomize_adapters(model, std=0.05)
    model.eval()
    with torch.no_grad():
        unmerged = model(input_ids=x).logits.float()
        lk.merge(model)
        torch.testing.assert_close(model(input_ids=x).logits.float(), unmerged, atol=0.15, rtol=0.05)


def test_autocast_adapter_dtype_off_keeps_base_dtype():
    model = models.llama().to(torch.bfloat16)
    lk.inject(model, lk.LoraConfig(target_modules=["q_proj"]), autocast_adapter_dtype=False)
    assert model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == torch.bfloat16


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_trains(when, reentrant):
    model = models.llama().train()
    kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": reentrant}}
    if when == "before":
        model.gradient_checkpointing_enable(**kwargs)
    lk.inject(model, lk.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
    if when == "after":
        model.gradient_checkpointing_enable(**kwargs)
    x = models.ids()
    model(input_ids=x, labels=x).loss.backward()
    lora = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert lora and all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in lora), \
        [n for n, p in lora if p.grad is None]


def test_merge_and_unload_stays_hf_and_saves(tmp_path):
    from transformers import LlamaForCausalLM

    model = models.llama()
    lk.inject(model, lk.LoraConfig(r=4, target_modules=TARGETS + ["lm_head"], init_lora_weights=False))
    x = models.ids()
    with torch.no_grad():
        expect = model(input_ids=x).logits
    plain = lk.merge_and_unload(model)
    assert type(plain) is LlamaForCausalLM and type(plain.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert not hasattr(plain, "_lorakit")
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=x).logits, expect, atol=1e-5, rtol=0)
    plain.save_pretrained(tmp_path)
    again = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=x).logits, expect, atol=1e-5, rtol=0)
    gen = plain.generate(x[:1, :3], max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, 7)


def test_merge_into_tied_head_unties_it():
    model = models.llama(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    lk.inject(model, lk.LoraConfig(r=4, target_modules=["lm_head"], init_lora_weights=False))
    x = models.ids()
    emb_before = model.model.embed_tokens.weight.detach().clone()
    with torch.no_grad():
        expect = model(input_ids=x).logits
    with pytest.warns(UserWarning, match="tied"):
        lk.merge(model)
    torch.testing.assert_close(model.model.embed_tokens.weight, emb_before, atol=0, rtol=0)
    assert model.config.tie_word_embeddings is False
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, expect, atol=1e-5, rtol=0)


def test_merge_and_unload_keeps_trained_classifier():
    model = models.bert_cls()
    lk.inject(model, lk.LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"]))
    with torch.no_grad():
        model.classifier.modules_to_save["default"].weight.add_(1.0)
        x = models.ids()
        expect = model(input_ids=x).logits
    plain = lk.merge_and_unload(model)
    assert type(plain.classifier) is torch.nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=x).logits, expect, atol=1e-5, rtol=0)
