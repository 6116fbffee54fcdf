"""A bitsandbytes 4-bit weight that bitsandbytes repacked for its CPU kernel (at an eval-mode forward
without grad, on AVX512-BF16 CPUs) is read back by lorakit as the weight it was, verified.

Reference: the weight bitsandbytes dequantizes before any forward (``dequantize_4bit`` of the codes
as quantized) plus ΔW = s·B·A. Tolerance: the repacking rounds each block's absmax to bf16, so
every element of W may move by 2⁻⁹ of itself; 2⁻⁸ allows one more rounding of the absmax (a
double-quantized one is re-quantized on the way back)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")

import bitsandbytes.functional as bf  # noqa: E402

import lorakit as lk  # noqa: E402
from lorakit.layers import QuantizedLinear, wrappers  # noqa: E402

import quantized_models as qm  # noqa: E402

torch.set_num_threads(1)
REL = 2.0 ** -8


def repacked_layer(in_features: int, out_features: int, nested: bool, seed: int = 0, std: float | None = None):
    """``(layer, W0)``: a Linear4bit NF4 layer after one eval forward without grad — repacked by
    bitsandbytes for its CPU kernel — and the fp32 weight it dequantized to before that forward.
    On a CPU without AVX512-BF16 bitsandbytes does not repack, so its packing function is applied
    directly (the same bytes its forward would write). ``std``: normal weights instead of
    nn.Linear's uniform ones."""
    torch.manual_seed(seed)
    lin = nn.Linear(in_features, out_features)
    if std is not None:
        nn.init.normal_(lin.weight, std=std)
    q = bnb.nn.Linear4bit(in_features, out_features, compute_dtype=torch.float32, compress_statistics=nested,
                          quant_type="nf4")
    q.load_state_dict(lin.state_dict())
    q = q.to("cpu").eval()
    w0 = bf.dequantize_4bit(q.weight.data, q.weight.quant_state).float()  # (out, in)
    if q.support_avx512bf16_for_cpu:
        with torch.no_grad():
            q(torch.randn(2, in_features))
    else:
        q.weight.data, q.weight.quant_state = bf._convert_weight_packed_for_cpu(q.weight.data, q.weight.quant_state)
    assert q.weight.quant_state.packing_format_for_cpu
    return q, w0


def assert_within_absmax_rounding(w: torch.Tensor, ref: torch.Tensor) -> None:
    bad = (w - ref).abs() > REL * ref.abs() + 1e-7
    assert not bad.any(), f"{int(bad.sum())} of {bad.numel()} elements off, max {(w - ref).abs().max():.3g}"


# (in, out): in > out (a down_proj); in > out again; in < out but two blocks per row (bitsandbytes'
# inverse is wrong here too: the condition is in_features > 64, not in > out); one block per row
SHAPES = [(256, 64), (128, 96), (128, 256), (64, 128)]


@pytest.mark.parametrize("nested", [False, True], ids=["plain-absmax", "double-quant"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{i}to{o}" for i, o in SHAPES])
def test_a_repacked_weight_is_read_back_as_it_was(shape, nested):
    layer, w0 = repacked_layer(*shape, nested)
    wrapped = lk.layers.wrap(layer)
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)  # the standard layout
    assert_within_absmax_rounding(wrapped.dequantized(), w0)
    x = torch.randn(3, shape[0])
    with torch.no_grad():  # the wrapped layer computes with that weight (repacking stays off)
        torch.testing.assert_close(wrapped(x), x @ wrapped.dequantized().T + layer.bias, rtol=1e-4, atol=1e-4)
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)


@pytest.mark.parametrize("nested", [False, True], ids=["plain-absmax", "double-quant"])
def test_merges_after_a_repacking_are_the_original_weight_plus_delta(nested):
    layer, w0 = repacked_layer(256, 64, nested)  # in_features > out_features, like a down_proj
    model = nn.Sequential(layer)
    torch.manual_seed(1)
    lk.inject(model, lk.LoraConfig(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights=False))
    wrapped = model[0]
    delta = wrapped.delta_weight("default").detach()  # (out, in) = s·B·A
    target = w0 + delta

    merged = lk.merge_and_unload(copy.deepcopy(model), dtype=torch.float32)
    assert type(merged[0]) is nn.Linear
    assert_within_absmax_rounding(merged[0].weight - delta, w0)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the re-quantization warning
        lk.merge(model)
    q, qs = bf.quantize_4bit(target, blocksize=64, compress_statistics=nested, quant_type="nf4")
    expected = bf.dequantize_4bit(q, qs).float()  # Q(W0 + ΔW): what re-quantizing the reference gives
    got = wrapped.dequantized()
    # a code may flip where W0 + ΔW sits on a boundary (W is read back to 2⁻⁹ of itself): allow 2%
    assert (got - expected).norm() / expected.norm() < 0.02


def test_a_double_quantized_absmax_bitsandbytes_cannot_reproduce_is_read_exactly():
    """Normal weights: re-quantizing the absmax on the way back does not land on the bf16 values the
    kernel used, so the exact inverse (an fp32 absmax, no longer double-quantized) is taken."""
    layer, w0 = repacked_layer(256, 64, nested=True, std=0.02)
    wrapped = lk.layers.wrap(layer)
    assert not layer.weight.quant_state.nested and layer.weight.quant_state.absmax.dtype == torch.float32
    assert_within_absmax_rounding(wrapped.dequantized(), w0)


