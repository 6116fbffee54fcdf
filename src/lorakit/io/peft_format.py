"""PEFT's adapter file format: which tensors go in the file, the config PEFT writes, reading files safely.

Key names come from ``lorakit.io.keymap`` (the one structural map of adapter keys). Beside an
adapter's own tensors PEFT writes some base tensors: the biases ``bias`` trains (``"all"``: every
``*.bias``; ``"lora_only"``: ``<adapted layer>.base_layer.bias``) and, when ``embed_tokens``/``lm_head``
are targeted, the embedding layers' base weights (PEFT's ``save_embedding_layers="auto"``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

from lorakit.config import ALL_LINEAR, TASK_HEADS, LoraConfig
from lorakit.inject import candidate_modules
from lorakit.io.keymap import PREFIX, alias_plan, base_plan, file_plan, saved_copy_paths
from lorakit.layers import LoraLayer, wrappers
from lorakit.matching import matches_any
from lorakit.state import require_state

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")  # PEFT's EMBEDDING_LAYER_NAMES

PathLike = Union[str, os.PathLike]
__all__ = ["PREFIX", "CONFIG_NAME", "WEIGHTS_NAME", "adapter_state_dict", "load_plan", "effective_config",
           "infer_task_type", "peft_file_config", "resolve_adapter_dir", "read_config_dict", "weights_path",
           "read_tensors"]


def embedding_is_targeted(model: nn.Module, cfg: LoraConfig) -> bool:
    """PEFT's test for saving the embedding layers: ``embed_tokens``/``lm_head`` named in a list
    ``target_modules``, or matched by a regex one."""
    t = cfg.target_modules
    if isinstance(t, str) and t != ALL_LINEAR:
        return any(re.fullmatch(t, n) for n, _ in model.named_modules()
                   if any(re.match(rf"(.*\.)?{e}$", n) for e in EMBEDDING_LAYER_NAMES))
    return isinstance(t, list) and any(e in t for e in EMBEDDING_LAYER_NAMES)


def _vocab_resized(model: nn.Module) -> bool:
    """PEFT's other reason to save embeddings: the vocabulary differs from the base model's
    (checked, as PEFT does, against ``config.json`` of a local ``_name_or_path``)."""
    config = getattr(model, "config", None)
    vocab, base = getattr(config, "vocab_size", None), getattr(config, "_name_or_path", None)
    path = Path(base) / "config.json" if base else None
    if not vocab or path is None or not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("vocab_size", vocab) != vocab
    except (OSError, ValueError):
        return False


def _embedding_keys(model: nn.Module, cfg: LoraConfig, save_embedding_layers: Union[bool, str]) -> list[str]:
    """Model keys of the embedding layers' base weights that PEFT puts in the file."""
    targeted = embedding_is_targeted(model, cfg)
    if save_embedding_layers == "auto":  # with trainable tokens, PEFT saves them only for a resized vocabulary
        save_embedding_layers = (targeted and cfg.trainable_token_indices is None) or _vocab_resized(model)
    if not save_embedding_layers or not hasattr(model, "get_input_embeddings"):
        return []
    keys: list[str] = []
    base_keys = list(base_plan(model).values())
    for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
        base = getattr(layer, "base_layer", None)
        if targeted and not isinstance(base, (nn.Linear, nn.Embedding)):
            continue
        wanted = base if targeted else layer
        name = next((n for n, m in model.named_modules() if m is wanted and wanted is not None), None)
        if name:
            keys += [k for k in base_keys if k.startswith(name + ".")]
    return list(dict.fromkeys(keys))


def adapter_state_dict(model: nn.Module, name: str,
                       save_embedding_layers: Union[bool, str] = "auto") -> dict[str, torch.Tensor]:
    """The tensors PEFT's ``save_pretrained`` writes for adapter ``name``, under PEFT's keys.

    Tensors are detached, contiguous, and never share storage (safetensors refuses aliases; a
    tied embedding/lm_head pair is stored twice, as PEFT does).
    """
    cfg = require_state(model).configs[name]
    state = model.state_dict()
    chosen = file_plan(model, name)  # file key -> model key
    base = [mk for fk, mk in base_plan(model).items() if fk == mk]
    if cfg.bias == "all":  # every base bias, and (as PEFT writes them twice) the saved copies' biases
        extra = {mk: mk for mk in base if mk.rsplit(".", 1)[-1] == "bias"}
        extra.update({fk: mk for fk, mk in alias_plan(model, name).items() if mk.rsplit(".", 1)[-1] == "bias"})
    elif cfg.bias == "lora_only":
        extra = {f"{p}.base_layer.bias": f"{p}.base_layer.bias" for p, w in wrappers(model)
                 if isinstance(w, LoraLayer) and w.ranked and name in w.r and f"{p}.base_layer.bias" in state}
    else:
        extra = {}
    extra.update({mk: mk for mk in _embedding_keys(model, cfg, save_embedding_layers)})
    for fk, mk in extra.items():
        chosen.setdefault(fk, mk)
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for fk, mk in chosen.items():
        t = state[mk].detach()
        ptr = t.untyped_storage().data_ptr() if t.numel() else -id(t)
        t = t.clone() if ptr in seen else t  # no aliasing inside one file
        seen.add(ptr)
        out[PREFIX + fk] = t.contiguous()
    return out


