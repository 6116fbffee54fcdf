"""An adapter of an init that moved the base weight, as a plain LoRA adapter for the *original* base
(PEFT's ``save_pretrained(path_initial_model_for_weight_conversion=...)``).

CorDA, LoRA-GA, PiSSA and OLoRA train on ``W_res = W - s·B₀·A₀``; after training the model computes
``W_res + s·B·A = W + s·(B·A - B₀·A₀)``, which is a rank-2r LoRA update of W itself:

    A' = [A ; A₀]  (2r, in)        B' = [B | -B₀]  (out, 2r)        r' = 2r, alpha' = 2·alpha

(``alpha' = √2·alpha`` with rsLoRA; rank and alpha patterns doubled), so ``s'·B'·A' = s·(B·A - B₀·A₀)``
and ``init_lora_weights=True``: PEFT and lorakit load the converted files onto the original base model.
The data the init needed is not needed to load them. (LoftQ's base is ``Q(W')``, not W: a LoftQ adapter
is reloaded by re-applying LoftQ to W instead, as PEFT does.)
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch
from torch import nn

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


def initial_factors(model: nn.Module, adapter_name: str = "default") -> Factors:
    """``{layer path: (A₀, B₀)}``, copies of adapter ``adapter_name``'s factors as they are now (right
    after ``inject``): what :func:`convert_to_lora` subtracts."""
    from lorakit.layers import LoraLayer, wrappers

    return {p: (w.lora_A[adapter_name].weight.detach().clone(), w.lora_B[adapter_name].weight.detach().clone())
            for p, w in wrappers(model) if isinstance(w, LoraLayer) and adapter_name in getattr(w, "lora_A", {})}


def convert_to_lora(model: nn.Module, directory, initial: Factors, adapter_name: str = "default") -> Path:
    """Write adapter ``adapter_name`` as a plain rank-2r LoRA adapter of the original base (see the module
    docstring) into ``directory``, in PEFT's format, all or nothing.

    Args:
        initial: :func:`initial_factors` taken right after ``inject``.

    Returns:
        The directory written.

    Raises:
        ValueError: an unknown adapter, DoRA or lora_bias (not a difference of two low-rank products),
            rsLoRA with rank/alpha patterns (as PEFT), or ``initial`` of other layers or shapes.
    """
    from lorakit.io.adapter import adapter_dir
    from lorakit.io.peft_format import (
        CONFIG_NAME,
        PREFIX,
        WEIGHTS_NAME,
        adapter_state_dict,
        effective_config,
        infer_task_type,
    )
    from lorakit.io.safe_write import write_files_atomically, write_text_file
    from lorakit.layers import LoraLayer, wrappers
    from lorakit.state import require_state

    state = require_state(model)
    if adapter_name not in state.configs:
        raise ValueError(f"no adapter named {adapter_name!r}; this model has {list(state.configs)}")
    cfg = effective_config(model, adapter_name)
    if cfg.use_dora or cfg.lora_bias:
        raise ValueError("convert_to_lora needs a plain LoRA adapter (no DoRA, no lora_bias)")
    if cfg.use_rslora and (cfg.rank_pattern or cfg.alpha_pattern):
        raise ValueError("convert_to_lora cannot keep the scaling with use_rslora and rank/alpha patterns (as PEFT)")
    layers = {p: w for p, w in wrappers(model) if isinstance(w, LoraLayer) and adapter_name in getattr(w, "lora_A", {})}
    if set(layers) != set(initial):
        raise ValueError(f"initial factors are for {sorted(initial)[:3]}..., the adapter's layers are "
                         f"{sorted(layers)[:3]}...; take them with initial_factors right after inject")
    tensors = adapter_state_dict(model, adapter_name)
    for path, (A0, B0) in initial.items():
        ka, kb = f"{PREFIX}{path}.lora_A.weight", f"{PREFIX}{path}.lora_B.weight"
        A, B = tensors[ka], tensors[kb]
        if A0.shape != A.shape or B0.shape != B.shape:
            raise ValueError(f"initial factors of {path} have shapes {tuple(A0.shape)}, {tuple(B0.shape)}; the "
                             f"adapter's are {tuple(A.shape)}, {tuple(B.shape)}")
        tensors[ka] = torch.cat([A, A0.to(A.dtype)], dim=0).contiguous()  # (2r, in)
        tensors[kb] = torch.cat([B, -B0.to(B.dtype)], dim=1).contiguous()  # (out, 2r)
    factor = math.sqrt(2) if cfg.use_rslora else 2
    converted = dataclasses.replace(
        cfg, init_lora_weights=True, r=2 * cfg.r, lora_alpha=factor * cfg.lora_alpha,
        rank_pattern={k: 2 * v for k, v in cfg.rank_pattern.items()},
        alpha_pattern={k: 2 * v for k, v in cfg.alpha_pattern.items()})
    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    config = converted.to_peft_dict(base_model_name_or_path=cfg.base_model_name_or_path or name_or_path,
                                    task_type=cfg.task_type or infer_task_type(model, adapter_name))

    def write_weights(path: str) -> None:
        from safetensors.torch import save_file

        save_file(tensors, path, metadata={"format": "pt"})

    out = adapter_dir(directory, adapter_name)
    write_files_atomically(out, {WEIGHTS_NAME: write_weights, CONFIG_NAME: lambda path: write_text_file(
        path, json.dumps(dict(sorted(config.items())), indent=2))})
    return out
