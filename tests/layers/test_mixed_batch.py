"""lk.mixed_batch: each row equals that row run alone with its adapter (reference: set_adapter /
disable_adapters on a batch of one), for Linear, Embedding, Conv, a tiny Llama and generate()."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit as lk

import models

torch.set_num_threads(2)
ATOL = 1e-5
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def randomise(model: nn.Module, seed: int, std: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def tiny_llama(ranks=(4, 4, 4)) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    for name, r in zip("abc", ranks):
        cfg = lk.LoraConfig(r=r, lora_alpha=2 * r, target_modules=PROJ + ["embed_tokens"])
        lk.inject(model, cfg, adapter_name=name)
    randomise(model, 1)
    return model


@torch.no_grad()
def per_row(model: nn.Module, rows: list[str], run) -> list[torch.Tensor]:
    return models.rows_alone(model, rows, run, restore="a")


@pytest.mark.parametrize("ranks", [(4, 4, 4), (2, 8, 5)], ids=["same-rank", "mixed-ranks"])
def test_llama_rows_equal_single_runs(ranks):
    model = tiny_llama(ranks)
    x = torch.randint(0, 64, (5, 7), generator=torch.Generator().manual_seed(2))
    rows = ["b", "__base__", "a", "c", "b"]
    with torch.no_grad(), lk.mixed_batch(model, rows):
        got = model(input_ids=x).logits  # (5, 7, V)
    want = per_row(model, rows, lambda i: model(input_ids=x[i:i + 1]).logits[0])
    for i in range(len(rows)):
        torch.testing.assert_close(got[i], want[i], atol=ATOL, rtol=1e-5)
    assert (want[0] - want[2]).abs().max() > 1e-2  # the adapters really differ


def test_generate_one_adapter_per_sequence():
    model = tiny_llama((3, 6, 4))
    model.config.use_cache = True
    prompts = torch.randint(0, 64, (4, 5), generator=torch.Generator().manual_seed(3))
    rows = ["a", "c", "__base__", "b"]
    kw = dict(max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    with torch.no_grad(), lk.mixed_batch(model, rows):
        got = model.generate(prompts, attention_mask=torch.ones_like(prompts), **kw)
    one = [prompts[i:i + 1] for i in range(len(rows))]
    want = per_row(model, rows, lambda i: model.generate(one[i], attention_mask=torch.ones_like(one[i]), **kw)[0])
    assert [g.tolist() for g in got] == [w.tolist() for w in want]
    assert len({tuple(w.tolist()) for w in want}) > 1  # different adapters produce different text


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.lin = nn.Linear(6, 5)
        self.conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")
        self.conv1 = nn.Conv1d(3, 2, 2, stride=2)

    def forward(self, ids, img, seq):
        return self.lin(self.emb(ids)), self.conv(img), self.conv1(seq)


@pytest.mark.parametrize("use_grad", [False, True], ids=["no_grad", "grad"])
def test_embedding_linear_conv_rows(use_grad):
    torch.manual_seed(0)
    model = Small()
    for name, r in (("a", 2), ("b", 3)):
        cfg = lk.LoraConfig(r=r, lora_alpha=4, target_modules=["emb", "lin", "conv", "conv1"])
        lk.inject(model, cfg, adapter_name=name)
    randomise(model, 4)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 20, (3, 4), generator=g)  # (N, L)
    img, seq = torch.randn(3, 3, 5, 5, generator=g), torch.randn(3, 3, 6, generator=g)  # (N, C, H, W), (N, C, L)
    rows = ["b", "a", "__base__"]
    with torch.set_grad_enabled(use_grad), lk.mixed_batch(model, rows):
        got = model(ids, img, seq)
    want = per_row(model, rows, lambda i: model(ids[i:i + 1], img[i:i + 1], seq[i:i + 1]))
    for k in range(3):
        for i in range(3):
            torch.testing.assert_close(got[k][i], want[i][k][0], atol=ATOL, rtol=1e-5)
    if use_grad:  # gradients reach the trainable (active) adapter's factors through the batched path
        sum(o.sum() for o in got).backward()
        assert model.conv.lora_A["a"].weight.grad.abs().sum() > 0
        assert model.emb.lora_embedding_B["a"].grad.abs().sum() > 0


def _rows_equal_alone(model: nn.Module, x: torch.Tensor, rows: list[str]) -> None:
    with torch.no_grad(), lk.mixed_batch(model, rows):
        got = model(input_ids=x).logits
    want = per_row(model, rows, lambda i: model(input_ids=x[i:i + 1]).logits[0])
    for i in range(len(rows)):
        torch.testing.assert_close(got[i], want[i], atol=ATOL, rtol=1e-5)


def test_stack_cache_reused_and_invalidated():
    """Stacks are built once per block and reused by every forward in it; lorakit's own changes,
    optimizer steps and ``lk.adapters_updated()`` make them stale; a change made between blocks is
    caught on entering the next one."""
    model = tiny_llama()
    x = torch.randint(0, 64, (3, 4), generator=torch.Generator().manual_seed(6))
    rows = ["a", "b", "c"]
    layer = model.model.layers[0].self_attn.q_proj
    factors = [p for p in model.parameters() if p.requires_grad or p.dim() == 2 and p.shape[0] <= 8]

    def stack():
        return layer.__dict__["_mixed_stack"][1].A

    with torch.no_grad(), lk.mixed_batch(model, rows):
        model(input_ids=x)
        first = stack()
        model(input_ids=x)
        assert stack() is first  # nothing changed: no rebuild
        for p in factors:  # an in-place write of our own, announced
            p.mul_(1.5)
        lk.adapters_updated()
        got = model(input_ids=x).logits
        assert stack() is not first
    want = per_row(model, rows, lambda i: model(input_ids=x[i:i + 1]).logits[0])
    for i in range(3):
        torch.testing.assert_close(got[i], want[i], atol=ATOL, rtol=1e-5)

    lk.set_adapter(model, ["a", "b", "c"])  # an optimizer step: the global optimizer hook marks stacks stale
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    with lk.mixed_batch(model, rows):
        model(input_ids=x).logits.sum().backward()
        opt.step()
    lk.set_adapter(model, "a")
    _rows_equal_alone(model, x, rows)

    with torch.no_grad():  # between blocks, unannounced: seen when the next block starts
        for p in factors:
            p.mul_(0.5)
    _rows_equal_alone(model, x, rows)

    lk.delete_adapter(model, "b")  # a new "b" of another rank: new parameters, new stacks
    lk.inject(model, lk.LoraConfig(r=7, lora_alpha=3, target_modules=PROJ), adapter_name="b")
    randomise(model, 7)
    _rows_equal_alone(model, x, rows)


def test_one_stack_serves_every_mix_of_rows():
    """A layer's stack covers all the model's adapters in the model's order, so blocks whose rows
    use different adapters (alternating prefill requests) reuse it rather than rebuilding it."""
    model = tiny_llama()
    x = torch.randint(0, 64, (3, 4), generator=torch.Generator().manual_seed(7))
    layer = model.model.layers[0].self_attn.q_proj
    mixes = [["a", "b", "__base__"], ["c", "c", "a"], ["b", "__base__", "c"]]
    with torch.no_grad(), lk.mixed_batch(model, mixes[0]):
        model(input_ids=x)
    first = layer.__dict__["_mixed_stack"][1]
    for rows in mixes[1:] + mixes:
        _rows_equal_alone(model, x, rows)
        assert layer.__dict__["_mixed_stack"][1] is first


def test_dora_rows_fall_back_to_loop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5))
    lk.inject(model, lk.LoraConfig(r=2, lora_alpha=4, target_modules=["0"], use_dora=True), adapter_name="a")
    lk.inject(model, lk.LoraConfig(r=3, lora_alpha=4, target_modules=["0"]), adapter_name="b")
    randomise(model, 8)
    x = torch.randn(3, 6)
    rows = ["a", "b", "__base__"]
    with torch.no_grad(), lk.mixed_batch(model, rows):
        got = model(x)
    want = per_row(model, rows, lambda i: model(x[i:i + 1])[0])
    for i in range(3):
        torch.testing.assert_close(got[i], want[i], atol=ATOL, rtol=1e-5)


def test_errors_name_the_problem():
    model = tiny_llama()
    x = torch.randint(0, 64, (3, 4))
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['zz'\]"):
        with lk.mixed_batch(model, ["a", "zz", "b"]):
            pass
    with pytest.raises(ValueError, match="empty list"):
        with lk.mixed_batch(model, []):
            pass
    with pytest.raises(ValueError, match="2 adapter names but the batch has 3 rows"):
        with torch.no_grad(), lk.mixed_batch(model, ["a", "b"]):
            model(input_ids=x)
    lk.merge(model)
    with pytest.raises(ValueError, match="unmerge"):
        with lk.mixed_batch(model, ["a", "b", "c"]):
            pass
