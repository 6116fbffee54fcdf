"""Scaled word embeddings (Gemma, Gemma 3, BART: the module returns ``embed_scale · E[x]``): the LoRA
term is scaled with the lookup, so the unmerged model equals the merged one and PEFT's, in plain
forwards, with DoRA and in mixed batches."""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit as lk

import models


def _gemma():
    from transformers import GemmaConfig, GemmaForCausalLM

    cfg = GemmaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, vocab_size=models.VOCAB, max_position_embeddings=64)
    return GemmaForCausalLM(cfg).eval()


def _gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=8, vocab_size=models.VOCAB, max_position_embeddings=64)
    return Gemma3ForCausalLM(cfg).eval()


BUILD = {"gemma": _gemma, "gemma3": _gemma3}


@pytest.mark.parametrize("arch", list(BUILD))
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_a_scaled_embedding_adapter_equals_peft_and_its_merge(arch, dora):
    from peft import LoraConfig, get_peft_model

    base = BUILD[arch]()
    assert float(base.model.embed_tokens.embed_scale) != 1.0
    kw = dict(r=4, target_modules=["embed_tokens", "q_proj"], use_dora=dora)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **kw)).eval()
    model = lk.inject(copy.deepcopy(base), lk.LoraConfig(**kw))
    assert models.copy_from_peft(model, peft_model) > 0
    x = models.ids()
    with torch.no_grad():
        ours = model(input_ids=x).logits
        torch.testing.assert_close(ours, peft_model(input_ids=x).logits, rtol=1e-4, atol=1e-5)
        merged = lk.merge_and_unload(copy.deepcopy(model))
        torch.testing.assert_close(merged(input_ids=x).logits, ours, rtol=1e-4, atol=1e-5)


def test_a_scaled_embedding_in_a_mixed_batch_equals_each_adapter_alone():
    model = _gemma()
    for name in ("a", "b"):
        lk.inject(model, lk.LoraConfig(r=4, target_modules=["embed_tokens"]), adapter_name=name)
    models.randomize_adapters(model, std=0.3)
    x = models.ids(3, 6)
    rows = ["a", "__base__", "b"]
    with torch.no_grad():
        with lk.mixed_batch(model, rows):
            out = model(input_ids=x).logits
        ref = models.rows_alone(model, rows, lambda i: model(input_ids=x[i:i + 1]).logits[0], "a")
    for i in range(len(rows)):
        torch.testing.assert_close(out[i], ref[i], rtol=1e-5, atol=1e-5)
