"""Tokenized datasets and the batches the training loop reads.

A :class:`TokenDataset` is a list of examples, each ``{"input_ids": [...], "labels": ...}``:

* ``task="seq-cls"``: ``labels`` is one class index per example;
* ``task="causal-lm"``: ``labels`` is a list as long as ``input_ids``, holding the token to
  predict at each position and ``-100`` where no loss is taken (prompt tokens, padding). The
  model shifts them itself (position t predicts token t+1), as Hugging Face models do.

Batches are formed by :func:`batch_order`: a seeded shuffle, then length-grouping inside
windows of ``50 · batch_size`` examples so that each batch holds similar lengths and padding
wastes little compute; the order depends only on ``(seed, epoch)``, so a resumed run can skip
straight to the batch it stopped at. :func:`collate_packed` lays a causal-LM batch out without any
padding instead: its examples end to end in one row, positions restarting at each example.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

IGNORE_INDEX = -100
TASKS = ("seq-cls", "causal-lm")


@dataclass
class TokenDataset:
    """Tokenized examples for one task.

    Attributes:
        examples: dicts with ``input_ids`` (list[int]) and ``labels`` (int or list[int]).
        task: ``"seq-cls"`` or ``"causal-lm"``.
        pad_id: token id used to pad ``input_ids``.
        label_names: class names (index = class id), seq-cls only.
        source: where the examples came from, for messages.
        notes: what loading changed (examples truncated or skipped for ``max_length``), to report.
    """

    examples: list[dict[str, Any]]
    task: str
    pad_id: int = 0
    label_names: list[str] = field(default_factory=list)
    source: str = ""
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.examples[i]

    def lengths(self) -> list[int]:
        return [len(e["input_ids"]) for e in self.examples]

    def subset(self, indices: list[int]) -> TokenDataset:
        return TokenDataset([self.examples[i] for i in indices], self.task, self.pad_id, self.label_names, self.source,
                            list(self.notes))


def batch_order(lengths: list[int], batch_size: int, seed: int, epoch: int, group_by_length: bool = True,
                shuffle: bool = True) -> list[list[int]]:
    """Batches of example indices for one epoch, a pure function of its arguments.

    Shuffle with ``torch.Generator().manual_seed(seed + epoch)``; with ``group_by_length``, sort
    each window of ``50·batch_size`` shuffled indices by length (longest first) and cut it into
    batches, then shuffle the batches so long and short ones alternate over the epoch.
    """
    n = len(lengths)
    if not shuffle:
        order = list(range(n))
        return [order[i:i + batch_size] for i in range(0, n, batch_size)]
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    if not group_by_length:
        return [order[i:i + batch_size] for i in range(0, n, batch_size)]
    window = 50 * batch_size
    batches = []
    for w in range(0, n, window):
        chunk = sorted(order[w:w + window], key=lambda i: -lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    perm = torch.randperm(len(batches), generator=g).tolist()
    return [batches[i] for i in perm]


def collate(examples: list[dict[str, Any]], task: str, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples into tensors.

    Returns:
        ``input_ids`` (B, T), ``attention_mask`` (B, T) and ``labels``: (B,) for seq-cls, (B, T)
        with ``-100`` on padding for causal-lm.
    """
    T = max(len(e["input_ids"]) for e in examples)
    B = len(examples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((B, T), dtype=torch.long)  # (B, T)
    if task == "causal-lm":
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    else:
        labels = torch.empty(B, dtype=torch.long)  # (B,)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"], dtype=torch.long)
        mask[i, :n] = 1
        if task == "causal-lm":
            labels[i, :n] = torch.tensor(e["labels"], dtype=torch.long)
        else:
            labels[i] = int(e["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def collate_packed(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """A causal-LM batch packed into one row without padding: the examples end to end.

    Example i (length T_i) occupies columns ``[S_i, S_i + T_i)`` with ``S_i = Σ_{j<i} T_j``;
    ``position_ids`` restart at 0 there, which is how a Hugging Face model with a packing-aware
    attention (``flash_attention_2``, ``flex_attention``, and ``sdpa``/``eager`` through a
    block-diagonal mask; see :func:`lorakit.train.packing.packing_problem`) keeps the examples
    apart. The label at each example's first column is ``-100``: position t predicts label t+1, so
    the last token of example i must not predict the first of example i+1. Every other label is
    the example's own, so the loss terms are exactly those of :func:`collate`'s padded batch.

    Returns:
        ``input_ids``, ``attention_mask`` (all ones), ``labels``, ``position_ids``: each (1, ΣT_i).
    """
    ids, labels, pos = [], [], []
    for e in examples:
        n = len(e["input_ids"])
        ids += e["input_ids"]
        labels += [IGNORE_INDEX] + list(e["labels"][1:])
        pos += range(n)
    ids_t = torch.tensor([ids], dtype=torch.long)  # (1, ΣT)
    return {"input_ids": ids_t, "attention_mask": torch.ones_like(ids_t),
            "labels": torch.tensor([labels], dtype=torch.long), "position_ids": torch.tensor([pos], dtype=torch.long)}
