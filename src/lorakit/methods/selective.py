"""Methods that add nothing to the model and only choose what trains: full fine-tuning, BitFit, linear probe."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lorakit.methods.base import freeze_all_but, head_names, trainable_state


@dataclass
class FullFineTuning:
    """Every weight trains; what must be stored is a whole copy of the model."""

    name: str = "full"
    inference: str = "the base architecture (a full copy of the weights per task)"

    def apply(self, model: nn.Module) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def stored_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return trainable_state(model)

    def for_inference(self, model: nn.Module) -> nn.Module:
        return model


@dataclass
class LinearProbe:
    """Only the task head trains (the encoder is a frozen feature extractor): the comparison's floor."""

    head: Sequence[str] | None = None
    name: str = "head"
    inference: str = "the base architecture, zero overhead"

    def apply(self, model: nn.Module) -> nn.Module:
        freeze_all_but(model, head_names(model, self.head))
        return model

    def stored_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return trainable_state(model)

    def for_inference(self, model: nn.Module) -> nn.Module:
        return model


@dataclass
class BitFit:
    """BitFit (Ben Zaken et al., 2021): train every bias term (linear and LayerNorm biases) and the head.

    ``y = W·x + b`` with ``W`` frozen and ``b`` trained; nothing is added, inference is unchanged.
    """

    head: Sequence[str] | None = None
    name: str = "bitfit"
    inference: str = "the base architecture, zero overhead"

    def apply(self, model: nn.Module) -> nn.Module:
        freeze_all_but(model, head_names(model, self.head))
        biases = [p for n, p in model.named_parameters() if n == "bias" or n.endswith(".bias")]
        if not biases:
            raise ValueError(f"BitFit needs bias parameters, but this {type(model).__name__} has none "
                             "(no parameter name ends in '.bias')")
        for p in biases:
            p.requires_grad_(True)
        return model

    def stored_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return trainable_state(model)

    def for_inference(self, model: nn.Module) -> nn.Module:
        return model
