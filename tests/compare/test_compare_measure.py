"""compare's measurements and report, on a tiny BERT and on hand-made rows (fast, no pretrained model)."""

from __future__ import annotations

import statistics

import pytest
import torch

from lorakit.compare.measure import paired_latency, size_on_disk, training_memory
from lorakit.compare.report import aggregate, markdown, verdict
from lorakit.methods import get_method

from models import tiny_bert

torch.set_num_threads(1)
MiB = 2**20


def _batch():
    ids = torch.randint(1, 100, (4, 6), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1, 0, 1])}


def _memory(name: str):
    model = tiny_bert()
    get_method(name).apply(model)
    b = _batch()
    return model, training_memory(model, lambda m: m(**b).loss)


def test_full_finetuning_memory_terms_are_weights_grads_and_two_adam_moments():
    model, mem = _memory("full")
    params = list(model.parameters())
    weights = sum(p.numel() * 4 for p in params)
    assert mem["weights_mb"] * MiB == weights
    assert mem["grads_mb"] * MiB == weights
    # AdamW keeps exp_avg and exp_avg_sq (fp32, like the weight) and a scalar fp32 step per parameter
    assert mem["optimizer_mb"] * MiB == 2 * weights + 4 * len(params)
    assert mem["total_mb"] == pytest.approx(sum(v for k, v in mem.items() if k != "total_mb"))
    assert all(p.grad is None for p in params)  # the measurement leaves nothing behind


def test_memory_orders_methods_and_head_only_stores_few_activations():
    mems = {n: _memory(n)[1] for n in ("head", "lora", "full")}
    assert mems["head"]["grads_mb"] < mems["lora"]["grads_mb"] < mems["full"]["grads_mb"]
    assert mems["head"]["activations_mb"] < mems["lora"]["activations_mb"]
    assert mems["head"]["total_mb"] < mems["lora"]["total_mb"] < mems["full"]["total_mb"]


def test_size_on_disk_is_the_tensor_bytes_plus_a_small_header():
    tensors = {"a": torch.zeros(100, 10), "b": torch.ones(7, dtype=torch.float16)}
    n = size_on_disk(tensors)
    assert 100 * 10 * 4 + 7 * 2 < n < 100 * 10 * 4 + 7 * 2 + 1024


def test_paired_latency_is_positive_restores_modes_and_reports_its_spread():
    base, other = tiny_bert(), tiny_bert()
    other.train()
    b = {k: v for k, v in _batch().items() if k != "labels"}
    lat = paired_latency(base, other, b, reps=4, warmup=1, max_reps=12)
    assert lat["base_ms"] > 0 and lat["other_ms"] > 0 and lat["ratio"] > 0
    assert 4 <= lat["pairs"] <= 12 and lat["spread"] >= 0
    assert lat["pairs"] == 12 or lat["spread"] <= 0.02  # it stops early only once the spread is small
    assert not base.training and other.training
    # an impossible target: it times the cap and says how noisy that was
    lat = paired_latency(base, other, b, reps=3, warmup=0, max_reps=5, target_spread=-1.0)
    assert lat["pairs"] == 5


def _row(label, method, seed, acc, params=100):
    return {"label": label, "method": method, "kwargs": {}, "lr": 1e-3, "trainable_params": params,
            "base_params": 1000, "trainable_pct": params / 10, "stored_bytes": 4 * params, "stored_tensors": 1,
            "served_architecture": "M", "inference": "as is", "steps": 1, "seed": seed, "accuracy": acc,
            "served_accuracy": acc, "train_seconds": 1.0, "memory_total_mb": 1.0, "memory_weights_mb": 1.0,
            "memory_grads_mb": 0.0, "memory_optimizer_mb": 0.0, "memory_activations_mb": 0.0,
            "latency_base_ms": 1.0, "latency_ms": 1.0, "latency_overhead_pct": 0.0, "latency_spread_pct": 1.0,
            "train_loss": 0.5}


def test_aggregate_gives_mean_and_sample_std_per_label_in_order():
    runs = [_row("B", "lora", s, a) for s, a in enumerate([80.0, 82.0, 84.0])] + [_row("A", "full", 0, 90.0)]
    rows = aggregate(runs, ["A", "B", "missing"])
    assert [r["label"] for r in rows] == ["A", "B"]
    assert rows[1]["accuracy_mean"] == 82.0
    assert rows[1]["accuracy_std"] == pytest.approx(statistics.stdev([80.0, 82.0, 84.0]))
    assert rows[0]["accuracy_std"] == 0.0 and rows[1]["seeds"] == [0, 1, 2]


def test_verdict_checks_the_three_targets_from_the_rows():
    ok = aggregate([_row("L", "lora", 0, 89.5, 5), _row("F", "full", 0, 90.0, 1000), _row("H", "head", 0, 70.0, 2)],
                   ["L", "F", "H"])
    lines = verdict(ok)
    assert "-0.50 points" in lines[0] and lines[0].endswith("met.") and "not met" not in lines[0]
    assert "0.50%" in lines[1] and "not met" not in lines[1]
    assert "+19.50 points" in lines[2] and "not met" not in lines[2]
    bad = aggregate([_row("L", "lora", 0, 85.0, 50), _row("F", "full", 0, 90.0, 1000), _row("H", "head", 0, 80.0)],
                    ["L", "F", "H"])
    assert all("not met" in line for line in verdict(bad)[:3])


