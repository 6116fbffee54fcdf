"""Hot swap: new weights into an existing adapter slot, in place, without re-injecting.

``hotswap_adapter(model, source, "default")`` copies each factor with ``Tensor.copy_`` into the
parameters that already exist, so every parameter keeps its identity and storage (a compiled or
captured model, an optimizer, or a ``mixed_batch`` stack cache keyed on ``tensor._version`` sees
the change). The new factors must have the slot's ranks; ``lora_alpha`` may differ (given a config,
the slot's scalings are updated).

Accepted state-dict keys, for module path ``P`` of the model lorakit was injected into:

* PEFT files: ``base_model.model.P.lora_A.weight``, ``P.lora_embedding_B``, ``P.lora_magnitude_vector``...
* lorakit in memory (``model.state_dict()``, one adapter): ``P.lora_A.<any name>.weight``,
  ``P.lora_embedding_A.<name>``...
* ``modules_to_save`` copies: ``P.<param>`` or ``P.modules_to_save.<name>.<param>``;
* base weights PEFT saves beside the adapter (``P.base_layer.weight`` of targeted embeddings) are
  checked to equal the model's and skipped: they are shared by all adapters.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Union

import torch
from torch import nn

from lorakit.adapters import _check_names, wrappers
from lorakit.config import LoraConfig
from lorakit.io.peft_format import CONFIG_NAME, PREFIX, read_config_dict, read_tensors, weights_path
from lorakit.layers import LoraLayer
from lorakit.layers.saved import ModulesToSave
from lorakit.state import require_state

FACTOR_ATTRS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
Source = Union[str, os.PathLike, Mapping[str, torch.Tensor]]


def read_adapter_dir(directory: str | os.PathLike) -> tuple[dict[str, torch.Tensor], LoraConfig | None]:
    """The adapter's tensors and, if present, its ``adapter_config.json`` (read by ``lorakit.io``:
    safetensors, or a legacy ``.bin`` with ``weights_only=True``, never unpickled).

    Raises:
        FileNotFoundError: no adapter weights in ``directory``.
        ValueError: an unreadable weights or config file.
    """
    d = Path(directory)
    sd = read_tensors(weights_path(d))
    cfg_path = d / CONFIG_NAME
    cfg = LoraConfig.from_peft_dict(read_config_dict(d), source=str(cfg_path)) if cfg_path.is_file() else None
    return sd, cfg


def _parse(key: str) -> tuple[str, str, str | None]:
    """``(module path, factor attribute or "", adapter name or None)`` of a state-dict key."""
    key = key[len(PREFIX):] if key.startswith(PREFIX) else key
    parts = key.split(".")
    hits = [i for i, p in enumerate(parts) if p in FACTOR_ATTRS]
    if not hits:
        return key, "", None
    i = hits[-1]
    rest = parts[i + 1:]
    if rest and rest[-1] == "weight":
        rest = rest[:-1]
    if len(rest) > 1:
        raise ValueError(f"cannot read state-dict key {key!r}: expected '<module>.{parts[i]}[.<adapter>][.weight]'")
    return ".".join(parts[:i]), parts[i], rest[0] if rest else None


def _target(layer: LoraLayer, attr: str, name: str) -> torch.Tensor:
    holder = getattr(layer, attr, None)
    if holder is None or name not in holder:
        raise KeyError(attr)
    item = holder[name]
    return item.weight if isinstance(item, nn.Module) else item


def _saved_target(model: nn.Module, path: str, name: str) -> torch.Tensor | None:
    """The ``modules_to_save`` copy's parameter that ``path`` names, or None."""
    for wpath, w in wrappers(model):
        if not isinstance(w, ModulesToSave) or name not in w.modules_to_save or not path.startswith(wpath + "."):
            continue
        rest = path[len(wpath) + 1:]
        marker = "modules_to_save."
        if rest.startswith(marker):
            rest = rest[len(marker):].split(".", 1)[-1]
        params = dict(w.modules_to_save[name].named_parameters()) | dict(w.modules_to_save[name].named_buffers())
        return params.get(rest)
    return None


def _check_base_copy(model: nn.Module, key: str, path: str, value: torch.Tensor) -> None:
    """A base weight in the file (PEFT saves embeddings' when they are targeted) must equal the model's:
    it is shared by every adapter, so one slot cannot take a different one."""
    try:
        current = model.get_parameter(path)
    except AttributeError:
        raise ValueError(f"state-dict key {key!r} names no parameter of this model") from None
    if current.shape != value.shape or not torch.equal(current.detach().cpu(), value.to(current.dtype).cpu()):
        raise ValueError(f"state-dict key {key!r} carries a base weight different from the model's (e.g. a resized "
                         "or trained embedding); hot swap only replaces adapter weights. Load it with "
                         "lorakit.load_adapter into a fresh model instead")


