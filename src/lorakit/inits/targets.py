"""Which Linear layers a data-aware init prepares: the config's targets, by lorakit's one matching rule."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from lorakit.config import LoraConfig


def linear_targets(model: nn.Module, cfg: LoraConfig, method: str) -> dict[str, nn.Module]:
    """``{target name: the nn.Linear / Conv1D to read}`` for every module ``inject(model, cfg)`` would
    adapt (a lorakit wrapper stands for its base layer).

    Raises:
        ValueError: a target that is not a full-precision Linear / Conv1D (``method`` names the init).
    """
    from lorakit.inject import find_targets
    from lorakit.layers import LoraLayer, is_linear_like
    from lorakit.layers.quant_formats import quant_format

    out = {}
    for name in find_targets(model, cfg):
        module = model.get_submodule(name)
        base = module.base_layer if isinstance(module, LoraLayer) else module
        if not is_linear_like(base) or quant_format(base) is not None or not base.weight.dtype.is_floating_point:
            raise ValueError(f"{method} initialises full-precision Linear layers only, but target {name!r} is a "
                             f"{type(base).__name__}; exclude it (exclude_modules) or use another init")
        out[name] = base
    return out
