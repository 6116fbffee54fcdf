"""Forms (b) and (a): the merged model, and the full model with its adapter layers.

(b) ``save_merged``: ``W + ΔW`` in the base architecture. A transformers model is saved with
    ``save_pretrained`` (reload with ``AutoModel*.from_pretrained``), any other module as a
    safetensors state dict ``model.safetensors`` (reload with ``load_state_dict``). The caller's
    model is not changed: a copy is merged.

    Tied weights: "correct" means the saved model computes exactly what the adapted model
    computes. When an adapter changes a weight that is tied to another module (LoRA on
    ``embed_tokens`` and/or ``lm_head`` of a model with ``tie_word_embeddings``), the two uses
    now need different matrices (E + ΔE for the lookup, W + ΔW for the output head), so the
    merged copy unties them and records ``tie_word_embeddings=False``: same architecture class,
    one more matrix of parameters. A plain nn.Module cannot record that, so it is refused.

(a) ``save_full`` / ``load_full``: every tensor of the adapted model (base + all adapters) in
    ``lorakit_model.safetensors`` and the adapters' configs, targets and active list in
    ``lorakit_state.json``, to resume training exactly.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from lorakit.adapters import adapter_names, set_adapter, wrappers
from lorakit.config import LoraConfig
from lorakit.inits import inject_for_loading
from lorakit.io.peft_format import PathLike, effective_config, read_tensors
from lorakit.io.safe_write import _umask, ensure_dir, write_files_atomically, write_text_file
from lorakit.layers import LoraLayer
from lorakit.layers.mixed_kernels import adapters_updated
from lorakit.merge import merge_and_unload, untie_adapted_weights
from lorakit.state import get_state, require_state
from lorakit.transaction import transaction

MERGED_WEIGHTS_NAME = "model.safetensors"
FULL_WEIGHTS_NAME = "lorakit_model.safetensors"
FULL_STATE_NAME = "lorakit_state.json"
FULL_FORMAT = "lorakit-full"
FULL_FORMAT_VERSION = 1


def _is_hf(model: nn.Module) -> bool:
    return hasattr(model, "save_pretrained") and hasattr(model, "config")


def save_merged(model: nn.Module, directory: PathLike, adapter_names: Sequence[str] | None = None,
                safe_merge: bool = False, *, dtype: torch.dtype | None = None) -> Path:
    """Save ``W + ΔW`` in the base architecture (form b); ``model`` itself keeps its adapters.

    Args:
        adapter_names: adapters to merge (default: the active ones).
        safe_merge: refuse to save if a merged weight would be non-finite.
        dtype: the saved weights' dtype (default: the model's own; for a quantized base, its
            compute dtype: quantized layers are dequantized, see ``merge_and_unload``).

    Returns:
        ``directory``.

    Raises:
        ValueError: no adapters, an unknown name, or (plain nn.Module) an adapted tied weight.
        NotADirectoryError / PermissionError: a bad target.
    """
    state = require_state(model)
    names = list(state.active if adapter_names is None else adapter_names)
    out = ensure_dir(directory)
    merged = copy.deepcopy(model)
    untied = untie_adapted_weights(merged, names)
    merged = merge_and_unload(merged, names, safe_merge, dtype=dtype)
    if not _is_hf(merged):
        if untied:
            raise ValueError(f"the adapters change weights that {type(model).__name__} shares between modules "
                             f"({untied}); a plain state dict cannot untie them. Save the adapter (save_adapter) "
                             "or the full model (save_full) instead")
        tensors = _unaliased(merged.state_dict())

        def write(path: str) -> None:
            from safetensors.torch import save_file

            save_file(tensors, path, metadata={"format": "pt"})

        write_files_atomically(out, {MERGED_WEIGHTS_NAME: write})
        _remove_stale_weights(out, keep={MERGED_WEIGHTS_NAME})
        return out
    tmp = tempfile.mkdtemp(dir=out, prefix=".lorakit-merged-")
    try:
        merged.save_pretrained(tmp)
        written = set(os.listdir(tmp))
        for f in sorted(written):
            if (out / f).is_dir():
                raise IsADirectoryError(f"cannot write {f!r}: {str(out / f)!r} is an existing directory")
        for f in sorted(written):
            os.chmod(os.path.join(tmp, f), 0o666 & ~_umask())  # safetensors writes 0600: give open()'s mode
            os.replace(os.path.join(tmp, f), out / f)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _remove_stale_weights(out, keep=written)
    return out


# a transformers weights file or shard index: model.safetensors, model-00001-of-00003.safetensors,
# pytorch_model.bin, model.safetensors.index.json ...
_WEIGHTS_FILE = re.compile(r"(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?")


def _remove_stale_weights(directory: Path, keep: set[str]) -> None:
    """Delete weight files and shard indexes an earlier save left in ``directory`` that the new
    save did not write: ``from_pretrained`` would otherwise read an old index or old shards."""
    for p in directory.iterdir():
        if p.is_file() and p.name not in keep and _WEIGHTS_FILE.fullmatch(p.name):
            p.unlink()


def _unaliased(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors with no two sharing storage (safetensors refuses aliases)."""
    out, seen = {}, set()
    for k, t in state.items():
        t = t.detach()
        ptr = t.untyped_storage().data_ptr() if t.numel() else -id(t)
        out[k] = (t.clone() if ptr in seen else t).contiguous()
        seen.add(ptr)
    return out


