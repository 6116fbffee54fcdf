"""Adapters on MoE models' fused experts, model level: several adapters, set_adapter, disable_adapters,
mixed_batch (one adapter per row), merge / unmerge, refusals (as PEFT), the fallback to W + ΔW with
its reason for modules the routed computation does not cover, and experts held as an nn.ModuleList
of Linear layers (plain LoRA per Linear, against PEFT)."""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from torch import nn
from transformers.integrations.moe import use_experts_implementation

import lorakit as lk
from lorakit.layers import Linear
from lorakit.layers.experts import ExpertsWrapper

import models
from models import EXPERTS, moe


def adapters(kind: str = "qwen3_moe", impl: str = "grouped_mm", names=("a", "b", "c")) -> nn.Module:
    model = moe(kind)
    model.set_experts_implementation(impl)
    for i, name in enumerate(names):
        lk.inject(model, lk.LoraConfig(r=2 + i, lora_alpha=4, target_parameters=EXPERTS, init_lora_weights=False),
                  name)
    models.randomize_adapters(model, seed=1, std=0.3)
    return model.eval()


def logits(model, ids):
    return model(input_ids=ids).logits


@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])
@pytest.mark.parametrize("kind", ["qwen3_moe", "gpt_oss"])
def test_mixed_batch_rows_get_their_own_adapter(kind, impl):
    """Each row of a mixed batch gets what it gets alone with its adapter (or none: "__base__")."""
    model = adapters(kind, impl)
    rows = ["b", "__base__", "a", "b", "c"]
    ids = models.ids(batch=len(rows), seq=6)
    with torch.no_grad():
        expected = models.rows_alone(model, rows, lambda i: logits(model, ids[i:i + 1])[0], restore="a")
        with lk.mixed_batch(model, rows):
            got = logits(model, ids)
    for i in range(len(rows)):
        torch.testing.assert_close(got[i], expected[i], atol=1e-5, rtol=1e-5, msg=rows[i])
    assert not torch.allclose(expected[0], expected[1], atol=1e-3)  # the adapters do change the rows


def test_several_active_adapters_add_up_and_switch():
    """Two active adapters give the merged model of both; set_adapter switches; disable_adapters is
    the base model bit for bit; unmerge restores the experts."""
    model = adapters(names=("a", "b"))
    ids = models.ids()
    base = moe("qwen3_moe").eval()
    with torch.no_grad():
        lk.set_adapter(model, ["a", "b"])
        both = logits(model, ids)
        lk.set_adapter(model, "a")
        only_a = logits(model, ids)
        with lk.disable_adapters(model):
            torch.testing.assert_close(logits(model, ids), logits(base, ids), atol=0, rtol=0)
        merged = lk.merge_and_unload(copy.deepcopy(model))
        torch.testing.assert_close(logits(merged, ids), only_a, atol=1e-5, rtol=1e-5)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        lk.set_adapter(model, ["a", "b"])
        lk.merge(model)
        torch.testing.assert_close(logits(model, ids), both, atol=1e-5, rtol=1e-5)
        lk.unmerge(model)
        for k, v in model.state_dict().items():
            torch.testing.assert_close(v, before[k], atol=1e-6, rtol=0, msg=k)
    assert not torch.allclose(both, only_a, atol=1e-3)


@pytest.mark.parametrize("field, value", [("lora_dropout", 0.1), ("use_dora", True)])
def test_dropout_and_dora_on_experts_are_refused_as_peft_refuses_them(field, value):
    kw = dict(r=2, target_parameters=EXPERTS, **{field: value})
    with pytest.raises(ValueError, match="does not work with"):
        peft.get_peft_model(moe("qwen3_moe"), peft.LoraConfig(**kw))
    model = moe("qwen3_moe")
    snap = models.snapshot(model)
    with pytest.raises(ValueError, match=field):
        lk.inject(model, lk.LoraConfig(**kw))
    models.assert_unchanged(model, snap)


