"""Mixed-batch stacks are rebuilt whenever the factors they were built from change between blocks,
however they change: in place under ``no_grad``, through ``param.data`` (its own version counter),
by ``load_state_dict(..., assign=True)`` on a factor module (a new Parameter object), or — for a
grouped convolution, whose stack holds a dense B derived from ``lora_B`` — in ``lora_B`` itself.
The reference is each row run alone with its adapter."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit as lk

import models


def _llama_two_adapters() -> nn.Module:
    model = models.llama()
    for name in ("a", "b"):
        lk.inject(model, lk.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), adapter_name=name)
    models.randomize_adapters(model, std=0.3)
    return model


def _assert_rows_alone(model: nn.Module, x: torch.Tensor, run) -> None:
    rows = ["a", "b"]
    with torch.no_grad():
        with lk.mixed_batch(model, rows):
            out = run(x)
        ref = models.rows_alone(model, rows, lambda i: run(x[i:i + 1])[0], "a")
    for i in range(len(rows)):
        torch.testing.assert_close(out[i], ref[i], rtol=1e-5, atol=1e-5)


def _write_b(layer: nn.Module, how: str) -> None:
    factor = layer.lora_B["b"]
    with torch.no_grad():
        if how == "no_grad in place":
            factor.weight.mul_(3)
        elif how == "param.data in place":
            factor.weight.data.mul_(3)
        elif how == "param.data assigned":
            factor.weight.data = factor.weight.data * 3
        elif how == "load_state_dict assign":
            factor.load_state_dict({"weight": factor.weight.detach() * 3}, assign=True)


@pytest.mark.parametrize("how", ["no_grad in place", "param.data in place", "param.data assigned",
                                 "load_state_dict assign"])
def test_a_factor_changed_between_blocks_is_seen(how):
    model = _llama_two_adapters()
    x = models.ids(2, 5)
    run = lambda t: model(input_ids=t).logits  # noqa: E731
    _assert_rows_alone(model, x, run)  # builds and caches the stacks
    _write_b(model.model.layers[0].self_attn.q_proj, how)
    _assert_rows_alone(model, x, run)


def test_the_whole_model_loaded_with_assign_is_seen():
    model = _llama_two_adapters()
    x = models.ids(2, 5)
    run = lambda t: model(input_ids=t).logits  # noqa: E731
    _assert_rows_alone(model, x, run)
    new = {k: v * 3 for k, v in model.state_dict().items() if ".lora_B.b." in k}
    model.load_state_dict(new, strict=False, assign=True)
    _assert_rows_alone(model, x, run)


@pytest.mark.parametrize("how", ["no_grad in place", "param.data in place"])
def test_a_grouped_convolution_sees_its_lora_b_change(how):
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2, padding=1))
    for name in ("a", "b"):
        lk.inject(model, lk.LoraConfig(r=4, target_modules=["0"]), adapter_name=name)
    models.randomize_adapters(model, std=0.3)
    x = torch.randn(2, 4, 5, 5)
    _assert_rows_alone(model, x, model)
    _write_b(model[0], how)
    _assert_rows_alone(model, x, model)


def test_an_unchanged_stack_is_reused_across_blocks():
    model = _llama_two_adapters()
    x = models.ids(2, 5)
    layer = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        with lk.mixed_batch(model, ["a", "b"]):
            model(input_ids=x)
        first = layer.__dict__["_mixed_stack"][1]
        with lk.mixed_batch(model, ["b", "a"]):
            model(input_ids=x)
    assert layer.__dict__["_mixed_stack"][1] is first
