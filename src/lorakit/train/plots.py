"""Training and evaluation curves as a PNG (matplotlib, headless Agg backend)."""

from __future__ import annotations

from typing import Any


def smooth(values: list[float], weight: float | None = None) -> list[float]:
    """Exponential moving average with TensorBoard's bias correction:

        m_t = w·m_{t-1} + (1 - w)·x_t,   m_0 = 0,   s_t = m_t / (1 - w^t)

    so the first points are not pulled towards 0. ``weight=None`` picks ``w = 1 - 10/n`` (about a
    tenth of the run's points in the window), clipped to [0, 0.99].
    """
    n = len(values)
    w = weight if weight is not None else min(0.99, max(0.0, 1.0 - 10.0 / max(n, 1)))
    out, m = [], 0.0
    for t, x in enumerate(values, start=1):
        m = w * m + (1.0 - w) * x
        out.append(m / (1.0 - w**t) if w > 0 else x)
    return out


def plot_history(history: dict[str, list[dict[str, Any]]], path: str, title: str = "") -> str:
    """Plot ``history["train"]`` (``step``, ``loss``, ``lr``) and ``history["eval"]`` (``step`` and
    ``eval_*`` metrics) to ``path``: loss curves on the left (the per-step loss faint, its
    :func:`smooth` average on top), the eval metric on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 4))
    train, evals = history.get("train", []), history.get("eval", [])
    if train:
        steps, losses = [h["step"] for h in train], [h["loss"] for h in train]
        ax_loss.plot(steps, losses, color="C0", alpha=0.25, lw=0.8, label="train loss (per step)")
        ax_loss.plot(steps, smooth(losses), color="C0", lw=1.8, label="train loss (smoothed)")
    if evals:
        ax_loss.plot([h["step"] for h in evals], [h["eval_loss"] for h in evals], "o-", color="C1", label="eval loss")
        key = "eval_accuracy" if "eval_accuracy" in evals[0] else "perplexity"
        ax_metric.plot([h["step"] for h in evals], [h[key] for h in evals], "o-", color="C2")
        ax_metric.set_ylabel(key.replace("_", " "))
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_metric.set_xlabel("optimizer step")
    ax_metric.set_title("evaluation")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
