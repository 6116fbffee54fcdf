"""Many adapters at once (issue 13): each row equals that row run alone with its adapter — prefill
and decoding, fp32 and bf16, after a hot swap, after training steps, after delete + re-inject —
and torch.compile agrees with eager without recompiling when the rows' adapters change."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lorakit as lk

import models

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NAMES = [f"a{i}" for i in range(6)]
TOL = {torch.float32: dict(atol=2e-5, rtol=1e-5), torch.bfloat16: dict(atol=6e-2, rtol=3e-2)}


def many(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    model = models.llama(layers=2).to(dtype)
    for i, name in enumerate(NAMES):  # ranks 2..7: stacks pad them; alphas differ
        lk.inject(model, lk.LoraConfig(r=2 + i, lora_alpha=3 + i, target_modules=PROJ, init_lora_weights=False),
                  adapter_name=name)
    return model.eval()


def alone(model: nn.Module, rows: list[str], run) -> list[torch.Tensor]:
    return models.rows_alone(model, rows, run, restore=NAMES[0])


def check_prefill(model: nn.Module, rows: list[str], dtype: torch.dtype = torch.float32) -> None:
    x = models.ids(batch=len(rows), seq=6, seed=4)
    with torch.no_grad(), lk.mixed_batch(model, rows):
        got = model(input_ids=x).logits.float()
    want = alone(model, rows, lambda i: model(input_ids=x[i:i + 1]).logits[0].float())
    for i in range(len(rows)):
        torch.testing.assert_close(got[i], want[i], **TOL[dtype])


def check_decoding(model: nn.Module, rows: list[str]) -> None:
    prompts = models.ids(batch=len(rows), seq=5, seed=5)
    kw = dict(max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=0)
    with torch.no_grad(), lk.mixed_batch(model, rows):
        got = model.generate(prompts, attention_mask=torch.ones_like(prompts), **kw)
    one = [prompts[i:i + 1] for i in range(len(rows))]
    want = alone(model, rows, lambda i: model.generate(one[i], attention_mask=torch.ones_like(one[i]), **kw)[0])
    assert [g.tolist() for g in got] == [w.tolist() for w in want]


ROWS = ["a3", "__base__", "a0", "a5", "a3", "a1", "a4", "a2"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_prefill_rows_equal_rows_alone(dtype):
    check_prefill(many(dtype), ROWS, dtype)


def test_decoding_rows_equal_rows_alone():
    model = many()
    check_decoding(model, ROWS)
    assert len({tuple(r) for r in ROWS}) > 1


def test_rows_after_hot_swap_training_and_reinject(tmp_path):
    model = many()
    check_prefill(model, ROWS)  # stacks built and cached
    donor = many()
    models.randomize_adapters(donor, seed=9)
    lk.save_adapter(donor, tmp_path, adapter_name="a3")
    lk.hotswap_adapter(model, tmp_path / "a3", adapter_name="a3")
    check_decoding(model, ROWS)

    lk.set_adapter(model, "a2")  # a few optimizer steps on one adapter
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = models.ids(batch=2, seq=6)
    for _ in range(3):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    lk.set_adapter(model, NAMES[0])
    check_prefill(model, ROWS)

    lk.delete_adapter(model, "a5")
    lk.inject(model, lk.LoraConfig(r=9, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
              adapter_name="a5")
    check_prefill(model, ROWS)
    check_decoding(model, ROWS)


def _compile_counts():
    from torch._dynamo.utils import counters

    return counters["stats"].get("unique_graphs", 0)


@pytest.mark.slow
def test_compiled_mixed_batches_agree_and_do_not_recompile_when_adapters_change():
    import torch._dynamo

    torch._dynamo.reset()
    model = many()
    compiled = torch.compile(model, backend="aot_eager")
    x = models.ids(batch=4, seq=5, seed=7)
    row_sets = [["a0", "a1", "a2", "a3"], ["a4", "a5", "__base__", "a1"], ["a2", "a2", "a2", "a0"]]
    graphs = []
    with torch.no_grad():
        for rows in row_sets:
            with lk.mixed_batch(model, rows):
                eager = model(input_ids=x).logits
                got = compiled(input_ids=x).logits
            torch.testing.assert_close(got, eager, atol=1e-5, rtol=1e-5)
            graphs.append(_compile_counts())
    assert graphs[0] == graphs[-1], graphs  # later adapter sets compiled nothing new


def test_compiled_plain_forward_has_no_graph_breaks_and_hot_swap_keeps_the_graph():
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = many()
    compiled = torch.compile(model, backend="aot_eager")
    x = models.ids(batch=2, seq=5, seed=8)
    with torch.no_grad():
        compiled(input_ids=x)
        assert not counters["graph_break"], dict(counters["graph_break"])
        graphs = _compile_counts()
        donor = copy.deepcopy(model)
        models.randomize_adapters(donor, seed=3)
        sd = {k: v for k, v in donor.state_dict().items() if ".a0." in k}
        lk.hotswap_adapter(model, sd, adapter_name="a0")  # same ranks and alphas: same storage, same graph
        torch.testing.assert_close(compiled(input_ids=x).logits, donor(input_ids=x).logits, atol=1e-5, rtol=1e-5)
    assert _compile_counts() == graphs
