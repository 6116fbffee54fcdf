"""Every public operation that changes a model plans and checks first, then applies inside a
transaction: when it fails partway (an error injected into its last step), the model is as it was —
its modules, its flags, lorakit's registry, and every tensor (bit for bit where nothing was written;
to the weight dtype's rounding where merged weights were taken out again, as ``unmerge`` promises)."""

from __future__ import annotations

import sys

import pytest
import torch

import lorakit as lk
from lorakit.adapters import wrappers
from lorakit.layers import LoraLayer

import models


class Boom(RuntimeError):
    pass


def _model():
    model = models.llama()
    lk.inject(model, lk.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "embed_tokens"]), adapter_name="a")
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["q_proj", "o_proj"], use_dora=True), adapter_name="b")
    models.randomize_adapters(model, std=0.2)
    return model


def _state(model):
    layers = [(p, type(w).__name__, list(w.active_adapters), getattr(w, "merged_adapters", None))
              for p, w in wrappers(model)]
    return lk.adapter_names(model), lk.active_adapters(model), layers


def _fail_on_last(monkeypatch, model, method: str) -> None:
    """Make ``method`` of the last LoRA layer raise (after the others did their part)."""
    last = [w for _, w in wrappers(model) if isinstance(w, LoraLayer)][-1]

    def boom(*args, **kwargs):
        raise Boom(f"{method} failed")

    monkeypatch.setattr(last, method, boom)


def _assert_as_before(model, snap, state, x, logits, exact: bool) -> None:
    tensors, flags, types = models.snapshot(model)
    assert types == snap[2] and flags == snap[1] and _state(model) == state
    for k, v in tensors.items():
        if exact:
            assert torch.equal(v, snap[0][k]), k
        else:
            torch.testing.assert_close(v, snap[0][k], rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", ["merge", "unmerge", "merge_and_unload", "unload", "delete_adapter",
                                "set_adapter"])
def test_a_failure_partway_leaves_the_model_as_it_was(monkeypatch, op):
    model = _model()
    lk.set_adapter(model, ["a", "b"])
    if op == "unmerge":
        lk.merge(model, ["a"])
    x = models.ids()
    with torch.no_grad():
        logits = model(input_ids=x).logits
    snap, state = models.snapshot(model), _state(model)
    if op in ("merge", "merge_and_unload"):
        _fail_on_last(monkeypatch, model, "merge")
        call = lambda: getattr(lk, op)(model)  # noqa: E731
    elif op == "unmerge":
        _fail_on_last(monkeypatch, model, "unmerge")
        call = lambda: lk.unmerge(model)  # noqa: E731
    elif op == "unload":
        monkeypatch.setattr(sys.modules["lorakit.inject"], "drop_state",
                            lambda m: (_ for _ in ()).throw(Boom("unload failed")))
        call = lambda: lk.unload(model)  # noqa: E731
    elif op == "delete_adapter":
        _fail_on_last(monkeypatch, model, "delete_adapter")
        call = lambda: lk.delete_adapter(model, "a")  # noqa: E731
    else:
        monkeypatch.setattr("lorakit.adapters.set_adapter_grads",
                            lambda *a, **k: (_ for _ in ()).throw(Boom("set_adapter failed")))
        call = lambda: lk.set_adapter(model, "b")  # noqa: E731
    with pytest.raises(Boom):
        call()
    monkeypatch.undo()
    _assert_as_before(model, snap, state, x, logits, exact=op not in ("merge", "merge_and_unload", "unmerge"))
    lk.unmerge(model)  # the model still works as an adapted model
    lk.set_adapter(model, "b")
    lk.delete_adapter(model, "a")
    assert lk.adapter_names(model) == ["b"]


def test_merge_and_unload_of_a_quantized_model_failing_at_the_end_restores_it(tmp_path, monkeypatch):
    import quantized_models as qm

    model = qm.load_bnb(qm.write_base(str(tmp_path / "base")), "nf4")
    lk.inject(model, lk.LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    models.randomize_adapters(model, std=0.05)
    x = qm.ids()
    with torch.no_grad():
        logits = model(input_ids=x).logits
    snap, state = models.snapshot(model), _state(model)
    config = model.config.to_dict()

    merge_mod = sys.modules["lorakit.merge"]
    real = merge_mod.finish_dequantized

    def finish_then_fail(*args, **kwargs):
        real(*args, **kwargs)
        raise Boom("the last step failed")

    monkeypatch.setattr(merge_mod, "finish_dequantized", finish_then_fail)
    with pytest.raises(Boom):
        lk.merge_and_unload(model)
    monkeypatch.undo()
    assert model.config.to_dict() == config  # the quantization config and dtype are back
    _assert_as_before(model, snap, state, x, logits, exact=True)
    merged = lk.merge_and_unload(model)
    assert not any(type(m).__name__ == "Linear4bit" for m in merged.modules())
