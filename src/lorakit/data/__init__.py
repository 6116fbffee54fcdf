"""Datasets for ``lorakit train``: files (JSONL, JSON, CSV/TSV, Parquet/Arrow and ``datasets``
directories), layouts and column mappings, tokenization with loss masks, batching, and the
built-in VADER word-sentiment task."""

from __future__ import annotations

from lorakit.data.builtin import vader_records, vader_split
from lorakit.data.dataset import IGNORE_INDEX, TASKS, TokenDataset, batch_order, collate
from lorakit.data.files import read_records
from lorakit.data.formats import Columns, detect_layout, infer_task
from lorakit.data.tokenize import classification_dataset, sft_dataset


def load_dataset(path: str, tokenizer, task: str, *, label_names: list[str] | None = None,
                 max_length: int = 1024, columns: Columns | None = None, split: str | None = None) -> TokenDataset:
    """Read and tokenize ``path`` for ``task`` (``"seq-cls"`` or ``"causal-lm"``); every check on
    the file runs here, before any training.

    Args:
        path: a data file or dataset directory (see :func:`read_records`).
        tokenizer: a Hugging Face tokenizer.
        task: ``"seq-cls"`` or ``"causal-lm"``.
        label_names: the label set (seq-cls); default: the sorted labels found.
        max_length: truncate examples to this many tokens (see ``TokenDataset.notes``).
        columns: which columns hold text, label, prompt, completion, messages.
        split: the split of a multi-split dataset directory (default ``train``).

    Raises:
        FileNotFoundError / ValueError: see :func:`read_records`, :func:`classification_dataset`,
            :func:`sft_dataset`.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    columns = columns or Columns()
    records = read_records(path, split)
    if task == "seq-cls":
        return classification_dataset(records, tokenizer, str(path), label_names=label_names, max_length=max_length,
                                      text_column=columns.text, label_column=columns.label)
    return sft_dataset(records, tokenizer, str(path), max_length=max_length, columns=columns)


__all__ = ["TokenDataset", "IGNORE_INDEX", "TASKS", "batch_order", "collate", "read_records", "Columns",
           "detect_layout", "infer_task", "classification_dataset", "sft_dataset", "load_dataset", "vader_records",
           "vader_split"]
