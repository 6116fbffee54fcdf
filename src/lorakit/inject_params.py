"""``target_parameters``: find the ``nn.Parameter`` targets of a config and wrap them (PEFT's rules).

A parameter ``P.name`` (``P`` the module's name, lorakit wrappers looked through) is a target when
``P.name`` equals an entry or ends in ``.<entry>``. The parameters of one module are wrapped in
the order the module registered them, each wrapper around the previous one, as PEFT nests them —
the nesting decides the file keys (``P.lora_A`` is the last parameter, ``P.base_layer.lora_A`` the
one before). So that every adapter's keys are those PEFT writes for it alone, adapters that
target parameters of the same module must target the same ones (PEFT requires the same set on
the whole model).
"""

from __future__ import annotations

import warnings

from torch import nn

from lorakit.config import LoraConfig
from lorakit.layers import LoraLayer, ModulesToSave
from lorakit.layers.experts import param_wrapper
from lorakit.layers.param import ParamWrapper
from lorakit.matching import matches_any, unmatched
from lorakit.transaction import Transaction


def _chain(module: nn.Module) -> list[ParamWrapper]:
    """The nested parameter wrappers at one path, outermost first."""
    out = []
    while isinstance(module, ParamWrapper):
        out.append(module)
        module = module.base_layer
    return out


def find_parameter_targets(model: nn.Module, cfg: LoraConfig, strict: bool = True) -> list[tuple[str, str]]:
    """``(module name, parameter name)`` of every parameter ``cfg.target_parameters`` names, in
    model order and, within a module, registration order. Changes nothing.

    Args:
        strict: an entry matching no parameter is an error (else a warning, as PEFT; nothing
            matching at all is always an error).

    Raises:
        ValueError: an entry matches no parameter (the message lists some real ones), or a matched
            parameter belongs to a module that ``target_modules`` adapts.
    """
    from lorakit.inject import candidate_modules  # inject imports this module

    wanted = sorted(set(cfg.target_parameters or []))
    found: list[tuple[str, str]] = []
    seen: list[str] = []
    for path, module in candidate_modules(model):
        real = module.real_module() if isinstance(module, ParamWrapper) else module
        is_other_wrapper = isinstance(module, (LoraLayer, ModulesToSave)) and not isinstance(module, ParamWrapper)
        holder = module.base_layer if isinstance(module, LoraLayer) and is_other_wrapper else real
        for pname, _ in holder.named_parameters(recurse=False):
            key = f"{path}.{pname}"
            seen.append(key)
            if matches_any(key, wanted):
                if is_other_wrapper:
                    raise ValueError(f"target_parameters matched {key!r}, but {path!r} is adapted as a module "
                                     "(target_modules or modules_to_save); a module's weight is adapted one way only")
                found.append((path, pname))
    missing = unmatched(wanted, seen)
    if missing:
        msg = (f"target_parameters entries {missing} match no parameter of this {type(model).__name__}; "
               f"parameters include: {[k for k in seen if not k.endswith('.bias')][:8]}")
        if strict or not found:
            raise ValueError(msg)
        warnings.warn(msg, stacklevel=4)
    return found


def wrap_parameters(txn: Transaction, cfg: LoraConfig, adapter_name: str, dtype_of=None,
                    peft_numerics: bool = False, strict: bool = True) -> list[str]:
    """Add adapter ``adapter_name`` to every parameter target, wrapping as needed (journaled).

    Args:
        dtype_of: ``weight -> dtype`` of the adapter's factors for a base weight (None: fp32 on a
            half-precision weight, as ``add_adapter`` decides).

    Returns:
        The paths of the wrappers holding the adapter (outermost first within a module).

    Raises:
        ValueError: see ``find_parameter_targets``; another adapter targets a different set of this
            module's parameters; a wrapper refusing the config.
    """
    model = txn.model
    found = find_parameter_targets(model, cfg, strict)
    by_module: dict[str, list[str]] = {}
    for path, pname in found:
        by_module.setdefault(path, []).append(pname)
    paths: list[str] = []
    for path, pnames in by_module.items():
        chain = _chain(model.get_submodule(path))
        existing = [w.parameter_name for w in reversed(chain)]  # innermost first = registration order
        if chain and existing != pnames:
            raise ValueError(f"adapter {adapter_name!r} targets parameters {pnames} of {path!r}, but other adapters "
                             f"target {existing}: adapters must target the same parameters of a module (their "
                             "nesting decides PEFT's file keys)")
        for depth, pname in enumerate(pnames):
            if chain:
                wrapper = chain[len(chain) - 1 - depth]
                txn.on_undo(lambda w=wrapper: w.delete_adapter(adapter_name))
            else:
                previous = model.get_submodule(path)
                wrapper = param_wrapper(previous, pname)  # an ExpertsWrapper for a 3-D weight
                txn.replace(path, wrapper, lambda p=previous: p)
            weight = wrapper.base_weight()
            key = wrapper.config_key(path)
            wrapper.add_adapter(adapter_name, cfg.rank_for(key), cfg.alpha_for(key), cfg,
                                dtype=None if dtype_of is None else dtype_of(weight))
            wrapper.peft_numerics = peft_numerics
        outer = model.get_submodule(path)
        paths += [path + ".base_layer" * i for i in range(len(_chain(outer)))]
    return paths
