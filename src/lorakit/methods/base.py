"""The interface every fine-tuning method implements, and the helpers they share.

A *method* is a way to decide what trains and what is added to a pretrained model:

* full fine-tuning trains every weight;
* BitFit trains the biases;
* Houlsby adapters add bottleneck layers and train them;
* prefix tuning adds learned key/value vectors to every attention layer;
* LoRA adds ``ΔW = B·A`` beside chosen weights;
* the linear probe trains nothing but the task head (the floor of the comparison).

For a sequence-classification model the task head (``classifier`` / ``score``) trains in every method.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from lorakit.matching import matches, unmatched

# Module names of Hugging Face task heads, tried in order when a method is given no head.
DEFAULT_HEADS = ("classifier", "score")


@runtime_checkable
class Method(Protocol):
    """What ``lorakit train --method NAME`` and ``lorakit compare`` need from a method.

    Attributes:
        name: the method's short name (``"lora"``, ``"bitfit"``...).
        inference: one line saying how the fine-tuned model runs at inference
            (``"merged into W: the base architecture, zero overhead"``, ``"+2 bottleneck layers per block"``).
    """

    name: str
    inference: str

    def apply(self, model: nn.Module) -> nn.Module:
        """Change ``model`` in place (add modules, set ``requires_grad``) and return it."""
        ...

    def stored_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The tensors that must be stored, beside the base checkpoint, to rebuild the fine-tuned model."""
        ...

    def for_inference(self, model: nn.Module) -> nn.Module:
        """The trained model in the form it is served (LoRA: merged and unloaded). May change ``model``."""
        ...


def head_names(model: nn.Module, head: Sequence[str] | None) -> list[str]:
    """Full names of the task-head modules: ``head`` as given (exact or dotted-suffix names),
    or the first of :data:`DEFAULT_HEADS` that the model has; ``[]`` when ``head == []``.

    Raises:
        ValueError: a given name matches no module, or ``head`` is None and no default head exists.
    """
    names = [n for n, _ in model.named_modules() if n]
    wanted = list(head or [])
    if head is None:
        wanted = [h for h in DEFAULT_HEADS if not unmatched([h], names)][:1]
        if not wanted:
            raise ValueError(f"no task head found: looked for modules named {list(DEFAULT_HEADS)} in this "
                             f"{type(model).__name__}; pass head=[...] (top-level modules: "
                             f"{[n for n in names if '.' not in n]}) or head=[] for none")
    found = []
    for h in wanted:
        hits = [n for n in names if matches(n, h)]
        if not hits:
            raise ValueError(f"head module {h!r} matches no module; top-level modules: "
                             f"{[n for n in names if '.' not in n]}")
        found += hits
    return found


def freeze_all_but(model: nn.Module, module_names: Sequence[str]) -> None:
    """``requires_grad=False`` everywhere except in the named modules (whose parameters all train)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for name in module_names:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` of every parameter with ``requires_grad`` (detached, contiguous, on CPU)."""
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}

