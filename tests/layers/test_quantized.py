"""QLoRA: LoRA on bitsandbytes 4-bit (NF4/FP4) and 8-bit layers and on torchao NF4 weights, on the CPU.

References: PEFT on the same quantized base (both ways), and the hand-written dequantized merge
``deq(W) + scaling·B·A`` (bitsandbytes.functional / torchao / ``CB·SCB/127``)."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("bitsandbytes")
pytest.importorskip("torchao")

import lorakit as lk  # noqa: E402
from lorakit.layers import QuantizedLinear, wrappers  # noqa: E402
from lorakit.layers.quant_formats import quant_format  # noqa: E402
from lorakit.models.quantized import prepare_for_kbit_training, weight_bytes  # noqa: E402

import quantized_models as qm  # noqa: E402

torch.set_num_threads(1)  # tiny matmuls: threads only add contention on a shared machine
ALL_LINEAR = 14  # 2 blocks × (q, k, v, o, gate, up, down)


def quantized(kind, base_dir, fp32_activations=True):
    """The quantized tiny Llama of ``kind``; the torchao one (bf16 non-quantized parameters) is
    prepared for k-bit training so that, like the bitsandbytes ones, its activations are fp32."""
    model = qm.load(kind, base_dir)
    return prepare_for_kbit_training(model) if kind == "torchao" and fp32_activations else model


def bf16_ulp(y: torch.Tensor) -> float:
    """One bf16 unit in the last place at the largest |y| (8 significant bits)."""
    return 2.0 ** (math.floor(math.log2(float(y.abs().max()))) - 7)


def hand_dequantize(layer: nn.Module) -> torch.Tensor:
    """W (out, in) fp32, from the format's own definition."""
    w = layer.weight
    if type(w).__name__ == "Params4bit":
        import bitsandbytes.functional as bf

        return bf.dequantize_4bit(w.data, w.quant_state).float()
    if type(w).__name__ == "Int8Params":
        scb = layer.state.SCB if layer.state.SCB is not None else w.SCB
        return w.data * scb[:, None] * (1 / 127)  # LLM.int8(): row-wise absmax scaling (× 1/127 as bitsandbytes)
    return w.get_original_weight().float()  # torchao NF4Tensor


# ------------------------------------------------------------------ inject
@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8", "torchao"])
def test_inject_wraps_quantized_layers_with_float_factors_and_starts_at_the_base(base_dir, kind):
    model = quantized(kind, base_dir)
    x = qm.ids()
    with torch.no_grad():
        before = model(x).logits
    lk.inject(model, lk.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    layers = [w for _, w in wrappers(model) if isinstance(w, QuantizedLinear)]
    assert len(layers) == ALL_LINEAR
    for layer in layers:
        assert quant_format(layer.base_layer) is not None  # the base stays quantized
        for p in layer.adapter_parameters("default"):
            assert p.dtype == torch.float32 and p.device == layer.base_layer.weight.device
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * ALL_LINEAR and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, before, rtol=0, atol=0)  # B = 0
    assert kind.replace("torchao", "NF4").replace("int8", "8-bit") in repr(layers[0])


# ------------------------------------------------------------------ training
@pytest.mark.parametrize("kind", qm.KINDS)
def test_training_lowers_the_loss_and_leaves_the_quantized_bytes_untouched(base_dir, kind):
    model = prepare_for_kbit_training(qm.load(kind, base_dir))
    lk.inject(model, lk.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    snapshot = qm.quantized_bytes(model)
    params = [p for p in model.parameters() if p.requires_grad]
    owned = {id(p) for _, w in wrappers(model) for p in w.adapter_parameters("default")}
    assert {id(p) for p in params} == owned  # only the factors train
    opt = torch.optim.AdamW(params, lr=1e-2)
    x = qm.ids(batch=4, seq=16)
    model.train()
    losses = []
    for _ in range(30):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0], losses  # measured: 4.60 -> 3.4 (bnb), 2.3 (torchao)
    model.eval()
    with torch.no_grad():
        model(x)  # an inference forward too (bitsandbytes would repack unheld 4-bit weights here)
    after = qm.quantized_bytes(model)
    assert snapshot.keys() == after.keys() and len(snapshot) >= ALL_LINEAR
    assert all(torch.equal(snapshot[k], after[k]) for k in snapshot)
    assert all(quant_format(w.base_layer) is not None for _, w in wrappers(model))


