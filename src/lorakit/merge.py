"""Merging adapters into the base weights, and combining adapters.

``merge`` folds ``W ← W + scaling·B·A`` into each adapted layer (a stack per layer, so ``unmerge``
takes them out in reverse order, restoring W to dtype tolerance). Nothing here ever runs as a
side effect of ``train()``/``eval()``.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from lorakit.adapters import _check_names, set_adapter_grads
from lorakit.config import LoraConfig
from lorakit.inject import unload
from lorakit.layers import Embedding, LoraLayer, ModulesToSave, MultiheadAttention, wrappers
from lorakit.layers.quantized import requantization_report
from lorakit.merge_quantized import dequantizing_merge, finish_dequantized, refuse_inexact_unmerge
from lorakit.state import require_state
from lorakit.transaction import transaction


def _lora_layers(model: nn.Module) -> list[LoraLayer]:
    return [w for _, w in wrappers(model) if isinstance(w, LoraLayer)]


def untie_adapted_weights(model: nn.Module, names: Sequence[str]) -> list[str]:
    """Give each adapted layer whose weight is shared (tied) with another module — lm_head and
    embed_tokens, say — and that an adapter in ``names`` is about to change, a private copy of
    that weight, so that folding ΔW into one leaves the other as it was. HF configs (and their
    text sub-config) get ``tie_word_embeddings=False`` so a saved copy reloads untied.

    Returns:
        The names of the layers that were untied.
    """
    owners: dict[int, int] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    untied = []
    for path, layer in wrappers(model):
        if not isinstance(layer, LoraLayer) or not any(n in layer.r and n not in layer.merged_adapters for n in names):
            continue
        weight = layer.base_weight()
        if owners.get(id(weight), 0) > 1:
            attr = "in_proj_weight" if isinstance(layer.base_layer, nn.MultiheadAttention) else "weight"
            setattr(layer.base_layer, attr, nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad))
            untied.append(path)
    config = getattr(model, "config", None)
    if untied and config is not None:
        text = getattr(config, "get_text_config", None)
        for c in (config, text() if callable(text) else None):
            if getattr(c, "tie_word_embeddings", False):
                c.tie_word_embeddings = False
    if untied:
        warnings.warn(f"merging into {untied}, whose weights are tied to another module: untied them (the other "
                      "module keeps the base weight; tie_word_embeddings=False)", stacklevel=3)
    return untied


def merge(model: nn.Module, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
    """Fold the given adapters (default: the active ones) into the base weights.

    Adapters already merged are skipped, so merging twice changes nothing.

    Args:
        safe_merge: first check, for every layer, that the merged weights are finite; if any is
            not, raise before any weight is touched.

    Raises:
        ValueError: an unknown adapter name, or (safe_merge) non-finite merged weights.
    """
    state = require_state(model)
    names = list(state.active if adapter_names is None else adapter_names)
    _check_names(model, names, "merge")
    layers = _lora_layers(model)
    if safe_merge:
        for layer in layers:
            for name in names:
                if name in layer.r and name not in layer.merged_adapters and not layer.merged_weight_is_finite(name):
                    raise ValueError(f"merging adapter {name!r} gives non-finite weights in "
                                     f"{type(layer.base_layer).__name__}; the adapter is broken. "
                                     "No weight was changed.")
    untie_adapted_weights(model, names)
    with requantization_report(model):  # quantized layers re-quantize: one warning with the measured error
        for layer in layers:
            layer.merge(names)


def unmerge(model: nn.Module) -> None:
    """Take every merged adapter back out of the base weights (a no-op when nothing is merged).

    Raises:
        ValueError: an adapter was merged into a re-quantized (4/8-bit) weight; nothing is changed.
    """
    require_state(model)
    refuse_inexact_unmerge(model)
    for layer in _lora_layers(model):
        layer.unmerge()


def merge_and_unload(model: nn.Module, adapter_names: Sequence[str] | None = None,
                     safe_merge: bool = False, *, dtype: torch.dtype | None = None) -> nn.Module:
    """Merge, then replace each wrapper by its base module: the plain base architecture with ΔW
    folded in (an HF model stays an HF model: ``save_pretrained`` and ``generate`` work).

    ``modules_to_save`` are replaced by the active adapter's trained copy. A quantized adapted
    layer (bitsandbytes, torchao NF4) is dequantized instead of re-quantized: it becomes a plain
    ``nn.Linear`` holding ``deq(W) + ΔW`` (added in fp32), and the whole model is returned in
    ``dtype`` — by default the quantized layers' compute dtype (bf16 for the usual QLoRA load) —
    without its quantization config (see ``lorakit.merge_quantized``).

    Args:
        dtype: cast the returned model's floating parameters to this dtype (default: unchanged,
            or the compute dtype for a quantized base).
    """
    state = require_state(model)
    names = list(state.active if adapter_names is None else adapter_names)
    _check_names(model, names, "merge_and_unload")
    dequantized_dtype = dequantizing_merge(model, names, safe_merge, dtype)
    merge(model, adapter_names, safe_merge)
    model = unload(model, keep_trained_copy_of=state.active[0])
    dtype = dtype or dequantized_dtype
    return model if dtype is None else finish_dequantized(model, dtype)


def _concat_into(layer: LoraLayer, parts: list[tuple[str, float]], new_name: str) -> None:
    """Fill ``new_name`` of one layer with the rank-concatenation of ``parts`` (see combine_adapters)."""
    with torch.no_grad():
        if isinstance(layer, Embedding):
            layer.lora_embedding_A[new_name].copy_(torch.cat([layer.lora_embedding_A[n] for n, _ in parts], 0))
            layer.lora_embedding_B[new_name].copy_(
                torch.cat([w * layer.scaling[n] * layer.lora_embedding_B[n] for n, w in parts], 1))
        else:
            layer.lora_A[new_name].weight.copy_(torch.cat([layer.lora_A[n].weight for n, _ in parts], 0))
            layer.lora_B[new_name].weight.copy_(
                torch.cat([w * layer.scaling[n] * layer.lora_B[n].weight for n, w in parts], 1))


def _carry_copy(saved: ModulesToSave, source: str, new_name: str) -> None:
    """The new adapter's copy of a ``modules_to_save`` module: an exact copy of ``source``'s (the
    one combined adapter that has one). A trained head is not a delta, so no weight applies."""
    saved.add_adapter(new_name)
    with torch.no_grad():
        for t, v in zip(saved.modules_to_save[new_name].state_dict(keep_vars=True).values(),
                        saved.modules_to_save[source].state_dict(keep_vars=True).values()):
            t.copy_(v)


def combine_adapters(model: nn.Module, names: Sequence[str], weights: Sequence[float], new_name: str) -> None:
    """Add adapter ``new_name`` with ``ΔW_new = Σ_i w_i·ΔW_i`` exactly, by concatenating ranks:

        A_new = [A_1; A_2; ...] (Σr, in),  B_new = [w_1 s_1 B_1, w_2 s_2 B_2, ...] (out, Σr),  scaling 1.

    Each layer's rank is the sum over the adapters present in it; the new config records it per
    layer (exact-name ``rank_pattern``/``alpha_pattern``, alpha = rank), so that it rebuilds the
    same shapes. A ``modules_to_save`` copy (a trained head) is carried over exactly from the one
    combined adapter that has it, so one adapter with weight 1.0 gives exactly that adapter; as in
    PEFT, two combined adapters with copies of the same module are refused (heads do not add up).
    The new adapter is added inactive; ``set_adapter(model, new_name)`` uses it.

    Raises:
        ValueError: unknown names, mismatched lengths, an existing ``new_name``, DoRA adapters, or
            two adapters saving the same module.
    """
    state = require_state(model)
    names = list(names)
    _check_names(model, names, "combine_adapters")
    if len(weights) != len(names) or not names:
        raise ValueError(f"combine_adapters needs one weight per adapter: got {len(names)} names, "
                         f"{len(weights)} weights")
    if new_name in state.configs:
        raise ValueError(f"adapter {new_name!r} already exists")
    if any(state.configs[n].use_dora for n in names):
        raise ValueError("DoRA adapters cannot be combined linearly (their magnitudes do not add)")
    targets = list(dict.fromkeys(t for n in names for t in state.targets[n]))
    ranks = {}
    for t in targets:
        layer = model.get_submodule(t)
        ranks[t] = sum(layer.r[n] for n in names if n in layer.r)
    patterns = {re.escape(t): r for t, r in ranks.items()}
    saved = {p: [n for n in names if n in w.modules_to_save] for p, w in wrappers(model)
             if isinstance(w, ModulesToSave) and any(n in w.modules_to_save for n in names)}
    clash = {p: ns for p, ns in saved.items() if len(ns) > 1}
    if clash:
        raise ValueError(f"combine_adapters: {clash} — several of the adapters have their own trained copy of the "
                         "same module (modules_to_save); copies do not add up. Combine adapters whose saved "
                         "modules differ")
    cfg = LoraConfig(r=max(ranks.values()), lora_alpha=max(ranks.values()), target_modules=targets,
                     rank_pattern=patterns, alpha_pattern=dict(patterns), init_lora_weights=False,
                     modules_to_save=list(saved) or None)
    with transaction(model) as txn:
        for t in targets:
            layer = model.get_submodule(t)
            parts = [(n, w) for n, w in zip(names, weights) if n in layer.r]
            txn.on_undo(lambda layer=layer: layer.delete_adapter(new_name))
            layer.add_adapter(new_name, ranks[t], ranks[t], cfg)  # scaling = alpha / r = 1
            _concat_into(layer, parts, new_name)
            if isinstance(layer, MultiheadAttention):  # its out_proj wrapper got the adapter too
                _concat_into(layer.out_proj_lora, parts, new_name)
        for p, (source,) in saved.items():
            module = model.get_submodule(p)
            txn.on_undo(lambda m=module: m.delete_adapter(new_name))
            _carry_copy(module, source, new_name)
        state.configs[new_name] = cfg
        state.targets[new_name] = targets
        for _, w in wrappers(model):
            w.set_active(state.active)
        set_adapter_grads(model, [new_name], state.active)
