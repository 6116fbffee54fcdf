"""The data-aware inits' identities (LoftQ's residual, step-0 outputs) and their refusals of bad
input: each a clear error that leaves the model exactly as it was."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.inits.corda import preprocess_corda
from lorakit.inits.eva import initialize_lora_eva_weights
from lorakit.inits.loftq import loftq_init, quantize_dequantize
from lorakit.inits.lora_ga import preprocess_loraga

import models


def batches(n: int = 4, bs: int = 4, seq: int = 12) -> list[dict]:
    return [{"input_ids": models.ids(bs, seq, seed=i), "attention_mask": torch.ones(bs, seq, dtype=torch.long)}
            for i in range(n)]


# ---------------------------------------------------------------- LoftQ's identities
@pytest.mark.parametrize("bits", [4, 8])
def test_loftq_residual_decreases_over_iterations_and_beats_plain_qlora(bits):
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    W = torch.randn(64, 128) @ torch.diag(torch.linspace(2, 0.1, 128))  # a spread spectrum, like trained weights
    history: list[float] = []
    q, A, B = loftq_init(W, bits, reduced_rank=8, num_iter=5, history=history)
    qlora = float(torch.linalg.norm(W - quantize_dequantize(W, bits)))  # QLoRA: Q(W), B·A = 0
    assert all(b <= a * (1 + 1e-6) for a, b in zip(history, history[1:])), history
    assert history[-1] < history[0] < qlora
    torch.testing.assert_close(float(torch.linalg.norm(W - q - B @ A)), history[-1], rtol=1e-5, atol=0)


@pytest.mark.parametrize("alpha", [4, 16])
def test_loftq_start_is_the_same_for_any_scaling(alpha):
    """Q + s·B·A is LoftQ's approximation whatever s = alpha/r is (PEFT's factors assume s = 1)."""
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    layer = nn.Linear(128, 64)
    W = layer.weight.detach().clone()
    model = nn.Sequential(layer)
    lk.inject(model, lk.LoraConfig(r=4, lora_alpha=alpha, target_modules=["0"], init_lora_weights="loftq",
                                   loftq_config={"loftq_bits": 4, "loftq_iter": 2}))
    wrapped = model[0]
    history: list[float] = []
    loftq_init(W, 4, 4, 2, history=history)
    start = wrapped.base_layer.weight + wrapped.delta_weight("default")
    torch.testing.assert_close(float(torch.linalg.norm(W - start)), history[-1], rtol=1e-4, atol=0)


def test_loftq_base_is_exactly_representable_in_nf4():
    """Quantizing the LoftQ base as QLoRA does (NF4, blocks of 64) gives back the same weight."""
    pytest.importorskip("bitsandbytes")
    model = models.llama()
    lk.inject(model, lk.LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj"], init_lora_weights="loftq",
                                   loftq_config={"loftq_bits": 4, "loftq_iter": 3}))
    w = model.model.layers[0].self_attn.q_proj.base_layer.weight.detach()
    assert torch.equal(quantize_dequantize(w, 4), w)


# ---------------------------------------------------------------- inits that move W start at the base model
@pytest.mark.parametrize("init", ["corda", "lora_ga"])
def test_inits_that_move_w_keep_the_output_at_step_zero(init):
    model = models.gpt2()  # Conv1D: the (in, out) layout
    plain = copy.deepcopy(model)
    cfg = lk.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"], init_lora_weights=init)
    data = batches()
    if init == "corda":
        preprocess_corda(model, cfg, run_model=lambda: [model(input_ids=b["input_ids"][:1]) for b in data])
    else:
        preprocess_loraga(model, cfg, lambda: [model(**b, labels=b["input_ids"]).loss.backward() for b in data])
    lk.inject(model, cfg)
    layer = model.transformer.h[0].attn.c_attn
    assert layer.lora_B["default"].weight.abs().sum() > 0  # a real, non-zero start
    x = models.ids()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, plain(input_ids=x).logits, atol=1e-4, rtol=0)


# ---------------------------------------------------------------- bad input changes nothing
@pytest.mark.parametrize("init, words", [("corda", "preprocess_corda"), ("lora_ga", "preprocess_loraga")])
def test_an_init_without_its_data_is_refused_and_changes_nothing(init, words):
    model = models.llama()
    snap = models.snapshot(model)
    with pytest.raises(ValueError, match=words):
        lk.inject(model, lk.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=init))
    models.assert_unchanged(model, snap)
    assert lk.adapter_names(model) == []


def test_a_failed_inject_keeps_the_preprocessed_data_and_the_weights():
    model = models.llama()
    cfg = lk.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights="corda")
    data = [models.ids(1, 10, seed=i) for i in range(8)]
    preprocess_corda(model, cfg, run_model=lambda: [model(input_ids=x) for x in data])
    v_proj = model.model.layers[1].self_attn.v_proj
    eigens = v_proj.eigens
    v_proj.eigens = type(eigens)(eigens.S_WC[:1], eigens.U_WC[:, :1], eigens.V_WC[:, :1])  # the last layer: wrong rank
    snap = models.snapshot(model)
    with pytest.raises(ValueError, match="r=2"):
        lk.inject(model, cfg)
    models.assert_unchanged(model, snap)  # the layers before it were initialised, then rolled back
    assert all("eigens" in vars(model.model.layers[i].self_attn.q_proj) for i in range(2))


def test_corda_refuses_a_target_that_is_not_a_linear_before_recording_anything():
    model = models.llama()
    cfg = lk.LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"], init_lora_weights="corda")
    ran = []
    with pytest.raises(ValueError, match="embed_tokens.*Embedding"):
        preprocess_corda(model, cfg, run_model=lambda: ran.append(1))
    assert not ran and not any("eigens" in vars(m) for m in model.modules())


def test_loftq_needs_its_config_and_valid_bits():
    with pytest.raises(ValueError, match="loftq_config"):
        lk.LoraConfig(target_modules=["q"], init_lora_weights="loftq")
    with pytest.raises(ValueError, match="loftq_bits"):
        lk.LoraConfig(target_modules=["q"], init_lora_weights="loftq", loftq_config={"loftq_bits": 3})
    with pytest.raises(ValueError, match="unknown key"):
        lk.LoraConfig(target_modules=["q"], init_lora_weights="eva", eva_config={"rhoo": 2})


def test_loftq_on_a_layer_it_cannot_quantize_is_refused_and_changes_nothing():
    pytest.importorskip("bitsandbytes")
    model = models.llama()
    snap = models.snapshot(model)
    cfg = lk.LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"], init_lora_weights="loftq",
                        loftq_config={"loftq_bits": 4})
    with pytest.raises(ValueError, match="init_lora_weights='loftq' is implemented for Linear layers only"):
        lk.inject(model, cfg)
    models.assert_unchanged(model, snap)


def test_eva_with_too_few_tokens_per_batch_is_refused_and_changes_nothing():
    model = models.llama()
    lk.inject(model, lk.LoraConfig(r=8, target_modules=["q_proj", "o_proj"], init_lora_weights="eva"))
    snap = models.snapshot(model)
    tiny = batches(n=3, bs=1, seq=5)  # 5 tokens a batch; r·rho = 16 components are needed
    with pytest.raises(ValueError, match="at least round\\(r·rho\\) = 16 input tokens per batch"):
        initialize_lora_eva_weights(model, tiny, show_progress_bar=False)
    models.assert_unchanged(model, snap)
    with pytest.raises(ValueError, match="dataloader"):
        initialize_lora_eva_weights(model, show_progress_bar=False)
    with pytest.raises(ValueError, match="empty"):
        initialize_lora_eva_weights(model, [], show_progress_bar=False)
    models.assert_unchanged(model, snap)


def test_eva_rolls_back_ranks_and_removed_layers_on_a_late_failure():
    model = models.llama()
    lk.inject(model, lk.LoraConfig(r=4, target_modules=["q_proj", "o_proj", "down_proj"], init_lora_weights="eva"))
    snap = models.snapshot(model)
    names = [n for n, m in model.named_modules() if isinstance(m, lk.layers.LoraLayer)]
    sd = {n: torch.randn(8, 32 if "down" not in n else 64) for n in names}
    sd[names[0]] = torch.zeros(0, 32)  # the first layer leaves, the others grow...
    sd[names[-1]] = torch.randn(3, 7)  # ...and the last one is broken
    with pytest.raises(ValueError, match="input features"):
        initialize_lora_eva_weights(model, eva_state_dict=sd)
    models.assert_unchanged(model, snap)
    assert {n: m.r["default"] for n, m in model.named_modules() if isinstance(m, lk.layers.LoraLayer)} == \
        dict.fromkeys(names, 4)


@pytest.fixture(scope="module")
def qbase(tmp_path_factory):
    pytest.importorskip("bitsandbytes")
    import quantized_models as qm

    return qm.write_base(str(tmp_path_factory.mktemp("qbase")))


def test_data_aware_inits_are_refused_on_a_quantized_layer(qbase):
    import quantized_models as qm

    model = qm.hold(qm.load_bnb(qbase, "nf4"))
    for init, extra in (("loftq", {"loftq_config": {"loftq_bits": 4}}), ("corda", {}), ("lora_ga", {})):
        with pytest.raises(ValueError, match=f"init_lora_weights='{init}' writes the residual.*4-bit"):
            lk.inject(model, lk.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=init, **extra))
    assert not list(lk.layers.wrappers(model))


def test_loading_a_corda_file_says_which_base_it_needs(tmp_path):
    model = models.llama()
    cfg = lk.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="corda")
    preprocess_corda(model, cfg, run_model=lambda: [model(input_ids=models.ids(1, 10, seed=i)) for i in range(6)])
    lk.inject(model, cfg)
    lk.save_adapter(model, tmp_path)
    residual = lk.unload(copy.deepcopy(model))  # the base CorDA left
    with pytest.warns(UserWarning, match="residual base"):
        back = lk.load_adapter(residual, tmp_path)
    x = models.ids()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=x).logits, model(input_ids=x).logits, atol=1e-6, rtol=0)


def test_eva_initialises_a_quantized_base_from_its_inputs(qbase):
    """EVA only reads the layer inputs, so it works on a 4-bit base (QLoRA + EVA); the output stays the base's."""
    import quantized_models as qm

    model = qm.hold(qm.load_bnb(qbase, "nf4"))
    x = models.ids()
    with torch.no_grad():
        before = model(input_ids=x).logits
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["q_proj", "down_proj"], init_lora_weights="eva"))
    initialize_lora_eva_weights(model, batches(n=6, bs=4, seq=12), show_progress_bar=False)
    layers = [m for m in model.modules() if isinstance(m, lk.layers.QuantizedLinear)]
    assert layers and sum(m.r["default"] for m in layers) == 2 * 4  # the rank budget, redistributed
    for m in layers:
        A = m.lora_A["default"].weight
        torch.testing.assert_close(A @ A.T, torch.eye(A.shape[0]), atol=1e-4, rtol=0)  # principal directions
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, before, atol=0, rtol=0)
