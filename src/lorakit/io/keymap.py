"""The one map between a model's state-dict keys and PEFT's adapter-file keys.

It is derived from the wrappers themselves — each wrapper lists the attributes holding per-adapter
tensors (``adapter_attrs``), so every key is assigned to an adapter *structurally*, never by
looking for the adapter's name inside a key (an adapter named ``"mlp"`` or ``"0"`` is as good as
any other). Save, load, hot swap and inspect all use it.

For adapter ``name`` (PEFT 0.21 ``get_peft_model_state_dict`` / ``set_peft_model_state_dict``):

    in memory (lorakit)                                   in adapter_model.safetensors (after PREFIX)
    model.layers.0.self_attn.q_proj.lora_A.<name>.weight  model.layers.0.self_attn.q_proj.lora_A.weight
    model.embed_tokens.lora_embedding_A.<name>            model.embed_tokens.lora_embedding_A
    ...q_proj.lora_magnitude_vector.<name>  (DoRA)        ...q_proj.lora_magnitude_vector
    classifier.modules_to_save.<name>.weight              classifier.weight

Every other tensor is a *base* tensor, shared by all adapters; its file key is its model key.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from lorakit.layers import LoraLayer, ModulesToSave, wrappers

PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the user's model
SAVED_COPIES = "modules_to_save"


@dataclass(frozen=True)
class AdapterKey:
    """Where one adapter-owned tensor lives, without the adapter's name.

    Attributes:
        module: path of the wrapper, e.g. ``"model.layers.0.self_attn.q_proj"``.
        attr: the wrapper attribute holding it (``"lora_A"``, ``"lora_embedding_B"``,
            ``"lora_magnitude_vector"``, ``"modules_to_save"``...).
        leaf: the tensor's key inside the adapter's entry: ``"weight"`` for a factor module,
            ``""`` for a Parameter entry, ``"0.bias"`` for a parameter of a saved copy.
    """

    module: str
    attr: str
    leaf: str

    def model_key(self, adapter: str) -> str:
        return ".".join(p for p in (self.module, self.attr, adapter, self.leaf) if p)

    @property
    def file_key(self) -> str:
        """PEFT's key: the adapter name dropped, and a saved copy stored under the module's own name."""
        parts = (self.module, self.leaf) if self.attr == SAVED_COPIES else (self.module, self.attr, self.leaf)
        return ".".join(p for p in parts if p)

    @property
    def alias_file_key(self) -> str | None:
        """PEFT's second key for a saved copy's tensor (``<module>.modules_to_save.<leaf>``), which
        its ``bias="all"`` files also carry for biases."""
        return f"{self.module}.{SAVED_COPIES}.{self.leaf}" if self.attr == SAVED_COPIES else None


def _entries(path: str, w: nn.Module) -> Iterator[tuple[str, AdapterKey]]:
    """``(adapter name, AdapterKey)`` for every adapter-owned tensor of one wrapper."""
    for attr in w.adapter_attrs:
        holder = getattr(w, attr)
        for name in holder:
            item = holder[name]
            if isinstance(item, nn.Module):
                for leaf in item.state_dict(keep_vars=True):
                    yield name, AdapterKey(path, attr, leaf)
            else:
                yield name, AdapterKey(path, attr, "")


def adapter_keys(model: nn.Module) -> dict[str, list[AdapterKey]]:
    """Adapter name -> the keys of every tensor it owns, in model order."""
    out: dict[str, list[AdapterKey]] = {}
    for path, w in wrappers(model):
        for name, key in _entries(path, w):
            out.setdefault(name, []).append(key)
    return out


def owned_model_keys(model: nn.Module) -> set[str]:
    """State-dict keys of every adapter's tensors (all the rest are base tensors)."""
    return {k.model_key(n) for n, keys in adapter_keys(model).items() for k in keys}


def file_plan(model: nn.Module, name: str) -> dict[str, str]:
    """``{file key (no PREFIX): model key}`` of adapter ``name``'s own tensors."""
    return {k.file_key: k.model_key(name) for k in adapter_keys(model).get(name, [])}


def alias_plan(model: nn.Module, name: str) -> dict[str, str]:
    """``{PEFT's second file key: model key}`` for adapter ``name``'s saved copies."""
    return {k.alias_file_key: k.model_key(name) for k in adapter_keys(model).get(name, []) if k.alias_file_key}


def base_plan(model: nn.Module) -> dict[str, str]:
    """``{file key: model key}`` of the base tensors (identical keys), plus, for each LoRA
    wrapper ``P``, ``P.<leaf>`` for ``P.base_layer.<leaf>`` — the key the same tensor has in a file
    written from a model where ``P`` was not wrapped (e.g. embeddings saved for a resized vocabulary)."""
    owned = owned_model_keys(model)
    plan = {k: k for k in model.state_dict(keep_vars=True) if k not in owned}
    for path, w in wrappers(model):
        if isinstance(w, LoraLayer):
            for leaf in w.base_layer.state_dict(keep_vars=True):
                mk = f"{path}.base_layer.{leaf}"
                if mk in plan:
                    plan.setdefault(f"{path}.{leaf}", mk)
    return plan


def parse_in_memory_key(model: nn.Module, key: str) -> tuple[str, str] | None:
    """A lorakit in-memory key of *any* adapter name, e.g. ``P.lora_A.<other>.weight`` (from another
    model's ``state_dict()``), as ``(file key, adapter name)`` — matched against this model's
    wrapper paths and attributes, not guessed from the key's shape. None if it is not one."""
    for path, w in wrappers(model):
        for attr in getattr(w, "adapter_attrs", ()):
            head = f"{path}.{attr}."
            if not key.startswith(head):
                continue
            name, _, leaf = key[len(head):].partition(".")
            if name:
                return AdapterKey(path, attr, leaf).file_key, name
    return None


def factor_attrs() -> tuple[str, ...]:
    """Every attribute any LoRA layer type keeps per-adapter tensors in (from the classes' own
    ``adapter_attrs``, so a new layer type is known here the moment it is defined)."""
    seen: dict[str, None] = {}
    todo = [LoraLayer]
    while todo:
        cls = todo.pop()
        seen.update(dict.fromkeys(cls.adapter_attrs))
        todo.extend(cls.__subclasses__())
    return tuple(seen)


def parse_file_key(key: str) -> tuple[str, str, str] | None:
    """``(module, attr, leaf)`` of a file key written for a LoRA layer (PREFIX optional): the last
    path component that is a factor attribute splits it, e.g. ``model.q_proj.lora_A.weight`` ->
    ``("model.q_proj", "lora_A", "weight")``. None for other tensors (saved copies, base tensors),
    which a file does not mark; reading them needs the model (:func:`file_plan`)."""
    key = key[len(PREFIX):] if key.startswith(PREFIX) else key
    parts = key.split(".")
    attrs = set(factor_attrs())
    for i in range(len(parts) - 1, 0, -1):
        if parts[i] in attrs:
            return ".".join(parts[:i]), parts[i], ".".join(parts[i + 1:])
    return None


def saved_copy_paths(model: nn.Module, name: str) -> list[str]:
    """Paths of the ``modules_to_save`` wrappers holding a copy for adapter ``name``."""
    return [p for p, w in wrappers(model) if isinstance(w, ModulesToSave) and name in w.modules_to_save]
