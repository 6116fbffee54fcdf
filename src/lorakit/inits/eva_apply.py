"""Put EVA's result into a model: each layer's new rank and A, the config that records them
(PEFT's ``_load_eva_state_dict``), as one transaction."""

from __future__ import annotations

import dataclasses
import warnings

import torch
from torch import nn

from lorakit.layers import LoraLayer, wrappers
from lorakit.layers.mixed_kernels import adapters_updated
from lorakit.transaction import Transaction, transaction


def _resize(txn: Transaction, layer: LoraLayer, name: str, r: int, alpha: float, cfg) -> None:
    """Re-create adapter ``name`` of ``layer`` at rank ``r`` (B = 0); undone on failure."""
    holders = [attr for attr in (*layer.adapter_attrs, "lora_dropout") if name in getattr(layer, attr)]
    saved = {attr: getattr(layer, attr)[name] for attr in holders}
    numbers = (layer.r[name], layer.lora_alpha[name], layer.scaling[name])
    active = list(layer.active_adapters)
    old_A = layer.lora_A[name].weight
    flag = old_A.requires_grad

    def undo() -> None:
        layer.delete_adapter(name)
        for attr, value in saved.items():
            getattr(layer, attr)[name] = value
        layer.r[name], layer.lora_alpha[name], layer.scaling[name] = numbers
        layer.set_active(active)
        adapters_updated()

    layer.delete_adapter(name)
    txn.on_undo(undo)
    layer.add_adapter(name, r, alpha, cfg, dtype=old_A.dtype)
    layer.set_active(active)
    for p in layer.adapter_parameters(name):
        p.requires_grad_(flag)


def _unwrap(txn: Transaction, model: nn.Module, path: str, layer: LoraLayer) -> None:
    """Replace a wrapper whose only adapter got rank 0 by the module it wraps; undone on failure."""
    quant = getattr(layer, "quant", None)

    def restore() -> nn.Module:
        if quant is not None:  # a quantized base: its storage is held again while wrapped
            layer._restore = quant.hold(layer.base_layer)
        return layer

    txn.replace(path, layer.release(), restore)


def apply_eva_state_dict(model: nn.Module, eva_state_dict: dict[str, torch.Tensor], adapter_name: str) -> None:
    """Layer by layer: rank ``A.size(0)`` (0: the adapter leaves the layer), ``lora_A ← A``, B = 0,
    alpha scaled by ``r_l / r`` with ``adjust_scaling_factors``; the adapter's config gets
    ``rank_pattern`` / ``alpha_pattern`` / ``target_modules`` for the new layout. Layers without an
    entry (embeddings, convolutions, attention modules: EVA initialises Linear layers) keep their
    default init, with a warning, as in PEFT."""
    from lorakit.state import require_state

    state = require_state(model)
    cfg = state.configs[adapter_name]
    merged = [p for p, w in wrappers(model) if isinstance(w, LoraLayer) and adapter_name in w.merged_adapters]
    if merged:
        raise ValueError(f"adapter {adapter_name!r} is merged into {merged[:3]}; unmerge it before EVA")
    layers = [(p, w) for p, w in wrappers(model) if isinstance(w, LoraLayer) and adapter_name in w.r
              and not p.endswith(".base_layer.out_proj")]
    unknown = [n for n in eva_state_dict if n not in dict(layers)]
    if unknown:
        raise ValueError(f"eva_state_dict names layers that do not hold adapter {adapter_name!r}: {unknown[:3]}")
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    kept, missing, removed = [], [], []
    with transaction(model) as txn:
        for path, layer in layers:
            key = layer.config_key(path)
            r, alpha = cfg.rank_for(key), cfg.alpha_for(key)
            if path in eva_state_dict:
                A = eva_state_dict[path]
                new_rank = A.size(0)
                if new_rank == 0:
                    _unwrap(txn, model, path, layer)
                    removed.append(path)
                    continue
                if A.shape[1] != layer.lora_A[adapter_name].weight.shape[1]:
                    raise ValueError(f"eva_state_dict[{path!r}] has {A.shape[1]} input features, the layer "
                                     f"{layer.lora_A[adapter_name].weight.shape[1]}")
                if new_rank != r and cfg.eva_config["adjust_scaling_factors"]:
                    alpha *= new_rank / r
                if new_rank != layer.r[adapter_name] or alpha != layer.lora_alpha[adapter_name]:
                    _resize(txn, layer, adapter_name, new_rank, alpha, cfg)
                weight = layer.lora_A[adapter_name].weight
                txn.keep(weight)
                with torch.no_grad():
                    weight.copy_(A.to(device=weight.device, dtype=weight.dtype))
                kept.append(path)
            else:
                new_rank = layer.r[adapter_name]
                missing.append(path)
            if new_rank != cfg.r:
                rank_pattern[path] = new_rank
            if alpha != cfg.lora_alpha:
                alpha_pattern[path] = alpha
        targets = kept + missing
        if not targets:
            raise ValueError("EVA gave every layer rank 0; nothing would be adapted (use more data or a larger r)")
        state.set_config(adapter_name, dataclasses.replace(cfg, target_modules=targets, rank_pattern=rank_pattern,
                                                           alpha_pattern=alpha_pattern))
        state.set_targets(adapter_name, [t for t in state.targets[adapter_name] if t not in removed])
        adapters_updated()
    if missing:
        warnings.warn(f"EVA initialises Linear layers; these keep the default init (A Kaiming-uniform, B = 0): "
                      f"{missing}", stacklevel=3)
