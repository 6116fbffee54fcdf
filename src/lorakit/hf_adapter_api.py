"""transformers' own adapter API on a model that carries lorakit adapters, routed to lorakit.

Every transformers ``PreTrainedModel`` has PEFT methods (``PeftAdapterMixin``): ``save_pretrained``,
``load_adapter``, ``add_adapter``, ``set_adapter``, ``disable_adapters``, ``enable_adapters``,
``active_adapters``, ``active_adapter``, ``get_adapter_state_dict``, ``delete_adapter``,
``enable_peft_hotswap``. Left alone on a lorakit model they act on transformers' integration, which
does not know lorakit's layers: ``load_adapter`` nests PEFT layers inside lorakit's and loads nothing
(every key "missing"), the others fail with a misleading "PEFT version" message, and
``save_pretrained`` writes ``base_layer`` keys that reload as random weights. :func:`install` (called
by ``lorakit.inject``) replaces them, on the model ``inject`` was given, with lorakit's own:

=========================  =========================================================================
``save_pretrained(dir)``   every adapter in PEFT's format (``dir`` for ``"default"``, ``dir/<name>/``
                           for the others: what ``PeftModel.save_pretrained`` writes), plus
                           ``model.safetensors`` — the trainable tensors under the model's own
                           parameter names, which is what ``Trainer(resume_from_checkpoint=...)``
                           reads back for a model that is not a ``PeftModel`` (``trainer_resume=False``:
                           PEFT's files alone)
``load_adapter(dir, name)``  ``lorakit.load_adapter``; into an existing adapter of that name, the
                           weights are swapped in place (``lorakit.hotswap_adapter``)
``add_adapter(cfg, name)``   ``lorakit.inject`` (a ``peft.LoraConfig`` is converted)
``set_adapter``, ``delete_adapter``, ``active_adapters``, ``active_adapter``  lorakit's
``disable_adapters()`` / ``enable_adapters()``  the base function until re-enabled
``get_adapter_state_dict``  the adapter's tensors, under PEFT's keys without ``base_model.model.``
``enable_peft_hotswap``    refused: use ``lorakit.hotswap_adapter``
=========================  =========================================================================

On the transformers sub-models inside it (``model.model`` of a ``*ForCausalLM``) the same names
refuse, naming the model to call them on. ``lorakit.unload`` / ``merge_and_unload`` take them away
again: a plain model saves and loads as transformers does.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from typing import Any

from torch import nn

ROUTED = ("save_pretrained", "load_adapter", "add_adapter", "set_adapter", "disable_adapters", "enable_adapters",
          "active_adapters", "active_adapter", "get_adapter_state_dict", "delete_adapter", "enable_peft_hotswap")
TRAINER_WEIGHTS = "model.safetensors"  # transformers' SAFE_WEIGHTS_NAME: what Trainer's resume reads
_PEFT_FLAG = "_hf_peft_config_loaded"  # transformers' "this model has trainable adapters" (Trainer checks it)


def as_lora_config(cfg: Any):
    """A ``lorakit.LoraConfig`` for ``cfg``: itself, or a ``peft.LoraConfig`` converted through its
    JSON form (sets become lists), exactly as its ``adapter_config.json`` would load.

    Raises:
        TypeError: neither. ValueError: a PEFT config of another method or with features lorakit lacks.
    """
    from lorakit.config import LoraConfig

    if isinstance(cfg, LoraConfig):
        return cfg
    if hasattr(cfg, "peft_type") and callable(getattr(cfg, "to_dict", None)):
        d = {k: sorted(v) if isinstance(v, (set, frozenset)) else v for k, v in cfg.to_dict().items()}
        d["peft_type"] = getattr(d.get("peft_type"), "value", d.get("peft_type"))
        d["task_type"] = getattr(d.get("task_type"), "value", d.get("task_type"))
        return LoraConfig.from_peft_dict(d, source=f"peft.{type(cfg).__name__}")
    raise TypeError(f"cfg must be a lorakit.LoraConfig or a peft.LoraConfig, got {type(cfg).__name__}")


def install(root: nn.Module, module: nn.Module, txn) -> None:
    """Route transformers' adapter methods of ``module`` (a transformers model inside ``root``, or
    ``root`` itself) to lorakit; journaled in ``txn`` so that a failed inject takes them away."""
    if not hasattr(type(module), "save_pretrained") or "save_pretrained" in module.__dict__:
        return
    methods = _routed(root) if module is root else {n: _refusal(n) for n in ROUTED}
    for name, fn in methods.items():
        if hasattr(type(module), name):
            module.__dict__[name] = fn
    if module is root:
        module.__dict__[_PEFT_FLAG] = True
    txn.on_undo(lambda m=module: uninstall(m))


def uninstall(module: nn.Module) -> None:
    """Give ``module`` transformers' own methods back (after ``unload``)."""
    for name in (*ROUTED, _PEFT_FLAG, "_lorakit_disabled"):
        if getattr(module.__dict__.get(name), "_lorakit_route", False) or name in (_PEFT_FLAG, "_lorakit_disabled"):
            module.__dict__.pop(name, None)


def _mark(fn):
    fn._lorakit_route = True
    return fn


