"""The runs of ``lorakit compare``: which methods at which learning rates, on what budget, and one run.

Every run trains on the same split of the default task (``lorakit.train.default_task``) with the same
seed, epochs and batch size; only the method and its learning rate differ. Learning rates follow the
usual ranges for each method (full fine-tuning ~5e-5; LoRA 1e-3; the small additive methods and the
linear probe higher), fixed in :data:`LINEUP` so that the table says exactly what was run.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from lorakit.compare.measure import paired_latency, size_on_disk, training_memory
from lorakit.methods import get_method

# Target sets of the rank sweep: name -> LoRA target_modules on a BERT encoder.
TARGET_SETS: dict[str, Any] = {"query": ["query"], "query,value": ["query", "value"], "all-linear": "all-linear"}


@dataclass(frozen=True)
class RunSpec:
    """One configuration to train: a table row (``label``), a method with its arguments, a learning rate."""

    label: str
    method: str
    kwargs: tuple[tuple[str, Any], ...]
    lr: float

    @property
    def key(self) -> tuple:
        """Runs with equal keys are the same experiment (the sweep reuses the lineup's LoRA run)."""
        return (self.method, self.kwargs, self.lr)


def lora_spec(r: int, targets: str, lr: float = 1e-3, init: str | None = None) -> RunSpec:
    """LoRA at rank ``r`` on a :data:`TARGET_SETS` entry; ``init``: a ``lorakit train --init`` name
    (the calibration data is the task's training set, see :mod:`lorakit.train.inits`)."""
    extra = (("init", init),) if init else ()
    return RunSpec(f"LoRA r={r} {targets}" + (f" init={init}" if init else ""), "lora",
                   (("r", r), ("target_modules", _freeze(TARGET_SETS[targets])), *extra), lr)


# The init sweep: does an initialisation change accuracy at r = 1..16? (query,value, the default job's targets)
INIT_RANKS = (1, 2, 4, 8, 16)
INIT_TARGETS = "query,value"


def init_specs(inits) -> list[RunSpec]:
    """The default init and each of ``inits`` (``lorakit train --init`` names) at every rank of :data:`INIT_RANKS`."""
    from lorakit.train.inits import init_value

    for name in inits:
        init_value(name)  # an unknown name: ValueError before anything runs
    return [lora_spec(r, INIT_TARGETS, init=i) for i in (None, *inits) for r in INIT_RANKS]


def _freeze(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


# The LoRA paper's Table 4 rows that apply to an encoder classifier, plus the linear probe as the floor.
LINEUP: tuple[RunSpec, ...] = (
    RunSpec("Head only (linear probe)", "head", (), 3e-3),
    RunSpec("BitFit", "bitfit", (), 3e-3),
    RunSpec("Prefix (P=10)", "prefix", (("num_prefix", 10),), 1e-2),
    RunSpec("Adapter (Houlsby, m=16)", "adapter", (("bottleneck", 16),), 1e-3),
    lora_spec(8, "query,value"),
    RunSpec("Full fine-tuning", "full", (), 5e-5),
)


@dataclass(frozen=True)
class Budget:
    """How much to run.

    Args:
        name: ``small`` (CI), ``quick`` (the default), ``medium`` or ``full``.
        train_limit / eval_limit: keep the first examples of each split (``None``: all).
        epochs: passes over the training data, the same for every method.
        ranks / targets: the LoRA sweep grid (``targets`` are keys of :data:`TARGET_SETS`).
        latency_reps: paired forward passes at least, per model, for the latency column (up to 4x as many
            while their spread is above 2%; see :func:`~lorakit.compare.measure.paired_latency`).
    """

    name: str
    train_limit: int | None
    eval_limit: int | None
    epochs: float
    ranks: tuple[int, ...]
    targets: tuple[str, ...]
    latency_reps: int = 30
    batch_size: int = 32
    notes: str = field(default="", compare=False)


BUDGETS: dict[str, Budget] = {
    # the test suite's run: small, yet every method learns well above the majority class (~52%)
    "small": Budget("small", 512, 300, 2, (1, 8), ("query", "all-linear"), latency_reps=10, batch_size=16,
                    notes="CI run: 512 training words, 300 test words, 2 epochs, batch 16, 4 sweep points"),
    # the default: all the data once; a few minutes on 2 CPU cores
    "quick": Budget("quick", None, None, 1, (1, 8), ("query", "all-linear"), latency_reps=20, batch_size=16,
                    notes="all data, 1 epoch, batch 16, 4 sweep points"),
    "medium": Budget("medium", None, None, 1, (1, 8, 64), ("query", "query,value", "all-linear"), latency_reps=20,
                     notes="all data, 1 epoch, batch 32, 9 sweep points"),
    # the default job's recipe (lorakit train: 5 epochs, batch 16), for every method
    "full": Budget("full", None, None, 5, (1, 2, 4, 8, 16, 64), ("query", "query,value", "all-linear"),
                   batch_size=16, notes="all data, 5 epochs, batch 16 (the default job's recipe), 18 sweep points"),
}
DEFAULT_BUDGET = "quick"


def sweep_specs(budget: Budget) -> list[RunSpec]:
    return [lora_spec(r, t) for t in budget.targets for r in budget.ranks]


def run_one(spec: RunSpec, seed: int, task, budget: Budget) -> dict[str, Any]:
    """Train ``spec`` on a fresh copy of ``task.model`` and measure it.

    Args:
        spec: what to run.
        seed: data order and dropout seed (the task's head was initialised from it too).
        task: a :class:`lorakit.train.Task` whose model stays untouched (it is the latency baseline).
        budget: epochs and latency repetitions.

    Returns:
        A flat dict: label, method, seed, lr, trainable/total params, test accuracy (after training and
        in the served form), train seconds, training memory terms, stored bytes, latency of base and
        served model.
    """
    from lorakit.data.dataset import collate
    from lorakit.train import TrainConfig, evaluate, fit

    model = copy.deepcopy(task.model)
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in spec.kwargs}
    init = kwargs.pop("init", None)
    method = get_method(spec.method, **kwargs)
    if init is None:
        method.apply(model)
    else:  # LoRA with a data-aware init: calibrated on the training set (lorakit train --init)
        from lorakit.train.inits import inject_with_init, with_init

        inject_with_init(model, with_init(method.config(model), init, None), task.train,
                         batch_size=budget.batch_size, seed=seed)
    cfg = TrainConfig(epochs=budget.epochs, lr=spec.lr, seed=seed, batch_size=budget.batch_size, progress=False)
    t0, c0 = time.perf_counter(), time.process_time()
    metrics = fit(model, task.train, task.eval, cfg)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    device = next(model.parameters()).device
    first = collate([task.train[i] for i in range(min(budget.batch_size, len(task.train)))],
                    task.train.task, task.train.pad_id)
    first = {k: v.to(device) for k, v in first.items()}
    memory = training_memory(model, lambda m: m(**first).loss)
    stored = method.stored_state(model)
    served = method.for_inference(model)
    served_acc = evaluate(served, task.eval, device=device)["eval_accuracy"]
    base = task.model.to(device)
    inputs = {k: v for k, v in first.items() if k != "labels"}
    latency = paired_latency(base, served, inputs, reps=budget.latency_reps)
    base_params = sum(p.numel() for p in task.model.parameters())
    return {
        "label": spec.label, "method": spec.method, "kwargs": {k: v for k, v in spec.kwargs}, "lr": spec.lr,
        "seed": seed, "trainable_params": metrics["trainable_params"], "base_params": base_params,
        "trainable_pct": 100.0 * metrics["trainable_params"] / base_params,
        "accuracy": 100.0 * metrics["eval_accuracy"], "served_accuracy": 100.0 * served_acc,
        "train_loss": metrics["train_loss"], "steps": metrics["steps"],
        "train_seconds": metrics["train_seconds"], "wall_seconds": wall, "cpu_seconds": cpu,
        # < 1 when other processes took this one's cores: its absolute times are then stretched (report.CONTENDED)
        "cpu_utilization": cpu / max(wall * torch.get_num_threads(), 1e-9),
        **{f"memory_{k}": v for k, v in memory.items()},
        "stored_bytes": size_on_disk(stored), "stored_tensors": len(stored),
        "latency_base_ms": latency["base_ms"], "latency_ms": latency["other_ms"],
        "latency_overhead_pct": 100.0 * (latency["ratio"] - 1.0), "latency_spread_pct": 100.0 * latency["spread"],
        "latency_pairs": latency["pairs"],
        "served_architecture": type(served).__name__, "inference": method.inference,
        "device": str(device),
    }
