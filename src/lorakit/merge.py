"""Merging adapters into the base weights, and combining adapters (the maths: ``lorakit.combine``).

``merge`` folds ``W ← W + scaling·B·A`` into each adapted layer (a stack per layer, so ``unmerge``
takes them out in reverse order, restoring W to dtype tolerance). Nothing here ever runs as a
side effect of ``train()``/``eval()``.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from lorakit.adapters import _check_names, set_adapter_grads
from lorakit.combine import check_combination, combined_factors, peft_rank
from lorakit.inject import unload
from lorakit.layers import (
    LoraLayer,
    ModulesToSave,
    TrainableTokens,
    wrappers,
)
from lorakit.layers.quantized import requantization_report
from lorakit.merge_quantized import apply_dequantize, finish_dequantized, plan_dequantize, refuse_inexact_unmerge
from lorakit.state import require_state
from lorakit.transaction import Transaction, transaction


def _lora_layers(model: nn.Module) -> list[LoraLayer]:
    return [w for _, w in wrappers(model) if isinstance(w, LoraLayer)]


def untie_adapted_weights(model: nn.Module, names: Sequence[str], txn: Transaction | None = None) -> list[str]:
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
    layers = [(path, w) for path, w in wrappers(model) if isinstance(w, LoraLayer)]
    untied = []
    for path, layer in layers:
        if not any(n in layer.r and n not in layer.merged_adapters for n in names):
            continue
        weight = layer.base_weight()
        sharing = [w for _, w in layers if w.base_weight() is weight]
        group = layer.tied_group()
        if group is not None and len(sharing) == owners.get(id(weight), 0) and all(
                w.tied_group() is group for w in sharing):
            continue  # e.g. an output layer following the embedding's token rows: both keep the one weight
        if owners.get(id(weight), 0) > 1:
            owner, attr = layer.weight_owner()
            if txn is not None:
                txn.on_undo(lambda owner=owner, attr=attr, weight=weight: setattr(owner, attr, weight))
            setattr(owner, attr, nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad))
            untied.append(path)
    config = getattr(model, "config", None)
    if untied and config is not None:
        text = getattr(config, "get_text_config", None)
        for c in (config, text() if callable(text) else None):
            if getattr(c, "tie_word_embeddings", False):
                if txn is not None:
                    txn.on_undo(lambda c=c: setattr(c, "tie_word_embeddings", True))
                c.tie_word_embeddings = False
    if untied:
        warnings.warn(f"merging into {untied}, whose weights are tied to another module: untied them (the other "
                      "module keeps the base weight; tie_word_embeddings=False)", stacklevel=3)
    return untied


def merge(model: nn.Module, adapter_names: Sequence[str] | None = None, safe_merge: bool = False) -> None:
    """Fold the given adapters (default: the active ones) into the base weights.

    Adapters already merged are skipped, so merging twice changes nothing. Every refusal (and,
    with ``safe_merge``, every non-finite result) is found before any weight changes; the merge
    itself is a transaction: if it fails midway, the layers merged so far are unmerged again.

    Args:
        safe_merge: first check, for every layer, that the merged weights are finite; if any is
            not, raise before any weight is touched.

    Raises:
        ValueError: an unknown adapter name, a layer refusing the merge, or (safe_merge) non-finite
            merged weights; no weight was changed.
    """
    names = _merge_names(model, adapter_names, "merge")
    layers = plan_merge(model, names, safe_merge)
    with transaction(model) as txn:
        apply_merge(txn, model, layers, names)


def _merge_names(model: nn.Module, adapter_names: Sequence[str] | None, what: str) -> list[str]:
    state = require_state(model)
    names = list(state.active if adapter_names is None else adapter_names)
    _check_names(model, names, what)
    return names


def plan_merge(model: nn.Module, names: Sequence[str], safe_merge: bool) -> list[LoraLayer]:
    """The layers a merge of ``names`` writes into, every refusal checked first. Changes nothing.

    Raises:
        ValueError: a layer refuses one of the adapters, or (``safe_merge``) a merged weight would
            not be finite.
    """
    layers = _lora_layers(model)
    for layer in layers:
        for name in names:
            if name in layer.r and name not in layer.merged_adapters:
                refusal = layer.merge_refusal(name)
                if refusal is not None:
                    raise ValueError(f"{refusal}. No weight was changed.")
    if safe_merge:
        for layer in layers:
            for name in names:
                if name in layer.r and name not in layer.merged_adapters and not layer.merged_weight_is_finite(name):
                    raise ValueError(f"merging adapter {name!r} gives non-finite weights in "
                                     f"{type(layer.base_layer).__name__}; the adapter is broken. "
                                     "No weight was changed.")
    return layers


def apply_merge(txn: Transaction, model: nn.Module, layers: Sequence[LoraLayer], names: Sequence[str]) -> None:
    """Merge ``names`` into checked ``layers`` (see :func:`plan_merge`), each journaled in ``txn``."""
    untie_adapted_weights(model, names, txn)
    with requantization_report(model):  # quantized layers re-quantize: one warning with the measured error
        for layer in layers:
            txn.on_undo(layer.merge_journal())
            layer.merge(names)


def unmerge(model: nn.Module) -> None:
    """Take every merged adapter back out of the base weights (a no-op when nothing is merged).

    A transaction: if it fails midway, the layers unmerged so far are merged again.

    Raises:
        ValueError: an adapter was merged into a re-quantized (4/8-bit) weight; nothing is changed.
    """
    require_state(model)
    refuse_inexact_unmerge(model)
    with transaction(model) as txn:
        for layer in _lora_layers(model):
            txn.on_undo(layer.merge_journal())
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

    All or nothing: every check (refusals of every layer, quantized or not; ``safe_merge``;
    readable quantized weights) comes before any change, and the changes run in one transaction.

    Args:
        dtype: cast the returned model's floating parameters to this dtype (default: unchanged,
            or the compute dtype for a quantized base).

    Raises:
        ValueError: an unknown adapter name or a refused merge; the model is unchanged.
    """
    state = require_state(model)
    names = _merge_names(model, adapter_names, "merge_and_unload")
    plan = plan_dequantize(model, names, safe_merge, dtype)  # checks every adapted layer, quantized or not
    with transaction(model) as txn:
        dequantized_dtype = apply_dequantize(model, plan, txn)
        apply_merge(txn, model, _lora_layers(model), names)  # the layers left: none refuses (checked above)
        model = unload(model, keep_trained_copy_of=state.active[0], txn=txn)
        dtype = dtype or dequantized_dtype
        if dtype is not None:
            finish_dequantized(model, dtype, txn)
    return model