# ------------------------------------------------------------------ PEFT parity
RICH = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
            rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3.0}, use_rslora=True, init_lora_weights=False)


@pytest.mark.parametrize("kind", qm.KINDS)
def test_peft_parity_both_ways_with_fp32_activations(base_dir, kind, tmp_path):
    """Same quantized base, same factors: PEFT and lorakit add the same fp32 LoRA term to the same
    base output, so the logits agree to fp32 rounding (measured: exactly)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    x = qm.ids()
    torch.manual_seed(1)
    theirs = get_peft_model(quantized(kind, base_dir), LoraConfig(**RICH))
    theirs.save_pretrained(tmp_path / "peft")
    ours = lk.load_adapter(quantized(kind, base_dir), tmp_path / "peft")
    with torch.no_grad():
        y_theirs, y_ours = theirs(x).logits, ours(x).logits
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-6, atol=1e-6)
    layer = ours.model.layers[0].self_attn.v_proj
    assert layer.r["default"] == 2 and layer.scaling["default"] == pytest.approx(8 / math.sqrt(2))  # rsLoRA
    assert ours.model.layers[0].mlp.down_proj.scaling["default"] == pytest.approx(3 / 2)

    torch.manual_seed(2)  # the other way: a lorakit adapter (trained one step) loaded by PEFT
    mine = quantized(kind, base_dir)
    lk.inject(mine, lk.LoraConfig(**RICH))
    mine(input_ids=x, labels=x).loss.backward()
    torch.optim.SGD([p for p in mine.parameters() if p.requires_grad], lr=0.1).step()
    lk.save_adapter(mine, tmp_path / "ours")
    loaded = PeftModel.from_pretrained(quantized(kind, base_dir), tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, mine(x).logits, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_peft_parity_with_bf16_activations(base_dir, kind, tmp_path):
    """The usual QLoRA load (non-quantized parameters in bf16): lorakit computes the LoRA term in
    bf16 (factors cast), PEFT in fp32 rounded to bf16. Tolerance: 4 bf16 units in the last place
    of the largest logit — each block rounds its output to bf16 (half an ulp), over 2 blocks plus
    the head. The adapter itself moves the logits by ~100 ulps, so the check has teeth."""
    from peft import LoraConfig, get_peft_model

    x = qm.ids()
    torch.manual_seed(1)
    theirs = get_peft_model(qm.load_bnb(base_dir, kind, torch.bfloat16), LoraConfig(**RICH))
    theirs.save_pretrained(tmp_path)
    ours = lk.load_adapter(qm.load_bnb(base_dir, kind, torch.bfloat16), tmp_path)
    with torch.no_grad():
        y_theirs, y_ours = theirs(x).logits.float(), ours(x).logits.float()
        with lk.disable_adapters(ours):
            y_base = ours(x).logits.float()
    assert y_ours.dtype == torch.float32 and ours(x).logits.dtype == torch.bfloat16
    ulp = bf16_ulp(y_theirs)
    assert (y_ours - y_theirs).abs().max() <= 4 * ulp
    assert (y_theirs - y_base).abs().max() > 25 * ulp


# ------------------------------------------------------------------ merging
@pytest.mark.parametrize("kind", qm.KINDS)
def test_merge_and_unload_is_the_dequantized_weight_plus_delta(base_dir, kind):
    model = quantized(kind, base_dir)
    torch.manual_seed(0)
    lk.inject(model, lk.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    x = qm.ids()
    with torch.no_grad():
        y = model(x).logits.float()
    expected = {}
    for path, layer in wrappers(model):
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        expected[path] = (hand_dequantize(layer.base_layer) + (B @ A) * layer.scaling["default"]).detach()
    merged32 = lk.merge_and_unload(copy.deepcopy(model), dtype=torch.float32)
    merged = lk.merge_and_unload(model)  # default: the compute dtype, bf16
    for m, dtype in ((merged, torch.bfloat16), (merged32, torch.float32)):
        assert not any(quant_format(mod) is not None or isinstance(mod, QuantizedLinear) for mod in m.modules())
        assert {p.dtype for p in m.parameters()} == {dtype} and m.config.dtype == dtype
        assert not hasattr(m.config, "quantization_config") and not getattr(m, "is_quantized", False)
        for path, ref in expected.items():
            layer = m.get_submodule(path)
            assert type(layer) is nn.Linear and not layer.weight.requires_grad
            assert torch.equal(layer.weight, ref.to(dtype)), path
    # within the quantization tolerance of the unmerged model: the merged fp32 model differs from
    # it only as much as deq(W)·x in fp32 differs from the quantized kernel on the same base
    base = quantized(kind, base_dir)
    with torch.no_grad():
        y_kernel = base(x).logits.float()
        lk.inject(base, lk.LoraConfig(r=4, target_modules="all-linear"))  # B = 0
        kernel_error = (lk.merge_and_unload(base, dtype=torch.float32)(x).logits - y_kernel).abs().max()
        err32 = (merged32(x).logits - y).abs().max()
        err16 = (merged(x).logits.float() - y).abs().max()
    assert err32 <= 2 * kernel_error + 1e-6, (err32, kernel_error)
    assert err16 <= err32 + 4 * bf16_ulp(y), (err16, err32)


def test_save_merged_writes_a_plain_bf16_model(base_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = qm.load_bnb(base_dir, "nf4")
    torch.manual_seed(0)
    lk.inject(model, lk.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
    lk.save_merged(model, tmp_path)
    assert isinstance(model.model.layers[0].self_attn.q_proj, QuantizedLinear)  # the caller's model is unchanged
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.dtype == torch.bfloat16 and not hasattr(reloaded.config, "quantization_config")
    expected = lk.merge_and_unload(model)
    x = qm.ids()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, expected(x).logits, rtol=0, atol=0)


@pytest.mark.parametrize("kind", qm.KINDS)
def test_inplace_merge_requantizes_reports_the_rounding_error_and_refuses_unmerge(base_dir, kind):
    model = quantized(kind, base_dir)
    torch.manual_seed(0)
    lk.inject(model, lk.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    layer = model.model.layers[0].self_attn.q_proj
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    target = (hand_dequantize(layer.base_layer) + (B @ A) * layer.scaling["default"]).detach()
    with pytest.warns(UserWarning, match=rf"merged into {ALL_LINEAR} quantized weight.*re-quantizing.*median \d+%"):
        lk.merge(model)
    error = hand_dequantize(layer.base_layer) - target  # measured independently
    report = layer.rounding_errors["default"]
    assert report["max_abs_error"] == pytest.approx(float(error.abs().max()), rel=1e-5)
    delta = (B @ A) * layer.scaling["default"]
    assert report["error_over_delta"] == pytest.approx(float(error.norm() / delta.norm()), rel=1e-4)
    assert quant_format(layer.base_layer) is not None and layer.merged_adapters == ["default"]
    stored = qm.quantized_bytes(model)
    with pytest.raises(ValueError, match=r"cannot unmerge \['default'\] from 'model.layers.0.self_attn.q_proj'.*"
                                         r"re-quantized.*measured rounding error default: \d+% of ‖ΔW‖"):
        lk.unmerge(model)
    with pytest.raises(ValueError, match="cannot unmerge"):
        with lk.disable_adapters(model):
            pass
    after = qm.quantized_bytes(model)
    assert all(torch.equal(stored[k], after[k]) for k in stored)  # refused before anything changed
    assert all(w.merged_adapters == ["default"] and not w.disabled for _, w in wrappers(model))


def test_a_single_layer_merge_warns_on_its_own():
    import bitsandbytes as bnb

    torch.manual_seed(0)
    lin = nn.Linear(64, 64, bias=False)
    q = bnb.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False)
    q.load_state_dict(lin.state_dict())
    q = q.to("cpu")
    layer = lk.layers.wrap(q)
    layer.add_adapter("a", 2, 4, lk.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False))
    layer.set_active(["a"])
    with pytest.warns(UserWarning, match=r"merged adapter 'a' into a bitsandbytes 8-bit .* rounding error"):
        layer.merge()


# ------------------------------------------------------------------ features on a quantized base
def test_dropout_adapters_mixed_batch_and_hotswap_on_a_4bit_base(base_dir, tmp_path):
    model = qm.load_bnb(base_dir, "nf4")
    x = qm.ids(batch=3)
    torch.manual_seed(0)
    lk.inject(model, lk.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules="all-linear",
                                   init_lora_weights=False), adapter_name="a")
    lk.inject(model, lk.LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "up_proj"], init_lora_weights=False),
              adapter_name="b")
    with torch.no_grad():
        y_a = model(x).logits
        lk.set_adapter(model, "b")
        y_b = model(x).logits
        with lk.disable_adapters(model):
            y_base = model(x).logits
        with lk.mixed_batch(model, ["a", "b", "__base__"]):
            y_mixed = model(x).logits
    torch.testing.assert_close(y_mixed, torch.stack([y_a[0], y_b[1], y_base[2]]), rtol=1e-5, atol=1e-5)
    assert (y_a - y_b).abs().max() > 0.05 and (y_a - y_base).abs().max() > 0.05

    lk.set_adapter(model, "a")  # dropout: random in training, off in eval
    model.train()
    y1, y2 = model(x).logits, model(x).logits
    assert not torch.allclose(y1, y2)
    y1.sum().backward()
    assert model.model.layers[0].self_attn.q_proj.lora_A["a"].weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, y_a, rtol=0, atol=0)

    lk.save_adapter(model, tmp_path, adapter_name="a")  # hot swap: a's weights into b's slot... of a copy
    other = qm.load_bnb(base_dir, "nf4")
    torch.manual_seed(5)
    lk.inject(other, lk.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules="all-linear",
                                   init_lora_weights=False))
    lk.hotswap_adapter(other, tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(other(x).logits, y_a, rtol=1e-6, atol=1e-6)


def test_dora_on_a_4bit_base_matches_peft(base_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    x = qm.ids()
    torch.manual_seed(1)
    theirs = get_peft_model(qm.load_bnb(base_dir, "nf4"),
                            LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], use_dora=True,
                                       init_lora_weights=False))
    theirs.save_pretrained(tmp_path)
    ours = lk.load_adapter(qm.load_bnb(base_dir, "nf4"), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, theirs(x).logits, rtol=1e-5, atol=1e-5)


def test_inits_that_write_into_the_weight_are_refused_and_leave_the_model_as_it_was(base_dir):
    model = qm.load_bnb(base_dir, "nf4")
    before = qm.quantized_bytes(model)
    for init in ("pissa", "olora"):
        with pytest.raises(ValueError, match=f"init_lora_weights='{init}' writes the residual.*bitsandbytes 4-bit nf4"):
            lk.inject(model, lk.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=init))
    assert not list(wrappers(model))
    after = qm.quantized_bytes(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_weight_bytes_counts_the_quantized_storage(base_dir):
    from transformers import AutoModelForCausalLM

    full = AutoModelForCausalLM.from_pretrained(base_dir)
    shapes = [m.weight.shape for n, m in full.named_modules() if type(m) is nn.Linear and "lm_head" not in n]
    sizes = [o * i for o, i in shapes]
    # NF4 + double quant: n/2 code bytes, one uint8 absmax per 64 weights, one fp32 per 256 absmaxes,
    # an fp32 offset, the 16-entry NF4 table and the 256-entry absmax code table (fp32)
    nf4 = sum(n // 2 + n // 64 + 4 * math.ceil(n / 64 / 256) + 4 + 4 * 16 + 4 * 256 for n in sizes)
    int8 = sum(n + 4 * o for n, (o, _) in zip(sizes, shapes))  # int8 rows + one fp32 scale per row
    four, eight = weight_bytes(qm.load_bnb(base_dir, "nf4")), weight_bytes(qm.load_bnb(base_dir, "int8"))
    assert four["quantized"] == nf4 and eight["quantized"] == int8
    assert four["other"] == eight["other"] == weight_bytes(full)["total"] - 4 * sum(sizes)


# ------------------------------------------------------------------ unsupported quantized layers
def _fake(module_path: str, name: str, base: type = nn.Module) -> nn.Module:
    cls = type(name, (base,), {"__module__": module_path})
    if base is nn.Module:
        return cls()
    return cls(8, 8)


@pytest.mark.parametrize("module, scheme", [
    (lambda: _fake("auto_gptq.nn_modules.qlinear.qlinear_cuda_old", "QuantLinear"), "GPTQ"),
    (lambda: _fake("gptqmodel.nn_modules.qlinear.marlin", "MarlinQuantLinear"), "GPTQ"),
    (lambda: _fake("awq.modules.linear.gemm", "WQLinear_GEMM"), "AWQ"),
    (lambda: _fake("hqq.core.quantize", "HQQLinear"), "HQQ"),
    (lambda: _fake("optimum.quanto.nn.qlinear", "QLinear", nn.Linear), "optimum-quanto"),
    (lambda: _fake("transformers.integrations.eetq", "EetqLinear"), "EETQ"),
])
def test_unsupported_quantized_layers_are_refused_by_name_type_and_scheme(module, scheme):
    model = nn.Sequential()
    model.add_module("proj", module())
    model.add_module("out", nn.Linear(8, 8))
    for targets in (["proj"], "all-linear"):
        with pytest.raises(TypeError, match=rf"module 'proj' is a {type(model.proj).__name__} quantized with "
                                            rf"{scheme}.*Supported quantized layers: bitsandbytes Linear4bit"):
            lk.inject(model, lk.LoraConfig(r=2, target_modules=targets))
    assert not list(wrappers(model))
    with pytest.raises(TypeError, match=scheme):
        lk.layers.wrap(model.proj)


def test_linear_with_an_unknown_integer_or_torchao_weight_is_refused():
    lin = nn.Linear(8, 8)
    lin.weight = nn.Parameter(torch.zeros(8, 8, dtype=torch.int8), requires_grad=False)
    model = nn.Sequential(lin)
    with pytest.raises(TypeError, match=r"module '0' is a Linear quantized with a torch.int8 weight"):
        lk.inject(model, lk.LoraConfig(r=2, target_modules=["0"]))

    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    ao = nn.Sequential(nn.Linear(64, 64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(ao, Int8WeightOnlyConfig())
    with pytest.raises(TypeError, match=rf"quantized with torchao {type(ao[0].weight).__name__} weight"):
        lk.inject(ao, lk.LoraConfig(r=2, target_modules="all-linear"))


@pytest.mark.parametrize("kind", qm.KINDS)
def test_save_full_round_trips_bitsandbytes_bases_refuses_nf4_tensors_and_unload_gives_the_base_back(
        base_dir, kind, tmp_path):
    model = quantized(kind, base_dir)
    torch.manual_seed(0)
    lk.inject(model, lk.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    x = qm.ids()
    with torch.no_grad():
        y = model(x).logits
    if kind == "torchao":
        with pytest.raises(ValueError, match="save_full cannot write tensor subclasses.*NF4Tensor"):
            lk.save_full(model, tmp_path)
    else:
        lk.save_full(model, tmp_path)
        again = lk.load_full(quantized(kind, base_dir), tmp_path)
        with torch.no_grad():
            torch.testing.assert_close(again(x).logits, y, rtol=0, atol=0)
    bases = {p: type(w.base_layer) for p, w in wrappers(model)}
    lk.unload(model)
    assert {p: type(model.get_submodule(p)) for p in bases} == bases
    assert all(quant_format(model.get_submodule(p)) is not None for p in bases)
