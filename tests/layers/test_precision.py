"""Mixed precision (issue 12): fp32 master factors on a bf16 base, the LoRA term computed in bf16.

* the factors and their gradients are fp32;
* no fp32 tensor of activation size is saved for backward (saved_tensors_hooks);
* outputs and gradients equal PEFT's within bf16 tolerance, and exactly with ``peft_numerics``;
* a few hundred bf16 steps lower the loss as fp32 steps do.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.layers import LoraLayer, wrappers

import models

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _bf16_llama() -> nn.Module:
    return models.llama(layers=2).to(torch.bfloat16)


def _fp32_activations_saved(model: nn.Module, x: torch.Tensor) -> int:
    """How many fp32 tensors of activation size ((batch·seq) × ≥ hidden elements) autograd saves
    in one forward."""
    count = 0

    def pack(t: torch.Tensor):
        nonlocal count
        count += int(t.dtype == torch.float32 and t.dim() >= 2 and t.numel() >= x.numel() * 32)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=x).logits.float().sum()
    return count


def test_bf16_base_keeps_fp32_masters_and_fp32_grads():
    model = _bf16_llama()
    lk.inject(model, lk.LoraConfig(r=4, target_modules=TARGETS + ["embed_tokens"], init_lora_weights="gaussian"))
    model.train()
    loss = model(input_ids=models.ids(), labels=models.ids()).loss
    loss.backward()
    params = [p for _, w in wrappers(model) if isinstance(w, LoraLayer) for p in w.adapter_parameters("default")]
    assert params and all(p.dtype == torch.float32 for p in params)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params)
    base = [p for n, p in model.named_parameters() if "base_layer" in n]
    assert base and all(p.dtype == torch.bfloat16 and p.grad is None for p in base)


def test_no_fp32_activation_is_saved_for_backward():
    """LoRA adds no fp32 activation to what the bf16 model itself saves (Llama's RMSNorm computes in
    fp32 on its own: the floor is the frozen model with grad-requiring embeddings)."""
    x = models.ids(batch=4, seq=16)
    floor = _bf16_llama()
    floor.requires_grad_(False)
    floor.enable_input_require_grads()
    floor.train()
    saved = {"floor": _fp32_activations_saved(floor, x)}
    for mode in ("lorakit", "peft_numerics"):
        model = _bf16_llama()
        lk.inject(model, lk.LoraConfig(r=4, target_modules=TARGETS), peft_numerics=mode == "peft_numerics")
        model.train()
        saved[mode] = _fp32_activations_saved(model, x)
    assert saved["lorakit"] <= saved["floor"], saved
    # the positive control: PEFT's numerics cast each adapted input to fp32 and save it (2 layers × 7)
    assert saved["peft_numerics"] >= saved["lorakit"] + 14, saved


def _grads(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.train()
    out = model(input_ids=x).logits
    out.float().pow(2).mean().backward()
    grads = {n.removeprefix("base_model.model."): p.grad.float() for n, p in model.named_parameters()
             if p.grad is not None}
    return out.detach().float(), grads


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_bf16_outputs_and_grads_match_peft():
    """Against an fp32 reference, lorakit's bf16 compute is as accurate as PEFT's own bf16 adapters
    (both compute the term in bf16; lorakit keeps fp32 masters); with ``peft_numerics`` it is
    PEFT's default exactly."""
    from peft import LoraConfig, get_peft_model

    base = models.llama(layers=2)
    cfg = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    ref = get_peft_model(copy.deepcopy(base), LoraConfig(**cfg))
    peft_default = get_peft_model(copy.deepcopy(base).to(torch.bfloat16), LoraConfig(**cfg))
    peft_default.load_state_dict(ref.state_dict(), strict=False)
    peft_bf16 = get_peft_model(copy.deepcopy(base).to(torch.bfloat16), LoraConfig(**cfg), autocast_adapter_dtype=False)
    peft_bf16.load_state_dict({k: v.to(torch.bfloat16) for k, v in ref.state_dict().items()}, strict=False)
    ours = lk.inject(copy.deepcopy(base).to(torch.bfloat16), lk.LoraConfig(**cfg))
    exact = lk.inject(copy.deepcopy(base).to(torch.bfloat16), lk.LoraConfig(**cfg), peft_numerics=True)
    for m in (ours, exact):
        assert models.copy_from_peft(m, ref) == 2 * 7 * 2
    x = models.ids(batch=2, seq=8)
    results = {k: _grads(m, x) for k, m in
               {"ref": ref, "peft": peft_default, "peft_bf16": peft_bf16, "ours": ours, "exact": exact}.items()}
    out, grads = results["exact"]
    torch.testing.assert_close(out, results["peft"][0], atol=0, rtol=0)
    for k, g in results["peft"][1].items():
        torch.testing.assert_close(grads[k], g, atol=0, rtol=0)
    ref_out, ref_grads = results["ref"]
    for who in ("ours", "peft_bf16"):
        assert results[who][1].keys() == ref_grads.keys()
    ours_err = max(_rel(results["ours"][1][k], ref_grads[k]) for k in ref_grads)
    peft_err = max(_rel(results["peft_bf16"][1][k], ref_grads[k]) for k in ref_grads)
    assert ours_err <= 1.25 * peft_err + 1e-3, (ours_err, peft_err)
    assert _rel(results["ours"][0], ref_out) <= 1.25 * _rel(results["peft_bf16"][0], ref_out) + 1e-3
    torch.testing.assert_close(results["ours"][0], ref_out, atol=5e-2, rtol=3e-2)  # bf16 tolerance


