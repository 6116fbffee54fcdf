"""Find the modules a config targets (a pure dry run), wrap them, and take the wrappers out again.

Matching follows PEFT's rules, applied to each module's full dotted name:

* a list: exact name, or dotted suffix (``"q_proj"`` matches ``model.layers.3.self_attn.q_proj``),
  then restricted to ``layers_to_transform`` (the index after ``.<layers_pattern>.``);
* a string: ``re.fullmatch(target_modules, name)``;
* ``"all-linear"``: every Linear / GPT-2 Conv1D except the model's output head, the
  ``modules_to_save`` and the ``out_proj`` of an nn.MultiheadAttention (read by the attention
  module, not called); layer indices apply;
* ``exclude_modules`` (same forms, no layer indices) removes matches.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator

from torch import nn

from lorakit.adapters import refresh_trainable, wrappers
from lorakit.config import ALL_LINEAR, LoraConfig
from lorakit.layers import LoraLayer, is_linear_like, is_supported, wrap
from lorakit.layers.saved import ModulesToSave
from lorakit.state import get_state


def _matches_list(name: str, patterns: list[str]) -> bool:
    return any(name == p or name.endswith("." + p) for p in patterns)


def _layer_index(name: str, layers_pattern) -> int | None:
    pats = [layers_pattern] if isinstance(layers_pattern, str) else (layers_pattern or [None])
    for pat in pats:
        m = re.match(rf".*\.{pat}\.(\d+)\." if pat else r".*\.[^.]*\.(\d+)\.", name)
        if m is None and pat:  # a top-level module list, e.g. "layers.0.attn"
            m = re.match(rf"{pat}\.(\d+)\.", name)
        if m is not None:
            return int(m.group(1))
    return None


def _in_layers(name: str, cfg: LoraConfig) -> bool:
    if cfg.layers_to_transform is None:
        return True
    idx = _layer_index(name, cfg.layers_pattern)
    wanted = [cfg.layers_to_transform] if isinstance(cfg.layers_to_transform, int) else cfg.layers_to_transform
    return idx is not None and idx in wanted


def _excluded(name: str, cfg: LoraConfig) -> bool:
    ex = cfg.exclude_modules
    if ex is None:
        return False
    return re.fullmatch(ex, name) is not None if isinstance(ex, str) else _matches_list(name, ex)


def candidate_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` for every module of the user's model, skipping lorakit's own internals
    (a wrapper stands for the module it wraps; its ``base_layer`` and factors are not candidates)."""
    skip: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(s) for s in skip):
            continue
        if isinstance(module, (LoraLayer, ModulesToSave)):
            skip.append(name + ".")
        yield name, module


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    try:
        return get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        return None


def _mha_out_projs(model: nn.Module) -> set[int]:
    return {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}


