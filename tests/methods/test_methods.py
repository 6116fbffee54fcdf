"""The compared fine-tuning methods: parameter counts derived by hand, the identities each one promises."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2ForSequenceClassification

import lorakit as lk
from lorakit.methods import METHODS, Bottleneck, Method, get_method

from models import BERT_SHAPE, tiny_bert

torch.set_num_threads(1)

D, L, H, FF, LABELS = BERT_SHAPE  # hidden, layers, heads, feed-forward width, classes


def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(1, 100, (3, 6), generator=g),
            "attention_mask": torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6, [1, 1, 0, 0, 0, 0]])}


HEAD = D * LABELS + LABELS  # classifier weight + bias
# Every bias of BERT: per layer q,k,v,attn-out (4·D), intermediate (FF), output (D), two LayerNorms (2·D);
# plus the embedding LayerNorm and the pooler (the classifier bias is counted in HEAD).
BIASES = L * (4 * D + FF + D + 2 * D) + D + D
LAYERNORMS = (2 * L + 1) * 2 * D  # two per layer + the embeddings', weight and bias each


def expected_trainable(name: str, **kw) -> int:
    if name == "full":
        return sum(p.numel() for p in tiny_bert().parameters())
    if name == "head":
        return HEAD
    if name == "bitfit":
        return HEAD + BIASES
    if name == "adapter":
        m = kw.get("bottleneck", 16)
        return 2 * L * (2 * D * m + m + D) + LAYERNORMS + HEAD
    if name == "prefix":
        return L * 2 * kw.get("num_prefix", 10) * D + HEAD
    if name == "lora":
        r, targets = kw.get("r", 8), kw.get("target_modules", ["query", "value"])
        return L * len(targets) * r * (D + D) + HEAD
    raise AssertionError(name)


CASES = [("full", {}), ("head", {}), ("bitfit", {}), ("adapter", {}), ("adapter", {"bottleneck": 3}),
         ("prefix", {}), ("prefix", {"num_prefix": 4}), ("lora", {}), ("lora", {"r": 2, "target_modules": ["query"]})]


@pytest.mark.parametrize("name,kw", CASES)
def test_trainable_parameter_counts_match_hand_derivation(name, kw):
    model = tiny_bert()
    method = get_method(name, **kw)
    assert isinstance(method, Method)
    method.apply(model)
    trainable, _ = lk.trainable_parameters(model)
    assert trainable == expected_trainable(name, **kw)
    stored = method.stored_state(model)
    assert sum(t.numel() for t in stored.values()) == trainable
    assert set(stored) == {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", ["full", "head", "bitfit", "adapter", "lora"])
def test_base_outputs_unchanged_at_initialisation(name):
    model, b = tiny_bert(), batch()
    with torch.no_grad():
        ref = model(**b).logits
        get_method(name).apply(model)
        out = model(**b).logits
    assert torch.equal(out, ref)  # zero-init up-projection / B: exactly h + 0


def test_adapter_is_in_the_forward_path_after_the_two_projections():
    model, b = tiny_bert(), batch()
    get_method("adapter", bottleneck=4).apply(model)
    bottlenecks = [n for n, m in model.named_modules() if isinstance(m, Bottleneck)]
    assert bottlenecks == [f"bert.encoder.layer.{i}.{site}.dense.adapter"
                           for i in range(L) for site in ("attention.output", "output")]
    with torch.no_grad():
        ref = model(**b).logits
        model.get_submodule(bottlenecks[0]).up.bias.normal_()  # not a constant: LayerNorm would remove it
        assert not torch.allclose(model(**b).logits, ref)


@pytest.mark.parametrize("name", list(METHODS))
def test_gradients_reach_exactly_the_trainable_parameters(name):
    model = tiny_bert()
    get_method(name).apply(model)
    model.train()
    model(**batch(), labels=torch.tensor([0, 1, 1])).loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n


def test_lora_served_merged_equals_unmerged_after_an_update():
    model, b = tiny_bert(), batch()
    method = get_method("lora", r=4, target_modules="all-linear")
    method.apply(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
        trained = model(**b).logits
        served = method.for_inference(model)
        assert not any(isinstance(m, lk.layers.LoraLayer) for m in served.modules())
        torch.testing.assert_close(served(**b).logits, trained, rtol=1e-5, atol=1e-5)


def test_houlsby_adapters_on_gpt2_conv1d():
    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=D, n_layer=L, n_head=H, vocab_size=100, n_positions=16, num_labels=LABELS,
                     pad_token_id=0)
    model = GPT2ForSequenceClassification(cfg).eval()
    ids = torch.randint(1, 100, (2, 5))
    with torch.no_grad():
        ref = model(ids).logits
        get_method("adapter", bottleneck=4).apply(model)  # head: GPT-2's "score" (no bias)
        assert torch.equal(model(ids).logits, ref)
    trainable, _ = lk.trainable_parameters(model)
    assert trainable == 2 * L * (2 * D * 4 + 4 + D) + (2 * L + 1) * 2 * D + D * LABELS


def test_errors_name_the_bad_value():
    with pytest.raises(ValueError, match="unknown method 'qlora'"):
        get_method("qlora")
    with pytest.raises(ValueError, match="bottleneck must be a positive int"):
        get_method("adapter", bottleneck=0).apply(tiny_bert())
    with pytest.raises(ValueError, match="head module 'nope'"):
        get_method("head", head=["nope"]).apply(tiny_bert())
    gpt2 = GPT2ForSequenceClassification(GPT2Config(n_embd=D, n_layer=1, n_head=H, vocab_size=50, n_positions=8))
    with pytest.raises(TypeError, match="BERT-style self-attention"):
        get_method("prefix").apply(gpt2)


@pytest.mark.parametrize("name", list(METHODS))
def test_added_modules_follow_the_models_eval_mode(name):
    model = tiny_bert()  # in eval mode; new modules start in training mode unless told
    get_method(name).apply(model)
    assert [n for n, m in model.named_modules() if m.training] == []
