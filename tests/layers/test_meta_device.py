"""Building a large model the memory-light way: base on the meta device → inject → ``to_empty`` → load.
Every adapter kind must inject on meta (its factors on meta too, as PEFT puts them) and, once the
real weights are loaded, compute exactly what the same model built on the CPU computes."""

from __future__ import annotations

import pytest
import torch

import lorakit as lk

import models

CONFIGS = {
    "lora": dict(r=4, target_modules=["q_proj", "v_proj", "embed_tokens"]),
    "dora": dict(r=4, target_modules=["q_proj", "v_proj", "embed_tokens"], use_dora=True),
    "pissa": dict(r=4, target_modules=["q_proj"], init_lora_weights="pissa"),
    "rslora bias": dict(r=4, target_modules=["o_proj"], use_rslora=True, lora_bias=True),
}


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_inject_on_meta_then_to_empty_and_load_equals_the_cpu_model(kind):
    cfg = lk.LoraConfig(**CONFIGS[kind])
    reference = models.llama()
    lk.inject(reference, cfg)
    models.randomize_adapters(reference)
    with torch.device("meta"):
        model = models.llama()
    lk.inject(model, cfg)
    params = dict(model.named_parameters())
    assert params and all(p.is_meta for p in params.values())  # the factors too: nothing allocated yet
    model.to_empty(device="cpu")
    model.load_state_dict(reference.state_dict())
    ref_buffers = dict(reference.named_buffers())
    with torch.no_grad():  # non-persistent buffers (rotary inv_freq) are not in a state dict: as transformers does
        for n, b in model.named_buffers():
            b.copy_(ref_buffers[n])
    x = models.ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, reference(x).logits)