def test_a_wrong_bitsandbytes_inverse_is_caught_and_the_exact_one_used(monkeypatch):
    layer, w0 = repacked_layer(256, 64, nested=True)
    real = bf._convert_weight_packed_for_cpu_inverse

    def swapped_rows(data, qs):  # a plausible bug: every code byte in place, rows of blocks exchanged
        d, s = real(data, qs)
        return d.view(64, -1).roll(1, 0).reshape(d.shape), s

    monkeypatch.setattr(bf, "_convert_weight_packed_for_cpu_inverse", swapped_rows)
    wrapped = lk.layers.wrap(layer)
    assert_within_absmax_rounding(wrapped.dequantized(), w0)


def test_a_repacked_weight_no_inverse_reproduces_is_refused_and_left_as_it_was(monkeypatch):
    import lorakit.layers.bnb_cpu_packing as packing

    layer, _ = repacked_layer(256, 64, nested=False)
    before = (layer.weight.data.clone(), layer.weight.quant_state.absmax.clone())
    exact = packing.exact_inverse

    def scrambled(data, qs):
        d, s = exact(data, qs)
        s.absmax = s.absmax.flip(0)
        return d, s

    monkeypatch.setattr(packing, "exact_inverse", scrambled)
    model = nn.Sequential(layer)
    with pytest.raises(ValueError, match=r"repacked it for its CPU kernel.*re-packing.*absmax.*"
                                         r"support_avx512bf16_for_cpu = False"):
        lk.inject(model, lk.LoraConfig(r=4, target_modules=["0"]))
    assert model[0] is layer and not list(wrappers(model))
    assert torch.equal(layer.weight.data, before[0]) and torch.equal(layer.weight.quant_state.absmax, before[1])
    assert layer.weight.quant_state.packing_format_for_cpu


def test_a_layer_bitsandbytes_failed_to_repack_is_wrapped_as_it_was():
    """in_features not a multiple of 64: bitsandbytes' repacking raises midway (after un-nesting
    the absmax); the layer still holds its weight, and wrapped it runs eval forwards unpacked."""
    torch.manual_seed(0)
    q = bnb.nn.Linear4bit(96, 64, compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
    q.load_state_dict(nn.Linear(96, 64).state_dict())
    q = q.to("cpu").eval()
    if not q.support_avx512bf16_for_cpu:
        pytest.skip("bitsandbytes does not repack on this CPU (no AVX512-BF16)")
    w0 = bf.dequantize_4bit(q.weight.data, q.weight.quant_state).float()
    x = torch.randn(2, 96)
    with pytest.raises(RuntimeError), torch.no_grad():
        q(x)
    wrapped = lk.layers.wrap(q)
    torch.testing.assert_close(wrapped.dequantized(), w0, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), x @ w0.T + q.bias, rtol=1e-4, atol=1e-4)


def test_qlora_on_a_model_evaluated_before_lorakit_saw_it(base_dir):
    """The user's order: load NF4 (no double quant), evaluate, then LoRA and merge_and_unload. Layer
    0's down_proj (128 in, 64 out) is adapted, layer 1's is not (dequantized as it is)."""
    model = qm.load_bnb(base_dir, "nf4", held=False, double_quant=False)
    originals = {n: bf.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
                 for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    x = qm.ids()
    with torch.no_grad():
        model(x)  # bitsandbytes repacks every 4-bit weight (on AVX512-BF16 CPUs)
    if not model.model.layers[0].mlp.down_proj.weight.quant_state.packing_format_for_cpu:
        pytest.skip("bitsandbytes does not repack on this CPU (no AVX512-BF16)")
    torch.manual_seed(0)
    lk.inject(model, lk.LoraConfig(r=4, lora_alpha=8, target_modules=["layers.0.mlp.down_proj", "q_proj"],
                                   init_lora_weights=False))
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, QuantizedLinear)
    assert_within_absmax_rounding(layer.dequantized(), originals["model.layers.0.mlp.down_proj"])
    delta = layer.delta_weight("default").detach()
    merged = lk.merge_and_unload(model, dtype=torch.float32)
    assert_within_absmax_rounding(merged.model.layers[0].mlp.down_proj.weight - delta,
                                  originals["model.layers.0.mlp.down_proj"])
    assert_within_absmax_rounding(merged.model.layers[1].mlp.down_proj.weight,
                                  originals["model.layers.1.mlp.down_proj"])


def test_saving_an_adapter_leaves_repacked_layers_no_adapter_wraps_intact(base_dir, tmp_path):
    """``save_adapter`` takes ``model.state_dict()``, at which bitsandbytes undoes its CPU repacking of
    every 4-bit layer with its own inverse — wrong for a plain absmax. inject holds the layers it does
    not wrap too, so their weights stay what the model computed with."""
    model = qm.load_bnb(base_dir, "nf4", held=False, double_quant=False)
    originals = {n: bf.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
                 for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    with torch.no_grad():
        model(qm.ids())
    if not model.model.layers[1].mlp.down_proj.weight.quant_state.packing_format_for_cpu:
        pytest.skip("bitsandbytes does not repack on this CPU (no AVX512-BF16)")
    lk.inject(model, lk.LoraConfig(r=4, target_modules=["q_proj"]))
    lk.save_adapter(model, tmp_path / "adapter")
    down = model.model.layers[1].mlp.down_proj
    assert_within_absmax_rounding(bf.dequantize_4bit(down.weight.data, down.weight.quant_state).float(),
                                  originals["model.layers.1.mlp.down_proj"])