def _refusal(name: str):
    @_mark
    def refuse(*args, **kwargs):
        raise ValueError(f"{name}() on a part of a model with lorakit adapters: call it on the model that "
                         "lorakit.inject was given (it routes transformers' adapter methods to lorakit)")

    return refuse


def _routed(model: nn.Module) -> dict[str, Any]:
    import lorakit as lk

    @_mark
    def save_pretrained(save_directory, *, state_dict: dict | None = None, is_main_process: bool = True,
                        selected_adapters: list[str] | None = None, save_embedding_layers: str | bool = "auto",
                        trainer_resume: bool = True, **kwargs: Any) -> None:
        """Write every adapter (or ``selected_adapters``) in PEFT's format, plus ``model.safetensors``
        for Trainer's ``resume_from_checkpoint`` (``trainer_resume``). Always safetensors; ``state_dict``
        (Trainer's, under FSDP/DeepSpeed) is read instead of the model's own."""
        if not is_main_process:
            return
        names = selected_adapters or lk.adapter_names(model)
        with ExitStack() as stack:
            if state_dict is not None:  # the tensors to write come from this state, not the model's
                model.__dict__["state_dict"] = lambda *a, **k: dict(state_dict)
                stack.callback(model.__dict__.pop, "state_dict", None)
            for name in names:
                lk.save_adapter(model, save_directory, name, save_embedding_layers=save_embedding_layers)
            if trainer_resume:
                from safetensors.torch import save_file

                from lorakit.io.safe_write import write_files_atomically

                own = model.state_dict()
                trained = {n for n, p in model.named_parameters() if p.requires_grad}
                tensors = {k: v.detach().contiguous().clone() for k, v in own.items() if k in trained}
                write_files_atomically(save_directory, {
                    TRAINER_WEIGHTS: lambda path: save_file(tensors, path, metadata={"format": "pt"})})

    @_mark
    def load_adapter(peft_model_id=None, adapter_name: str | None = None, is_trainable: bool = False,
                     adapter_state_dict: dict | None = None, **kwargs: Any) -> None:
        """``lorakit.load_adapter`` from a local directory; an existing ``adapter_name`` gets the
        file's weights in place (``lorakit.hotswap_adapter``: the same parameters, so an optimizer
        keeps tracking them)."""
        name = adapter_name or "default"
        source = adapter_state_dict if adapter_state_dict is not None else peft_model_id
        if source is None:
            raise ValueError("load_adapter needs a local adapter directory (or adapter_state_dict)")
        unread = sorted(k for k, v in kwargs.items() if v not in (None, False))
        if unread:
            raise ValueError(f"load_adapter on a lorakit model reads a local directory; {unread} are not supported")
        if isinstance(source, (str, os.PathLike)) and not os.path.isdir(source):
            raise FileNotFoundError(f"load_adapter: {str(source)!r} is not a local directory; lorakit loads "
                                    "adapters from disk (download a Hub adapter first with `hf download`)")
        if name in lk.adapter_names(model):
            lk.hotswap_adapter(model, source, name)
        elif isinstance(source, dict):
            raise ValueError("load_adapter(adapter_state_dict=...) into a new adapter needs its config: "
                             "call add_adapter(config, name) first, then load_adapter(adapter_state_dict=..., name)")
        else:
            lk.load_adapter(model, source, name, is_trainable=is_trainable)

    @_mark
    def add_adapter(adapter_config, adapter_name: str | None = None) -> None:
        lk.inject(model, as_lora_config(adapter_config), adapter_name or "default")

    @_mark
    def set_adapter(adapter_name) -> None:
        lk.set_adapter(model, adapter_name)

    @_mark
    def delete_adapter(adapter_names) -> None:
        for name in [adapter_names] if isinstance(adapter_names, str) else list(adapter_names):
            lk.delete_adapter(model, name)

    @_mark
    def active_adapters() -> list[str]:
        return lk.active_adapters(model)

    @_mark
    def active_adapter() -> str:
        return lk.active_adapters(model)[0]

    @_mark
    def disable_adapters() -> None:
        if "_lorakit_disabled" not in model.__dict__:
            block = lk.disable_adapters(model)
            block.__enter__()
            model.__dict__["_lorakit_disabled"] = block

    @_mark
    def enable_adapters() -> None:
        block = model.__dict__.pop("_lorakit_disabled", None)
        if block is not None:
            block.__exit__(None, None, None)

    @_mark
    def get_adapter_state_dict(adapter_name: str | None = None, state_dict: dict | None = None) -> dict:
        from lorakit.io.peft_format import PREFIX, adapter_state_dict

        name = adapter_name or lk.active_adapters(model)[0]
        return {k.removeprefix(PREFIX): v for k, v in adapter_state_dict(model, name).items()}

    @_mark
    def enable_peft_hotswap(*args, **kwargs) -> None:
        raise ValueError("enable_peft_hotswap: a lorakit model swaps adapters with lorakit.hotswap_adapter(model, "
                         "dir, name) (in place, no recompilation)")

    return {f.__name__: f for f in (save_pretrained, load_adapter, add_adapter, set_adapter, delete_adapter,
                                    active_adapters, active_adapter, disable_adapters, enable_adapters,
                                    get_adapter_state_dict, enable_peft_hotswap)}


__all__ = ["as_lora_config", "install", "uninstall", "ROUTED", "TRAINER_WEIGHTS"]