def find_targets(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Names of the modules ``inject(model, cfg)`` would adapt, in model order. Changes nothing.

    Raises:
        ValueError: nothing matches (the message lists the patterns and real module names).
        TypeError: a matched module has a type lorakit cannot adapt.
    """
    spec = cfg.target_modules
    if spec is None:
        raise ValueError("target_modules is not set: give module names, a regex or 'all-linear'. "
                         f"Some module names in this model: {_sample_names(model)}")
    saved = cfg.modules_to_save or []
    head = _output_head(model)
    out_projs = _mha_out_projs(model)
    found: list[str] = []
    for name, module in candidate_modules(model):
        if spec == ALL_LINEAR:
            hit = (is_linear_like(getattr(module, "base_layer", module)) and module is not head
                   and id(module) not in out_projs and not _matches_list(name, saved) and _in_layers(name, cfg))
        elif isinstance(spec, str):
            hit = re.fullmatch(spec, name) is not None
        else:
            hit = _matches_list(name, spec) and _in_layers(name, cfg)
        if not hit or _excluded(name, cfg):
            continue
        if not is_supported(module):
            raise TypeError(f"target_modules={spec!r} matched {name!r}, a {type(module).__name__}, which lorakit "
                            "cannot adapt (supported: Linear, Conv1D, Embedding, Conv1d/2d/3d, MultiheadAttention). "
                            "Name its sub-layers instead, e.g. "
                            f"{[n.rsplit('.', 1)[-1] for n, m in module.named_modules() if n and is_supported(m)][:6]}")
        if id(module) in out_projs:
            raise ValueError(f"{name!r} is the out_proj of an nn.MultiheadAttention, which reads its weight directly; "
                             "target the attention module itself (its out_proj is then adapted too)")
        found.append(name)
    if not found:
        extra = f", layers_to_transform={cfg.layers_to_transform!r}" if cfg.layers_to_transform is not None else ""
        raise ValueError(f"target_modules={spec!r}{extra} matched no module of this {type(model).__name__}. "
                         f"Adaptable modules include: {_sample_names(model)}")
    return found


def _sample_names(model: nn.Module, k: int = 8) -> list[str]:
    names = [n for n, m in candidate_modules(model) if is_supported(m)]
    leaves = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in names))
    return leaves[:k] + [n for n in names[:3] if n not in leaves]


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the dotted ``name`` is in ``model`` (``""`` is not allowed: the root stays)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def inject(model: nn.Module, cfg: LoraConfig, adapter_name: str = "default", *,
           autocast_adapter_dtype: bool = True) -> nn.Module:
    """Add LoRA adapter ``adapter_name`` to the modules ``cfg`` targets, in place; freeze the rest.

    The first call wraps each target in a lorakit layer; later calls with new names add
    adapters to the layers they target. The first adapter is active; others are added inactive
    (``set_adapter`` switches). Only the active adapter's factors, its ``modules_to_save``
    copies and the biases that ``cfg.bias`` names keep ``requires_grad``.

    Args:
        model: any nn.Module (a Hugging Face model stays one).
        cfg: the adapter's configuration.
        adapter_name: a new name for this adapter.
        autocast_adapter_dtype: keep adapter weights in fp32 on fp16/bf16 layers (PEFT's default).

    Returns:
        ``model`` itself.

    Raises:
        ValueError: a bad or duplicate adapter name, or no module matches.
        TypeError: ``cfg`` is not a LoraConfig, or a match cannot be adapted.
    """
    if not isinstance(cfg, LoraConfig):
        raise TypeError(f"cfg must be a lorakit.LoraConfig, got {type(cfg).__name__}")
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name or adapter_name == "__base__":
        raise ValueError(f"adapter_name must be a non-empty string without '.', not '__base__'; got {adapter_name!r}")
    state = get_state(model, create=True)
    if adapter_name in state.configs:
        raise ValueError(f"adapter {adapter_name!r} already exists (adapters: {list(state.configs)}); "
                         "choose another name or delete it first")
    targets = find_targets(model, cfg)
    saved = _find_modules_to_save(model, cfg)
    if any(type(model.get_submodule(n)).__name__ == "Conv1D" for n in targets) and not cfg.fan_in_fan_out:
        cfg = dataclasses.replace(cfg, fan_in_fan_out=True)  # GPT-2 layout, recorded as PEFT does
    dtype = None if autocast_adapter_dtype else "base"
    for name in targets:
        module = model.get_submodule(name)
        if not isinstance(module, LoraLayer):
            module = wrap(module)
            replace_module(model, name, module)
        weight = module.base_weight()
        module.add_adapter(adapter_name, cfg.rank_for(name), cfg.alpha_for(name), cfg,
                           dtype=weight.dtype if dtype == "base" else None)
        module.train(module.base_layer.training)  # new dropout modules follow the model's train/eval mode
    for name in saved:
        module = model.get_submodule(name)
        if not isinstance(module, ModulesToSave):
            module = ModulesToSave(module)
            replace_module(model, name, module)
        module.add_adapter(adapter_name)
        module.train(module.original_module.training)
    state.configs[adapter_name] = cfg
    state.targets[adapter_name] = targets
    if not state.active:
        state.active = [adapter_name]
    for _, w in wrappers(model):
        w.set_active(state.active)
    refresh_trainable(model)
    _enable_checkpointing_grads(model)
    return model


def _find_modules_to_save(model: nn.Module, cfg: LoraConfig) -> list[str]:
    if not cfg.modules_to_save:
        return []
    names = [n for n, m in candidate_modules(model) if _matches_list(n, cfg.modules_to_save)]
    if not names:
        raise ValueError(f"modules_to_save={cfg.modules_to_save!r} matched no module. "
                         f"Module names include: {[n for n, _ in candidate_modules(model)][-8:]}")
    return names


def _enable_checkpointing_grads(model: nn.Module) -> None:
    """With reentrant gradient checkpointing, a block whose inputs need no grad gives its LoRA
    factors no grad either; make the embeddings' output require grad, as PEFT does."""
    new_name = hasattr(type(model), "is_activation_checkpointing")  # transformers >= 5 renamed the flag
    flag = "is_activation_checkpointing" if new_name else "is_gradient_checkpointing"
    if getattr(model, flag, False) and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()


def unload(model: nn.Module, keep_trained_copy_of: str | None = None) -> nn.Module:
    """Replace every wrapper with the module it wraps, dropping all adapters (merged ones stay in W).

    Args:
        keep_trained_copy_of: ``modules_to_save`` become this adapter's trained copy (as
            ``merge_and_unload`` does for the active adapter); by default, and for modules
            without such a copy, their original (untrained) module.

    Returns:
        ``model``.
    """
    for name, module in list(candidate_modules(model)):
        if isinstance(module, LoraLayer):
            base = module.base_layer
            if isinstance(base, nn.MultiheadAttention) and isinstance(base.out_proj, LoraLayer):
                base.out_proj = base.out_proj.base_layer
            replace_module(model, name, base)
        elif isinstance(module, ModulesToSave):
            copies = module.modules_to_save
            keep = copies[keep_trained_copy_of] if keep_trained_copy_of in copies else module.original_module
            replace_module(model, name, keep)
    if get_state(model) is not None:
        del model._lorakit
    return model
