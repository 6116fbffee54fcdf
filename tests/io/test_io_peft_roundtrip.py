"""Form (c) against real PEFT 0.21: files PEFT writes load in lorakit with the same outputs, files
lorakit writes load in PEFT with the same outputs, and the two files hold the same tensors."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from safetensors import safe_open

import lorakit as lk
from io_models import base_model, logits, perturb_adapters, perturb_trainable

ATOL = 1e-5  # fp32

LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# name -> (model kind, LoraConfig kwargs shared by PEFT and lorakit, PEFT-only kwargs)
CASES = {
    "llama_all7": ("llama", dict(r=4, lora_alpha=8, target_modules=LLAMA_ALL), {}),
    "gpt2_conv1d_bias": ("gpt2", dict(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"],
                                      fan_in_fan_out=True, bias="lora_only"), {}),
    "bert_cls_head": ("bert_cls", dict(r=4, lora_alpha=8, target_modules=["query", "value"],
                                       modules_to_save=["classifier"]), {"task_type": "SEQ_CLS"}),
    "bert_bias_all": ("bert_cls", dict(r=4, lora_alpha=8, target_modules=["query"], bias="all",
                                       modules_to_save=["classifier"]), {}),
    "t5": ("t5", dict(r=4, lora_alpha=8, target_modules=["q", "v", "wi", "wo"]), {}),
    "embed_lm_head": ("llama", dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head", "q_proj"]), {}),
    "embed_lm_head_tied": ("llama_tied", dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head"]), {}),
    "dora": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True), {}),
    "rank_alpha_patterns": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                          rank_pattern={"v_proj": 2, "layers.1.self_attn.q_proj": 6},
                                          alpha_pattern={"down_proj": 3.0}, use_rslora=True), {}),
    "layers_to_transform": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"],
                                          layers_to_transform=[1], layers_pattern="layers"), {}),
    "regex_target": ("llama", dict(r=4, lora_alpha=8,
                                   target_modules=r".*\.layers\.0\.(self_attn\.(q|v)_proj|mlp\.up_proj)"), {}),
}


def _peft_model(kind, kw, peft_kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tied-weights / fan_in_fan_out notices
        pm = peft.get_peft_model(base_model(kind), peft.LoraConfig(init_lora_weights=False, **kw, **peft_kw))
    perturb_trainable(pm)
    return pm.eval()


def _lk_model(kind, kw):
    model = lk.inject(base_model(kind), lk.LoraConfig(init_lora_weights=False, **kw))
    perturb_trainable(model, seed=1)
    return model.eval()


def _save_peft(pm, directory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Setting save_embedding_layers to True"
        pm.save_pretrained(directory)


def _file_layout(path):
    with safe_open(str(path), "pt") as f:
        return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}, f.metadata()


@pytest.mark.parametrize("case", list(CASES))
def test_peft_file_loads_in_lorakit(case, tmp_path):
    kind, kw, peft_kw = CASES[case]
    pm = _peft_model(kind, kw, peft_kw)
    _save_peft(pm, tmp_path)
    expected = logits(pm, kind)
    ours = lk.load_adapter(base_model(kind), tmp_path)
    assert lk.adapter_names(ours) == ["default"]
    assert not torch.allclose(expected, logits(base_model(kind), kind), atol=1e-3)  # the adapter matters
    torch.testing.assert_close(logits(ours, kind), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_lorakit_file_loads_in_peft_and_matches_peft_file(case, tmp_path):
    kind, kw, peft_kw = CASES[case]
    ours = _lk_model(kind, kw)
    lk.save_adapter(ours, tmp_path / "lk")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(base_model(kind), tmp_path / "lk").eval()
    expected = logits(ours, kind)
    torch.testing.assert_close(logits(pm, kind), expected, atol=ATOL, rtol=0)
    # PEFT re-saving what it read gives the same file: same keys, shapes, dtypes, metadata and size
    _save_peft(pm, tmp_path / "peft")
    ours_file, peft_file = tmp_path / "lk/adapter_model.safetensors", tmp_path / "peft/adapter_model.safetensors"
    assert _file_layout(ours_file) == _file_layout(peft_file)
    assert ours_file.stat().st_size == peft_file.stat().st_size
    # and a model PEFT built itself from the same config writes that layout too
    _save_peft(_peft_model(kind, kw, peft_kw), tmp_path / "peft_own")
    assert _file_layout(ours_file)[0] == _file_layout(tmp_path / "peft_own/adapter_model.safetensors")[0]


@pytest.mark.parametrize("case", ["llama_all7", "bert_cls_head", "dora"])
def test_written_config_reads_back_in_peft(case, tmp_path):
    kind, kw, _ = CASES[case]
    lk.save_adapter(_lk_model(kind, kw), tmp_path)
    cfg = peft.PeftConfig.from_pretrained(str(tmp_path))
    assert cfg.peft_type == peft.PeftType.LORA
    for k, v in kw.items():
        got = getattr(cfg, k)
        assert (sorted(got) if isinstance(got, (set, list)) else got) == (sorted(v) if isinstance(v, list) else v), k


def test_second_named_adapter_both_ways(tmp_path):
    cfg_a = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    cfg_b = dict(r=2, lora_alpha=4, target_modules=["up_proj", "o_proj"])
    # PEFT -> lorakit: PEFT puts the second adapter in <dir>/other/
    pm = peft.get_peft_model(base_model("llama"), peft.LoraConfig(init_lora_weights=False, **cfg_a))
    pm.add_adapter("other", peft.LoraConfig(init_lora_weights=False, **cfg_b))
    for i, name in enumerate(["default", "other"]):
        pm.set_adapter(name)
        perturb_trainable(pm, seed=i)
    pm.save_pretrained(tmp_path / "peft")
    assert (tmp_path / "peft/other/adapter_config.json").is_file()
    ours = lk.load_adapter(base_model("llama"), tmp_path / "peft")
    lk.load_adapter(ours, tmp_path / "peft", adapter_name="other")
    assert lk.adapter_names(ours) == ["default", "other"]
    for name in ["default", "other"]:
        pm.set_adapter(name)
        lk.set_adapter(ours, name)
        torch.testing.assert_close(logits(ours, "llama"), logits(pm, "llama"), atol=ATOL, rtol=0)
    # lorakit -> PEFT, same layout
    ours = lk.inject(base_model("llama"), lk.LoraConfig(**cfg_a))
    lk.inject(ours, lk.LoraConfig(**cfg_b), adapter_name="other")
    perturb_adapters(ours, seed=3)
    lk.save_adapter(ours, tmp_path / "lk")
    assert lk.save_adapter(ours, tmp_path / "lk", "other") == tmp_path / "lk/other"
    back = peft.PeftModel.from_pretrained(base_model("llama"), tmp_path / "lk")
    back.load_adapter(tmp_path / "lk/other", adapter_name="other")
    for name in ["default", "other"]:
        back.set_adapter(name)
        lk.set_adapter(ours, name)
        torch.testing.assert_close(logits(back, "llama"), logits(ours, "llama"), atol=ATOL, rtol=0)


@pytest.mark.parametrize("is_trainable", [False, True])
def test_is_trainable(is_trainable, tmp_path):
    lk.save_adapter(_lk_model("llama", CASES["llama_all7"][1]), tmp_path)
    model = lk.load_adapter(base_model("llama").train(), tmp_path, is_trainable=is_trainable)
    trainable, _ = lk.trainable_parameters(model)
    n_adapter = sum(p.numel() for _, w in lk.adapters.wrappers(model) for p in w.adapter_parameters("default"))
    assert trainable == (n_adapter if is_trainable else 0)
    assert model.training is is_trainable  # an inference load puts the model in eval mode, as PEFT does


def test_overlapping_rank_patterns_keep_their_order(tmp_path):
    """The first matching pattern wins, so the file must keep the patterns' order: here the
    generic "q_proj" comes before (and shadows) the layer-1 entry, which sorting would reverse."""
    kw = dict(r=4, target_modules=["q_proj"], rank_pattern={"q_proj": 2, "layers.1.self_attn.q_proj": 6},
              init_lora_weights=False)
    ours = lk.inject(base_model("llama"), lk.LoraConfig(**kw))
    perturb_trainable(ours)
    lk.save_adapter(ours, tmp_path)
    back = peft.PeftModel.from_pretrained(base_model("llama"), tmp_path)
    torch.testing.assert_close(logits(back, "llama"), logits(ours, "llama"), atol=ATOL, rtol=0)
    again = lk.load_adapter(base_model("llama"), tmp_path)
    torch.testing.assert_close(logits(again, "llama"), logits(ours, "llama"), atol=ATOL, rtol=0)


def test_half_precision_base_same_file_as_peft(tmp_path):
    """On a bf16 base both keep fp32 adapter weights (PEFT's autocast_adapter_dtype): same file."""
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"])
    ours = lk.inject(base_model("llama").to(torch.bfloat16), lk.LoraConfig(**kw))
    lk.save_adapter(ours, tmp_path / "lk")
    _save_peft(peft.get_peft_model(base_model("llama").to(torch.bfloat16), peft.LoraConfig(**kw)), tmp_path / "peft")
    ours_file, peft_file = tmp_path / "lk/adapter_model.safetensors", tmp_path / "peft/adapter_model.safetensors"
    layout = _file_layout(ours_file)
    assert layout == _file_layout(peft_file)
    assert {dtype for _, dtype in layout[0].values()} == {"F32", "BF16"}  # factors fp32, embedding base bf16
    assert ours_file.stat().st_size == peft_file.stat().st_size


def test_base_model_name_or_path_recorded(tmp_path):
    import transformers as tf

    base_model("llama").save_pretrained(tmp_path / "base")
    model = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["q_proj"]))
    lk.save_adapter(model, tmp_path / "adapter")
    cfg = peft.PeftConfig.from_pretrained(str(tmp_path / "adapter"))
    assert cfg.base_model_name_or_path == str(tmp_path / "base")
    assert cfg.task_type == "CAUSAL_LM"
