"""LoRA on fused expert tensors computed on the routed tokens ("split LoRA", ``ExpertsWrapper``):
the maths against the ΔW formulation (PEFT's: the module's own forward with W + s·B·A per expert,
the einsum written here), per expert, forward and backward, eager loop and grouped matmul, fp32
and bf16; and no (E, out, in)-sized tensor allocated in a forward or backward."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from torch import nn
from torch.profiler import ProfilerActivity, profile

import lorakit as lk
from lorakit.layers.experts import ExpertsWrapper
from lorakit.layers.experts_forward import grouped_mm

TOKENS, K = 24, 2


class Holder(nn.Module):
    """A bare experts module, as a MoE block holds it (``experts``)."""

    def __init__(self, experts: nn.Module) -> None:
        super().__init__()
        self.experts = experts

    def forward(self, hidden, index, weights):
        return self.experts(hidden, index, weights)


def experts(kind: str, impl: str, dtype=torch.float32, n: int = 8, hidden: int = 32, inter: int = 16) -> nn.Module:
    """A Qwen3-MoE ((E, out, in) weights), NemotronH (no gate) or gpt-oss (transposed, biases, its own
    gate) experts module."""
    if kind == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(hidden_size=hidden, moe_intermediate_size=inter, num_experts=n)
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts as cls
    elif kind == "nemotron_h":  # no gate: up_proj, relu², down_proj
        cfg = tf.NemotronHConfig(hidden_size=hidden, moe_intermediate_size=inter, n_routed_experts=n)
        from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHExperts as cls
    else:
        cfg = tf.GptOssConfig(hidden_size=hidden, intermediate_size=inter, num_local_experts=n)
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts as cls
    cfg._experts_implementation = impl
    torch.manual_seed(0)
    module = cls(cfg)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.2)
    return module.to(dtype)


def routing(n_experts: int, dtype, hidden: int = 32, seed: int = 1):
    """Inputs routed to experts 0 .. n-2 only (the last one gets no token)."""
    g = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(n_experts - 1, generator=g)[:K] for _ in range(TOKENS)])  # (T, K)
    weights = torch.rand(TOKENS, K, generator=g).to(dtype)
    x = torch.randn(TOKENS, hidden, generator=g).to(dtype)
    return x, index, weights


def adapt(module: nn.Module, params: list[str], r: int = 4) -> Holder:
    model = lk.inject(Holder(module), lk.LoraConfig(r=r, lora_alpha=2 * r, init_lora_weights=False,
                                                    target_parameters=[f"experts.{p}" for p in params]))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)  # B off zero, both factors O(1)
    return model


def wrappers(model: Holder) -> dict[str, ExpertsWrapper]:
    out, m = {}, model.experts
    while isinstance(m, ExpertsWrapper):
        out[m.parameter_name] = m
        m = m.base_layer
    return out


def delta(wrapper: ExpertsWrapper, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """PEFT's ΔW of a 3-D parameter: einsum over its (r·E, in) / (out, r·E) layout."""
    E = wrapper.num_experts
    A3, B3 = A.reshape(E, -1, A.shape[-1]), B.reshape(B.shape[0], -1, E)
    spec = "o r e, e r i -> e o i" if wrapper.out_in else "o r e, e r i -> e i o"
    return torch.einsum(spec, B3, A3) * wrapper.scaling["default"]


def reference(model: Holder, x, index, weights, dtype):
    """The real module's own forward with each adapted W replaced by W + ΔW, in ``dtype``; the
    factors as fresh leaves. Returns (output, {param: (A, B)})."""
    ws = wrappers(model)
    real = next(iter(ws.values())).real_module()
    leaves, new = {}, {}
    for name, w in ws.items():
        A = w.lora_A["default"].weight.detach().to(dtype).requires_grad_()
        B = w.lora_B["default"].weight.detach().to(dtype).requires_grad_()
        leaves[name] = (A, B)
        new[name] = getattr(real, name).detach().to(dtype) + delta(w, A, B)
    other = {n: p.detach().to(dtype) for n, p in real.named_parameters() if n not in new}
    out = torch.func.functional_call(real, {**new, **other}, (x.to(dtype), index, weights.to(dtype)))
    return out, leaves


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl", ["eager", "grouped_mm", "batched_mm"])  # batched_mm: computed in the grouped form
@pytest.mark.parametrize("kind, params", [
    ("qwen3_moe", ["gate_up_proj", "down_proj"]), ("qwen3_moe", ["down_proj"]),
    ("gpt_oss", ["gate_up_proj", "down_proj"]), ("nemotron_h", ["up_proj", "down_proj"])],
    ids=["qwen3-both", "qwen3-down", "gptoss-both", "nemotronh-both"])
