"""lorakit vs Hugging Face PEFT: same config + same adapter weights -> same outputs and counts.

PEFT is the independent reference: both libraries get a copy of the same random base model,
PEFT's adapter tensors (random, init_lora_weights=False) are copied into lorakit's, and the
outputs must agree to fp32 tolerance. Targeted module sets and trainable counts must match.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from peft.tuners.lora import LoraLayer as PeftLoraLayer

import lorakit as lk

import models

ATOL = 1e-5

CASES = {
    # kind: (builder, lorakit/PEFT config kwargs)
    "llama": (models.llama, dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj"])),
    "gpt2": (models.gpt2, dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)),
    "bert": (models.bert_cls, dict(target_modules=["query", "value"], modules_to_save=["classifier"])),
    "t5": (models.t5, dict(target_modules=["q", "k", "v", "o", "wi", "wo"])),
    "conv": (models.ConvNet, dict(target_modules=["conv1", "conv2", "conv1d", "fc"])),
    "mha": (models.TransformerBlock, dict(target_modules=["attn", "ff.0", "ff.2", "embed"])),
}


def _biased_llama():
    """Llama with biased projections, so that the bias modes have something to train."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=models.VOCAB, attention_bias=True, mlp_bias=True)
    return LlamaForCausalLM(cfg).eval()


OPTION_CASES = {"llama_biased": (_biased_llama, CASES["llama"][1])}


def _inputs(kind: str):
    if kind == "conv":
        return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    return models.ids()


def _pair(kind: str, seed: int = 0, **extra):
    """(lorakit model, PEFT model) on identical base weights, PEFT adapters copied into lorakit."""
    build, kw = {**CASES, **OPTION_CASES}[kind]
    kw = {**kw, **extra}
    torch.manual_seed(seed)
    base = build()
    ours = copy.deepcopy(base)
    ref = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **kw))
    lk.inject(ours, lk.LoraConfig(r=4, lora_alpha=8, **kw))
    assert models.copy_from_peft(ours, ref) > 0
    return ours, ref


def _peft_targets(ref) -> set[str]:
    return {n.removeprefix("base_model.model.") for n, m in ref.named_modules()
            if isinstance(m, PeftLoraLayer) and not n.endswith("out_proj")}


def _zero_mha_out_proj(*ms) -> None:
    """PEFT 0.21.2 applies the MultiheadAttention out_proj delta twice (huggingface/peft#3774);
    with that update zero both agree, and test_mha_matches_hand_merged covers the out_proj."""
    for m in ms:
        for n, p in m.named_parameters():
            if "out_proj.lora_B" in n:
                torch.nn.init.zeros_(p.data)


@pytest.mark.parametrize("kind", list(CASES))
def test_same_outputs_and_counts(kind):
    ours, ref = _pair(kind)
    if kind == "mha":
        _zero_mha_out_proj(ours, ref)
    x = _inputs(kind)
    with torch.no_grad():
        a, b = models.run(ours, kind, x), models.run(ref, kind, x)
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    assert lk.trainable_parameters(ours) == ref.get_nb_trainable_parameters()
    assert set(lk.find_targets(copy.deepcopy(ours), lk.LoraConfig(**{k: v for k, v in CASES[kind][1].items()
                                                                       if k != "modules_to_save"}))) \
        >= _peft_targets(ref)


def test_mha_matches_hand_merged():
    """Independent reference for nn.MultiheadAttention: a plain block whose in_proj and out_proj
    weights have scaling·B·A added by hand."""
    torch.manual_seed(0)
    base = models.TransformerBlock()
    ours, manual = copy.deepcopy(base), copy.deepcopy(base)
    lk.inject(ours, lk.LoraConfig(r=4, lora_alpha=8, target_modules=["attn"]))
    models.randomize_adapters(ours)
    attn = ours.attn
    with torch.no_grad():
        s = attn.scaling["default"]
        manual.attn.in_proj_weight += s * attn.lora_B["default"].weight @ attn.lora_A["default"].weight
        out = attn.base_layer.out_proj
        manual.attn.out_proj.weight += s * out.lora_B["default"].weight @ out.lora_A["default"].weight
        x = models.ids()
        torch.testing.assert_close(ours(x), manual(x), atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["llama", "bert", "mha"])
