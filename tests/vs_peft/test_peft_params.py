"""target_parameters (LoRA on nn.Parameter weights) against PEFT 0.21's ParamWrapper: tiny MoE models
from transformers v5 whose experts are fused 3-D parameters (Qwen3-MoE, Mixtral: (E, out, in);
gpt-oss: ``is_transposed``), a module with two 2-D parameters (nesting), several adapters, mixed
batches (on experts: tests/test_moe_model.py), bf16, and file round trips both ways with PEFT's keys.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lorakit as lk
from lorakit.layers.experts import ExpertsWrapper

import models
from models import EXPERTS, moe


def _pair(base: nn.Module, **kw):
    """(lorakit, PEFT) adapters of the same config on copies of ``base``, PEFT's random weights in both."""
    ours = lk.inject(copy.deepcopy(base), lk.LoraConfig(**kw))
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw, init_lora_weights=False))
    assert models.copy_from_peft(ours, ref) > 0
    return ours, ref.eval()


def _logits(model, ids):
    return model(ids).logits


@pytest.mark.parametrize("impl", ["grouped_mm", "eager"])
@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_moe_experts_same_as_peft(kind, impl):
    """Forward, gradients of every factor, and the merged model equal PEFT's (lorakit computing the
    LoRA terms on the routed tokens, PEFT with W + ΔW), in both of the model's expert implementations."""
    base = moe(kind)
    base.set_experts_implementation(impl)
    ours, ref = _pair(base, r=2, lora_alpha=4, target_modules=["q_proj"], target_parameters=EXPERTS)
    experts = ours.model.layers[0].mlp.experts
    assert isinstance(experts, ExpertsWrapper) and isinstance(experts.base_layer, ExpertsWrapper)
    assert experts.routed_reason is None and experts.base_layer.routed_reason is None
    assert experts.num_experts == 4 and experts.lora_A["default"].weight.shape[0] == 2 * 4
    ids = models.ids()
    torch.testing.assert_close(_logits(ours, ids), _logits(ref, ids), atol=1e-5, rtol=1e-5)
    _logits(ours, ids).sum().backward()
    _logits(ref, ids).sum().backward()
    grads = {n.removeprefix("base_model.model."): p.grad for n, p in ref.named_parameters() if p.requires_grad}
    for n, p in ours.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], atol=1e-5, rtol=1e-4, msg=n)
    with torch.no_grad():
        out = _logits(ours, ids)
        torch.testing.assert_close(_logits(lk.merge_and_unload(ours), ids), out, atol=1e-5, rtol=1e-5)
    assert type(ours.model.layers[0].mlp.experts).__name__.endswith("Experts")


@pytest.mark.parametrize("kind", ["qwen3_moe", "gpt_oss"])
def test_moe_files_both_ways(kind, tmp_path):
    """PEFT's file loads in lorakit; lorakit's file has PEFT's exact keys and loads in PEFT."""
    base = moe(kind)
    _, ref = _pair(base, r=2, target_parameters=EXPERTS)
    ref.save_pretrained(tmp_path / "peft")
    ours = lk.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    ids = models.ids()
    torch.testing.assert_close(_logits(ours, ids), _logits(ref, ids), atol=1e-5, rtol=1e-5)
    lk.save_adapter(ours, tmp_path / "lk")
    theirs, mine = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("peft", "lk"))
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lk").eval()
    torch.testing.assert_close(_logits(again, ids), _logits(ours, ids), atol=1e-5, rtol=1e-5)


def test_merge_unmerge_restores_the_experts():
    base = moe("qwen3_moe")
    ours, _ = _pair(base, r=2, target_parameters=EXPERTS)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    ids = models.ids()
    with lk.disable_adapters(ours):
        torch.testing.assert_close(_logits(ours, ids), _logits(base, ids), atol=0, rtol=0)
    out = _logits(ours, ids)
    lk.merge(ours)
    torch.testing.assert_close(_logits(ours, ids), out, atol=1e-5, rtol=1e-5)
    lk.unmerge(ours)
    for k, v in ours.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=1e-6, rtol=0, msg=k)
    with lk.disable_adapters(ours):
        torch.testing.assert_close(_logits(ours, ids), _logits(base, ids), atol=1e-6, rtol=0)


def test_bf16_experts_compute_in_bf16_from_fp32_masters():
    base = moe("qwen3_moe")
    ours = lk.inject(copy.deepcopy(base).to(torch.bfloat16), lk.LoraConfig(r=2, target_parameters=EXPERTS,
                                                                           init_lora_weights=False))
    ref = lk.inject(copy.deepcopy(base), lk.LoraConfig(r=2, target_parameters=EXPERTS, init_lora_weights=False))
    with torch.no_grad():
        for (n, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters()):
            if ".lora_" in n:
                assert p.dtype == torch.float32
                p.copy_(q)
    ids = models.ids()
    out = _logits(ours, ids)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), _logits(ref, ids), atol=0.1, rtol=0.05)