def load_plan(model: nn.Module, name: str) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """Where each file key goes in ``model`` for adapter ``name`` (after ``inject``).

    Returns:
        ``(required, aliases, base)``, each ``{file key without PREFIX: model key}``. Required: the
        adapter's own tensors, which a file must hold. Aliases: PEFT's second key for a saved
        copy's tensor. Base: base tensors PEFT may also have written (trained biases, embedding
        layers), shared by every adapter on the model.
    """
    required = file_plan(model, name)
    aliases = {k: v for k, v in alias_plan(model, name).items() if k not in required}
    base = {k: v for k, v in base_plan(model).items() if k not in required and k not in aliases}
    return required, aliases, base


def peft_file_config(model: nn.Module, cfg: LoraConfig, file_keys: Iterable[str]) -> LoraConfig:
    """A config read from an adapter file, with ``modules_to_save`` resolved so that the file's
    tensors land where its writer put them.

    PEFT matches ``modules_to_save`` by plain suffix (``"classifier"`` also catches DistilBERT's
    ``pre_classifier``) and its classification model classes add their heads (``classifier`` /
    ``score``, ``qa_outputs``). A module matched only that way becomes a saved copy when the file
    holds its tensors (a PEFT file does; a lorakit one does not), so they never overwrite the
    base. Entries become exact module names.
    """
    keys = {k[len(PREFIX):] if k.startswith(PREFIX) else k for k in file_keys}
    explicit = list(cfg.modules_to_save or [])
    extra = [h for h in TASK_HEADS.get(cfg.task_type or "", ()) if h not in explicit]
    if not explicit and not extra:
        return cfg
    chosen = []
    for n, m in candidate_modules(model):
        if isinstance(m, LoraLayer) or any(n.startswith(c + ".") for c in chosen):
            continue
        if matches_any(n, explicit):  # lorakit's rule: always
            chosen.append(n)
        elif any(n.endswith(w) for w in explicit + extra):  # PEFT's wider rule: when the file says so
            leaves = m.state_dict(keep_vars=True)
            if leaves and all(f"{n}.{leaf}" in keys for leaf in leaves):
                chosen.append(n)
    return dataclasses.replace(cfg, modules_to_save=chosen or None)


def effective_config(model: nn.Module, name: str) -> LoraConfig:
    """Adapter ``name``'s config, extended so that it reproduces every layer's rank and alpha.

    An adapter built by ``inject`` already matches its config. One built otherwise (e.g. by
    ``combine_adapters``, whose per-layer ranks differ) gets an explicit ``rank_pattern`` /
    ``alpha_pattern`` entry per layer (the escaped full module name), so that PEFT and lorakit
    rebuild the same shapes from the file.
    """
    cfg = require_state(model).configs[name]
    layers = [(p, w) for p, w in wrappers(model) if isinstance(w, LoraLayer) and w.ranked and name in w.r
              and not p.endswith(".base_layer.out_proj")]  # an nn.MultiheadAttention's out_proj follows its parent
    keys = [(w.config_key(p), w) for p, w in layers]  # a parameter wrapper: "<module>.<parameter>"
    if all(w.r[name] == cfg.rank_for(k) and w.lora_alpha[name] == cfg.alpha_for(k) for k, w in keys):
        return cfg
    rank = {re.escape(k): w.r[name] for k, w in keys}
    alpha = {re.escape(k): w.lora_alpha[name] for k, w in keys}
    return dataclasses.replace(cfg, rank_pattern=rank, alpha_pattern=alpha)


_AUTO_MAPPINGS = (("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "CAUSAL_LM"),
                  ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "SEQ_2_SEQ_LM"),
                  ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "SEQ_CLS"),
                  ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "TOKEN_CLS"),
                  ("MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "QUESTION_ANS"),
                  ("MODEL_MAPPING_NAMES", "FEATURE_EXTRACTION"))


def _task_from_transformers(cls_name: str) -> str | None:
    """The task of a transformers model class, from transformers' own auto-class tables
    (``GPT2LMHeadModel`` is a causal LM, though its name does not say so)."""
    try:
        from transformers.models.auto import modeling_auto
    except ImportError:  # not a transformers model, then
        return None
    for table, task in _AUTO_MAPPINGS:
        for value in getattr(modeling_auto, table, {}).values():
            if cls_name in ((value,) if isinstance(value, str) else tuple(value)):
                return task
    return None


