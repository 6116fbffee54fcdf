"""trainable_token_indices (+ ensure_weight_tying) against PEFT 0.21: the same outputs on the same
rows, PEFT's file layout both ways, its tying rules on a tied Llama, merging that keeps the tie, and
the refusals."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lorakit as lk
import peft_models as pm
from lorakit.layers import TokensWrapper

import models

ROWS = [1, 5, 7]
PREFIX = "base_model.model."


def _pair(base, **kw):
    """(lorakit, PEFT) with the same config and PEFT's random rows / factors in both."""
    ours = lk.inject(copy.deepcopy(base), lk.LoraConfig(**kw))
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw, init_lora_weights=False)).eval()
    pm.randomize_tokens(ref)
    assert models.copy_from_peft(ours, ref) > 0
    return ours.eval(), ref


def _logits(model, ids=None):
    return model(models.ids() if ids is None else ids).logits


def test_custom_model_same_as_peft_and_files_both_ways(tmp_path):
    kw = {"target_modules": ["conv1d"], "trainable_token_indices": {"emb": [0, 10]}}
    ours, ref = _pair(pm.build("EmbConv1D"), **kw)
    X = pm.inputs()
    torch.testing.assert_close(ours(X), ref(X), atol=1e-6, rtol=1e-6)
    lora = sum(p.numel() for n, p in ours.named_parameters() if ".lora_" in n)
    assert lk.trainable_parameters(ours)[0] == 2 * 5 + lora  # two rows of five, not the 100 x 5 matrix
    ref.save_pretrained(tmp_path / "peft")
    loaded = lk.load_adapter(pm.build("EmbConv1D"), tmp_path / "peft")
    torch.testing.assert_close(loaded(X), ref(X), atol=1e-6, rtol=1e-6)
    lk.save_adapter(loaded, tmp_path / "lk")
    theirs, mine = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("peft", "lk"))
    assert mine.keys() == theirs.keys() and "base_model.model.emb.token_adapter.trainable_tokens_delta" in mine
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    again = peft.PeftModel.from_pretrained(pm.build("EmbConv1D"), tmp_path / "lk").eval()
    torch.testing.assert_close(again(X), ref(X), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("spec", [ROWS, {"embed_tokens": ROWS, "lm_head": ROWS}], ids=["list", "both_names"])
@pytest.mark.parametrize("ensure", [False, True], ids=["default", "ensure_weight_tying"])
def test_tied_llama_follows_embedding_rows_as_peft(spec, ensure, tmp_path):
    """tie_word_embeddings: lm_head follows the embedding's rows (nothing of it saved); merging writes
    the rows once and keeps lm_head tied; unmerging restores the rows exactly."""
    base = models.llama(tie=True)
    ours, ref = _pair(base, target_modules=["q_proj"], trainable_token_indices=spec, ensure_weight_tying=ensure)
    assert isinstance(ours.lm_head, TokensWrapper) and ours.lm_head.token_adapter.source is not None
    torch.testing.assert_close(_logits(ours), _logits(ref), atol=1e-5, rtol=1e-5)
    ref.save_pretrained(tmp_path)
    keys = load_file(str(tmp_path / "adapter_model.safetensors")).keys()
    assert [k for k in keys if "token" in k] == [f"{PREFIX}model.embed_tokens.token_adapter.trainable_tokens_delta"]
    loaded = lk.load_adapter(copy.deepcopy(base), tmp_path)
    out = _logits(loaded)
    torch.testing.assert_close(out, _logits(ref), atol=1e-5, rtol=1e-5)
    weight = loaded.model.embed_tokens.token_adapter.base_layer.weight
    original = weight.detach().clone()
    lk.merge(loaded)
    assert loaded.lm_head.token_adapter.base_layer.weight is weight  # still tied
    torch.testing.assert_close(_logits(loaded), out, atol=1e-5, rtol=1e-5)
    lk.unmerge(loaded)
    assert torch.equal(weight, original)
    merged = lk.merge_and_unload(loaded)
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    torch.testing.assert_close(_logits(merged), out, atol=1e-5, rtol=1e-5)


def test_tied_layers_with_different_rows():
    """Different ids for the tied pair: refused with ensure_weight_tying (as PEFT), else trained apart."""
    base = models.llama(tie=True)
    spec = {"embed_tokens": ROWS, "lm_head": [2, 3]}
    for lib in (peft, lk):
        with pytest.raises(ValueError, match="(?i)weight tying|ensure_weight_tying"):
            cfg = lib.LoraConfig(target_modules=["q_proj"], trainable_token_indices=spec, ensure_weight_tying=True)
            (lk.inject if lib is lk else peft.get_peft_model)(copy.deepcopy(base), cfg)
    ours, ref = _pair(base, target_modules=["q_proj"], trainable_token_indices=spec)
    assert ours.lm_head.token_adapter.source is None and ours.lm_head.token_adapter.token_indices["default"] == [2, 3]
    torch.testing.assert_close(_logits(ours), _logits(ref), atol=1e-5, rtol=1e-5)


def test_ensure_weight_tying_without_tied_weights_warns():
    with pytest.warns(UserWarning, match="ensure_weight_tying"):
        lk.inject(models.llama(tie=False), lk.LoraConfig(target_modules=["q_proj"], trainable_token_indices=ROWS,
                                                         ensure_weight_tying=True))


def test_adapters_with_disjoint_rows_add_up_overlapping_ones_are_refused():
    base = models.llama()
    model = lk.inject(base, lk.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[1, 2]), "a")
    lk.inject(model, lk.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[3]), "b")
    lk.inject(model, lk.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[2, 4]), "c")
    pm.randomize_tokens(model)
    layer = model.model.embed_tokens.token_adapter
    lk.set_adapter(model, ["a", "b"])
    ids = torch.tensor([[1, 2, 3, 4]])
    rows = model.model.embed_tokens(ids)[0]
    delta = layer.trainable_tokens_delta
    torch.testing.assert_close(rows[:3], torch.cat([delta["a"], delta["b"]]))
    torch.testing.assert_close(rows[3], layer.base_layer.weight[4])
    lk.set_adapter(model, ["a", "c"])
    with pytest.raises(ValueError, match="both train token 2"):
        model(ids)
    lk.combine_adapters(model, ["a", "b"], [1.0, 1.0], "ab")  # disjoint rows are carried as a union
    lk.set_adapter(model, "ab")
    torch.testing.assert_close(model.model.embed_tokens(ids)[0], rows)
    with pytest.raises(ValueError, match="overlapping token rows"):
        lk.combine_adapters(model, ["a", "c"], [1.0, 1.0], "ac")