def _carry_copy(saved: ModulesToSave, source: str, new_name: str) -> None:
    """The new adapter's copy of a ``modules_to_save`` module: an exact copy of ``source``'s (the
    one combined adapter that has one). A trained head is not a delta, so no weight applies."""
    saved.add_adapter(new_name)
    with torch.no_grad():
        for t, v in zip(saved.modules_to_save[new_name].state_dict(keep_vars=True).values(),
                        saved.modules_to_save[source].state_dict(keep_vars=True).values()):
            t.copy_(v)


def combine_adapters(model: nn.Module, names: Sequence[str], weights: Sequence[float], new_name: str, *,
                     combination_type: str = "cat", svd_rank: int | None = None, svd_clamp: float | None = None,
                     svd_full_matrices: bool = True, svd_driver: str | None = None, density: float | None = None,
                     majority_sign_method: str = "total") -> None:
    """Add adapter ``new_name``, a weighted combination of adapters ``names`` (PEFT's
    ``add_weighted_adapter``; the maths of every type is in ``lorakit.combine``).

    The default, ``"cat"``, is exact: ``ΔW_new = Σ_i w_i·ΔW_i`` by concatenating ranks,
    ``A_new = [w_1 s_1 A_1; w_2 s_2 A_2; ...]``, ``B_new = [B_1, B_2, ...]``, scaling 1. (PEFT's default
    is ``"svd"``; its ``"cat"`` gives the same ΔW, zero-padded to one rank for all layers.) Each
    layer's rank is what its combination has; the new config records it per layer (exact-name
    ``rank_pattern``/``alpha_pattern``, alpha = rank) so that it rebuilds the same shapes. A
    ``modules_to_save`` copy (a trained head) is carried over exactly from the one combined adapter
    that has it; as in PEFT, two combined adapters with copies of the same module are refused
    (heads do not add up). With one adapter the type is ``"linear"`` (as PEFT), which is exact.
    The new adapter is added inactive; ``set_adapter(model, new_name)`` uses it.

    Args:
        combination_type: ``cat``, ``linear``, ``svd``, ``ties``, ``ties_svd``, ``dare_linear``,
            ``dare_ties``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune``,
            ``magnitude_prune_svd``.
        svd_rank: rank of the ``_svd`` types (default: the largest rank of the adapters' configs).
        svd_clamp: quantile at which to clamp the SVD factors (``_svd`` types).
        svd_full_matrices, svd_driver: passed to ``torch.linalg.svd``.
        density: fraction of entries kept by the pruning types (``ties*``, ``dare*``, ``magnitude_prune*``).
        majority_sign_method: ``"total"`` or ``"frequency"`` (``ties*``).

    Raises:
        ValueError: unknown names, mismatched lengths, an existing ``new_name``, DoRA or
            ``target_parameters`` adapters (their updates are not B·A sums), two adapters saving
            the same module, a bad combination argument, unequal ranks for a factor merge.
    """
    state = require_state(model)
    names = list(names)
    _check_names(model, names, "combine_adapters")
    if len(weights) != len(names) or not names:
        raise ValueError(f"combine_adapters needs one weight per adapter: got {len(names)} names, "
                         f"{len(weights)} weights")
    if new_name in state.configs:
        raise ValueError(f"adapter {new_name!r} already exists")
    configs = [state.configs[n] for n in names]
    if any(c.use_dora for c in configs):
        raise ValueError("DoRA adapters cannot be combined (their magnitudes do not add)")
    if any(c.target_parameters for c in configs):
        raise ValueError("adapters with target_parameters cannot be combined (as in PEFT): their per-expert updates "
                         "are not one B·A")
    kind = check_combination(combination_type, len(names), density, majority_sign_method)
    targets = set(t for n in names for t in state.targets[n])
    layers = [(p, w) for p, w in wrappers(model) if p in targets]  # model order: PEFT's order of random draws
    saved = {p: [n for n in names if n in w.modules_to_save] for p, w in wrappers(model)
             if isinstance(w, ModulesToSave) and any(n in w.modules_to_save for n in names)}
    clash = {p: ns for p, ns in saved.items() if len(ns) > 1}
    if clash:
        raise ValueError(f"combine_adapters: {clash} — several of the adapters have their own trained copy of the "
                         "same module (modules_to_save); copies do not add up. Combine adapters whose saved "
                         "modules differ")
    tokens = {p: [n for n in names if n in w.r] for p, w in wrappers(model)
              if isinstance(w, TrainableTokens) and w.source is None and any(n in w.r for n in names)}
    for p, ns in tokens.items():  # rows are replaced, not added: several adapters' rows must be disjoint
        rows = [i for n in ns for i in model.get_submodule(p).token_indices[n]]
        if len(set(rows)) != len(rows):
            raise ValueError(f"combine_adapters: adapters {ns} train overlapping token rows of {p!r} "
                             "(trainable_token_indices); trained rows do not add up. Combine adapters whose rows "
                             "are disjoint")
    options = dict(svd_rank=svd_rank or peft_rank("svd", configs), density=density, svd_clamp=svd_clamp,
                   majority_sign_method=majority_sign_method, svd_full_matrices=svd_full_matrices,
                   svd_driver=svd_driver)
    # PEFT first creates the new adapter (rank peft_rank, its first adapter's init), drawing random
    # numbers, then merges; lorakit draws the same, so a seeded DARE combination is PEFT's
    init = configs[0].init_lora_weights if configs[0].init_lora_weights in (True, False, "gaussian") else False
    alloc = dataclasses.replace(configs[0], init_lora_weights=init, use_rslora=False, lora_dropout=0.0, bias="none",
                                modules_to_save=None, trainable_token_indices=None, layers_to_transform=None,
                                layers_pattern=None)
    rank = options["svd_rank"] if kind.endswith("svd") else peft_rank(kind, configs)
    with transaction(model) as txn:
        for _, layer in layers:
            txn.on_undo(lambda layer=layer: layer.delete_adapter(new_name))
            layer.add_adapter(new_name, rank, rank, alloc)
        factors = {}
        for path, layer in layers:
            parts = [(n, w) for n, w in zip(names, weights) if n in layer.r]
            factors[path] = [combined_factors(layer, parts, kind, **options)]
            for sub in layer.sub_layers()[1:]:  # e.g. an attention's out_proj wrapper gets the adapter too
                factors[path].append(combined_factors(sub, parts, kind, **options))
        ranks = {p: f[0][0].shape[0] for p, f in factors.items()}
        patterns = {re.escape(p): r for p, r in ranks.items()}
        cfg = dataclasses.replace(
            alloc, r=max(ranks.values()), lora_alpha=max(ranks.values()), target_modules=list(ranks),
            rank_pattern=patterns, alpha_pattern=dict(patterns), init_lora_weights=False,
            lora_bias=any(b is not None for f in factors.values() for _, _, b in f),
            modules_to_save=list(saved) or None, exclude_modules=None, target_parameters=None,
            trainable_token_indices={p.removesuffix(".token_adapter"): [
                i for n in ns for i in model.get_submodule(p).token_indices[n]] for p, ns in tokens.items()} or None)
        for path, layer in layers:
            if ranks[path] != rank or cfg.lora_bias != alloc.lora_bias:
                with torch.random.fork_rng(devices=[]):  # the final shapes; no more draws
                    layer.delete_adapter(new_name)
                    layer.add_adapter(new_name, ranks[path], ranks[path], cfg)  # scaling = alpha / r = 1
            for sub, (A, B, bias) in zip(layer.sub_layers(), factors[path]):
                sub.set_factors(new_name, A, B, bias)
        for p, (source,) in saved.items():
            module = model.get_submodule(p)
            txn.on_undo(lambda m=module: m.delete_adapter(new_name))
            _carry_copy(module, source, new_name)
        for p, ns in tokens.items():  # trained rows carried exactly (the union), like a saved copy
            owner = model.get_submodule(p)
            rows = cfg.trainable_token_indices[p.removesuffix(".token_adapter")]
            for _, w in wrappers(model):
                if isinstance(w, TrainableTokens) and w.owner is owner and any(n in w.r for n in ns):
                    txn.on_undo(lambda w=w: w.delete_adapter(new_name))
                    w.add_tokens(new_name, rows, cfg)
            with torch.no_grad():
                owner.trainable_tokens_delta[new_name].copy_(torch.cat([owner.trainable_tokens_delta[n] for n in ns]))
        state.add(model, new_name, cfg, list(ranks))
        set_adapter_grads(model, [new_name], state.active)