def test_verdict_claims_nothing_a_budget_that_did_not_learn_did_not_show():
    """Issue 11 #24: every method at the majority class (52.0%) printed "→ met"."""
    flat = aggregate([_row("L", "lora", 0, 52.0, 5), _row("F", "full", 0, 52.0, 1000), _row("H", "head", 0, 52.0, 2)],
                     ["L", "F", "H"])
    lines = verdict(flat, majority=52.0)
    assert "not shown" in lines[0] and "met" not in lines[0].replace("not shown", "")
    assert "met" in lines[1] and "not shown" not in lines[1]  # a parameter count needs no learning
    assert "not shown" in lines[2] and "majority class (52.0%)" in lines[2]
    assert lines[-1].startswith("- Majority class of the test set: 52.0%")
    learned = aggregate([_row("L", "lora", 0, 89.5, 5), _row("F", "full", 0, 90.0, 1000),
                         _row("H", "head", 0, 52.0, 2)], ["L", "F", "H"])
    lines = verdict(learned, majority=52.0)
    assert lines[0].endswith("→ met.")
    # the head-only floor sat at the majority class: a gap to it shows nothing (it claimed "+37.50 → met")
    assert "not shown" in lines[2] and "H did not learn" in lines[2] and "met" not in lines[2].replace("not shown", "")


def test_markdown_has_a_row_per_method_and_the_command():
    methods = aggregate([_row("L", "lora", 0, 89.5), _row("F", "full", 0, 90.0), _row("H", "head", 0, 70.0)],
                        ["L", "F", "H"])
    result = {"command": "lorakit compare --budget small", "budget": {"name": "small", "notes": "n", "epochs": 1,
              "batch_size": 32}, "seeds": [0], "train_examples": 10, "test_examples": 5, "task": "t",
              "environment": {"device": "cpu", "torch": "x", "threads": 1}, "elapsed_seconds": 60.0,
              "methods": methods, "sweep": []}
    md = markdown(result)
    assert "`lorakit compare --budget small`" in md
    assert sum(line.startswith(("| L |", "| F |", "| H |")) for line in md.splitlines()) == 3


def _result(methods, sweep, majority=52.0):
    return {"command": "c", "budget": {"name": "small", "notes": "n", "epochs": 1, "batch_size": 32}, "seeds": [0],
            "train_examples": 10, "test_examples": 5, "task": "t", "majority_class_pct": majority,
            "environment": {"device": "cpu", "torch": "x", "threads": 2}, "elapsed_seconds": 60.0,
            "methods": methods, "sweep": sweep}


def _sweep_row(r, target, acc):
    return {**_row(f"LoRA r={r} {target}", "lora", 0, acc), "kwargs": {"r": r}}


def test_rows_that_did_not_learn_are_flagged_in_the_tables_and_the_plot(tmp_path):
    from lorakit.compare.report import plot_sweep

    methods = aggregate([_row("L", "lora", 0, 89.5), _row("F", "full", 0, 90.0), _row("H", "head", 0, 52.0)],
                        ["L", "F", "H"])
    sweep = aggregate([_sweep_row(1, "query", 88.0), _sweep_row(64, "all-linear", 52.0)],
                      ["LoRA r=1 query", "LoRA r=64 all-linear"])
    md = markdown(_result(methods, sweep))
    lines = md.splitlines()
    assert next(x for x in lines if x.startswith("| H |")).count("52.0 †") == 1
    assert "89.5 †" not in md and "88.0 †" not in md
    assert next(x for x in lines if x.startswith("| 64 |")).count("52.0 †") == 1
    assert "† did not learn: within 5 points of the majority class (52.0%)" in md
    flagged = plot_sweep(sweep, str(tmp_path / "sweep.png"), majority=52.0)
    assert flagged == ["LoRA r=64 all-linear"] and (tmp_path / "sweep.png").stat().st_size > 0


def test_timings_under_contention_are_flagged_and_quiet_ones_are_not():
    busy = [{**_row("L", "lora", 0, 89.5), "cpu_utilization": 0.3}, {**_row("F", "full", 0, 90.0),
                                                                       "cpu_utilization": 0.95}]
    methods = aggregate(busy, ["L", "F"])
    md = markdown(_result(methods, []))
    assert next(x for x in md.splitlines() if x.startswith("| L |")).count(" ‡ |") == 1
    assert " ‡ |" not in next(x for x in md.splitlines() if x.startswith("| F |"))
    assert "‡ timed under contention: the training process got as little as 30% of its cpu cores" in md
    quiet = markdown(_result(aggregate([{**_row("F", "full", 0, 90.0), "cpu_utilization": 0.95}], ["F"]), []))
    assert "‡" not in quiet
