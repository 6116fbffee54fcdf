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
* base tensors PEFT saves beside the adapter (``P.base_layer.weight`` of targeted embeddings,
  biases under ``bias="all"``) are checked to equal the model's and skipped: they are shared by
  all adapters.

Keys are mapped to the model by ``io.peft_format.load_plan``, as for ``load_adapter``, so every
layer type that can be saved and loaded (Linear, Conv1D, Embedding, Conv, nn.MultiheadAttention,
DoRA magnitudes, modules_to_save) can be hot-swapped.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Union

import torch
from torch import nn

from lorakit.adapters import _check_names
from lorakit.config import LoraConfig
from lorakit.io.keymap import PREFIX, parse_in_memory_key
from lorakit.io.peft_format import CONFIG_NAME, load_plan, read_config_dict, read_tensors, weights_path
from lorakit.layers import LoraLayer, TrainableTokens, wrappers
from lorakit.layers.mixed_kernels import adapters_updated
from lorakit.state import require_state
from lorakit.transaction import transaction

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


def _check_base_copy(key: str, current: torch.Tensor, value: torch.Tensor) -> None:
    """A base tensor in the file (PEFT saves targeted embeddings' weights, and biases under
    ``bias="all"/"lora_only"``) must equal the model's: it is shared by every adapter, so one slot
    cannot take a different one."""
    if current.shape != value.shape or not torch.equal(current.detach().cpu(), value.to(current.dtype).cpu()):
        raise ValueError(f"state-dict key {key!r} carries a base tensor different from the model's (e.g. a resized "
                         "or trained embedding, or a trained bias); hot swap only replaces adapter weights. Load it "
                         "with lorakit.load_adapter into a fresh model instead")


def _plan(model: nn.Module, sd: Mapping[str, torch.Tensor], name: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(destination, source)`` pairs, every key and shape checked before anything is written.

    Keys are PEFT file keys (with or without ``base_model.model.``) or lorakit in-memory keys of any
    adapter name; both are resolved through ``lorakit.io.keymap``, as ``load_adapter`` does."""
    required, aliases, base = load_plan(model, name)  # {file key: model key}
    adapter = {**aliases, **required}
    targets = model.state_dict(keep_vars=True)
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    named_in_keys: set[str] = set()
    seen: set[str] = set()
    for key, value in sd.items():
        fk = key[len(PREFIX):] if key.startswith(PREFIX) else key
        if fk not in adapter and fk not in base:
            parsed = parse_in_memory_key(model, fk)
            if parsed is not None:
                fk, key_name = parsed
                named_in_keys.add(key_name)
        seen.add(fk)
        if fk not in adapter:
            if fk in base and isinstance(value, torch.Tensor):
                _check_base_copy(key, targets[base[fk]], value)
                continue
            raise ValueError(f"state-dict key {key!r} names no tensor of adapter slot {name!r} in this model (as "
                             f"{fk!r}); the new weights target other modules than the slot")
        dest = targets[adapter[fk]]
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(dest.shape):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"state-dict key {key!r} has shape {shape}, but adapter slot {name!r} holds "
                             f"{tuple(dest.shape)} there; hot swap needs the same ranks (use lorakit.delete_adapter "
                             "and inject/load the new adapter instead)")
        pairs.append((dest, value))
    if len(named_in_keys) > 1:
        raise ValueError(f"the state dict holds several adapters {sorted(named_in_keys)}; pass one adapter's keys")
    missing = sorted(set(required) - seen)
    if missing:
        raise ValueError(f"the new weights do not cover {len(missing)} tensor(s) of adapter {name!r}, e.g. "
                         f"{missing[:3]}; hot swap needs the same target modules")
    return pairs


def _check_token_ids(model: nn.Module, name: str, config: LoraConfig | None) -> None:
    """Trained token rows are stored without their token ids (the ids are in the config): the new
    rows may be written into the slot only if they are for the same tokens.

    Raises:
        ValueError: the new config trains other token ids than the slot, or no config was given
            for a slot that trains token rows (the ids could not be checked).
    """
    from lorakit.inject_tokens import token_targets

    slot = {p.removesuffix(".token_adapter"): w.token_indices[name] for p, w in wrappers(model)
            if isinstance(w, TrainableTokens) and w.source is None and name in w.token_indices}
    if not slot:
        return
    if config is None or config.trainable_token_indices is None:
        what = "no config was given" if config is None else "the new config has no trainable_token_indices"
        raise ValueError(f"adapter {name!r} trains the rows of tokens {slot} (trainable_token_indices), but {what}, "
                         "so the new rows' token ids cannot be checked; pass the adapter's config (config=...) or "
                         "its directory")
    new, _ = token_targets(model, config)
    if new != slot:
        raise ValueError(f"the new adapter trains the rows of tokens {new}, but slot {name!r} holds rows for tokens "
                         f"{slot}; hot swap writes rows in place, so the token ids must be the same (load it as a "
                         "new adapter with lorakit.load_adapter instead)")


def hotswap_adapter(model: nn.Module, source: Source, adapter_name: str = "default",
                    config: LoraConfig | None = None) -> None:
    """Load new weights into the existing adapter ``adapter_name`` in place.

    Every key, shape and rank is checked before anything is written, and the writes run in a
    transaction: on any failure the slot keeps its old weights and scalings.

    Args:
        model: a model with lorakit adapters.
        source: a directory holding ``adapter_model.safetensors`` (+ ``adapter_config.json``), or a
            state dict in PEFT's key format or lorakit's in-memory one (see the module docstring).
        adapter_name: the slot to overwrite; it keeps its name, activity and parameters.
        config: the new adapter's config, when ``source`` is a state dict (a directory's own
            ``adapter_config.json`` is used otherwise). If given, each adapted module's
            ``lora_alpha`` and scaling are updated from it (its rank and alpha patterns apply per
            targeted module; an nn.MultiheadAttention's out_proj follows its attention module);
            without one they stay as they are.

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
    merged = [p for p, w in wrappers(model) if isinstance(w, LoraLayer) and adapter_name in w.merged_adapters]
    if merged:
        raise ValueError(f"adapter {adapter_name!r} is merged into {merged[:3]}; call lorakit.unmerge(model) first")
    pairs = _plan(model, sd, adapter_name)
    _check_token_ids(model, adapter_name, config)
    targets = [(t, model.get_submodule(t)) for t in state.targets[adapter_name]]  # the modules inject adapted
    if config is not None:
        bad = [(t, w.r[adapter_name], config.rank_for(w.config_key(t))) for t, w in targets
               if config.rank_for(w.config_key(t)) != w.r[adapter_name]]
        if bad:
            raise ValueError(f"the new config's ranks differ from adapter {adapter_name!r}'s, e.g. at {bad[0][0]!r}: "
                             f"r={bad[0][2]} vs r={bad[0][1]}; hot swap needs the same ranks")
    with transaction(model) as txn, torch.no_grad():
        for dest, value in pairs:
            txn.keep(dest)
            dest.copy_(value)
        adapters_updated()
        if config is not None:
            old_cfg, old_alpha = state.configs[adapter_name], {t: w.lora_alpha[adapter_name] for t, w in targets}

            def restore() -> None:
                for t, w in targets:
                    w.set_scale(adapter_name, old_alpha[t], old_cfg)
                state.set_config(adapter_name, old_cfg)

            txn.on_undo(restore)
            for t, w in targets:
                w.set_scale(adapter_name, config.alpha_for(w.config_key(t)), config)
            state.set_config(adapter_name, config)
