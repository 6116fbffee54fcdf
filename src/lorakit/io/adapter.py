"""Form (c): one adapter as PEFT's ``adapter_config.json`` + ``adapter_model.safetensors``.

``save_adapter`` writes exactly the tensors, keys and dtypes PEFT 0.21's ``save_pretrained``
writes for the same adapter (so the files are the same size), and a config PEFT >= 0.10 reads.
``load_adapter`` reads files written by PEFT or lorakit, injects the adapter the config
describes and loads its weights, checking every key and shape first.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Union

import torch
from torch import nn

from lorakit.adapters import set_adapter_grads
from lorakit.config import LoraConfig
from lorakit.inits import inject_for_loading
from lorakit.io import distributed
from lorakit.io.peft_format import (
    CONFIG_NAME,
    PREFIX,
    WEIGHTS_NAME,
    PathLike,
    adapter_state_dict,
    effective_config,
    infer_task_type,
    load_plan,
    peft_file_config,
    read_config_dict,
    read_tensors,
    resolve_adapter_dir,
    weights_path,
)
from lorakit.io.safe_write import write_files_atomically, write_text_file
from lorakit.layers.mixed_kernels import adapters_updated
from lorakit.state import get_state, require_state
from lorakit.transaction import Transaction, transaction


def adapter_dir(directory: PathLike, adapter_name: str) -> Path:
    """Where PEFT's ``save_pretrained`` puts an adapter: ``directory`` for ``"default"``,
    ``directory/<adapter_name>/`` for any other name."""
    return Path(directory) if adapter_name == "default" else Path(directory) / adapter_name


def save_adapter(model: nn.Module, directory: PathLike, adapter_name: str = "default", *,
                 task_type: str | None = None, save_embedding_layers: Union[bool, str] = "auto") -> Path:
    """Save adapter ``adapter_name`` in PEFT's format (form c): a few MB, merged or not at load.

    Writes ``adapter_config.json`` and ``adapter_model.safetensors`` into ``directory`` (for
    ``"default"``) or ``directory/<adapter_name>/`` (any other name), as PEFT does. Both files are
    written to temporaries first and renamed into place together, so a failed save leaves the
    previous files untouched.

    Args:
        model: a model with lorakit adapters.
        directory: the output directory (created if missing).
        adapter_name: which adapter to save.
        task_type: PEFT's ``task_type`` to record (default: the config's, else inferred from a
            transformers class, e.g. ``"CAUSAL_LM"`` for ``*ForCausalLM`` and ``GPT2LMHeadModel``).
        save_embedding_layers: also store the embedding layers' base weights; ``"auto"`` (PEFT's
            default) does when ``embed_tokens``/``lm_head`` are targeted.

    Under ``torch.distributed`` call it on every rank: FSDP2-sharded tensors are gathered (a
    collective), and only rank 0 writes — the same file a single process writes (see
    :mod:`lorakit.io.distributed`). A ``DistributedDataParallel`` wrapper is looked through.

    Returns:
        The directory the files were written to.

    Raises:
        ValueError: an unknown adapter name. NotADirectoryError / PermissionError: a bad target.
    """
    model = distributed.unwrap(model)  # torch.distributed: DDP -> the user's model
    state = require_state(model)
    if adapter_name not in state.configs:
        raise ValueError(f"no adapter named {adapter_name!r}; this model has {list(state.configs)}")
    out = adapter_dir(directory, adapter_name)
    cfg = effective_config(model, adapter_name)
    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    config = cfg.to_peft_dict(base_model_name_or_path=cfg.base_model_name_or_path or name_or_path,
                              task_type=task_type or cfg.task_type or infer_task_type(model, adapter_name))
    # torch.distributed: full tensors from FSDP2 shards (collective), then rank 0 alone writes
    tensors = distributed.gather_adapter_state(model, adapter_state_dict, adapter_name, save_embedding_layers)

    def write_weights(path: str) -> None:
        from safetensors.torch import save_file

        save_file(tensors, path, metadata={"format": "pt"})

    distributed.on_main_process(lambda: write_files_atomically(out, {
        WEIGHTS_NAME: write_weights,
        # top-level keys sorted like PEFT's; rank/alpha_pattern keep their order (the first match wins)
        CONFIG_NAME: lambda path: write_text_file(path, json.dumps(dict(sorted(config.items())), indent=2)),
    }), sync=distributed.has_dtensors(model))  # sharded: the other ranks wait until the files exist
    return out


def load_adapter(model: nn.Module, directory: PathLike, adapter_name: str = "default",
                 is_trainable: bool = False) -> nn.Module:
    """Load a PEFT-format LoRA adapter (written by PEFT or lorakit) into ``model``, in place.

    Reads the config, injects the adapter it describes (into a plain base model, or as one more
    named adapter of an already-injected model) and loads its weights. Files are read and
    checked before the model is touched, and the whole load is a transaction: if anything fails,
    the model is left exactly as it was (weights bit for bit, wrappers, ``requires_grad``).
    ``directory/<adapter_name>/`` is used when it holds the adapter (PEFT's layout for a
    non-default adapter), else ``directory``.

    Weights are read from ``adapter_model.safetensors``, or from a legacy ``adapter_model.bin``
    with ``torch.load(weights_only=True)`` only: arbitrary pickled objects are refused. Base
    tensors PEFT stores beside the adapter (trained biases, embedding layers) are loaded into the
    base of a model without adapters, as PEFT does; a model that already has adapters accepts them
    only when they equal its own (they are shared, so they would change the other adapters).

    Args:
        is_trainable: False (default, as PEFT): the adapter's parameters are frozen and the
            model is put in ``eval()`` mode. True: they train while the adapter is active.

    Under ``torch.distributed`` every rank loads the file. To train or shard the adapter, load it
    before ``fully_shard``: it is then sharded with its blocks. Into an already sharded (FSDP2)
    model it loads for inference: each base tensor of the file lands in its rank's shard and
    the adapter's own tensors stay whole (``is_trainable=True`` and DoRA are refused there).

    Returns:
        ``model``.

    Raises:
        FileNotFoundError / NotADirectoryError: no such directory or files.
        ValueError: malformed JSON, another PEFT method or an unsupported LoRA feature, a
            truncated or unsafe weights file, keys missing or unexpected, shapes that do not fit
            the model (naming the key, the expected and the found shape), base tensors that
            differ from those the model's other adapters rely on, or ``is_trainable`` or DoRA
            on an FSDP2-sharded model.
    """
    d = resolve_adapter_dir(directory, adapter_name)
    cfg = LoraConfig.from_peft_dict(read_config_dict(d), source=str(d / CONFIG_NAME))
    distributed.check_load_target(model, cfg.use_dora, is_trainable)  # torch.distributed: FSDP2-sharded model
    source = weights_path(d)
    tensors = read_tensors(source)
    state = get_state(model)
    if state is not None and adapter_name in state.configs:
        raise ValueError(f"adapter {adapter_name!r} already exists (adapters: {list(state.configs)}); "
                         "load under another adapter_name or delete it first")
    fresh = state is None or not state.configs
    cfg = peft_file_config(model, cfg, tensors)
    with transaction(model) as txn:
        try:
            with distributed.new_parameters_whole(model):  # an FSDP2-sharded model: no stray DTensor copies
                inject_for_loading(txn, cfg, adapter_name, strict_targets=False)  # data-aware inits: allocated
        except (ValueError, TypeError) as e:
            raise type(e)(f"cannot apply the adapter in {str(d)!r} to this {type(model).__name__}: {e}") from e
        _load_tensors(txn, adapter_name, tensors, source=str(source), fresh=fresh)
        set_adapter_grads(model, [adapter_name], require_state(model).active if is_trainable else [])
    if not is_trainable:
        model.eval()
    return model


def _load_tensors(txn: Transaction, name: str, tensors: dict[str, torch.Tensor], source: str, fresh: bool) -> None:
    """Check every key and shape, then copy (casting to each tensor's dtype), journaling base writes."""
    model = txn.model
    required, aliases, base = load_plan(model, name)
    file_keys = {(k[len(PREFIX):] if k.startswith(PREFIX) else k): k for k in tensors}
    missing = [k for k in required if k not in file_keys]
    unexpected = [k for k in file_keys if k not in required and k not in aliases and k not in base]
    if missing:
        raise ValueError(f"{source}: {len(missing)} tensor(s) the config's adapter needs are missing, e.g. "
                         f"{[PREFIX + k for k in missing[:3]]}; the file does not match this model or config")
    if unexpected:
        raise ValueError(f"{source}: {len(unexpected)} tensor(s) match nothing in this "
                         f"{type(model).__name__}, e.g. {[file_keys[k] for k in unexpected[:3]]}")
    targets = model.state_dict(keep_vars=True)
    plan = {**base, **aliases, **required}
    for k, fk in file_keys.items():
        want, got = tuple(targets[plan[k]].shape), tuple(tensors[fk].shape)
        if want != got:
            raise ValueError(f"{source}: tensor {fk!r} has shape {got} but this model expects {want}; "
                             "the adapter was trained for a different model size or rank")
    shared = [k for k in file_keys if k in base and not _equal(targets[base[k]], tensors[file_keys[k]])]
    if shared and not fresh:
        others = [a for a in require_state(model).configs if a != name]
        raise ValueError(f"{source} carries base tensors that differ from this model's, e.g. "
                         f"{[file_keys[k] for k in shared[:3]]} (PEFT stores trained biases and embedding layers "
                         f"beside the adapter). Base tensors are shared, so loading them would change the outputs of "
                         f"adapters {others}; load this adapter into a model without adapters instead")
    with torch.no_grad():
        for k, fk in file_keys.items():
            if k in base:
                if k not in shared:
                    continue
                txn.keep(targets[base[k]])
            distributed.copy_full_into(targets[plan[k]], tensors[fk])  # a DTensor: this rank's shard
    adapters_updated()


def _equal(current: torch.Tensor, value: torch.Tensor) -> bool:
    current = distributed.full_tensor(current.detach())  # an FSDP2 shard: gathered (collective, every rank)
    return current.shape == value.shape and torch.equal(current.cpu(), value.to(current.dtype).cpu())
