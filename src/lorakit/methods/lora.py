"""LoRA as one of the compared methods: ``lorakit.inject`` with the task head in ``modules_to_save``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Union

import torch
from torch import nn

from lorakit.config import LoraConfig
from lorakit.inject import inject
from lorakit.merge import merge_and_unload
from lorakit.methods.base import head_names, trainable_state


@dataclass
class LoRA:
    """``y = W0·x + (α/r)·B·A·x`` on ``target_modules``; the head is a trained copy (``modules_to_save``).

    Args:
        r: the rank.
        lora_alpha: the scale numerator α (default ``2·r``).
        target_modules: names / dotted suffixes, a regex, or ``"all-linear"`` (see :class:`LoraConfig`).
        lora_dropout: dropout on the adapter's input.
        head: the task head's module names (default: ``classifier`` / ``score``).
    """

    r: int = 8
    lora_alpha: float | None = None
    target_modules: Union[Sequence[str], str] = field(default_factory=lambda: ["query", "value"])
    lora_dropout: float = 0.0
    head: Sequence[str] | None = None
    name: str = "lora"
    inference: str = "merged into W: the base architecture, zero overhead"

    def config(self, model: nn.Module) -> LoraConfig:
        heads = head_names(model, self.head)
        targets = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        return LoraConfig(r=self.r, lora_alpha=2 * self.r if self.lora_alpha is None else self.lora_alpha,
                          lora_dropout=self.lora_dropout, target_modules=targets,
                          modules_to_save=[h.rsplit(".", 1)[-1] for h in heads] or None)

    def apply(self, model: nn.Module) -> nn.Module:
        return inject(model, self.config(model))

    def stored_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return trainable_state(model)

    def for_inference(self, model: nn.Module) -> nn.Module:
        return merge_and_unload(model)