def test_routed_lora_equals_the_delta_weight_formulation(kind, params, impl, dtype):
    """Output and the gradients of every factor, of the input and of the routing weights equal the
    ΔW formulation computed in fp32 (fp32: to rounding; bf16: to bf16 tolerance); an expert that
    got no token gets exactly zero gradient in its own rows of A and columns of B (PEFT's layout)."""
    model = adapt(experts(kind, impl, dtype), params)
    ws = wrappers(model)
    assert all(w.routed_reason is None for w in ws.values())
    x, index, weights = routing(8, dtype)
    x.requires_grad_(), weights.requires_grad_()
    out = model(x, index, weights)
    assert out.dtype == dtype and all(w.fallback_reason is None for w in ws.values())
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    (out.float() * grad).sum().backward()

    xr, wr = x.detach().float().requires_grad_(), weights.detach().float().requires_grad_()
    ref, leaves = reference(model, xr, index, wr, torch.float32)
    (ref * grad).sum().backward()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel(out, ref) < tol
    if dtype == torch.bfloat16:  # no less accurate than PEFT's bf16 numerics (W + ΔW formed in bf16)
        with torch.no_grad():
            assert rel(out, ref) <= 1.2 * rel(reference(model, x, index, weights, dtype)[0], ref)
    assert rel(x.grad, xr.grad) < tol and rel(weights.grad, wr.grad) < tol
    for name, w in ws.items():
        A, B = leaves[name]
        gA, gB = w.lora_A["default"].weight.grad, w.lora_B["default"].weight.grad
        assert gA.dtype == torch.float32  # fp32 masters on a bf16 base
        assert rel(gA, A.grad) < tol and rel(gB, B.grad) < tol, name
        r, E = w.r["default"], w.num_experts
        assert gA[(E - 1) * r:].abs().max() == 0 and gB[:, E - 1::E].abs().max() == 0  # the idle expert
        assert gA[:r].abs().max() > 0 and gB[:, ::E].abs().max() > 0


@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])
def test_each_expert_alone_is_x_times_its_own_adapted_weight(impl):
    """Every token on one expert e (top-1, weight 1): the output is the expert MLP with
    W_e + s·B_e·A_e, written out by hand from PEFT's layout (A rows e·r.., B columns k·E + e)."""
    module = experts("qwen3_moe", impl)
    model = adapt(module, ["gate_up_proj", "down_proj"])
    ws = wrappers(model)
    x = torch.randn(5, 32)
    for e in range(8):
        got = model(x, torch.full((5, 1), e), torch.ones(5, 1))
        W = {}
        for name, w in ws.items():
            r, E, s = w.r["default"], w.num_experts, w.scaling["default"]
            A_e = w.lora_A["default"].weight[e * r:(e + 1) * r]  # (r, in)
            B_e = w.lora_B["default"].weight[:, e::E]  # (out, r)
            W[name] = getattr(module, name)[e] + s * B_e @ A_e
        gate, up = (x @ W["gate_up_proj"].T).chunk(2, dim=-1)
        torch.testing.assert_close(got, (nn.functional.silu(gate) * up) @ W["down_proj"].T, atol=1e-5, rtol=1e-5)


def _largest_allocation(run) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    return max((e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), default=0)


@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])
def test_no_expert_stack_sized_tensor_in_forward_or_backward(impl):
    """The largest tensor allocated in a train step's forward and backward is far below one expert
    stack (E, out, in), whereas the ΔW formulation (the same wrapper made to fall back) allocates one."""
    module = experts("qwen3_moe", impl, n=16, hidden=64, inter=64)
    model = adapt(module, ["gate_up_proj", "down_proj"])
    stack = min(p.numel() * p.element_size() for p in (module.gate_up_proj, module.down_proj))  # (16, 64, 64) fp32
    x, index, weights = routing(16, torch.float32, hidden=64)
    x.requires_grad_()

    def step():
        model(x, index, weights).square().sum().backward()

    step()  # warm-up: lazy initialisations outside the measured step
    assert _largest_allocation(step) < stack // 4
    for w in wrappers(model).values():
        w.routed_reason = "forced by the test"
    assert _largest_allocation(step) >= stack


def test_grouped_mm_and_its_segment_loop_agree():
    """The grouped matmul (torch's kernel where usable) and the per-segment loop it falls back to
    (strides torch's kernel refuses: r=2) give the same values and gradients, empty groups included."""
    g = torch.Generator().manual_seed(0)
    offs = torch.tensor([3, 3, 9, 12], dtype=torch.int32)
    for r in (2, 16):
        x = torch.randn(12, 16, generator=g, requires_grad=True)
        w = torch.randn(4, 16, r, generator=g, requires_grad=True)
        out = grouped_mm(x, w, offs)
        ref = torch.cat([x[0:3] @ w[0], x[3:9] @ w[2], x[9:12] @ w[3]])
        torch.testing.assert_close(out, ref)
        gx, gw = torch.autograd.grad((out * ref.detach()).sum(), (x, w))
        rx, rw = torch.autograd.grad((ref * ref.detach()).sum(), (x, w))
        torch.testing.assert_close(gx, rx)
        torch.testing.assert_close(gw, rw)
        assert gw[1].abs().max() == 0


def test_peft_numerics_computes_the_term_from_an_fp32_input():
    """``peft_numerics``: the routed activations are cast to the fp32 factors (the Linear layers'
    PEFT numerics) instead of the factors to bf16: another rounding, the same function."""
    module = experts("qwen3_moe", "grouped_mm", torch.bfloat16)
    model = adapt(module, ["gate_up_proj", "down_proj"])
    x, index, weights = routing(8, torch.bfloat16)
    with torch.no_grad():
        ref, _ = reference(model, x.float(), index, weights.float(), torch.float32)
        bf16 = model(x, index, weights)
        for w in wrappers(model).values():
            w.peft_numerics = True
        cast = model(x, index, weights)
    assert cast.dtype == torch.bfloat16 and rel(cast, ref) < 2e-2 and not torch.equal(cast, bf16)
