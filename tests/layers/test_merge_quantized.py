"""Merging into quantized bases: the adapter's ``lora_bias`` is folded in by every merge, and
``merge_and_unload`` refuses before it replaces any layer.

Reference (hand-derived, as PEFT's plain ``Linear`` merges): weight ``deq(W) + s·B·A``, bias
``b + s·b_lora`` summed in fp32, with ``deq`` from the format's own definition."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("bitsandbytes")

import lorakit as lk  # noqa: E402
from lorakit.layers import QuantizedLinear, wrappers  # noqa: E402
from lorakit.layers.quant_formats import quant_format  # noqa: E402

import quantized_models as qm  # noqa: E402

torch.set_num_threads(1)
LORA_BIAS = dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False, lora_bias=True)


@pytest.fixture(scope="module")
def bias_dir(tmp_path_factory):
    return qm.write_base(str(tmp_path_factory.mktemp("qbase-bias")), bias=True)


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory):
    return qm.write_base(str(tmp_path_factory.mktemp("qbase-nobias")))


def hand_dequantize(layer: nn.Module) -> torch.Tensor:
    w = layer.weight
    if type(w).__name__ == "Params4bit":
        import bitsandbytes.functional as bf

        return bf.dequantize_4bit(w.data, w.quant_state).float()
    scb = layer.state.SCB if layer.state.SCB is not None else w.SCB
    return w.data * scb[:, None] * (1 / 127)  # LLM.int8(): CB·SCB/127


def adapted(directory: str, kind: str):
    """``(model, expected)``: a quantized tiny Llama with a lora_bias adapter on q_proj and
    down_proj, and per adapted layer the reference merged ``(weight, bias)`` in fp32."""
    model = qm.load_bnb(directory, kind)
    torch.manual_seed(0)
    lk.inject(model, lk.LoraConfig(**LORA_BIAS))
    expected = {}
    for path, layer in wrappers(model):
        A, B, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
        b_lora = layer.lora_B["default"].bias
        assert b_lora.abs().min() > 0  # every output gets a bias term
        expected[path] = ((hand_dequantize(layer.base_layer) + (B @ A) * s).detach(),
                          (layer.base_layer.bias.float() + b_lora * s).detach())
    return model, expected


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_merge_and_unload_folds_the_scaled_lora_bias_into_the_bias(bias_dir, kind):
    model, expected = adapted(bias_dir, kind)
    merged = lk.merge_and_unload(model, dtype=torch.float32)
    for path, (weight, bias) in expected.items():
        layer = merged.get_submodule(path)
        assert type(layer) is nn.Linear
        assert torch.equal(layer.weight, weight), path
        torch.testing.assert_close(layer.bias, bias, rtol=1e-6, atol=1e-7)


def test_save_merged_writes_the_scaled_lora_bias(bias_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model, expected = adapted(bias_dir, "nf4")
    lk.save_merged(model, tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.dtype == torch.bfloat16  # the compute dtype
    for path, (weight, bias) in expected.items():
        layer = reloaded.get_submodule(path)
        assert torch.equal(layer.weight, weight.to(torch.bfloat16)), path
        torch.testing.assert_close(layer.bias, bias.to(torch.bfloat16), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_inplace_merge_folds_the_scaled_lora_bias_into_the_bias(bias_dir, kind):
    model, expected = adapted(bias_dir, kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the re-quantization report
        lk.merge(model)
    for path, (_, bias) in expected.items():
        layer = model.get_submodule(path)
        assert layer.merged_adapters == ["default"] and quant_format(layer.base_layer) is not None
        torch.testing.assert_close(layer.base_layer.bias.float(), bias, rtol=1e-6, atol=1e-7)
        assert layer.rounding_errors["default"]["error_over_delta"] > 0  # measured, as before


@pytest.mark.parametrize("targets", [["q_proj"], ["q_proj", "lm_head"]], ids=["quantized", "quantized+plain"])
def test_lora_bias_on_layers_without_bias_is_refused_before_any_layer_is_replaced(plain_dir, targets, tmp_path):
    model = qm.load_bnb(plain_dir, "nf4")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "merging it will be refused"
        lk.inject(model, lk.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                                       lora_bias=True))
    x = qm.ids()
    with torch.no_grad():
        y = model(x).logits
    stored = qm.quantized_bytes(model)
    modules = dict(model.named_modules())
    for op in (lambda: lk.merge_and_unload(model), lambda: lk.save_merged(model, tmp_path / "merged"),
               lambda: lk.merge(model)):
        with pytest.raises(ValueError, match=r"has a lora_bias but (Linear4bit|Linear) has no bias.*No weight"):
            op()
    assert dict(model.named_modules()) == modules  # no layer replaced
    assert all(isinstance(model.get_submodule(p), QuantizedLinear) for p, w in wrappers(model)
               if quant_format(w.base_layer) is not None)
    after = qm.quantized_bytes(model)
    assert stored.keys() == after.keys() and all(torch.equal(stored[k], after[k]) for k in stored)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, y, rtol=0, atol=0)
    assert not (tmp_path / "merged").exists() or not any((tmp_path / "merged").iterdir())


def test_plan_dequantize_checks_and_changes_nothing_apply_replaces(bias_dir):
    from lorakit.merge_quantized import apply_dequantize, plan_dequantize

    model, expected = adapted(bias_dir, "nf4")
    modules = dict(model.named_modules())
    plan = plan_dequantize(model, ["default"], safe_merge=True, dtype=None)
    assert dict(model.named_modules()) == modules and plan.dtype == torch.bfloat16
    assert apply_dequantize(model, plan) == torch.bfloat16
    for path, (weight, _) in expected.items():
        layer = model.get_submodule(path)
        assert type(layer) is nn.Linear and torch.equal(layer.weight, weight.to(torch.bfloat16))
    assert not any(quant_format(m) is not None for m in model.modules())  # untouched 4-bit layers too
