"""Aggregate runs over seeds and write results.json, results.md and the plots."""

from __future__ import annotations

import json
import math
import os
import statistics
from typing import Any

# per-run numbers that get a mean and a standard deviation over seeds
NUMERIC = ("accuracy", "served_accuracy", "train_seconds", "cpu_utilization", "memory_total_mb", "memory_weights_mb",
           "memory_grads_mb", "memory_optimizer_mb", "memory_activations_mb", "latency_base_ms", "latency_ms",
           "latency_overhead_pct", "latency_spread_pct", "train_loss")
LEARNED_MARGIN = 5.0  # points above the majority class a method must reach before a claim about it is made
# CPU time / (wall time × threads) below this during training: the process did not get its cores (other load),
# so its absolute times say more about the machine than about the method
CONTENDED = 0.7
DID_NOT_LEARN = "†"
CONTENTION = "‡"
# per-run facts that are the same for every seed
FIXED = ("label", "method", "kwargs", "lr", "trainable_params", "base_params", "trainable_pct", "stored_bytes",
         "stored_tensors", "served_architecture", "inference", "steps")


def aggregate(runs: list[dict[str, Any]], labels: list[str]) -> list[dict[str, Any]]:
    """One row per label (in ``labels`` order): the fixed facts, and ``<x>_mean`` / ``<x>_std`` (sample
    standard deviation; 0 for one seed) of every :data:`NUMERIC` field, plus ``seeds``."""
    rows = []
    for label in labels:
        mine = [r for r in runs if r["label"] == label]
        if not mine:
            continue
        row = {k: mine[0][k] for k in FIXED}
        row["seeds"] = [r["seed"] for r in mine]
        for k in NUMERIC:
            xs = [float(r[k]) for r in mine if k in r]
            if not xs:  # a field older results do not have
                continue
            row[f"{k}_mean"] = statistics.fmean(xs)
            row[f"{k}_std"] = statistics.stdev(xs) if len(xs) > 1 else 0.0
        rows.append(row)
    return rows


def _pm(row: dict[str, Any], key: str, digits: int = 1) -> str:
    mean, std = row[f"{key}_mean"], row[f"{key}_std"]
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(row["seeds"]) > 1 else f"{mean:.{digits}f}"


def verdict(methods: list[dict[str, Any]], majority: float | None = None) -> list[str]:
    """The paper's claims checked against the measured rows (lines of Markdown).

    ``majority``: the test set's majority-class accuracy (%). A claim about accuracy is made only for
    methods that learned — at least :data:`LEARNED_MARGIN` points above it; otherwise the line says
    the budget did not show it, rather than "met" on numbers that are all the majority class.
    """
    by = {r["method"]: r for r in methods}
    if not {"lora", "full", "head"} <= set(by):
        return ["(the claims need the lora, full and head rows)"]
    lora, full, head = by["lora"], by["full"], by["head"]

    def learned(row: dict[str, Any]) -> bool:
        return majority is None or row["accuracy_mean"] >= majority + LEARNED_MARGIN

    def not_shown(rows: list[dict[str, Any]]) -> str:
        names = " and ".join(r["label"] for r in rows)
        return (f" → **not shown**: {names} stayed within {LEARNED_MARGIN:g} points of the majority class "
                f"({majority:.1f}%) at this budget; run a larger budget.")

    n = len(lora["seeds"])
    gap = lora["accuracy_mean"] - full["accuracy_mean"]
    # standard error of a difference of two means over n seeds each
    se = math.sqrt((lora["accuracy_std"] ** 2 + full["accuracy_std"] ** 2) / n) if n > 1 else float("nan")
    ratio = 100.0 * lora["trainable_params"] / full["trainable_params"]
    lift = lora["accuracy_mean"] - head["accuracy_mean"]
    unlearned = [r for r in (lora, full) if not learned(r)]
    floor_flat = (f" → **not shown**: {head['label']} did not learn (it stayed within {LEARNED_MARGIN:g} points of the "
                  f"majority class, {majority:.1f}%), so the gap is to a floor that never trained, not to a linear "
                  "probe; run a larger budget." if not learned(head) else "")
    lines = [
        f"- LoRA − full fine-tuning: **{gap:+.2f} points** (target: within 1 point)"
        + (f", standard error of the difference {se:.2f} over {n} seeds" if n > 1 else ", one seed")
        + (not_shown(unlearned) if unlearned else f" → {'met' if gap >= -1.0 else 'not met'}."),
        f"- LoRA trains **{ratio:.2f}%** of full fine-tuning's parameters (target: < 1%) → "
        f"{'met' if ratio < 1.0 else 'not met'}.",
        f"- LoRA − head only: **{lift:+.2f} points** (target: ≥ 10)"
        + (not_shown([lora]) if not learned(lora) else floor_flat or f" → {'met' if lift >= 10.0 else 'not met'}."),
    ]
    for name, title in (("adapter", "Houlsby adapters"), ("prefix", "prefix tuning"), ("bitfit", "BitFit")):
        if name in by:
            d = lora["accuracy_mean"] - by[name]["accuracy_mean"]
            lines.append(f"- LoRA − {title}: {d:+.2f} points.")
    if majority is not None:
        lines.append(f"- Majority class of the test set: {majority:.1f}% (a model that learned nothing scores this).")
    return lines


