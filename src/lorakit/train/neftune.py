"""NEFTune (Jain et al., 2023, "NEFTune: Noisy Embeddings Improve Instruction Finetuning").

In training mode the input embeddings ``E`` (B, T, d) of every forward get uniform noise:

    E' = E + ε,   ε ~ U(-α/√(T·d), α/√(T·d))    (T: the batch's padded length, d: hidden size)

— transformers' ``neftune_post_forward_hook``, the same numbers for the same random state. In eval
mode (evaluation, generation) the embeddings are untouched.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def _noise_hook(alpha: float):
    def hook(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return output
        bound = alpha / math.sqrt(output.size(1) * output.size(2))
        return output + torch.zeros_like(output).uniform_(-bound, bound)  # (B, T, d)

    return hook


@contextmanager
def neftune(model: nn.Module, alpha: float | None) -> Iterator[None]:
    """Inside the block, NEFTune noise of ``alpha`` on ``model``'s input embeddings (``None``: nothing).

    Raises:
        ValueError: ``alpha`` is set and the model has no ``get_input_embeddings()``.
    """
    if alpha is None:
        yield
        return
    get = getattr(model, "get_input_embeddings", None)
    embed = get() if callable(get) else None
    if not isinstance(embed, nn.Module):
        raise ValueError(f"neftune_noise_alpha needs a model with get_input_embeddings(); {type(model).__name__} "
                         "has none")
    handle = embed.register_forward_hook(_noise_hook(float(alpha)))
    try:
        yield
    finally:
        handle.remove()
