"""Peak memory and evaluation metrics."""

from __future__ import annotations

import math
import resource
import sys

import torch
from torch import nn

from lorakit.data.dataset import TokenDataset, batch_order, collate
from lorakit.train.losses import causal_lm_loss_sum, classification_loss_sum, count_targets


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: ``torch.cuda.max_memory_allocated``; CPU: the process's resident-set high-water mark."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def evaluate(model: nn.Module, ds: TokenDataset, batch_size: int = 64, device: torch.device | None = None,
             bf16: bool = False, chunk_size: int | None = None) -> dict[str, float]:
    """Metrics of ``model`` on ``ds`` (in eval mode; restores the previous mode).

    Returns:
        seq-cls: ``eval_loss`` (mean CE per example) and ``eval_accuracy``;
        causal-lm: ``eval_loss`` (mean CE per answer token) and ``perplexity = exp(eval_loss)``.
    """
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = correct = count = 0.0
    lengths = ds.lengths()
    try:
        for idx in batch_order(lengths, batch_size, 0, 0, shuffle=False):
            batch = to_device(collate([ds[i] for i in idx], ds.task, ds.pad_id), device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                if ds.task == "causal-lm":
                    total += float(causal_lm_loss_sum(model, batch, chunk_size))
                else:
                    loss, logits = classification_loss_sum(model, batch)
                    total += float(loss)
                    correct += float((logits.argmax(-1) == batch["labels"]).sum())
            count += count_targets(batch, ds.task)
    finally:
        model.train(was_training)
    mean = total / max(count, 1)
    if ds.task == "causal-lm":
        return {"eval_loss": mean, "perplexity": math.exp(min(mean, 50.0))}
    return {"eval_loss": mean, "eval_accuracy": correct / max(count, 1)}
