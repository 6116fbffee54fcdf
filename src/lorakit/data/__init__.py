"""Datasets for ``lorakit train``: files (JSONL/CSV), tokenization with loss masks, batching, and
the built-in VADER word-sentiment task."""

from __future__ import annotations

from lorakit.data.builtin import vader_records, vader_split
from lorakit.data.dataset import IGNORE_INDEX, TASKS, TokenDataset, batch_order, collate
from lorakit.data.files import read_records
from lorakit.data.tokenize import classification_dataset, sft_dataset


def load_dataset(path: str, tokenizer, task: str, *, label_names: list[str] | None = None,
                 max_length: int = 1024) -> TokenDataset:
    """Read and tokenize ``path`` for ``task`` (``"seq-cls"`` or ``"causal-lm"``); every check on
    the file runs here, before any training.

    Raises:
        FileNotFoundError / ValueError: see :func:`read_records`, :func:`classification_dataset`,
            :func:`sft_dataset`.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    records = read_records(path)
    if task == "seq-cls":
        return classification_dataset(records, tokenizer, path, label_names=label_names, max_length=max_length)
    return sft_dataset(records, tokenizer, path, max_length=max_length)


__all__ = ["TokenDataset", "IGNORE_INDEX", "TASKS", "batch_order", "collate", "read_records",
           "classification_dataset", "sft_dataset", "load_dataset", "vader_records", "vader_split"]
