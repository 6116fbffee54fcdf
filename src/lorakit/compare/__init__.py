"""``lorakit compare``: the LoRA paper's comparison (Hu et al. 2021, Table 4 and the rank study), measured.

    from lorakit.compare import compare
    result = compare("docs/compare", budget="small", seeds=1)   # results.json / .md, methods.png, sweep.png

Every method of :data:`~lorakit.compare.runs.LINEUP` and every point of the LoRA rank × target sweep is
trained on the same split of the default task with the same seeds and epochs
(:func:`lorakit.train.fit`), then measured: test accuracy, trainable parameters, train time, training
memory, size of what must be stored, and inference latency of the served model against the base.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Sequence
from typing import Any

import torch

from lorakit.compare.report import aggregate, write
from lorakit.compare.runs import (
    BUDGETS,
    DEFAULT_BUDGET,
    LINEUP,
    TARGET_SETS,
    Budget,
    RunSpec,
    init_specs,
    lora_spec,
    run_one,
    sweep_specs,
)

__all__ = ["compare", "BUDGETS", "DEFAULT_BUDGET", "LINEUP", "TARGET_SETS", "Budget", "RunSpec", "lora_spec", "run_one",
           "sweep_specs", "majority_pct"]


def majority_pct(ds) -> float:
    """Accuracy (%) of always answering the most frequent label of ``ds`` (what a model that learned nothing gets)."""
    from collections import Counter

    counts = Counter(int(e["labels"]) for e in ds.examples)
    return 100.0 * max(counts.values()) / max(1, len(ds))


def compare(out_dir: str, budget: str | Budget = DEFAULT_BUDGET, seeds: int | Sequence[int] = 1,
            methods: Sequence[str] | None = None, sweep: bool = True, progress: bool = True,
            command: str | None = None, inits: Sequence[str] = ()) -> dict[str, Any]:
    """Run the comparison and write its results into ``out_dir``.

    Args:
        out_dir: directory for results.json, results.md, methods.png and sweep.png.
        budget: a key of :data:`BUDGETS` (``small``, ``quick``, ``medium``, ``full``) or a :class:`Budget`.
        seeds: how many seeds (0, 1, ...) or the seeds themselves; >1 gives mean ± std.
        methods: restrict the lineup to these method names (``full``, ``bitfit``, ``adapter``,
            ``prefix``, ``lora``, ``head``); default all.
        sweep: also run the LoRA rank × target sweep.
        inits: also run the init sweep: LoRA on query,value at r = 1, 2, 4, 8, 16 with the default init
            and with each of these (``lorakit train --init`` names: loftq, eva, corda, lora-ga, pissa, olora).
        progress: a tqdm bar over runs.
        command: the command line to record (default: this process's argv).

    Returns:
        The dict written to results.json (``methods``, ``sweep``, ``runs``, ``budget``...).

    Raises:
        ValueError: an unknown budget or method name, or no seeds.
    """
    from dataclasses import asdict

    from tqdm.auto import tqdm

    from lorakit.train import default_task

    if isinstance(budget, str):
        if budget not in BUDGETS:
            raise ValueError(f"unknown budget {budget!r}; valid: {list(BUDGETS)}")
        budget = BUDGETS[budget]
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if not seed_list:
        raise ValueError(f"seeds must be a positive count or a non-empty list, got {seeds!r}")
    known = {s.method for s in LINEUP}
    if methods is not None and set(methods) - known:
        raise ValueError(f"unknown method(s) {sorted(set(methods) - known)}; valid: {sorted(known)}")
    lineup = [s for s in LINEUP if methods is None or s.method in methods]
    grid = sweep_specs(budget) if sweep else []
    init_grid = init_specs(inits) if inits else []
    # the sweep's r=8 q,v point is the lineup's LoRA (and the init sweep's default-init points are the sweep's)
    unique = list({s.key: s for s in [*lineup, *grid, *init_grid]}.values())

    start = time.perf_counter()
    runs: list[dict[str, Any]] = []
    by_key = {s.key: s.label for s in unique}
    env = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "machine": platform.machine()}
    result: dict[str, Any] = {}

    def report(task, plots: bool = False) -> None:  # after every run: an interrupted comparison keeps its table
        sweep_runs = [{**r, "label": s.label} for s in grid for r in runs if r["label"] == by_key[s.key]]
        init_runs = [{**r, "label": s.label, "kwargs": dict(s.kwargs)} for s in init_grid for r in runs
                     if r["label"] == by_key[s.key]]
        result.clear()
        result.update({
            "command": command or f"lorakit.compare.compare({out_dir!r}, budget={budget.name!r}, seeds={seed_list})",
            "task": "word sentiment from the VADER lexicon (words with |mean| >= 1, no emoticons), "
                    "pretrained all-MiniLM-L6-v2 + new 2-way head",
            "budget": asdict(budget), "seeds": seed_list, "complete": len(runs) == len(unique) * len(seed_list),
            "train_examples": len(task.train), "test_examples": len(task.eval),
            "majority_class_pct": majority_pct(task.eval),
            "environment": {**env, "device": runs[0]["device"]},
            "elapsed_seconds": time.perf_counter() - start,
            "methods": aggregate(runs, [s.label for s in lineup]),
            "sweep": aggregate(sweep_runs, [s.label for s in grid]),
            "inits": aggregate(init_runs, [s.label for s in init_grid]),
            "runs": runs,
        })
        result["paths"] = write(result, out_dir, plots=plots)

    bar = tqdm(total=len(unique) * len(seed_list), desc="compare", unit="run", disable=not progress,
               dynamic_ncols=True)
    for seed in seed_list:
        task = default_task(seed=seed, train_limit=budget.train_limit, eval_limit=budget.eval_limit)
        task.model.eval()
        for spec in unique:
            bar.set_postfix_str(f"{spec.label} seed={seed}")
            row = run_one(spec, seed, task, budget)
            runs.append(row)
            bar.update(1)
            bar.write(f"{spec.label:28s} seed={seed} acc={row['accuracy']:.1f}% "
                      f"trainable={row['trainable_params']:,} train={row['train_seconds']:.0f}s")
            report(task)
    bar.close()
    report(task, plots=True)  # the plots once, at the end
    return result
