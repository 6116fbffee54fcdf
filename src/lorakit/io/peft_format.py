"""PEFT's adapter file format: key names, which tensors go in the file, reading files safely.

A lorakit model keeps its adapters under the same attribute names as PEFT, so the keys map one
to one. For adapter ``name`` (PEFT 0.21 ``get_peft_model_state_dict`` / ``set_peft_model_state_dict``):

    in memory (lorakit)                                   in adapter_model.safetensors
    model.layers.0.self_attn.q_proj.lora_A.<name>.weight  base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight
    model.embed_tokens.lora_embedding_A.<name>            base_model.model.model.embed_tokens.lora_embedding_A
    ...q_proj.lora_magnitude_vector.<name>  (DoRA)        base_model.model....q_proj.lora_magnitude_vector
    classifier.modules_to_save.<name>.weight              base_model.model.classifier.weight

plus, as PEFT writes them, the base biases that ``bias`` trains (``"all"``: every ``*.bias``;
``"lora_only"``: ``<adapted layer>.base_layer.bias``) and, when ``embed_tokens``/``lm_head`` are
targeted, the embedding layers' base weights (PEFT's ``save_embedding_layers="auto"``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

from lorakit.adapters import wrappers
from lorakit.config import ALL_LINEAR, LoraConfig
from lorakit.layers import LoraLayer
from lorakit.layers.saved import ModulesToSave
from lorakit.state import require_state

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the user's model
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")  # PEFT's EMBEDDING_LAYER_NAMES
# task types whose PEFT model class wraps these heads as modules_to_save on load
_TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
               "QUESTION_ANS": ("qa_outputs",)}

PathLike = Union[str, os.PathLike]


def remove_adapter_name(key: str, name: str) -> str:
    """PEFT's rule: ``a.lora_A.<name>.weight`` -> ``a.lora_A.weight``; ``a.lora_embedding_A.<name>``
    -> ``a.lora_embedding_A``. Only the adapter-name position is touched, never a module that
    happens to share the name."""
    if "." not in key:
        return key
    if key.endswith(f".{name}"):
        return key[: -len(name) - 1]
    head, _, suffix = key.rpartition(".")
    return f"{re.sub(re.escape(f'.{name}') + r'$', '', head)}.{suffix}"


def _other_adapter_key(key: str, others: list[str]) -> bool:
    return any(f".{o}." in key or key.endswith(f".{o}") for o in others)


def _adapter_keys(model: nn.Module, name: str) -> dict[str, str]:
    """``{model key: file key without PREFIX}`` of adapter ``name``'s own tensors (factors, DoRA
    magnitudes, modules_to_save copies), found structurally from the wrappers, not by substring."""
    out: dict[str, str] = {}
    for path, w in wrappers(model):
        if isinstance(w, LoraLayer):
            for attr in w.adapter_attrs:
                holder = getattr(w, attr)
                if name not in holder:
                    continue
                item = holder[name]
                if isinstance(item, nn.Module):
                    for k in item.state_dict():
                        mk = f"{path}.{attr}.{name}.{k}"
                        out[mk] = remove_adapter_name(mk, name)
                else:
                    out[f"{path}.{attr}.{name}"] = f"{path}.{attr}"
        elif isinstance(w, ModulesToSave) and name in w.modules_to_save:
            for k in w.modules_to_save[name].state_dict():
                out[f"{path}.modules_to_save.{name}.{k}"] = f"{path}.{k}"
    return out


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
    if save_embedding_layers == "auto":
        save_embedding_layers = targeted or _vocab_resized(model)
    if not save_embedding_layers or not hasattr(model, "get_input_embeddings"):
        return []
    keys: list[str] = []
    state = model.state_dict()
    for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
        base = getattr(layer, "base_layer", None)
        if targeted and not isinstance(base, (nn.Linear, nn.Embedding)):
            continue
        wanted = base if targeted else layer
        name = next((n for n, m in model.named_modules() if m is wanted and wanted is not None), None)
        if name:
            keys += [k for k in state if k.startswith(name + ".")]
    return keys


def adapter_state_dict(model: nn.Module, name: str,
                       save_embedding_layers: Union[bool, str] = "auto") -> dict[str, torch.Tensor]:
    """The tensors PEFT's ``save_pretrained`` writes for adapter ``name``, under PEFT's keys.

    Tensors are detached, contiguous, and never share storage (safetensors refuses aliases; a
    tied embedding/lm_head pair is stored twice, as PEFT does).
    """
    cfg = require_state(model).configs[name]
    others = [a for a in require_state(model).configs if a != name]
    state = {k: v for k, v in model.state_dict().items() if not _other_adapter_key(k, others)}
    chosen = {fk: mk for mk, fk in _adapter_keys(model, name).items()}  # file key -> model key
    extra: list[str] = []
    if cfg.bias == "all":
        extra += [k for k in state if k == "bias" or k.endswith(".bias")]
    elif cfg.bias == "lora_only":
        extra += [f"{p}.base_layer.bias" for p, w in wrappers(model)
                  if isinstance(w, LoraLayer) and f"{p}.base_layer.bias" in state]
    extra += _embedding_keys(model, cfg, save_embedding_layers)
    for k in extra:  # under bias="all" a saved head's bias is written twice, as PEFT does
        chosen.setdefault(remove_adapter_name(k, name), k)
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for fk, mk in chosen.items():
        t = state[mk].detach()
        ptr = t.untyped_storage().data_ptr() if t.numel() else -id(t)
        t = t.clone() if ptr in seen else t  # no aliasing inside one file
        seen.add(ptr)
        out[PREFIX + fk] = t.contiguous()
    return out


def load_plan(model: nn.Module, name: str) -> tuple[dict[str, str], dict[str, str]]:
    """Where each file key goes in ``model`` for adapter ``name`` (after ``inject``).

    Returns:
        ``(required, optional)``, each ``{file key without PREFIX: model key}``. Required: the
        adapter's own tensors, which a file must hold. Optional: base tensors PEFT may also have
        written (trained biases, embedding layers), loaded into the base like PEFT does.
    """
    others = [a for a in require_state(model).configs if a != name]
    required = {fk: mk for mk, fk in _adapter_keys(model, name).items()}
    optional: dict[str, str] = {}
    for mk in model.state_dict():  # incl. PEFT's duplicate "<head>.modules_to_save.bias" under bias="all"
        if not _other_adapter_key(mk, others):
            optional.setdefault(remove_adapter_name(mk, name), mk)
    return required, optional


def effective_config(model: nn.Module, name: str) -> LoraConfig:
    """Adapter ``name``'s config, extended so that it reproduces every layer's rank and alpha.

    An adapter built by ``inject`` already matches its config. One built otherwise (e.g. by
    ``combine_adapters``, whose per-layer ranks differ) gets an explicit ``rank_pattern`` /
    ``alpha_pattern`` entry per layer (the escaped full module name), so that PEFT and lorakit
    rebuild the same shapes from the file.
    """
    import dataclasses

    cfg = require_state(model).configs[name]
    layers = [(p, w) for p, w in wrappers(model) if isinstance(w, LoraLayer) and name in w.r
              and not p.endswith(".base_layer.out_proj")]  # an nn.MultiheadAttention's out_proj follows its parent
    if all(w.r[name] == cfg.rank_for(p) and w.lora_alpha[name] == cfg.alpha_for(p) for p, w in layers):
        return cfg
    rank = {re.escape(p): w.r[name] for p, w in layers}
    alpha = {re.escape(p): w.lora_alpha[name] for p, w in layers}
    return dataclasses.replace(cfg, rank_pattern=rank, alpha_pattern=alpha)


def infer_task_type(model: nn.Module, name: str) -> str | None:
    """PEFT's ``task_type`` for a transformers model, from its class name; None when unknown.

    A classification task type is only written when the head is saved with the adapter:
    PEFT's classifier model classes wrap ``classifier``/``score`` on load and would fail on a
    file without them.
    """
    cls = type(model).__name__
    is_enc_dec = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    if cls.endswith("ForCausalLM"):
        task = "CAUSAL_LM"
    elif cls.endswith("ForSeq2SeqLM") or (cls.endswith("ForConditionalGeneration") and is_enc_dec):
        task = "SEQ_2_SEQ_LM"
    elif cls.endswith("ForSequenceClassification"):
        task = "SEQ_CLS"
    elif cls.endswith("ForTokenClassification"):
        task = "TOKEN_CLS"
    elif cls.endswith("ForQuestionAnswering"):
        task = "QUESTION_ANS"
    elif cls.endswith("Model") and hasattr(model, "config") and hasattr(model, "save_pretrained"):
        task = "FEATURE_EXTRACTION"
    else:
        return None
    heads = _TASK_HEADS.get(task)
    if heads:
        present = {p.rsplit(".", 1)[-1] for p, _ in model.named_modules() if p.rsplit(".", 1)[-1] in heads}
        saved = {p.rsplit(".", 1)[-1] for p, w in wrappers(model)
                 if isinstance(w, ModulesToSave) and name in w.modules_to_save}
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