def test_same_gradients(kind):
    """Training-mode forward + backward: every adapter gradient equals PEFT's."""
    ours, ref = _pair(kind)
    if kind == "mha":
        _zero_mha_out_proj(ours, ref)
    ours.train(), ref.train()
    x = _inputs(kind)
    for m in (ours, ref):  # same seed: the base model's own dropout draws the same masks
        torch.manual_seed(1)
        models.run(m, kind, x).square().mean().backward()
    dora_key = ("lora_magnitude_vector.default.weight", "lora_magnitude_vector.default")
    ref_grads = {n.removeprefix("base_model.model.").replace(*dora_key): p.grad
                 for n, p in ref.named_parameters() if p.requires_grad}
    ours_grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert ref_grads.keys() == ours_grads.keys()
    for n, g in ours_grads.items():
        torch.testing.assert_close(g, ref_grads[n], atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("extra", [
    dict(use_dora=True),
    dict(use_rslora=True),
    dict(rank_pattern={"q_proj": 2, r"layers\.1\.mlp\.down_proj": 6}, alpha_pattern={"v_proj": 3}),
    dict(layers_to_transform=[1], layers_pattern="layers"),
    dict(layers_to_transform=0),
    dict(target_modules=r".*\.(q_proj|v_proj)"),
    dict(target_modules="all-linear"),
    dict(target_modules="all-linear", exclude_modules=["down_proj"]),
    dict(bias="all"),
    dict(bias="lora_only", target_modules=["q_proj"]),
], ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items())[:60])
def test_llama_options(extra):
    ours, ref = _pair("llama_biased", **extra)
    x = models.ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=x).logits, ref(input_ids=x).logits, atol=ATOL, rtol=0)
    assert lk.trainable_parameters(ours) == ref.get_nb_trainable_parameters()
    ours_targets = {n for n, m in ours.named_modules() if isinstance(m, lk.layers.LoraLayer)}
    assert ours_targets == _peft_targets(ref)


def test_embedding_and_lm_head():
    ours, ref = _pair("llama", target_modules=["embed_tokens", "lm_head", "q_proj"])
    x = models.ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=x).logits, ref(input_ids=x).logits, atol=ATOL, rtol=0)
    assert lk.trainable_parameters(ours) == ref.get_nb_trainable_parameters()


@pytest.mark.parametrize("init", ["pissa", "olora", "gaussian"])
def test_init_matches_peft(init):
    """PiSSA/OLoRA factors and residual base weights equal PEFT's; all inits keep the output at the base."""
    torch.manual_seed(0)
    base = models.llama()
    ours, plain = copy.deepcopy(base), copy.deepcopy(base)
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=init)
    ref = peft.get_peft_model(base, peft.LoraConfig(**kw))
    lk.inject(ours, lk.LoraConfig(**kw))
    x = models.ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=x).logits, plain(input_ids=x).logits, atol=1e-4, rtol=0)
    if init == "gaussian":
        return
    ref_sd = {k.removeprefix("base_model.model."): v for k, v in ref.state_dict().items()}
    for k, v in ours.state_dict().items():
        if ".lora_" in k or "base_layer" in k:
            torch.testing.assert_close(v, ref_sd[k], atol=1e-5, rtol=1e-4, msg=k)


def test_second_adapter_and_switch():
    ours, ref = _pair("llama")
    kw = dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    ref.add_adapter("other", peft.LoraConfig(init_lora_weights=False, **kw))
    lk.inject(ours, lk.LoraConfig(**kw), adapter_name="other")
    models.copy_from_peft(ours, ref)
    x = models.ids()
    for name in ("other", "default"):
        ref.set_adapter(name)
        lk.set_adapter(ours, name)
        with torch.no_grad():
            torch.testing.assert_close(ours(input_ids=x).logits, ref(input_ids=x).logits, atol=ATOL, rtol=0)
        assert lk.trainable_parameters(ours) == ref.get_nb_trainable_parameters()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_dora_outputs_and_gradients(kind, dropout):
    """DoRA on Linear and on GPT-2's transposed Conv1D, in eval and training mode (same dropout masks)."""
    ours, ref = _pair(kind, use_dora=True, lora_dropout=dropout)
    ours.eval(), ref.eval()
    x = models.ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=x).logits, ref(input_ids=x).logits, atol=ATOL, rtol=0)
    ours.train(), ref.train()
    for m in (ours, ref):
        torch.manual_seed(3)
        m(input_ids=x).logits.square().mean().backward()
    dora_key = ("lora_magnitude_vector.default.weight", "lora_magnitude_vector.default")
    ref_grads = {n.removeprefix("base_model.model.").replace(*dora_key): p.grad
                 for n, p in ref.named_parameters() if p.requires_grad}
    for n, p in ours.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, ref_grads[n], atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_dora_merge_matches_peft(kind):
    ours, ref = _pair(kind, use_dora=True)
    x = models.ids()
    lk.merge(ours)
    ref.merge_adapter()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=x).logits, ref(input_ids=x).logits, atol=ATOL, rtol=0)
        lk.unmerge(ours)
        ref.unmerge_adapter()
        torch.testing.assert_close(ours(input_ids=x).logits, ref(input_ids=x).logits, atol=ATOL, rtol=0)
