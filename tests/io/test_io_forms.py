"""Forms (a) full and (b) merged: each reloads to the adapted model's outputs; (b) with plain transformers."""

from __future__ import annotations

import json

import peft
import pytest
import torch
import transformers as tf
from safetensors.torch import load_file
from torch import nn

import lorakit as lk
from io_models import base_model, logits, perturb_adapters, perturb_trainable

ATOL = 1e-5


def _adapted(kind, seed=0, **kw):
    kw.setdefault("r", 4)
    model = lk.inject(base_model(kind), lk.LoraConfig(init_lora_weights=False, **kw))
    perturb_trainable(model, seed=seed)
    return model.eval()


def _n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied parameters once


# ---------------------------------------------------------------------- (b) merged
@pytest.mark.parametrize("kind,auto,kw", [
    ("llama", tf.AutoModelForCausalLM, dict(target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True)),
    ("gpt2", tf.AutoModelForCausalLM, dict(target_modules=["c_attn", "c_fc"])),
    ("bert_cls", tf.AutoModelForSequenceClassification, dict(target_modules=["query", "value"],
                                                             modules_to_save=["classifier"])),
])
def test_merged_reloads_with_plain_transformers(kind, auto, kw, tmp_path):
    model = _adapted(kind, **kw)
    expected = logits(model, kind)
    lk.save_merged(model, tmp_path)
    reloaded = auto.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(base_model(kind))
    assert _n_params(reloaded) == _n_params(base_model(kind))
    torch.testing.assert_close(logits(reloaded, kind), expected, atol=ATOL, rtol=0)
    # the caller's model keeps its (unmerged) adapters
    assert lk.adapter_names(model) == ["default"]
    assert not any(w.merged for _, w in lk.adapters.wrappers(model) if isinstance(w, lk.layers.LoraLayer))
    torch.testing.assert_close(logits(model, kind), expected, atol=0, rtol=0)