def _train(dtype: torch.dtype, steps: int) -> list[float]:
    torch.manual_seed(0)
    model = models.llama(layers=1).to(dtype)
    lk.inject(model, lk.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    x = models.ids(batch=4, seq=12, seed=1)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    return losses


def test_bf16_training_lowers_the_loss_like_fp32():
    fp32, bf16 = _train(torch.float32, 60), _train(torch.bfloat16, 60)
    assert fp32[-1] < 0.9 * fp32[0]  # random tokens: a 1-layer model at r=8 can only learn so much
    assert bf16[-1] < 0.9 * bf16[0]
    for step in (10, 30, 59):  # the bf16 curve tracks the fp32 one
        assert abs(bf16[step] - fp32[step]) < 0.01 * fp32[step], (step, bf16[step], fp32[step])


def test_train_on_a_bf16_gpu_loads_the_base_in_bf16_without_autocast():
    from lorakit.train.settings import gpu_precision

    assert gpu_precision("auto", None, True, cuda=True, bf16_supported=True) == ("bfloat16", False)
    assert gpu_precision("cuda:1", None, False, cuda=True, bf16_supported=True) == ("bfloat16", False)
    assert gpu_precision("cuda", None, True, cuda=True, bf16_supported=False) == (None, True)  # e.g. a V100
    assert gpu_precision("auto", None, True, cuda=False) == (None, True)  # the CPU keeps fp32 + autocast
    assert gpu_precision("cuda", "float32", True, cuda=True, bf16_supported=True) == ("float32", True)  # --dtype wins


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_gradient_checkpointing_gives_the_same_grads_on_a_bf16_base(reentrant):
    """HF activation checkpointing (either flavour) with fp32 masters computed in bf16: the same
    gradients as without it (the recomputed forward is the same function)."""
    grads = []
    adapted = lk.inject(_bf16_llama(), lk.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
    for checkpointing in (False, True):
        model = copy.deepcopy(adapted)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            model.enable_input_require_grads()  # what lk.inject does for a model checkpointed before injection
        model.train()
        x = models.ids(batch=2, seq=8)
        model(input_ids=x, labels=x).loss.backward()
        grads.append({n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 7 * 2
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], atol=1e-6, rtol=1e-3)


def _saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd keeps for backward in one forward."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=x).logits.float().sum()
    return sum(seen.values())


def test_the_lora_term_saves_only_its_shared_inputs_and_the_r_wide_products():
    """Over the frozen model, LoRA on all 7 projections keeps at most: each distinct input once (q/k/v
    share one, gate/up another: 4 per layer), the r-wide A·x of each projection, and the bf16 copies
    of the small factors — in bf16. PEFT's numerics keep fp32 copies of the inputs besides."""
    b, t, r, layers, h, inter = 4, 16, 4, 2, 32, 64
    x = models.ids(batch=b, seq=t)
    floor = _bf16_llama()
    floor.requires_grad_(False)
    floor.enable_input_require_grads()
    floor.train()
    extra = {}
    for mode in ("lorakit", "peft_numerics"):
        model = _bf16_llama()
        lk.inject(model, lk.LoraConfig(r=r, target_modules=TARGETS), peft_numerics=mode == "peft_numerics")
        model.train()
        extra[mode] = _saved_bytes(model, x) - _saved_bytes(floor, x)
    kv = 16  # 2 KV heads × head dim 8
    factors = sum(r * i + o * r for i, o in [(h, h), (h, kv), (h, kv), (h, h), (h, inter), (h, inter), (inter, h)])
    bound = layers * 2 * (b * t * (3 * h + inter) + 7 * b * t * r + factors)  # bf16: 2 bytes each
    assert 0 < extra["lorakit"] <= bound, (extra, bound)
    assert extra["peft_numerics"] > 3 * extra["lorakit"], extra