def _plan(model: nn.Module, sd: Mapping[str, torch.Tensor], name: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(destination, source)`` pairs, every key and shape checked before anything is written."""
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    named_in_keys: set[str] = set()
    covered: set[int] = set()
    for key, value in sd.items():
        path, attr, key_name = _parse(key)
        if key_name is not None:
            named_in_keys.add(key_name)
        if not attr and ".base_layer." in f".{path}":
            _check_base_copy(model, key, path, value)  # PEFT's save_embedding_layers: a copy of the base weight
            continue
        if not attr:
            dest = _saved_target(model, path, name)
            if dest is None:
                raise ValueError(f"state-dict key {key!r} is neither a LoRA factor ({', '.join(FACTOR_ATTRS)}) nor a "
                                 f"parameter of a modules_to_save copy of adapter {name!r}")
        else:
            try:
                layer = model.get_submodule(path)
            except AttributeError:
                layer = None
            if not isinstance(layer, LoraLayer):
                raise ValueError(f"state-dict key {key!r} names module {path!r}, which is not a lorakit LoRA layer of "
                                 f"this model; the adapter targets other modules than slot {name!r}")
            try:
                dest = _target(layer, attr, name)
            except KeyError:
                raise ValueError(f"state-dict key {key!r}: module {path!r} has no {attr} for adapter {name!r} "
                                 f"(its adapters: {layer.adapter_names})") from None
            covered.add(id(layer))
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(dest.shape):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"state-dict key {key!r} has shape {shape}, but adapter slot {name!r} holds "
                             f"{tuple(dest.shape)} there; hot swap needs the same ranks (use lorakit.delete_adapter "
                             "and inject/load the new adapter instead)")
        pairs.append((dest, value))
    if len(named_in_keys) > 1:
        raise ValueError(f"the state dict holds several adapters {sorted(named_in_keys)}; pass one adapter's keys")
    missing = [p for p, w in wrappers(model) if isinstance(w, LoraLayer) and name in w.r and id(w) not in covered]
    if missing:
        raise ValueError(f"the new weights do not cover {len(missing)} layer(s) of adapter {name!r}, e.g. "
                         f"{missing[:3]}; hot swap needs the same target modules")
    return pairs


def hotswap_adapter(model: nn.Module, source: Source, adapter_name: str = "default",
                    config: LoraConfig | None = None) -> None:
    """Load new weights into the existing adapter ``adapter_name`` in place.

    Args:
        model: a model with lorakit adapters.
        source: a directory holding ``adapter_model.safetensors`` (+ ``adapter_config.json``), or a
            state dict in PEFT's key format or lorakit's in-memory one (see the module docstring).
        adapter_name: the slot to overwrite; it keeps its name, activity and parameters.
        config: the new adapter's config, when ``source`` is a state dict (a directory's own
            ``adapter_config.json`` is used otherwise). If given, each layer's ``lora_alpha`` and
            scaling are updated from it; without one they stay as they are.

    Raises:
        ValueError: an unknown or merged slot, a key naming no layer of the slot, a shape (rank)
            mismatch, layers of the slot the new weights leave out, or a config whose ranks differ.
        FileNotFoundError: ``source`` is a path without adapter weights.
        TypeError: ``source`` is neither a path nor a mapping.
    """
    state = require_state(model)
    _check_names(model, [adapter_name], "hotswap_adapter")
    if isinstance(source, (str, os.PathLike)):
        sd, file_cfg = read_adapter_dir(source)
        config = config or file_cfg
    elif isinstance(source, Mapping):
        sd = source
    else:
        raise TypeError(f"source must be a directory or a state dict, got {type(source).__name__}")
    layers = [(p, w) for p, w in wrappers(model) if isinstance(w, LoraLayer) and adapter_name in w.r]
    merged = [p for p, w in layers if adapter_name in w.merged_adapters]
    if merged:
        raise ValueError(f"adapter {adapter_name!r} is merged into {merged[:3]}; call lorakit.unmerge(model) first")
    pairs = _plan(model, sd, adapter_name)
    if config is not None:
        bad = [(p, w.r[adapter_name], config.rank_for(p)) for p, w in layers if config.rank_for(p) != w.r[adapter_name]]
        if bad:
            raise ValueError(f"the new config's ranks differ from adapter {adapter_name!r}'s, e.g. at {bad[0][0]!r}: "
                             f"r={bad[0][2]} vs r={bad[0][1]}; hot swap needs the same ranks")
    with torch.no_grad():
        for dest, value in pairs:
            dest.copy_(value)
    if config is not None:
        for p, w in layers:
            alpha = config.alpha_for(p)
            w.lora_alpha[adapter_name] = alpha
            w.scaling[adapter_name] = config.scaling(w.r[adapter_name], alpha)
        state.configs[adapter_name] = config