def did_not_learn(row: dict[str, Any], majority: float | None) -> bool:
    """Whether a row's accuracy stayed within :data:`LEARNED_MARGIN` points of the majority class."""
    return majority is not None and row["accuracy_mean"] < majority + LEARNED_MARGIN


def contended(row: dict[str, Any], device: str = "cpu") -> bool:
    """Whether a CPU row's training ran short of its cores (CPU time / (wall × threads) < :data:`CONTENDED`)."""
    u = row.get("cpu_utilization_mean")
    return device.startswith("cpu") and u is not None and u < CONTENDED


def _acc(row: dict[str, Any], majority: float | None) -> str:
    return _pm(row, "accuracy") + (f" {DID_NOT_LEARN}" if did_not_learn(row, majority) else "")


def _seconds(row: dict[str, Any], device: str) -> str:
    return _pm(row, "train_seconds", 0) + (f" {CONTENTION}" if contended(row, device) else "")


def flags_note(rows: list[dict[str, Any]], majority: float | None, device: str) -> list[str]:
    """Footnotes for the flags the rows carry (none when no row is flagged)."""
    notes = []
    if any(did_not_learn(r, majority) for r in rows):
        notes.append(f"{DID_NOT_LEARN} did not learn: within {LEARNED_MARGIN:g} points of the majority class "
                     f"({majority:.1f}%); no claim is made from it.")
    busy = [r for r in rows if contended(r, device)]
    if busy:
        worst = min(r["cpu_utilization_mean"] for r in busy)
        notes.append(f"{CONTENTION} timed under contention: the training process got as little as {worst:.0%} of "
                     f"its {device} cores (CPU time / (wall time × threads) < {CONTENDED:.0%}), so other load "
                     "stretched its absolute times; compare the ratios (latency `vs base`, paired), not the seconds.")
    return notes


def _vs_base(row: dict[str, Any]) -> str:
    spread = row.get("latency_spread_pct_mean")
    return f"{row['latency_overhead_pct_mean']:+.0f}%" + (f" ± {spread:.0f}%" if spread is not None else "")