@pytest.mark.parametrize("targets", [["embed_tokens"], ["lm_head"], ["embed_tokens", "lm_head", "q_proj"]])
def test_merged_tied_embeddings_compute_the_adapted_function(targets, tmp_path):
    """Tied embed_tokens/lm_head: the merged file computes exactly what the adapted model does.
    An adapter on a tied weight needs E + ΔE for the lookup but W + ΔW for the head, so the saved
    model is untied (tie_word_embeddings=False, one more V×d matrix)."""
    model = _adapted("llama_tied", target_modules=targets)
    expected = logits(model, "llama")
    with pytest.warns(UserWarning, match="untied"):
        lk.save_merged(model, tmp_path)
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.tie_word_embeddings is False
    assert reloaded.lm_head.weight is not reloaded.model.embed_tokens.weight
    base = base_model("llama_tied")
    assert _n_params(reloaded) == _n_params(base) + base.lm_head.weight.numel()
    torch.testing.assert_close(logits(reloaded, "llama"), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(logits(model, "llama"), expected, atol=0, rtol=0)  # caller unchanged


def test_merged_tied_embeddings_stay_tied_when_untouched(tmp_path):
    model = _adapted("llama_tied", target_modules=["q_proj", "v_proj"])
    lk.save_merged(model, tmp_path)
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    assert _n_params(reloaded) == _n_params(base_model("llama_tied"))
    torch.testing.assert_close(logits(reloaded, "llama"), logits(model, "llama"), atol=ATOL, rtol=0)


class _MLP(nn.Module):
    def __init__(self, tied: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.fc = nn.Linear(8, 8)
        self.out = nn.Linear(8, 16, bias=False)
        if tied:
            self.out.weight = self.emb.weight

    def forward(self, x):
        return self.out(torch.relu(self.fc(self.emb(x))))


def test_merged_plain_module_is_a_state_dict(tmp_path):
    torch.manual_seed(0)
    model = lk.inject(_MLP(), lk.LoraConfig(r=2, target_modules=["emb", "fc"], init_lora_weights=False))
    perturb_adapters(model)
    x = torch.randint(0, 16, (3, 5))
    lk.save_merged(model, tmp_path)
    fresh = _MLP()
    fresh.load_state_dict(load_file(tmp_path / "model.safetensors"))
    torch.testing.assert_close(fresh(x), model(x), atol=ATOL, rtol=0)


def test_merged_plain_module_with_adapted_tied_weight_is_refused(tmp_path):
    model = lk.inject(_MLP(tied=True), lk.LoraConfig(r=2, target_modules=["emb"], init_lora_weights=False))
    with pytest.raises(ValueError, match="shares between modules"):
        lk.save_merged(model, tmp_path)
    assert not (tmp_path / "model.safetensors").exists()


# ---------------------------------------------------------------------- (a) full
def _two_adapters(kind="llama"):
    model = lk.inject(base_model(kind), lk.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True))
    lk.inject(model, lk.LoraConfig(r=2, lora_alpha=4, target_modules=["embed_tokens", "up_proj"]), "other")
    perturb_adapters(model, seed=5)
    lk.set_adapter(model, "other")
    return model.eval()


@pytest.mark.parametrize("into", ["plain_base", "injected"])
def test_full_round_trip(into, tmp_path):
    model = _two_adapters()
    expected = {}
    for name in ["default", "other"]:
        lk.set_adapter(model, name)
        expected[name] = logits(model, "llama")
    lk.set_adapter(model, "other")
    lk.save_full(model, tmp_path)
    target = base_model("llama") if into == "plain_base" else _two_adapters()
    if into == "injected":
        perturb_adapters(target, seed=9)  # different numbers, same structure
        lk.set_adapter(target, "default")
    loaded = lk.load_full(target, tmp_path)
    assert lk.adapter_names(loaded) == ["default", "other"]
    assert lk.active_adapters(loaded) == ["other"]
    assert lk.trainable_parameters(loaded) == lk.trainable_parameters(model)
    for name in ["other", "default"]:
        lk.set_adapter(loaded, name)
        torch.testing.assert_close(logits(loaded, "llama"), expected[name], atol=0, rtol=0)


def test_full_keeps_tied_weights_tied_and_stores_them_once(tmp_path):
    model = _adapted("llama_tied", target_modules=["q_proj"])
    lk.save_full(model, tmp_path)
    meta = json.loads((tmp_path / "lorakit_state.json").read_text())
    assert meta["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    loaded = lk.load_full(base_model("llama_tied"), tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    torch.testing.assert_close(logits(loaded, "llama"), logits(model, "llama"), atol=0, rtol=0)


def test_full_refuses_merged_and_mismatched(tmp_path):
    model = _two_adapters()
    lk.merge(model)
    with pytest.raises(ValueError, match="unmerge"):
        lk.save_full(model, tmp_path)
    lk.unmerge(model)
    lk.save_full(model, tmp_path)
    one = lk.inject(base_model("llama"), lk.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"holds adapters \['default', 'other'\] but the model has \['default'\]"):
        lk.load_full(one, tmp_path)
    bigger = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=48,
                                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match=r"has shape .* but this model expects"):
        lk.load_full(bigger, tmp_path)
    assert lk.adapter_names(bigger) == []  # rolled back
    assert not any(isinstance(m, lk.layers.LoraLayer) for m in bigger.modules())


def test_combined_adapter_saves_with_per_layer_ranks_peft_reads(tmp_path):
    """combine_adapters gives layers different ranks than its config's r; the saved config spells
    them out so PEFT rebuilds the same shapes."""
    model = lk.inject(base_model("llama"), lk.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["v_proj", "up_proj"]), "b")
    perturb_adapters(model)
    lk.combine_adapters(model, ["default", "b"], [0.5, 2.0], "mix")
    lk.set_adapter(model, "mix")
    lk.save_adapter(model, tmp_path, "mix")
    pm = peft.PeftModel.from_pretrained(base_model("llama"), tmp_path / "mix")
    torch.testing.assert_close(logits(pm, "llama"), logits(model, "llama"), atol=ATOL, rtol=0)
    again = lk.load_adapter(base_model("llama"), tmp_path, "mix")
    lk.set_adapter(again, "mix")
    torch.testing.assert_close(logits(again, "llama"), logits(model, "llama"), atol=ATOL, rtol=0)
