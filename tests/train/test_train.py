"""The training loop: its loss against Hugging Face's, accumulation, LoRA+, the schedule, resume."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.data import TokenDataset, collate
from lorakit.models import tiny_llama
from lorakit.train import TrainConfig, fit, param_groups
from lorakit.train.losses import auto_chunk_rows, causal_lm_loss_sum, count_targets
from lorakit.train.schedule import lr_factor

torch.set_num_threads(1)
TARGETS = ["q_proj", "v_proj", "up_proj"]


def sft_dataset(tok, n=24, seed=0) -> TokenDataset:
    """Reverse a random lowercase word: prompt "abc=" -> completion "cba", loss on the answer."""
    g = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(n):
        k = int(torch.randint(2, 7, (1,), generator=g))
        word = "".join(chr(97 + int(c)) for c in torch.randint(0, 6, (k,), generator=g))
        p = [tok.bos_token_id] + tok(word + "=", add_special_tokens=False)["input_ids"]
        c = tok(word[::-1], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        examples.append({"input_ids": p + c, "labels": [-100] * len(p) + c})
    return TokenDataset(examples, "causal-lm", pad_id=tok.pad_token_id)


def lora_llama(seed=0, dropout=0.0):
    model, tok = tiny_llama(hidden_size=32, num_layers=2, seed=seed)
    # the random model's lm_head is trained in full: frozen, its tiny random weights barely move the logits
    lk.inject(model, lk.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS,
                                   modules_to_save=["lm_head"]))
    return model, tok


def adapter_tensors(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------- loss
@pytest.mark.parametrize("chunk_size", [7, None])
def test_answer_only_loss_equals_hf_loss_and_grad(chunk_size):
    model, tok = lora_llama()
    with torch.no_grad():  # a non-trivial adapter
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    ds = sft_dataset(tok, n=6)
    batch = collate(ds.examples, ds.task, ds.pad_id)
    ours = causal_lm_loss_sum(model, batch, chunk_size=chunk_size) / count_targets(batch, "causal-lm")
    g_ours = torch.autograd.grad(ours, [p for p in model.parameters() if p.requires_grad])
    ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    g_ref = torch.autograd.grad(ref, [p for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_auto_chunk_rows_bound_the_logits_of_one_chunk():
    assert auto_chunk_rows(nn.Linear(8, 8000)) == 2**21 // 8000 == 262
    assert auto_chunk_rows(nn.Linear(8, 128_256)) == 16  # never fewer than 16 rows


# ---------------------------------------------------------------- memory/precision options
def test_gradient_checkpointing_changes_memory_not_the_result():
    """Recomputing activations in backward must end at the same weights as keeping them."""
    cfg = dict(max_steps=6, lr=1e-2, batch_size=8, seed=0, progress=False, device="cpu")
    runs = []
    for ckpt in (False, True):
        model, tok = lora_llama()
        m = fit(model, sft_dataset(tok), None, TrainConfig(gradient_checkpointing=ckpt, **cfg))
        assert model.is_activation_checkpointing == ckpt
        runs.append((m["train_loss"], adapter_tensors(model)))
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-5)
    for k, v in runs[0][1].items():
        torch.testing.assert_close(runs[1][1][k], v, rtol=1e-4, atol=1e-6)


def test_bf16_autocast_runs_the_matmuls_in_bf16_and_still_learns():
    model, tok = lora_llama()
    seen = set()
    layer = model.model.layers[0].self_attn.q_proj
    layer.register_forward_hook(lambda mod, inp, out: seen.add(out.dtype) if mod.training else None)
    ds = sft_dataset(tok)
    m = fit(model, ds, ds, TrainConfig(max_steps=40, lr=1e-2, batch_size=8, bf16=True, seed=0, progress=False,
                                       device="cpu"))
    assert seen == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights and optimizer stay fp32
    first = m["history"]["train"][0]["loss"]
    assert math.isfinite(m["eval_loss"]) and m["eval_loss"] < 0.7 * first


# ---------------------------------------------------------------- optimisation
def test_fit_lowers_answer_loss_and_trains_only_requires_grad():
    model, tok = lora_llama()
    ds = sft_dataset(tok, n=32)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = adapter_tensors(model)
    m = fit(model, ds, ds, TrainConfig(max_steps=30, lr=1e-2, batch_size=8, progress=False, warmup_ratio=0.0))
    first_eval = m["history"]["eval"][0]["eval_loss"] if len(m["history"]["eval"]) > 1 else None
    assert m["eval_loss"] < m["history"]["train"][0]["loss"] * 0.6, m
    if first_eval is not None:
        assert m["eval_loss"] < first_eval
    assert math.isclose(m["perplexity"], math.exp(m["eval_loss"]), rel_tol=1e-9)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    moved = [not torch.equal(before[n], p) for n, p in model.named_parameters() if n.endswith("lora_B.default.weight")]
    assert moved and all(moved)
    assert m["trainable_params"] == sum(t.numel() for t in before.values())
    assert m["steps"] == 30 and m["tokens_per_second"] > 0 and m["peak_memory_mb"] > 0


def test_gradient_accumulation_equals_a_bigger_batch():
    ds = sft_dataset(lora_llama()[1], n=32)
    results = []
    for bs, accum in ((8, 1), (4, 2), (2, 4)):
        model, _ = lora_llama()
        fit(model, ds, None, TrainConfig(max_steps=4, lr=5e-3, batch_size=bs, grad_accum=accum, progress=False,
                                         group_by_length=False))
        results.append(adapter_tensors(model))
    for other in results[1:]:
        for n in results[0]:
            torch.testing.assert_close(other[n], results[0][n], rtol=1e-4, atol=1e-6)


def test_loraplus_gives_b_factors_a_larger_lr():
    model, _ = lora_llama()
    groups = param_groups(model, TrainConfig(lr=1e-3, loraplus_lr_ratio=16))
    b_params = {id(m.lora_B["default"].weight) for m in model.modules() if isinstance(m, lk.layers.LoraLayer)}
    slow, fast = groups
    assert slow["lr"] == 1e-3 and fast["lr"] == 16e-3
    assert {id(p) for p in fast["params"]} == b_params
    assert not {id(p) for p in slow["params"]} & b_params


def test_warmup_then_cosine():
    total, warmup = 100, 10
    assert lr_factor(0, total, warmup) == pytest.approx(1 / 11)
    assert lr_factor(9, total, warmup) == pytest.approx(10 / 11)
    for s in (10, 40, 77, 100):
        assert lr_factor(s, total, warmup) == pytest.approx(0.5 * (1 + math.cos(math.pi * (s - 10) / 90)))
    assert lr_factor(55, total, 0, "linear") == pytest.approx(0.45)


def test_nothing_to_train_is_an_error():
    model, tok = tiny_llama(hidden_size=32, num_layers=1)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters with requires_grad=True"):
        fit(model, sft_dataset(tok, n=4), None, TrainConfig(max_steps=1, progress=False))


# ---------------------------------------------------------------- checkpoint and resume
def test_interrupt_then_resume_equals_uninterrupted_run(tmp_path):
    cfg = TrainConfig(max_steps=8, lr=5e-3, batch_size=4, grad_accum=2, progress=False, seed=3)
    ds = sft_dataset(lora_llama()[1], n=20)  # 3 micro-batches per epoch: steps cross epoch boundaries

    full, _ = lora_llama(dropout=0.1)  # dropout: the RNG state must be restored too
    fit(full, ds, ds, cfg, out_dir=str(tmp_path / "full"))

    def interrupt(step, logs):
        if step == 3:
            raise KeyboardInterrupt

    part, _ = lora_llama(dropout=0.1)
    with pytest.raises(KeyboardInterrupt):
        fit(part, ds, ds, cfg, out_dir=str(tmp_path / "run"), callbacks=[interrupt])
    assert (tmp_path / "run" / "checkpoints" / "step-000003" / "state.pt").exists()

    resumed, _ = lora_llama(dropout=0.1)
    m = fit(resumed, ds, ds, cfg, out_dir=str(tmp_path / "run"), resume=str(tmp_path / "run"))
    assert m["steps"] == 8
    want, got = adapter_tensors(full), adapter_tensors(resumed)
    assert want.keys() == got.keys()
    for n in want:
        assert torch.equal(want[n], got[n]), n
    assert not any(p.name.startswith(".step") for p in (tmp_path / "run" / "checkpoints").iterdir())  # no temp left