def markdown(result: dict[str, Any]) -> str:
    """results.md: how it was made, the method table, the claims, the rank × target sweep."""
    b, methods, sweep = result["budget"], result["methods"], result["sweep"]
    seeds = result["seeds"]
    majority, device = result.get("majority_class_pct"), result["environment"]["device"]
    out = [
        "# lorakit compare — the LoRA paper's comparison, measured",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Task: {result['task']}. Budget `{b['name']}` ({b['notes']}): {result['train_examples']} training / "
        f"{result['test_examples']} test examples, {b['epochs']:g} epoch(s), batch {b['batch_size']}, "
        f"seeds {seeds}{' (mean ± sample std)' if len(seeds) > 1 else ''}. Device: {result['environment']['device']}, "
        f"torch {result['environment']['torch']}, {result['environment']['threads']} thread(s). "
        f"Total time {result['elapsed_seconds'] / 60:.1f} min.",
        "",
        *([] if result.get("complete", True) else
          [f"**Partial results: {len(result.get('runs', []))} runs finished when this was written.**", ""]),
        "| Method | LR | Trainable params | % of base | Test acc. (%) | Train s | Train memory (MiB) "
        "| Stored (MiB) | Latency (ms) | vs base | Served as |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in methods:
        out.append(
            f"| {r['label']} | {r['lr']:g} | {r['trainable_params']:,} | {r['trainable_pct']:.3f} | "
            f"{_acc(r, majority)} | {_seconds(r, device)} | {r['memory_total_mb_mean']:.1f} | "
            f"{r['stored_bytes'] / 2**20:.2f} | {r['latency_ms_mean']:.2f} | {_vs_base(r)} | {r['inference']} |")
    out += ["", *flags_note(methods + sweep, majority, device)]
    out += [
        "",
        "Train memory = weights + gradients + AdamW state + activations saved for backward on one batch, "
        "each summed from the real tensors of a training step (not the process RSS). Stored = the tensors "
        "that must be kept per task beside the base checkpoint (safetensors file size). Latency = median "
        "forward time of the served model on one batch; `vs base` = the median ratio to the untouched base "
        "model over paired calls (alternating which goes first, repeated until the spread is at most 2% or "
        "the budget's cap), ± half the interquartile range of those ratios. A difference within the ± is noise: "
        "models served in the base architecture (merged LoRA, BitFit, head, full) run the same computation as "
        "the base.",
        "",
        "## The paper's claims on this task",
        "",
        *verdict(methods, result.get("majority_class_pct")),
        "",
        "![methods](methods.png)",
        "",
    ]
    if sweep:
        ranks = sorted({r["kwargs"]["r"] for r in sweep})
        targets = list(dict.fromkeys(r["label"].split(" ", 2)[2] for r in sweep))
        cell = {(r["kwargs"]["r"], r["label"].split(" ", 2)[2]): r for r in sweep}
        out += ["## LoRA rank × target modules", "",
                "Test accuracy (%) and trainable parameters (head included); lr 1e-3, alpha = 2r.", "",
                "| r | " + " | ".join(targets) + " |", "|---:|" + "---:|" * len(targets)]
        for rank in ranks:
            cells = [f"{_acc(cell[(rank, t)], majority)} ({cell[(rank, t)]['trainable_params']:,})"
                     if (rank, t) in cell else "—" for t in targets]
            out.append(f"| {rank} | " + " | ".join(cells) + " |")
        out += ["", "![sweep](sweep.png)", ""]
    out += init_table(result.get("inits") or [])
    return "\n".join(out)


def init_table(rows: list[dict[str, Any]]) -> list[str]:
    """The init sweep as Markdown lines: rank × init, test accuracy (%); [] without one."""
    if not rows:
        return []
    inits = list(dict.fromkeys(r["kwargs"].get("init") or "default" for r in rows))
    cell = {(r["kwargs"]["r"], r["kwargs"].get("init") or "default"): r for r in rows}
    out = ["## LoRA rank × initialisation (query,value)", "",
           "Test accuracy (%); lr 1e-3, alpha = 2r. `default`: A Kaiming-uniform, B = 0. The data-aware inits "
           "are calibrated on the training set (`lorakit train --init`: corda and lora-ga on 256 examples, eva "
           "until its components converge).", "",
           "| r | " + " | ".join(inits) + " |", "|---:|" + "---:|" * len(inits)]
    for rank in sorted({k[0] for k in cell}):
        out.append(f"| {rank} | " + " | ".join(_pm(cell[(rank, i)], "accuracy") if (rank, i) in cell else "—"
                                                for i in inits) + " |")
    return out + [""]


def plot_methods(methods: list[dict[str, Any]], path: str) -> None:
    """Bar chart: test accuracy per method (± std), annotated with the trainable share."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=110)
    xs = range(len(methods))
    ax.bar(xs, [r["accuracy_mean"] for r in methods], yerr=[r["accuracy_std"] for r in methods],
           color=["#c44e52" if r["method"] == "lora" else "#4c72b0" for r in methods], capsize=4)
    for x, r in zip(xs, methods):
        pct = r["trainable_pct"]
        ax.text(x, r["accuracy_mean"] + 0.5, f"{pct:.2g}%" if pct < 10 else f"{pct:.0f}%", ha="center",
                va="bottom", fontsize=8)
    ax.set_xticks(list(xs), [r["label"] for r in methods], rotation=20, ha="right", fontsize=8)
    low = min(r["accuracy_mean"] for r in methods)
    ax.set_ylim(max(0.0, low - 10), 100)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Fine-tuning methods on the default task (label: trainable % of base)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_sweep(sweep: list[dict[str, Any]], path: str, majority: float | None = None) -> list[str]:
    """Accuracy vs trainable parameters (log x), one line per target set, points labelled by rank; the
    points that did not learn are circled in red and labelled, over a dashed line at the majority class.

    Returns:
        The labels of the points flagged as not learned.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in sweep:
        groups.setdefault(r["label"].split(" ", 2)[2], []).append(r)
    for target, rows in groups.items():
        rows = sorted(rows, key=lambda r: r["trainable_params"])
        ax.errorbar([r["trainable_params"] for r in rows], [r["accuracy_mean"] for r in rows],
                    yerr=[r["accuracy_std"] for r in rows], marker="o", capsize=3, label=target)
        for r in rows:
            flat = did_not_learn(r, majority)
            ax.annotate(f"r={r['kwargs']['r']}" + (" (did not learn)" if flat else ""),
                        (r["trainable_params"], r["accuracy_mean"]), fontsize=7, textcoords="offset points",
                        xytext=(3, -10), color="#c44e52" if flat else "black")
    flagged = [r for r in sweep if did_not_learn(r, majority)]
    if flagged:
        ax.scatter([r["trainable_params"] for r in flagged], [r["accuracy_mean"] for r in flagged], s=140,
                   facecolors="none", edgecolors="#c44e52", linewidths=1.5, zorder=5,
                   label=f"did not learn (< majority + {LEARNED_MARGIN:g})")
    if majority is not None:
        ax.axhline(majority, color="grey", linestyle="--", linewidth=1, label=f"majority class {majority:.1f}%")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale, head included)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("LoRA: rank × target modules", fontsize=10)
    ax.legend(title="targets", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return [r["label"] for r in flagged]


def write(result: dict[str, Any], out_dir: str, plots: bool = True) -> dict[str, str]:
    """Write results.json, results.md and, with ``plots``, methods.png and (with a sweep) sweep.png;
    returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "results.json"), "md": os.path.join(out_dir, "results.md"),
             "methods_png": os.path.join(out_dir, "methods.png")}
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    with open(paths["md"], "w", encoding="utf-8") as f:
        f.write(markdown(result))
    if not plots:
        return paths
    if result["methods"]:
        plot_methods(result["methods"], paths["methods_png"])
    if result["sweep"]:
        paths["sweep_png"] = os.path.join(out_dir, "sweep.png")
        plot_sweep(result["sweep"], paths["sweep_png"], result.get("majority_class_pct"))
    return paths
