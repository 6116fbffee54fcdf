"""lk.hotswap_adapter: new weights into an existing slot, in place (same parameters), equal to the
adapter's source (real PEFT, or another lorakit model); clear errors leave the slot untouched."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.utils import get_peft_model_state_dict
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit as lk

torch.set_num_threads(2)
PROJ = ["q_proj", "v_proj", "down_proj"]


def llama() -> nn.Module:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=64)).eval()


def randomise(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def peft_model(alpha: float = 8, seed: int = 1) -> nn.Module:
    m = get_peft_model(llama(), LoraConfig(r=4, lora_alpha=alpha, target_modules=PROJ + ["embed_tokens"])).eval()
    randomise(m, seed)
    return m


def ours() -> nn.Module:
    m = lk.inject(llama(), lk.LoraConfig(r=4, lora_alpha=8, target_modules=PROJ + ["embed_tokens"]))
    randomise(m, 9)
    return m


def identities(model: nn.Module) -> dict[str, tuple[int, int]]:
    return {n: (id(p), p.data_ptr()) for n, p in model.named_parameters()}


X = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def logits(model: nn.Module) -> torch.Tensor:
    return model(input_ids=X).logits


def test_peft_state_dict_in_place_equals_peft():
    theirs = peft_model()
    model = ours()
    before = identities(model)
    assert not torch.allclose(logits(model), logits(theirs))
    lk.hotswap_adapter(model, get_peft_model_state_dict(theirs), "default")
    torch.testing.assert_close(logits(model), logits(theirs), atol=1e-6, rtol=1e-5)
    assert identities(model) == before  # no parameter re-created or re-allocated


def test_directory_with_new_alpha_updates_scaling(tmp_path):
    theirs = peft_model(alpha=20, seed=5)
    theirs.save_pretrained(tmp_path)
    model = ours()
    before = identities(model)
    lk.hotswap_adapter(model, tmp_path, "default")
    torch.testing.assert_close(logits(model), logits(theirs), atol=1e-6, rtol=1e-5)
    assert model.model.layers[0].self_attn.q_proj.scaling["default"] == 5.0  # 20 / 4
    assert identities(model) == before


def test_lorakit_state_dict_into_another_slot_and_mixed_batch_sees_it():
    src = ours()
    randomise(src, 11)
    model = ours()
    lk.inject(model, lk.LoraConfig(r=4, lora_alpha=8, target_modules=PROJ + ["embed_tokens"]), adapter_name="b")
    with torch.no_grad(), lk.mixed_batch(model, ["b", "default"]):
        stale = logits(model)
    sd = {k: v for k, v in src.state_dict().items() if "lora_" in k}
    lk.hotswap_adapter(model, sd, "b")
    lk.set_adapter(model, "b")
    torch.testing.assert_close(logits(model), logits(src), atol=1e-6, rtol=1e-5)
    with torch.no_grad(), lk.mixed_batch(model, ["b", "default"]):  # cached stacks were rebuilt
        fresh = logits(model)
    torch.testing.assert_close(fresh[0], logits(src)[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(fresh[0], stale[0])


def test_set_adapter_allocates_nothing():
    """Switching re-creates no parameter and allocates no tensor memory (torch.profiler's CPU
    allocation events during the switches: none)."""
    from torch.profiler import ProfilerActivity, profile

    model = ours()
    lk.inject(model, lk.LoraConfig(r=4, lora_alpha=8, target_modules=PROJ), adapter_name="b")
    before = identities(model)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        lk.set_adapter(model, "b")
        lk.set_adapter(model, "default")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as control:
        torch.zeros(1000)  # the method sees an allocation when there is one

    def allocated(p):
        return [e.nbytes() for e in p.profiler.kineto_results.events() if e.name() == "[memory]" and e.nbytes() > 0]

    assert allocated(prof) == []
    assert allocated(control) == [4000]
    assert identities(model) == before


def test_rank_mismatch_is_a_clear_error_and_writes_nothing():
    theirs = get_peft_model(llama(), LoraConfig(r=6, lora_alpha=8, target_modules=PROJ + ["embed_tokens"]))
    randomise(theirs, 2)
    model = ours()
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"has shape \(6, (32|64)\), but adapter slot 'default' holds \(4, (32|64)\)"):
        lk.hotswap_adapter(model, get_peft_model_state_dict(theirs), "default")
    for n, p in model.named_parameters():
        assert torch.equal(p, snapshot[n]), n


def test_other_errors():
    model = ours()
    sd = get_peft_model_state_dict(peft_model())
    with pytest.raises(ValueError, match="unknown adapter"):
        lk.hotswap_adapter(model, sd, "nope")
    with pytest.raises(ValueError, match="do not cover"):
        lk.hotswap_adapter(model, {k: v for k, v in sd.items() if "layers.1." not in k}, "default")
    with pytest.raises(ValueError, match="names no tensor of adapter slot"):
        lk.hotswap_adapter(model, {**sd, "base_model.model.lm_head.lora_A.weight": torch.zeros(4, 32)}, "default")
    with pytest.raises(FileNotFoundError, match="has neither adapter_model.safetensors"):
        lk.hotswap_adapter(model, "/nonexistent/dir", "default")
    with pytest.raises(TypeError, match="directory or a state dict"):
        lk.hotswap_adapter(model, 3, "default")
    lk.merge(model)
    with pytest.raises(ValueError, match="unmerge"):
        lk.hotswap_adapter(model, sd, "default")


# ---------------------------------------------------------------- every layer type load_adapter knows
def _swap_equals_fresh_load(make, cfg: lk.LoraConfig, run, tmp_path) -> None:
    """Hot-swapping a saved adapter into a slot gives the outputs of a fresh model that
    ``load_adapter`` read the same files into; the slot's parameters stay the same objects."""
    from tests.models import randomize_adapters

    src = lk.inject(make(), cfg)
    randomize_adapters(src, seed=4)
    lk.save_adapter(src, tmp_path)
    fresh = lk.load_adapter(make(), tmp_path).eval()
    slot = lk.inject(make(), cfg).eval()
    randomize_adapters(slot, seed=8)
    before = identities(slot)
    assert not torch.allclose(run(slot), run(fresh))
    lk.hotswap_adapter(slot, tmp_path, "default")
    torch.testing.assert_close(run(slot), run(fresh), atol=1e-6, rtol=1e-5)
    assert identities(slot) == before