def test_mixed_batch_and_bf16():
    base = models.llama()
    model = lk.inject(copy.deepcopy(base).to(torch.bfloat16),
                      lk.LoraConfig(target_modules=["q_proj"], trainable_token_indices=ROWS), "a")
    lk.inject(model, lk.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[2, 9]), "b")
    pm.randomize_tokens(model)
    assert model.model.embed_tokens.token_adapter.trainable_tokens_delta["a"].dtype == torch.float32
    ids = torch.tensor([[1, 5, 2, 9], [7, 2, 9, 1], [1, 2, 3, 4]])
    expected = []
    for i, name in enumerate(["a", "b", "__base__"]):
        if name == "__base__":
            with lk.disable_adapters(model):
                expected.append(_logits(model, ids)[i])
        else:
            lk.set_adapter(model, name)
            expected.append(_logits(model, ids)[i])
    with torch.no_grad(), lk.mixed_batch(model, ["a", "b", "__base__"]):
        out = _logits(model, ids)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, torch.stack(expected))


@pytest.mark.parametrize("kw, match", [
    (dict(target_modules=["q_proj"], trainable_token_indices=[1, models.VOCAB]), "out of range"),
    (dict(target_modules=["q_proj"], trainable_token_indices={"nowhere": [1]}), "matches no module"),
    (dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"], trainable_token_indices={"embed_tokens": [1]}),
     "modules_to_save"),
    (dict(target_modules=["q_proj", "embed_tokens"], trainable_token_indices={"embed_tokens": [1]}), "one way only"),
])
def test_refusals_change_nothing(kw, match):
    model = models.llama()
    types = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=match):
        lk.inject(model, lk.LoraConfig(**kw))
    assert [type(m) for m in model.modules()] == types and lk.adapter_names(model) == []


@pytest.mark.parametrize("kw", [dict(target_modules=["q_proj", "lm_head"]), dict(target_modules=["q_proj"],
                                                                                 modules_to_save=["lm_head"])])
def test_ensure_weight_tying_of_lora_or_saved_copies_is_refused(kw):
    """PEFT ties LoRA factors / saved copies of a tied pair too; lorakit does not, so it refuses."""
    model = models.llama(tie=True)
    with pytest.raises(ValueError, match="ensure_weight_tying"):
        lk.inject(model, lk.LoraConfig(ensure_weight_tying=True, **kw))
    assert lk.adapter_names(model) == []


class ScaledEmbedding(nn.Embedding):
    """Gemma's kind of embedding: its forward scales the lookup."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("embed_scale", torch.tensor(3.0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.embed_scale


class TokenNet(nn.Module):
    def __init__(self, emb: nn.Embedding) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = emb
        self.lin = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(self.emb(x))


@pytest.mark.parametrize("emb", [lambda: nn.Embedding(20, 6), lambda: ScaledEmbedding(20, 6),
                                 lambda: nn.Embedding(20, 6, padding_idx=2)], ids=["plain", "scaled", "padding_row"])
def test_outputs_and_row_gradients_equal_peft(emb):
    """The direct path (plain embedding) and the module's own forward (a scaled embedding; a padding
    row among the trained rows) give PEFT's outputs and PEFT's gradients of the rows."""
    torch.manual_seed(0)
    base = TokenNet(emb())
    ours, ref = _pair(base, target_modules=["lin"], trainable_token_indices={"emb": [2, 4, 9]})
    x = torch.tensor([[2, 4, 5], [9, 9, 1]])
    torch.testing.assert_close(ours(x), ref(x), atol=1e-6, rtol=1e-6)
    ours(x).square().sum().backward()
    ref(x).square().sum().backward()
    grad = ref.base_model.model.emb.token_adapter.trainable_tokens_delta["default"].grad
    torch.testing.assert_close(ours.emb.token_adapter.trainable_tokens_delta["default"].grad, grad)
