"""Padding-free packing (``--packing``): the packed layout, its loss and gradients against the padded
batch's, the probe that decides whether a model keeps packed examples apart, and training end to end."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lorakit as lk
from lorakit.cli import main
from lorakit.data.dataset import IGNORE_INDEX, TokenDataset, collate, collate_packed
from lorakit.train import losses
from lorakit.train.config import TrainConfig
from lorakit.train.loop import fit
from lorakit.train.packing import packing_problem

import models

torch.set_num_threads(1)


def examples(n: int = 5, seed: int = 0) -> list[dict]:
    """SFT-like examples of different lengths: a prompt (no loss) then an answer."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        p, a = int(torch.randint(2, 6, (1,), generator=g)), int(torch.randint(1, 5, (1,), generator=g))
        ids = torch.randint(1, models.VOCAB, (p + a,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * p + ids[p:]})
    return out


def lora_llama(impl: str = "sdpa") -> nn.Module:
    model = models.llama()
    model.set_attn_implementation(impl)
    lk.inject(model, lk.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]))
    models.randomize_adapters(model, seed=1)
    return model.train()


def test_packed_layout():
    ex = examples(3)
    b = collate_packed(ex)
    lengths = [len(e["input_ids"]) for e in ex]
    assert {k: tuple(v.shape) for k, v in b.items()} == {k: (1, sum(lengths)) for k in
                                                         ("input_ids", "attention_mask", "labels", "position_ids")}
    assert b["position_ids"][0].tolist() == [i for n in lengths for i in range(n)]
    assert b["input_ids"][0].tolist() == [t for e in ex for t in e["input_ids"]]
    starts = [sum(lengths[:i]) for i in range(len(ex))]
    assert all(b["labels"][0, s] == IGNORE_INDEX for s in starts)  # no prediction across a boundary
    padded = collate(ex, "causal-lm", pad_id=0)
    assert losses.count_targets(b, "causal-lm") == losses.count_targets(padded, "causal-lm") > 0


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("split", [True, False], ids=["chunked-head", "model-logits"])
def test_packed_loss_and_gradients_equal_the_padded_batch(impl, split, monkeypatch):
    if not split:  # the fallback that takes the model's own logits
        monkeypatch.setattr(losses, "split_lm", lambda model: None)
    model = lora_llama(impl)
    ex = examples(5)
    grads = []
    for batch in (collate(ex, "causal-lm", pad_id=0), collate_packed(ex)):
        model.zero_grad(set_to_none=True)
        loss = losses.causal_lm_loss_sum(model, batch, chunk_size=3)
        loss.backward()
        grads.append((float(loss.detach()),
                      {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (padded, g_pad), (packed, g_pack) = grads
    assert packed == pytest.approx(padded, rel=1e-5)
    leaky = dict(collate_packed(ex), position_ids=torch.arange(sum(len(e["input_ids"]) for e in ex))[None])
    with torch.no_grad():  # control: without the restarts the examples see each other, and the loss moves
        assert float(losses.causal_lm_loss_sum(model, leaky)) != pytest.approx(padded, rel=1e-3)
    for n in g_pad:
        assert g_pad[n].abs().max() > 0, n
        torch.testing.assert_close(g_pack[n], g_pad[n], rtol=1e-4, atol=1e-6, msg=n)


def test_the_probe_accepts_a_model_that_keeps_examples_apart():
    for impl in ("sdpa", "eager"):
        model = lora_llama(impl)
        assert packing_problem(model) is None
        assert model.training  # the mode is restored


class _Leaky(nn.Module):
    """A causal 'LM' whose every position sees all earlier tokens, boundaries or not."""

    def __init__(self, raises: bool = False) -> None:
        super().__init__()
        self.config = SimpleNamespace(vocab_size=50)
        self.emb, self.head, self.raises = nn.Embedding(50, 8), nn.Linear(8, 50), raises

    def forward(self, input_ids, position_ids=None, use_cache=None):
        if self.raises and position_ids is not None:
            raise TypeError("forward() got an unexpected keyword argument 'position_ids'")
        h = self.emb(input_ids).cumsum(1)  # (B, T, 8): attends across everything before
        return SimpleNamespace(logits=self.head(h))


def test_the_probe_refuses_a_model_that_leaks_or_fails():
    assert "see each other" in packing_problem(_Leaky())
    assert "packed forward failed (TypeError" in packing_problem(_Leaky(raises=True))
    assert "vocab_size" in packing_problem(nn.Linear(2, 2))


def _sft(n: int = 24) -> TokenDataset:
    return TokenDataset(examples(n, seed=3), "causal-lm", pad_id=0)


def test_fit_with_packing_ends_at_the_padded_runs_adapter(monkeypatch):
    import lorakit.train.distributed as distributed

    packed_rows = []
    monkeypatch.setattr(distributed, "collate_packed", lambda ex: packed_rows.append(len(ex)) or collate_packed(ex))
    runs = []
    for packing in (False, True):
        model = models.llama()
        lk.inject(model, lk.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        cfg = TrainConfig(max_steps=6, batch_size=6, lr=1e-2, progress=False, packing=packing, device="cpu")
        fit(model, _sft(), None, cfg)
        runs.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    assert packed_rows == [6] * 6  # the packed run packed every micro-batch, the padded one none
    for n in runs[0]:
        torch.testing.assert_close(runs[1][n], runs[0][n], rtol=1e-4, atol=2e-5, msg=n)
    assert any(t.abs().max() > 0 for n, t in runs[0].items() if "lora_B" in n)  # it trained


def test_fit_falls_back_to_padding_with_a_note(capsys, monkeypatch):
    import lorakit.train.packing as packing

    monkeypatch.setattr(packing, "packing_problem", lambda model, device=None: "its attention (x) leaks")
    model = models.llama()
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["q_proj"]))
    fit(model, _sft(8), None, TrainConfig(max_steps=1, batch_size=4, progress=False, packing=True, device="cpu"))
    assert "packing off: its attention (x) leaks; batches are padded" in capsys.readouterr().err
    with pytest.raises(ValueError, match="packing applies to causal-lm"):
        ds = TokenDataset([{"input_ids": [1, 2], "labels": 0}], "seq-cls")
        fit(nn.Linear(2, 2), ds, None, TrainConfig(max_steps=1, progress=False, packing=True, device="cpu"))


def test_cli_packing_and_attention_implementation(tmp_path):
    llama_dir = models.save_tiny_llama(tmp_path / "llama")
    sft = models.write_reverse_sft(tmp_path / "sft.jsonl", n=30)
    common = ["train", "--model", llama_dir, "--data", sft, "--task", "causal-lm", "--r", "4", "--lr", "1e-2",
              "--batch-size", "8", "--max-steps", "4", "--eval-split", "0.2", "--threads", "1", "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "padded")]) == 0
    assert main([*common, "--packing", "--attn-implementation", "eager", "--out", str(tmp_path / "packed")]) == 0
    a, b = (load_file(str(tmp_path / r / "adapter" / "adapter_model.safetensors")) for r in ("padded", "packed"))
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=2e-5, msg=k)
    assert main([*common, "--attn-implementation", "no_such_attention", "--out", str(tmp_path / "bad")]) == 1
