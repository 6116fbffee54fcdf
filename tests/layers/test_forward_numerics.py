"""The lean unmerged forward against real PEFT in training mode (outputs and gradients) and
against the hand-written maths y = W0·x + b + Σ_a s_a·B_a·A_a·x."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import lorakit as lk

torch.set_num_threads(2)
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama() -> nn.Module:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=64))


def gpt2() -> nn.Module:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32))


def pair(make, targets, dropout):
    """A PEFT model and a lorakit model on the same base with the same (random) factors."""
    ours, theirs = make(), make()
    theirs = get_peft_model(theirs, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets))
    lk.inject(ours, lk.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets))
    g = torch.Generator().manual_seed(1)
    sd = ours.state_dict()
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
                sd[n.removeprefix("base_model.model.")].copy_(p)
    return ours, theirs


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n.removeprefix("base_model.model."): p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("make,targets", [(llama, PROJ), (gpt2, ["c_attn", "c_proj", "c_fc"])],
                         ids=["llama", "gpt2-conv1d"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_training_step_matches_peft(make, targets, dropout):
    ours, theirs = pair(make, targets, dropout)
    ours.train()
    theirs.train()
    x = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(2))
    losses = []
    for m in (ours, theirs):
        torch.manual_seed(123)  # the same dropout masks, drawn in the same order
        out = m(input_ids=x, labels=x)
        out.loss.backward()
        losses.append(out.logits)
    torch.testing.assert_close(losses[0], losses[1], atol=1e-6, rtol=1e-5)
    g_ours, g_theirs = grads(ours), grads(theirs)
    assert g_ours.keys() == g_theirs.keys() and len(g_ours) > 0
    for k in g_ours:
        torch.testing.assert_close(g_ours[k], g_theirs[k], atol=1e-6, rtol=1e-5, msg=k)


def test_several_active_adapters_hand_maths():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 5))
    W, b = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    for name, r, alpha in (("a", 2, 3.0), ("c", 4, 1.0)):
        lk.inject(model, lk.LoraConfig(r=r, lora_alpha=alpha, target_modules=["0"]), adapter_name=name)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad or p.dim() == 2 and p.shape != W.shape:
                p.normal_()
    lk.set_adapter(model, ["a", "c"])
    layer = model[0]
    x = torch.randn(2, 3, 7, requires_grad=True)
    want = x @ W.T + b  # (2, 3, 5)
    for name in ("a", "c"):
        A, B = layer.lora_A[name].weight.detach(), layer.lora_B[name].weight.detach()
        want = want + layer.scaling[name] * (x @ A.T @ B.T)
    got = model(x)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    got.sum().backward()  # the in-place accumulation leaves autograd intact: d/dx = W^T·1 + Σ s·A^T·B^T·1
    gx = torch.autograd.grad(want.sum(), x)[0]
    torch.testing.assert_close(x.grad, gx, atol=1e-6, rtol=1e-5)


def test_half_precision_base_with_fp32_adapters():
    """A bf16 base with fp32 adapters (PEFT's autocast_adapter_dtype) takes the general path and
    computes base(x) + s·B·A·x with the update in fp32."""
    torch.manual_seed(0)
    base = nn.Linear(8, 6).to(torch.bfloat16)
    model = nn.Sequential(copy.deepcopy(base))
    lk.inject(model, lk.LoraConfig(r=2, lora_alpha=2, target_modules=["0"]))
    with torch.no_grad():
        model[0].lora_B["default"].weight.normal_()
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    layer = model[0]
    delta = layer.lora_B["default"](layer.lora_A["default"](x.float()))  # (4, 6), fp32
    torch.testing.assert_close(model(x), (base(x).float() + delta).to(torch.bfloat16))
