"""Training and evaluation curves as a PNG (matplotlib, headless Agg backend)."""

from __future__ import annotations

from typing import Any


def plot_history(history: dict[str, list[dict[str, Any]]], path: str, title: str = "") -> str:
    """Plot ``history["train"]`` (``step``, ``loss``, ``lr``) and ``history["eval"]`` (``step`` and
    ``eval_*`` metrics) to ``path``: loss curves on the left, the eval metric on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 4))
    train, evals = history.get("train", []), history.get("eval", [])
    if train:
        ax_loss.plot([h["step"] for h in train], [h["loss"] for h in train], label="train loss", lw=1)
    if evals:
        ax_loss.plot([h["step"] for h in evals], [h["eval_loss"] for h in evals], "o-", label="eval loss")
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