def infer_task_type(model: nn.Module, name: str) -> str | None:
    """PEFT's ``task_type`` for a transformers model, from its class; None when unknown.

    A classification task type is only written when the head is saved with the adapter:
    PEFT's classifier model classes wrap ``classifier``/``score`` on load and would fail on a
    file without them.
    """
    cls = type(model).__name__
    if not (hasattr(model, "config") and hasattr(model, "save_pretrained")):
        return None
    is_enc_dec = bool(getattr(model.config, "is_encoder_decoder", False))
    task = _task_from_transformers(cls)
    if task is None:  # a class transformers' tables do not list (remote code, say): its name
        if cls.endswith(("ForCausalLM", "LMHeadModel")):
            task = "CAUSAL_LM"
        elif cls.endswith("ForSeq2SeqLM") or (cls.endswith("ForConditionalGeneration") and is_enc_dec):
            task = "SEQ_2_SEQ_LM"
        elif cls.endswith("ForSequenceClassification"):
            task = "SEQ_CLS"
        elif cls.endswith("ForTokenClassification"):
            task = "TOKEN_CLS"
        elif cls.endswith("ForQuestionAnswering"):
            task = "QUESTION_ANS"
        elif cls.endswith("Model"):
            task = "FEATURE_EXTRACTION"
    heads = TASK_HEADS.get(task or "")
    if heads:
        present = {p.rsplit(".", 1)[-1] for p, _ in model.named_modules() if p.rsplit(".", 1)[-1] in heads}
        saved = {p.rsplit(".", 1)[-1] for p in saved_copy_paths(model, name)}
        if not present or not present <= saved:
            return None
    return task


# ---------------------------------------------------------------------- reading files
def resolve_adapter_dir(directory: PathLike, adapter_name: str = "default") -> Path:
    """The directory holding ``adapter_config.json``: ``directory/<adapter_name>/`` when it has
    one (where ``save_adapter`` and PEFT put a non-default adapter), else ``directory``.

    Raises:
        FileNotFoundError / NotADirectoryError: naming the path and what was expected.
    """
    d = Path(directory)
    if not d.exists():
        raise FileNotFoundError(f"adapter directory {str(d)!r} does not exist")
    if not d.is_dir():
        raise NotADirectoryError(f"{str(d)!r} is a file; give the directory holding {CONFIG_NAME}")
    sub = d / adapter_name
    if adapter_name != "default" and (sub / CONFIG_NAME).is_file():
        return sub
    if (d / CONFIG_NAME).is_file():
        return d
    subdirs = sorted(p.name for p in d.iterdir() if (p / CONFIG_NAME).is_file())
    hint = f"; sub-directories with one: {subdirs}" if subdirs else ""
    raise FileNotFoundError(f"{str(d)!r} has no {CONFIG_NAME}{hint}")


def read_config_dict(directory: Path) -> dict[str, Any]:
    """The parsed ``adapter_config.json``.

    Raises:
        FileNotFoundError: no config; ValueError: malformed JSON or not a JSON object.
    """
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{str(path)!r} is not UTF-8 text: {e}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(path)!r} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{str(path)!r}: expected a JSON object, got {type(d).__name__}")
    return d


def weights_path(directory: Path) -> Path:
    """``adapter_model.safetensors``, else the legacy ``adapter_model.bin``.

    Raises:
        FileNotFoundError: neither exists.
    """
    for name in (WEIGHTS_NAME, LEGACY_WEIGHTS_NAME):
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"{str(directory)!r} has neither {WEIGHTS_NAME} nor {LEGACY_WEIGHTS_NAME}")


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, or of a legacy ``.bin`` read with
    ``torch.load(weights_only=True)``, which refuses any pickled object that is not plain tensor
    data: lorakit never runs code from a weights file.

    Raises:
        ValueError: a truncated/corrupt file, a ``.bin`` holding other objects, or not a dict of tensors.
    """
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
        except Exception as e:  # safetensors raises its own SafetensorsError (and OSError for I/O)
            raise ValueError(f"{str(path)!r} is not a readable safetensors file (truncated or corrupt?): {e}") from e
    else:
        try:
            tensors = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # pickle.UnpicklingError, RuntimeError (bad zip), EOFError
            raise ValueError(f"{str(path)!r} could not be read as plain tensors with torch.load(weights_only=True); "
                             f"lorakit does not unpickle arbitrary objects: {type(e).__name__}: {str(e)[:300]}") from e
    if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in tensors.items()):
        raise ValueError(f"{str(path)!r} does not hold a {{name: tensor}} dict")
    return tensors