# ---------------------------------------------------------------------- form (a)
def save_full(model: nn.Module, path: PathLike) -> Path:
    """Save the model with all its adapters (form a): resumable, base weights included.

    ``path`` is a directory; it receives ``lorakit_model.safetensors`` (every tensor of
    ``model.state_dict()``, tied ones once) and ``lorakit_state.json`` (format version, each
    adapter's config and targets, the active adapters), written all or nothing.

    Raises:
        ValueError: no adapters, adapters merged into the base (``unmerge`` first: form (a)
            keeps W and ΔW apart), or a tensor subclass (torchao NF4) safetensors cannot store.
            NotADirectoryError / PermissionError: a bad target.
    """
    from lorakit import __version__

    state = require_state(model)
    merged = [p for p, w in wrappers(model) if isinstance(w, LoraLayer) and w.merged]
    if merged:
        raise ValueError(f"adapters are merged into {merged[:3]}; call lorakit.unmerge(model) before save_full "
                         "(form (a) stores the base weights and the adapters separately)")
    full = model.state_dict()
    subclassed = {k: type(t).__name__ for k, t in full.items()
                  if type(t) is not torch.Tensor and not issubclass(type(t), nn.Parameter)}
    if subclassed:  # e.g. torchao NF4Tensor weights: safetensors stores plain tensors only
        some = dict(list(subclassed.items())[:3])
        raise ValueError(f"save_full cannot write tensor subclasses to safetensors: {some}. Save the adapter "
                         "(save_adapter) and rebuild the quantized base from its checkpoint")
    tensors, aliases = {}, {}
    first: dict[int, str] = {}
    for k, t in full.items():
        ptr = t.untyped_storage().data_ptr() if t.numel() else -id(t)
        if ptr in first and full[first[ptr]].shape == t.shape and full[first[ptr]].stride() == t.stride() \
                and full[first[ptr]].storage_offset() == t.storage_offset():
            aliases[k] = first[ptr]  # a tied weight: stored once
            continue
        first.setdefault(ptr, k)
        tensors[k] = t.detach().contiguous()
    tensors = _unaliased(tensors)
    meta = {
        "format": FULL_FORMAT, "format_version": FULL_FORMAT_VERSION, "lorakit_version": __version__,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "adapters": {n: {"config": effective_config(model, n).to_peft_dict(), "targets": state.targets[n]}
                     for n in state.configs},
        "active": list(state.active), "aliases": aliases,
    }

    def write(p: str) -> None:
        from safetensors.torch import save_file

        save_file(tensors, p, metadata={"format": "pt"})

    out = Path(path)
    write_files_atomically(out, {FULL_WEIGHTS_NAME: write,
                                 FULL_STATE_NAME: lambda p: write_text_file(p, json.dumps(meta, indent=2))})
    return out


def load_full(model: nn.Module, path: PathLike) -> nn.Module:
    """Restore a ``save_full`` directory into ``model``, in place.

    ``model`` is either a plain base model of the same architecture (the adapters are injected
    from the stored configs) or a model that already has exactly the stored adapters. Every
    tensor is then loaded; the active adapters are restored.

    Raises:
        FileNotFoundError / NotADirectoryError: no such directory or files.
        ValueError: not a lorakit full save, a different set of adapters, or keys / shapes that
            do not fit ``model`` (naming the key and both shapes).
    """
    d = Path(path)
    if not d.exists():
        raise FileNotFoundError(f"{str(d)!r} does not exist")
    if not d.is_dir():
        raise NotADirectoryError(f"{str(d)!r} is a file; give the directory save_full wrote")
    meta_path = d / FULL_STATE_NAME
    if not meta_path.is_file():
        raise FileNotFoundError(f"{str(d)!r} has no {FULL_STATE_NAME}; it was not written by lorakit.save_full")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(meta_path)!r} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FULL_FORMAT:
        raise ValueError(f"{str(meta_path)!r} is not a lorakit full save (format {FULL_FORMAT!r})")
    if meta.get("format_version", 0) > FULL_FORMAT_VERSION:
        raise ValueError(f"{str(meta_path)!r} has format_version {meta['format_version']}; this lorakit reads "
                         f"up to {FULL_FORMAT_VERSION}. Upgrade lorakit")
    weights = d / FULL_WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{str(weights)!r} does not exist")
    tensors = read_tensors(weights)
    configs = {n: LoraConfig.from_peft_dict(a["config"], source=f"{meta_path}[adapters][{n}]")
               for n, a in meta["adapters"].items()}
    fresh = get_state(model) is None or not get_state(model).configs
    if not fresh and set(adapter_names(model)) != set(configs):
        raise ValueError(f"{str(d)!r} holds adapters {list(configs)} but the model has {adapter_names(model)}; "
                         "pass a plain base model or one with the same adapters")
    with transaction(model) as txn:
        if fresh:
            for n, cfg in configs.items():
                inject_for_loading(txn, cfg, n, warn=False)  # the stored base is the one the adapters need
        _load_all(model, tensors, meta.get("aliases", {}), str(weights))  # checks every key and shape first
        set_adapter(model, meta["active"])
    return model


def _load_all(model: nn.Module, tensors: dict[str, torch.Tensor], aliases: dict[str, str], source: str) -> None:
    targets = model.state_dict(keep_vars=True)
    available = set(tensors) | set(aliases)
    missing = [k for k in targets if k not in available]
    unexpected = [k for k in available if k not in targets]
    if missing or unexpected:
        raise ValueError(f"{source} does not fit this {type(model).__name__}: missing {missing[:3]} "
                         f"({len(missing)} in all), unexpected {unexpected[:3]} ({len(unexpected)} in all)")
    for k, t in targets.items():
        got = tuple(tensors[aliases.get(k, k)].shape)
        if tuple(t.shape) != got:
            raise ValueError(f"{source}: tensor {k!r} has shape {got} but this model expects {tuple(t.shape)}")
    with torch.no_grad():
        for k, t in targets.items():
            t.copy_(tensors[aliases.get(k, k)])
    adapters_updated()
