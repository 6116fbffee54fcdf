"""Watching a run: eval lines, progress lines for logs, and experiment trackers (``--report-to``).

Every reporter is a callback of :func:`lorakit.train.fit`: called as ``cb(step, logs)`` after each
optimizer step (``loss``, ``lr``, ``tok/s``), and, when it has one, ``cb.on_eval(step, metrics)``
after each evaluation (``eval_loss``, ``eval_accuracy`` or ``perplexity``); ``close()`` ends it.

Trackers (imported only when asked for; each is an extra of ``pyproject.toml``):

* ``tensorboard``: event files under ``<run>/tensorboard/`` (``torch.utils.tensorboard``);
* ``wandb``: ``wandb.init(project=$WANDB_PROJECT or "lorakit", dir=<run>)``;
* ``mlflow``: a run in the tracking URI MLflow is configured with (``$MLFLOW_TRACKING_URI``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

from lorakit.extras import require

REPORTERS = ("tensorboard", "wandb", "mlflow", "none")


def notify_eval(callbacks: Sequence[Any], step: int, metrics: dict[str, float]) -> None:
    """Hand an evaluation's metrics to every callback that has ``on_eval``."""
    for cb in callbacks:
        on_eval = getattr(cb, "on_eval", None)
        if on_eval is not None:
            on_eval(step, metrics)


def parse_report_to(value: str | Sequence[str] | None) -> list[str]:
    """``"tensorboard,wandb"`` / a list -> the tracker names; ``none`` or empty -> [].

    Raises:
        ValueError: an unknown name.
    """
    if value is None:
        return []
    names = [v.strip() for v in (value.split(",") if isinstance(value, str) else value) if v.strip()]
    bad = [n for n in names if n not in REPORTERS]
    if bad:
        raise ValueError(f"--report-to {bad} unknown; choose from {list(REPORTERS)} (comma-separated)")
    return [n for n in names if n != "none"]


def _write(line: str) -> None:
    """One line on stderr, above a tqdm bar if there is one."""
    try:
        from tqdm import tqdm

        tqdm.write(line, file=sys.stderr)
    except ImportError:
        print(line, file=sys.stderr, flush=True)


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float)))


class EvalPrinter:
    """Prints ``eval step S/T: eval_loss=... eval_accuracy=...`` after every evaluation."""

    def __init__(self, total: int) -> None:
        self.total = total

    def __call__(self, step: int, logs: dict[str, float]) -> None:
        pass

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        _write(f"eval  step {step}/{self.total}: {_fmt(metrics)}")


class StepPrinter:
    """Plain progress lines every ``every`` steps (for a log file, where a bar would write ``\\r`` updates)."""

    def __init__(self, total: int, every: int | None = None) -> None:
        self.total, self.every = total, every or max(1, total // 20)

    def __call__(self, step: int, logs: dict[str, float]) -> None:
        if step % self.every == 0 or step == self.total:
            _write(f"train step {step}/{self.total}: loss={logs['loss']:.4g} lr={logs['lr']:.3g} "
                   f"tok/s={logs['tok/s']:.0f}")


class TensorBoardReporter:
    """Scalars ``train/loss``, ``train/lr``, ``train/tokens_per_second`` and ``eval/<metric>``."""

    def __init__(self, log_dir: str, config: dict[str, Any]) -> None:
        require("tensorboard", "--report-to tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=log_dir)
        self.writer.add_text("config", "\n".join(f"    {k}: {v!r}" for k, v in sorted(config.items())))

    def __call__(self, step: int, logs: dict[str, float]) -> None:
        self.writer.add_scalar("train/loss", logs["loss"], step)
        self.writer.add_scalar("train/lr", logs["lr"], step)
        self.writer.add_scalar("train/tokens_per_second", logs["tok/s"], step)

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(f"eval/{k.removeprefix('eval_')}", v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbReporter:
    def __init__(self, out_dir: str, config: dict[str, Any]) -> None:
        self.wandb = require("wandb", "--report-to wandb")
        self.run = self.wandb.init(project=os.environ.get("WANDB_PROJECT", "lorakit"), dir=out_dir, config=config,
                                   name=os.path.basename(os.path.abspath(out_dir)))

    def __call__(self, step: int, logs: dict[str, float]) -> None:
        self.run.log({"train/loss": logs["loss"], "train/lr": logs["lr"], "train/tokens_per_second": logs["tok/s"]},
                     step=step)

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log({f"eval/{k.removeprefix('eval_')}": v for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowReporter:
    def __init__(self, out_dir: str, config: dict[str, Any]) -> None:
        self.mlflow = require("mlflow", "--report-to mlflow")
        self.mlflow.start_run(run_name=os.path.basename(os.path.abspath(out_dir)))
        self.mlflow.log_params({k: str(v)[:500] for k, v in config.items()})

    def __call__(self, step: int, logs: dict[str, float]) -> None:
        self.mlflow.log_metrics({"train_loss": logs["loss"], "lr": logs["lr"], "tokens_per_second": logs["tok/s"]},
                                step=step)

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        self.mlflow.log_metrics(dict(metrics), step=step)

    def close(self) -> None:
        self.mlflow.end_run()


def make_reporters(names: Sequence[str], out_dir: str, config: dict[str, Any]) -> list[Any]:
    """The trackers of ``names`` (see :func:`parse_report_to`) for a run in ``out_dir``.

    Raises:
        lorakit.extras.MissingDependency: a tracker's package is not installed (the message names the extra).
    """
    made: list[Any] = []
    for name in names:
        if name == "tensorboard":
            made.append(TensorBoardReporter(os.path.join(out_dir, "tensorboard"), config))
        elif name == "wandb":
            made.append(WandbReporter(out_dir, config))
        elif name == "mlflow":
            made.append(MlflowReporter(out_dir, config))
    return made


def close_all(callbacks: Sequence[Any]) -> None:
    for cb in callbacks:
        close = getattr(cb, "close", None)
        if close is not None:
            close()
