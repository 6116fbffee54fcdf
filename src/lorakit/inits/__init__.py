"""PEFT's LoRA initialisations that read the weights or the data: LoftQ, EVA, CorDA, LoRA-GA.

Each is chosen with ``LoraConfig(init_lora_weights=...)`` and configured with PEFT's sub-config field
(:mod:`lorakit.inits.configs`); the ones that need data get it the way PEFT's API gives it:

    lk.inject(model, LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": 4, "loftq_iter": 5}))

    preprocess_corda(model, cfg, run_model=lambda: [model(**b) for b in calib])   # covariances, then
    lk.inject(model, cfg)                                                          # init_lora_weights="corda"

    preprocess_loraga(model, cfg, train_step=lambda: [model(**b).loss.backward() for b in batches])
    lk.inject(model, cfg)                                                          # init_lora_weights="lora_ga"

    lk.inject(model, cfg)                                                          # init_lora_weights="eva"
    initialize_lora_eva_weights(model, dataloader)                                 # ranks and A from the data

LoftQ, CorDA and LoRA-GA (like PiSSA and OLoRA) write into the base weight, so that the adapted model
starts where the base model was (CorDA, LoRA-GA: ``W - s·B·A + s·B·A = W``) or as close to it as the
quantized base allows (LoftQ: ``Q(W') + s·B·A ≈ W``). This module is the light dispatch the layers
call; the methods live in :mod:`lorakit.inits.loftq`, ``.eva``, ``.corda``, ``.lora_ga`` (torch only;
LoftQ quantizes with bitsandbytes, as PEFT does).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from lorakit.config import LoraConfig
    from lorakit.layers.linear import Linear
    from lorakit.transaction import Transaction

# what preprocess_corda / preprocess_loraga attach to a Linear (PEFT's attribute names, so either
# library's preprocessing feeds either library's init)
CORDA_ATTR = "eigens"
LORA_GA_ATTR = "_peft_loraga_grad"
DATA_ATTRS = {"corda": CORDA_ATTR, "lora_ga": LORA_GA_ATTR}

__all__ = ["init_linear", "release_init_data", "loading_config", "inject_for_loading", "preprocess_corda",
           "preprocess_loraga",
           "initialize_lora_eva_weights", "get_eva_state_dict", "convert_to_lora", "loftq_init"]


def init_linear(layer: Linear, name: str, cfg: LoraConfig) -> None:
    """Initialise adapter ``name`` of a Linear wrapper per ``cfg.init_lora_weights`` in
    ``("loftq", "corda", "lora_ga")``: its factors, and the base weight it moves."""
    init = cfg.init_lora_weights
    with torch.no_grad():
        if init == "loftq":
            from lorakit.inits.loftq import init_layer
        elif init == "corda":
            from lorakit.inits.corda import init_layer
        else:
            from lorakit.inits.lora_ga import init_layer
        init_layer(layer, name, cfg)


def set_factors(layer: Linear, name: str, A: torch.Tensor, B: torch.Tensor) -> None:
    """``lora_A[name] ← A`` (r, in), ``lora_B[name] ← B`` (out, r), in the factors' own dtype."""
    for factor, value in ((layer.lora_A[name].weight, A), (layer.lora_B[name].weight, B)):
        if tuple(factor.shape) != tuple(value.shape):
            raise ValueError(f"internal: factor of shape {tuple(factor.shape)} cannot take {tuple(value.shape)}")
        factor.data = value.to(device=factor.device, dtype=factor.dtype).contiguous()


def write_base(layer: Linear, w_out_in: torch.Tensor) -> None:
    """The base weight ← ``w_out_in`` (out, in), in its own layout (Conv1D: transposed) and dtype."""
    weight = layer.base_weight()
    weight.data.copy_((w_out_in.T if layer.fan_in_fan_out else w_out_in).to(weight.dtype))


def release_init_data(txn: Transaction, layer: Any, cfg: LoraConfig) -> None:
    """After ``inject`` initialised ``layer`` from preprocessed data (CorDA's eigens, LoRA-GA's
    gradient, attached to its base Linear), drop that data as PEFT does; a failed inject puts it back."""
    attr = DATA_ATTRS.get(cfg.init_lora_weights)
    base = getattr(layer, "base_layer", None)
    if attr is None or base is None or attr not in base.__dict__:
        return
    value = base.__dict__.pop(attr)
    txn.on_undo(lambda: base.__dict__.__setitem__(attr, value))


def loading_config(cfg: LoraConfig) -> LoraConfig:
    """The config to *allocate* an adapter with whose weights come from a file: an init that needs
    data it cannot have at load time (EVA, CorDA, LoRA-GA) allocates as ``True`` — PEFT loads such
    files the same way (its LoRA-GA init falls back to the default; EVA's A is in the file). The
    file's own base (a CorDA / LoRA-GA residual) must be the model it is loaded into. LoftQ, PiSSA and
    OLoRA are re-applied to W, as PEFT does."""
    if cfg.init_lora_weights in DATA_ATTRS or cfg.init_lora_weights == "eva":
        return dataclasses.replace(cfg, init_lora_weights=True)
    return cfg


def inject_for_loading(txn: Transaction, cfg: LoraConfig, adapter_name: str, *, warn: bool = True,
                       **kwargs: Any) -> LoraConfig:
    """``inject_into`` for an adapter whose weights are about to be read from a file: allocated with
    :func:`loading_config`, recorded with the file's own ``init_lora_weights`` (so a re-save writes it).

    With ``warn``, an adapter of an init that moved W from data (CorDA, LoRA-GA) says that its base
    must be the residual base it was trained on (the data is not in the file to rebuild it from W).
    """
    import warnings

    from lorakit.inject import inject_into
    from lorakit.state import get_state

    alloc = loading_config(cfg)
    recorded = inject_into(txn, alloc, adapter_name, **kwargs)
    if alloc is cfg:
        return recorded
    recorded = dataclasses.replace(recorded, init_lora_weights=cfg.init_lora_weights)
    get_state(txn.model).set_config(adapter_name, recorded)
    if warn and cfg.init_lora_weights in DATA_ATTRS:
        warnings.warn(f"this adapter was trained with init_lora_weights={cfg.init_lora_weights!r}, which moved the "
                      "base weights (W - s·B0·A0) using data that is not in its files; it is loaded as a plain adapter "
                      "(as PEFT does), so load it into that residual base model. Adapters written by lorakit train are "
                      "converted to plain LoRA for the original base (lorakit.inits.convert_to_lora)", stacklevel=4)
    return recorded


def __getattr__(name: str):
    lazy = {"preprocess_corda": "lorakit.inits.corda", "preprocess_loraga": "lorakit.inits.lora_ga",
            "initialize_lora_eva_weights": "lorakit.inits.eva", "get_eva_state_dict": "lorakit.inits.eva",
            "convert_to_lora": "lorakit.inits.convert", "loftq_init": "lorakit.inits.loftq"}
    if name in lazy:
        import importlib

        return getattr(importlib.import_module(lazy[name]), name)
    raise AttributeError(f"module 'lorakit.inits' has no attribute {name!r}")