class TwoWeights(nn.Module):
    """y = (x @ w1ᵀ) @ w2ᵀ with two bare 2-D parameters (out, in)."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(12, 10))
        self.w2 = nn.Parameter(torch.randn(6, 12))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.w1.T) @ self.w2.T


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.block = TwoWeights()
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x))


def test_two_parameters_of_one_module_nest_as_peft(tmp_path):
    """The last registered parameter is the outer wrapper (``block.lora_A``), the first the inner
    (``block.base_layer.lora_A``): PEFT's keys, PEFT's outputs; rank_pattern keys name parameters."""
    kw = dict(r=3, target_parameters=["block.w2", "block.w1"], rank_pattern={"w2": 2})
    ours, ref = _pair(Net(), **kw)
    assert ours.block.parameter_name == "w2" and ours.block.base_layer.parameter_name == "w1"
    assert ours.block.r["default"] == 2 and ours.block.base_layer.r["default"] == 3
    x = torch.randn(4, 10)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
    ref.save_pretrained(tmp_path)
    assert sorted(load_file(str(tmp_path / "adapter_model.safetensors"))) == [
        "base_model.model.block.base_layer.lora_A.weight", "base_model.model.block.base_layer.lora_B.weight",
        "base_model.model.block.lora_A.weight", "base_model.model.block.lora_B.weight"]
    loaded = lk.load_adapter(Net(), tmp_path)
    torch.testing.assert_close(loaded(x), ref(x), atol=1e-5, rtol=1e-5)
    unloaded = lk.unload(loaded)
    assert type(unloaded.block) is TwoWeights and set(dict(unloaded.named_parameters())) == {
        "block.w1", "block.w2", "head.weight", "head.bias"}


def test_several_adapters():
    """Same parameters: added to the same wrappers; another module's parameter: fine; a different
    set on one module: refused (the nesting, so the keys, would change), the model untouched."""
    model = lk.inject(Net(), lk.LoraConfig(target_parameters=["block.w1"], init_lora_weights=False), "a")
    lk.inject(model, lk.LoraConfig(target_parameters=["block.w1"], init_lora_weights=False), "b")
    lk.inject(model, lk.LoraConfig(target_parameters=["head.weight"], init_lora_weights=False), "c")
    assert set(model.block.r) == {"a", "b"} and set(model.head.r) == {"c"}
    x = torch.randn(3, 10)
    lk.set_adapter(model, ["a", "b"])
    both = model(x)
    with torch.no_grad():
        w1 = model.block.base_weight() + model.block.delta_weight("a") + model.block.delta_weight("b")
        torch.testing.assert_close(both, model.head.base_layer((x @ w1.T) @ model.block.base_layer.w2.T))
    types = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match="same parameters"):
        lk.inject(model, lk.LoraConfig(target_parameters=["block.w1", "block.w2"]), "d")
    assert [type(m) for m in model.modules()] == types and lk.adapter_names(model) == ["a", "b", "c"]


def test_mixed_batch_rows_get_their_adapter():
    model = lk.inject(Net(), lk.LoraConfig(target_parameters=["block.w1"], init_lora_weights=False), "a")
    lk.inject(model, lk.LoraConfig(target_parameters=["block.w1"], init_lora_weights=False), "b")
    x = torch.randn(6, 10)
    expected = torch.empty(6, 2)
    rows = ["a", "b", "__base__", "b", "a", "a"]
    for name in ("a", "b"):
        lk.set_adapter(model, name)
        idx = [i for i, r in enumerate(rows) if r == name]
        expected[idx] = model(x)[idx]
    with lk.disable_adapters(model):
        expected[2] = model(x)[2]
    with torch.no_grad(), lk.mixed_batch(model, rows):
        torch.testing.assert_close(model(x), expected)


@pytest.mark.parametrize("kw, match", [
    (dict(target_parameters=["block.w1"], lora_dropout=0.1), "lora_dropout"),
    (dict(target_parameters=["block.w1"], use_dora=True), "use_dora"),
    (dict(target_parameters=["block.nothing"]), "match no parameter"),
    (dict(target_modules=["head"], target_parameters=["head.weight"]), "adapted as a module"),
    (dict(target_parameters=["head.bias"]), "2-D or 3-D"),
])
def test_refusals_name_the_problem_and_change_nothing(kw, match):
    model = Net()
    types = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=match):
        lk.inject(model, lk.LoraConfig(**kw))
    assert [type(m) for m in model.modules()] == types and lk.adapter_names(model) == []