class DenseExperts(nn.Module):
    """Experts as a dense 3-D weight used by ``bmm`` over all experts (Llama4-style): no routed form."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 8, 6) * 0.3)  # (E, in, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (E, n, in)
        return torch.bmm(x, self.w)


class Dense(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.experts = DenseExperts()

    def forward(self, x):
        return self.experts(x)


def test_an_unrecognised_3d_parameter_falls_back_to_delta_weight_with_its_reason():
    """A 3-D parameter of a module lorakit has no routed form for: W + ΔW (PEFT's outputs), a
    warning and ``routed_reason`` saying why."""
    kw = dict(r=2, target_parameters=["experts.w"])
    with pytest.warns(UserWarning, match="DenseExperts is not a transformers experts module"):
        ours = lk.inject(Dense(), lk.LoraConfig(**kw))
    ref = peft.get_peft_model(Dense(), peft.LoraConfig(**kw, init_lora_weights=False))
    models.copy_from_peft(ours, ref)
    assert isinstance(ours.experts, ExpertsWrapper) and "not a transformers experts" in ours.experts.routed_reason
    x = torch.randn(3, 4, 8)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-6, rtol=1e-5)


def test_a_custom_eager_forward_is_detected_and_not_replaced():
    """An experts class decorated like transformers' but whose eager loop computes something else:
    the routed computation would change its outputs, so lorakit keeps the module's forward (W + ΔW)."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    class ScaledExperts(Qwen3MoeExperts):
        def forward(self, hidden_states, top_k_index, top_k_weights):
            return 2 * Qwen3MoeExperts.forward.__wrapped__(self, hidden_states, top_k_index, top_k_weights)

    cls = use_experts_implementation(ScaledExperts)
    model = moe("qwen3_moe")
    model.set_experts_implementation("eager")
    for layer in model.model.layers:
        old = layer.mlp.experts
        layer.mlp.experts = cls(model.config)
        layer.mlp.experts.load_state_dict(old.state_dict())
    ids = models.ids()
    with torch.no_grad():
        base = logits(model, ids)
    with pytest.warns(UserWarning, match="eager forward computes something other"):
        lk.inject(model, lk.LoraConfig(r=2, target_parameters=EXPERTS))  # B = 0: the base model
    with torch.no_grad():
        torch.testing.assert_close(logits(model, ids), base, atol=1e-6, rtol=1e-6)


def test_expert_parallel_experts_fall_back_at_call_time():
    model = adapters(names=("a",))
    ids = models.ids()
    with torch.no_grad():
        routed = logits(model, ids)
        experts = [m for m in model.modules() if isinstance(m, ExpertsWrapper)]
        for m in experts:
            m.real_module()._is_expert_parallel = True  # no sentinels here, so the same function
        torch.testing.assert_close(logits(model, ids), routed, atol=1e-5, rtol=1e-5)
    assert all("expert parallelism" in m.fallback_reason for m in experts)


class LinearExperts(nn.Module):
    """A top-1 MoE whose experts are an nn.ModuleList of two-Linear MLPs (the pre-v5 layout)."""

    def __init__(self, n: int = 4, d: int = 16, h: int = 24) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.router = nn.Linear(d, n, bias=False)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(d, h), nn.SiLU(), nn.Linear(h, d)) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (T, d)
        choice = self.router(x).argmax(-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            idx = (choice == e).nonzero().squeeze(1)
            out = out.index_add(0, idx, expert(x[idx]))
        return out


def test_experts_as_a_module_list_of_linears_keep_lora_per_linear():
    kw = dict(r=2, target_modules=["experts.0.0", "experts.0.2", "experts.3.0"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning: these are plain Linear layers
        ours = lk.inject(LinearExperts(), lk.LoraConfig(**kw))
    ref = peft.get_peft_model(LinearExperts(), peft.LoraConfig(**kw, init_lora_weights=False))
    models.copy_from_peft(ours, ref)
    assert isinstance(ours.experts[0][0], Linear) and isinstance(ours.experts[3][0], Linear)
    x = torch.randn(32, 16)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-6, rtol=1e-5)


def test_gradient_checkpointing_recomputes_the_routed_terms_exactly():
    model = adapters(names=("a",)).train()
    ids = models.ids()

    def grads():
        model.zero_grad()
        logits(model, ids).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain = grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    again = grads()
    assert plain.keys() == again.keys() and len(plain) == 8
    for k in plain:
        torch.testing.assert_close(again[k], plain[k], atol=1e-7, rtol=1e-6, msg=k)