@torch.no_grad()
def test_multihead_attention_slot(tmp_path):
    from tests.models import TransformerBlock

    ids = torch.randint(0, 96, (2, 5), generator=torch.Generator().manual_seed(0))

    def make():
        torch.manual_seed(0)
        return TransformerBlock().eval()

    _swap_equals_fresh_load(make, lk.LoraConfig(r=4, target_modules=["attn", "ff.0"]), lambda m: m(ids), tmp_path)


@torch.no_grad()
def test_dora_slot_with_saved_classifier_and_biases(tmp_path):
    from tests.models import bert_cls, ids

    x = ids()

    def make():
        torch.manual_seed(0)
        return bert_cls()

    cfg = lk.LoraConfig(r=4, target_modules=["query", "value"], use_dora=True, modules_to_save=["classifier"],
                        bias="lora_only")
    _swap_equals_fresh_load(make, cfg, lambda m: m(input_ids=x).logits, tmp_path)


def test_a_different_base_bias_is_refused():
    from tests.models import bert_cls

    cfg = lk.LoraConfig(r=4, target_modules=["query"], bias="lora_only")
    torch.manual_seed(0)
    src = lk.inject(bert_cls(), cfg)
    sd = lk.io.peft_format.adapter_state_dict(src, "default")
    key = next(k for k in sd if k.endswith("query.base_layer.bias"))
    sd[key] = sd[key] + 1
    torch.manual_seed(0)
    slot = lk.inject(bert_cls(), cfg)
    lk.hotswap_adapter(slot, lk.io.peft_format.adapter_state_dict(src, "default"), "default")  # same biases: fine
    with pytest.raises(ValueError, match="base tensor different from the model's"):
        lk.hotswap_adapter(slot, sd, "default")


@torch.no_grad()
def test_multihead_attention_file_written_by_peft(tmp_path):
    """PEFT's key layout for nn.MultiheadAttention (in_proj factors on the module, out_proj's under
    ``base_layer.out_proj``) reaches the same tensors by hot swap as by load_adapter."""
    from tests.models import TransformerBlock

    def make():
        torch.manual_seed(0)
        return TransformerBlock().eval()

    theirs = get_peft_model(make(), LoraConfig(r=4, target_modules=["attn"]))
    randomise(theirs, 6)
    theirs.save_pretrained(tmp_path)
    fresh = lk.load_adapter(make(), tmp_path)
    slot = lk.inject(make(), lk.LoraConfig(r=4, target_modules=["attn"]))
    lk.hotswap_adapter(slot, tmp_path, "default")
    ours_sd, ref_sd = slot.state_dict(), fresh.state_dict()
    assert ours_sd.keys() == ref_sd.keys()
    for k in ours_sd:
        assert torch.equal(ours_sd[k], ref_sd[k]), k
    peft_sd = get_peft_model_state_dict(theirs)  # "base_model.model.<P>.lora_A.weight"
    assert len(peft_sd) == 4  # in_proj and out_proj, A and B
    for k, v in peft_sd.items():
        ours_k = k.removeprefix("base_model.model.").replace(".weight", ".default.weight")
        assert torch.equal(ours_sd[ours_k], v), k


def test_trainable_token_rows_for_other_token_ids_are_refused(tmp_path):
    """Trained rows are stored without their ids (the ids are in the config): rows trained for tokens
    5, 6, 7 must never land on the slot's tokens 1, 2, 3."""
    from models import assert_unchanged, ids, llama, snapshot

    model = llama()
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[1, 2, 3]))
    other = llama()
    lk.inject(other, lk.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[5, 6, 7]))
    lk.save_adapter(other, tmp_path / "other")
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"tokens .*\[5, 6, 7\].*tokens .*\[1, 2, 3\]"):
        lk.hotswap_adapter(model, tmp_path / "other", "default")
    assert_unchanged(model, snap)
    sd = lk.io.peft_format.adapter_state_dict(other, "default")
    with pytest.raises(ValueError, match="token ids cannot be checked"):
        lk.hotswap_adapter(model, sd, "default")  # a bare state dict: no ids to check
    assert_unchanged(model, snap)
    # the same ids swap in, and the model then equals the source
    same = llama()
    lk.inject(same, lk.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[1, 2, 3]))
    with torch.no_grad():
        same.model.embed_tokens.token_adapter.trainable_tokens_delta["default"].add_(1.0)
        same.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" not in k and "trainable" not in k},
                             strict=False)
    lk.save_adapter(same, tmp_path / "same")
    lk.hotswap_adapter(model, tmp_path / "same", "default")
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, same(x).logits)
