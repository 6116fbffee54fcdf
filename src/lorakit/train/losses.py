"""Losses that only pay for the positions that carry a label.

Causal LM: position t predicts token t+1, so the loss is

    L = Σ_{t : y_{t+1} ≠ -100} CE(W_out · h_t, y_{t+1}) / N,     N = #{t : y_{t+1} ≠ -100}

Instead of the model's full ``(B, T, V)`` logits (then upcast to fp32 — twice the memory), we
run the backbone to hidden states ``h`` (B, T, H), keep the N rows that carry a label, and project
them to the vocabulary ``chunk`` rows at a time; each chunk is recomputed in backward
(activation checkpointing), so at most ``chunk · V`` logits are alive at once. By default
``chunk = max(16, 2²¹ // V)`` rows, about 8 MB of fp32 logits per chunk whatever the vocabulary
(262 rows for V = 8k, 16 rows for V = 128k). Prompt and padding positions never reach the
vocabulary projection.

Batches are right-padded, so in a causal decoder no real token attends to a padding position
and padding never shifts a real token's position: the backbone can run without an attention
mask, which lets ``scaled_dot_product_attention`` take its ``is_causal`` (flash) path instead of
materialising a (B, heads, T, T) masked score matrix. Outputs at every labelled position are
unchanged (tested against the model's own masked loss).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lorakit.data.dataset import IGNORE_INDEX


def split_lm(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """``(backbone, output_head)`` of a Hugging Face ``*ForCausalLM`` whose logits are exactly
    ``head(backbone(x).last_hidden_state)``; ``None`` when that is not known to hold (a logit
    soft-cap or scale, or a model of another shape), so callers fall back to ``model(...).logits``."""
    cfg = getattr(model, "config", None)
    if cfg is None or not type(model).__name__.endswith("ForCausalLM"):
        return None
    if any(getattr(cfg, k, None) not in (None, 1, 1.0) for k in ("final_logit_softcapping", "logit_scale",
                                                                  "logits_scaling", "output_multiplier_scale")):
        return None
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if backbone is None or head is None or backbone is model:
        return None
    return backbone, head


LOGITS_PER_CHUNK = 2**21  # fp32 logits alive at once in the chunked loss (8 MB)


def auto_chunk_rows(head: nn.Module) -> int:
    """Rows per loss chunk so that one chunk's logits hold about :data:`LOGITS_PER_CHUNK` values."""
    weight = getattr(head, "weight", None)  # (V, H) for nn.Linear and a LoRA-wrapped lm_head alike
    vocab = weight.shape[0] if isinstance(weight, torch.Tensor) else 32_000  # unknown head: a LLaMA-2-sized guess
    return max(16, LOGITS_PER_CHUNK // vocab)


def _chunk_ce(head: nn.Module, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = head(h).float()  # (n, V)
    return F.cross_entropy(logits, y, reduction="sum")


def causal_lm_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], chunk_size: int | None = None
                       ) -> torch.Tensor:
    """Sum of next-token cross-entropies over the labelled positions of ``batch`` (divide by
    :func:`count_targets` to get the mean). ``chunk_size``: labelled rows projected to the
    vocabulary at a time (``None``: :func:`auto_chunk_rows`)."""
    labels = batch["labels"]  # (B, T)
    target = labels[:, 1:]  # (B, T-1): the token position t must predict
    keep = target != IGNORE_INDEX  # (B, T-1)
    parts = split_lm(model)
    # packed (collate_packed): no mask, positions restarting per example, and no KV cache (transformers
    # detects packing from position_ids only without one)
    packed = {"position_ids": batch["position_ids"], "use_cache": False} if "position_ids" in batch else {}
    mask = None if packed else batch["attention_mask"]
    if parts is None:
        logits = model(input_ids=batch["input_ids"], attention_mask=mask, **packed).logits  # (B, T, V)
        return F.cross_entropy(logits[:, :-1][keep].float(), target[keep], reduction="sum")
    backbone, head = parts
    if mask is not None and bool((mask[:, :-1] >= mask[:, 1:]).all()):  # right-padded: no 0 followed by a 1
        mask = None
    hidden = backbone(input_ids=batch["input_ids"], attention_mask=mask, **packed)[0]  # (B, T, H)
    h = hidden[:, :-1][keep]  # (N, H)
    y = target[keep]  # (N,)
    total = h.new_zeros((), dtype=torch.float32)
    recompute = torch.is_grad_enabled() and h.requires_grad
    chunk_size = chunk_size or auto_chunk_rows(head)
    for i in range(0, h.shape[0], chunk_size):
        hc, yc = h[i:i + chunk_size], y[i:i + chunk_size]  # (n, H), (n,)
        total = total + (checkpoint(_chunk_ce, head, hc, yc, use_reentrant=False) if recompute
                         else _chunk_ce(head, hc, yc))
    return total


def count_targets(batch: dict[str, torch.Tensor], task: str) -> int:
    """Number of loss terms in ``batch``: labelled next-token positions, or labelled examples
    (an example labelled ``-100`` is ignored, as ``F.cross_entropy`` ignores it)."""
    if task == "causal-lm":
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    return int((batch["labels"] != IGNORE_INDEX).sum())


def classification_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ cross-entropy over the batch, logits (B, C))."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, C)
    return F.cross_entropy(logits.float(), batch["labels"], reduction="sum"), logits


def loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], task: str, chunk_size: int | None = None
             ) -> torch.Tensor:
    """The summed loss of ``batch`` for ``task``."""
    if task == "causal-lm":
        return causal_lm_loss_sum(model, batch, chunk_size)
    return classification_loss_sum(model, batch)[0]
