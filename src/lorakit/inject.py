"""Find the modules a config targets (a pure dry run), wrap them, and take the wrappers out again.

Matching follows PEFT's rules, applied to each module's full dotted name:

* a list: exact name, or dotted suffix (``"q_proj"`` matches ``model.layers.3.self_attn.q_proj``),
  then restricted to ``layers_to_transform`` (the index after ``.<layers_pattern>.``); every entry
  must match some module (a typo is an error naming close real names);
* a string: ``re.fullmatch(target_modules, name)``;
* ``"all-linear"``: every Linear / GPT-2 Conv1D except the model's output head, the
  ``modules_to_save`` and the ``out_proj`` of an nn.MultiheadAttention (read by the attention
  module, not called); layer indices apply;
* ``exclude_modules`` (same forms, no layer indices) removes matches.

``inject`` is a transaction (``lorakit.transaction``): if any target refuses the config, the model
is left exactly as it was.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import warnings
from collections.abc import Iterator

from torch import nn

from lorakit import hf_adapter_api
from lorakit.adapters import set_adapter_grads
from lorakit.config import ALL_LINEAR, TASK_HEADS, WEIGHT_INITS, LoraConfig
from lorakit.inits import release_init_data
from lorakit.inject_params import wrap_parameters
from lorakit.inject_tokens import add_trainable_tokens, check_weight_tying
from lorakit.layers import (
    LoraLayer,
    ModulesToSave,
    TokensWrapper,
    check_quantized,
    is_linear_like,
    is_supported,
    unsupported_quantization,
    wrap,
    wrappers,
)
from lorakit.layers.param import ParamWrapper
from lorakit.layers.quant_formats import quant_format
from lorakit.layers.registry import supported_names
from lorakit.matching import in_layers, inside, matches_any, matches_spec, unmatched
from lorakit.state import LorakitState, drop_state, get_state, put_state
from lorakit.transaction import Transaction, set_submodule, transaction

replace_module = set_submodule  # the name other modules know


def _in_layers(name: str, cfg: LoraConfig) -> bool:
    return in_layers(name, cfg.layers_to_transform, cfg.layers_pattern)


def candidate_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` for every module of the user's model, skipping lorakit's own internals
    (a wrapper stands for the module it wraps; its ``base_layer`` and factors are not candidates)."""
    skip: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(s) for s in skip):
            continue
        if isinstance(module, (LoraLayer, ModulesToSave, TokensWrapper)):
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


def find_targets(model: nn.Module, cfg: LoraConfig, strict: bool = True) -> list[str]:
    """Names of the modules ``inject(model, cfg)`` would adapt, in model order. Changes nothing.

    Args:
        strict: every entry of a list ``target_modules`` must match some module (else an error
            naming it and close real names); ``False`` only warns (used for files written by
            PEFT, which accepts such entries silently).

    Raises:
        ValueError: nothing matches, or (strict) a list entry matches nothing; the message lists
            the patterns and real module names.
        TypeError: a matched module has a type lorakit cannot adapt.
    """
    spec = cfg.target_modules
    if spec is None and (cfg.target_parameters or cfg.trainable_token_indices is not None):
        return []  # the config adapts parameters or embedding rows only
    if spec is None:
        raise ValueError("target_modules is not set: give module names, a regex or 'all-linear'. "
                         f"Some module names in this model: {_sample_names(model)}")
    saved = cfg.modules_to_save or []
    head = _output_head(model)
    out_projs = _mha_out_projs(model)
    candidates = list(candidate_modules(model))
    if isinstance(spec, list):
        _check_entries(model, candidates, spec, strict)
    found: list[str] = []
    for name, module in candidates:
        if spec == ALL_LINEAR:  # a quantized linear lorakit cannot adapt matches too, to be refused below
            inner = getattr(module, "base_layer", module)
            refused = unsupported_quantization(inner) is not None and not isinstance(inner, (nn.Embedding, nn.Conv2d))
            hit = ((is_linear_like(inner) or refused) and module is not head
                   and id(module) not in out_projs and not matches_any(name, saved) and _in_layers(name, cfg))
        elif isinstance(spec, str):
            hit = re.fullmatch(spec, name) is not None
        else:
            hit = matches_any(name, spec) and _in_layers(name, cfg)
        if not hit or matches_spec(name, cfg.exclude_modules) or inside(name, saved):
            continue
        check_quantized(name, module)
        if isinstance(module, TokensWrapper):
            raise ValueError(f"target_modules={spec!r} matched {name!r}, whose token rows an adapter trains "
                             "(trainable_token_indices); a layer is adapted one way only")
        if not is_supported(module):
            raise TypeError(f"target_modules={spec!r} matched {name!r}, a {type(module).__name__}, which lorakit "
                            f"cannot adapt (supported: {supported_names()}). "
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


def _check_entries(model: nn.Module, candidates: list[tuple[str, nn.Module]], spec: list[str], strict: bool) -> None:
    """Every list entry must name some module (before layer indices and exclusions apply)."""
    names = [n for n, _ in candidates]
    missing = unmatched(spec, names)
    if not missing:
        return
    pool = list(dict.fromkeys([n.rsplit(".", 1)[-1] for n in names] + names))
    hints = {p: difflib.get_close_matches(p, pool, n=3, cutoff=0.6) for p in missing}
    text = "; ".join(f"{p!r} (close: {h})" if h else repr(p) for p, h in hints.items())
    msg = (f"target_modules={spec!r}: {text} match{'es' if len(missing) == 1 else ''} no module of this "
           f"{type(model).__name__}. Adaptable modules include: {_sample_names(model)}")
    if strict:
        raise ValueError(msg)
    warnings.warn(msg, stacklevel=3)


def _sample_names(model: nn.Module, k: int = 8) -> list[str]:
    names = [n for n, m in candidate_modules(model) if is_supported(m)]
    leaves = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in names))
    return leaves[:k] + [n for n in names[:3] if n not in leaves]


def _check_bias_modes(state: LorakitState | None, cfg: LoraConfig, adapter_name: str) -> None:
    """PEFT's rule, both ways: an adapter that trains base biases must be the only adapter."""
    if state is None or not state.configs:
        return
    with_bias = [n for n, c in state.configs.items() if c.bias != "none"]
    if cfg.bias != "none" or with_bias:
        who = f"adapter {adapter_name!r} has bias={cfg.bias!r}" if cfg.bias != "none" else \
            f"adapter(s) {with_bias} already train base biases"
        raise ValueError(f"cannot add adapter {adapter_name!r}: {who}. Base biases are shared by every adapter, so "
                         "an adapter with bias='all' or 'lora_only' must be the only one on the model (as in PEFT). "
                         "Use bias='none' for every adapter, or one model per bias-training adapter")


def inject(model: nn.Module, cfg: LoraConfig, adapter_name: str = "default", *,
           autocast_adapter_dtype: bool = True, strict_targets: bool = True, peft_numerics: bool = False) -> nn.Module:
    """Add LoRA adapter ``adapter_name`` to the modules ``cfg`` targets, in place.

    The first call wraps each target in a lorakit layer and freezes the base model; later calls
    with new names add adapters to the layers they target. The first adapter is active (and
    trainable); later ones are added inactive (``set_adapter`` switches). ``cfg.bias`` unfreezes
    the base biases it names. All or nothing: on any error the model is left exactly as it was.

    Args:
        model: any nn.Module (a Hugging Face model stays one).
        cfg: the adapter's configuration (a ``peft.LoraConfig`` is converted).
        adapter_name: a new name for this adapter.
        autocast_adapter_dtype: keep adapter weights in fp32 on fp16/bf16 layers (PEFT's default):
            fp32 master weights, optimizer state and gradients.
        strict_targets: see :func:`find_targets`.
        peft_numerics: compute the LoRA term as PEFT does, with the input cast to the adapter's
            dtype (an fp32 copy of every adapted activation on a half-precision base). By default
            the small factors are cast to the activation's dtype instead. Applies to the layers
            this adapter adapts.

    Returns:
        ``model`` itself.

    Raises:
        ValueError: a bad or duplicate adapter name, a target entry matching nothing, a second
            adapter where one trains biases, or a target refusing the config.
        TypeError: ``cfg`` is not a (lorakit or PEFT) LoraConfig, or a match cannot be adapted.
    """
    cfg = hf_adapter_api.as_lora_config(cfg)  # a peft.LoraConfig is converted
    with transaction(model) as txn:
        inject_into(txn, cfg, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                    strict_targets=strict_targets, peft_numerics=peft_numerics)
    return model


def inject_into(txn: Transaction, cfg: LoraConfig, adapter_name: str, *, autocast_adapter_dtype: bool = True,
                strict_targets: bool = True, peft_numerics: bool = False) -> LoraConfig:
    """``inject``'s work, journaled in ``txn`` (``load_adapter`` runs it inside its own transaction).

    Returns:
        The config as recorded (Conv1D targets set ``fan_in_fan_out``).
    """
    model = txn.model
    if not isinstance(cfg, LoraConfig):
        raise TypeError(f"cfg must be a lorakit.LoraConfig, got {type(cfg).__name__}")
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name or adapter_name == "__base__":
        raise ValueError(f"adapter_name must be a non-empty string without '.', not '__base__'; got {adapter_name!r}")
    state = get_state(model)
    if state is not None and adapter_name in state.configs:
        raise ValueError(f"adapter {adapter_name!r} already exists (adapters: {list(state.configs)}); "
                         "choose another name or delete it first")
    _check_bias_modes(state, cfg, adapter_name)
    cfg = with_task_heads(cfg)
    targets = find_targets(model, cfg, strict=strict_targets)
    saved = _find_modules_to_save(model, cfg)
    check_weight_tying(model, cfg, targets, saved)
    if any(type(model.get_submodule(n)).__name__ == "Conv1D" for n in targets) and not cfg.fan_in_fan_out:
        cfg = dataclasses.replace(cfg, fan_in_fan_out=True)  # GPT-2 layout, recorded as PEFT does
    state = get_state(model, create=True)
    if not state.configs:  # the first adapter: the base is frozen (later ones leave the user's flags alone)
        for p in model.parameters():
            p.requires_grad_(False)
    for name in targets:
        module = model.get_submodule(name)
        if isinstance(module, ParamWrapper):
            raise ValueError(f"target_modules matched {name!r}, whose parameters other adapters adapt "
                             "(target_parameters); a module's weight is adapted one way only")
        if not isinstance(module, LoraLayer):
            module = wrap(module)
            txn.replace(name, module, module.release)
        else:
            txn.on_undo(lambda m=module: m.delete_adapter(adapter_name))
        if cfg.init_lora_weights in WEIGHT_INITS:  # these write into W (a residual, LoftQ's Q(W'))
            txn.keep(module.base_weight())
        weight = module.base_weight()
        module.add_adapter(adapter_name, cfg.rank_for(name), cfg.alpha_for(name), cfg,
                           dtype=None if autocast_adapter_dtype else weight.dtype)
        release_init_data(txn, module, cfg)  # CorDA's / LoRA-GA's preprocessed data, used: dropped
        for layer in module.modules():  # an attention's out_proj wrapper too
            if isinstance(layer, LoraLayer):
                layer.peft_numerics = peft_numerics
        module.train(module.base_layer.training)  # new dropout modules follow the model's train/eval mode
    if cfg.target_parameters:
        targets = targets + wrap_parameters(
            txn, cfg, adapter_name, dtype_of=None if autocast_adapter_dtype else (lambda w: w.dtype),
            peft_numerics=peft_numerics, strict=strict_targets)
    for name in saved:
        module = model.get_submodule(name)
        if not isinstance(module, ModulesToSave):
            module.requires_grad_(False)  # the original stays frozen; the copies train (PEFT)
            module = ModulesToSave(module)
            txn.replace(name, module, module.release)
        else:
            txn.on_undo(lambda m=module: m.delete_adapter(adapter_name))
        module.add_adapter(adapter_name)
        module.train(module.original_module.training)
    if cfg.trainable_token_indices is not None:
        add_trainable_tokens(txn, cfg, adapter_name, dtype_of=None if autocast_adapter_dtype else (lambda w: w.dtype))
    biases = _unfreeze_biases(model, cfg, adapter_name)
    state.add(model, adapter_name, cfg, targets, biases)
    set_adapter_grads(model, [adapter_name], state.active)
    _guard(model, txn)
    _enable_checkpointing_grads(model)
    return cfg


def _unfreeze_biases(model: nn.Module, cfg: LoraConfig, adapter_name: str) -> list[str]:
    """The base biases ``cfg.bias`` trains (``"all"``: every parameter named ``bias`` that lorakit
    does not own — never a ``modules_to_save`` original; ``"lora_only"``: the biases of this
    adapter's layers); unfrozen, and their names returned."""
    if cfg.bias == "none":
        return []
    owned = set()
    for _, w in wrappers(model):
        for name in w.adapter_names:
            owned.update(id(p) for p in w.adapter_parameters(name))
        if isinstance(w, ModulesToSave):
            owned.update(id(p) for p in w.original_module.parameters())
    if cfg.bias == "all":
        chosen = {id(p) for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] == "bias" and id(p) not in owned}
    else:
        chosen = {id(w.base_layer.bias) for _, w in wrappers(model) if isinstance(w, LoraLayer)
                  and adapter_name in w.r and isinstance(getattr(w.base_layer, "bias", None), nn.Parameter)}
    names = []
    for n, p in model.named_parameters():
        if id(p) in chosen:
            p.requires_grad_(True)
            names.append(n)
    return names


def with_task_heads(cfg: LoraConfig) -> LoraConfig:
    """``cfg`` with the heads its ``task_type`` trains added to ``modules_to_save``, as PEFT's model
    classes add them (``SEQ_CLS`` / ``TOKEN_CLS``: ``classifier``, ``score``; ``QUESTION_ANS``:
    ``qa_outputs``): a classifier trained with LoRA learns its head, and PEFT, which wraps these
    heads when it loads such a file, finds them in it."""
    saved = list(cfg.modules_to_save or [])
    heads = [h for h in TASK_HEADS.get(cfg.task_type or "", ()) if h not in saved]
    return dataclasses.replace(cfg, modules_to_save=saved + heads) if heads else cfg


def _find_modules_to_save(model: nn.Module, cfg: LoraConfig) -> list[str]:
    if not cfg.modules_to_save:
        return []
    names = [n for n, m in candidate_modules(model) if matches_any(n, cfg.modules_to_save)]
    heads = TASK_HEADS.get(cfg.task_type or "", ())
    if not names and heads:
        raise ValueError(f"task_type={cfg.task_type!r} trains the model's head in full, as PEFT does "
                         f"(modules_to_save gets {list(heads)}), but this {type(model).__name__} has no module named "
                         f"so; name its head in modules_to_save, e.g. one of "
                         f"{[n for n, _ in candidate_modules(model)][-4:]}")
    if not names:
        raise ValueError(f"modules_to_save={cfg.modules_to_save!r} matched no module. "
                         f"Module names include: {[n for n, _ in candidate_modules(model)][-8:]}")
    return names


# ---------------------------------------------------------------------- guards on an adapted model
def _no_fused_fast_path(module: nn.Module, args: tuple) -> None:
    """A no-op forward pre-hook. torch's ``nn.TransformerEncoderLayer`` skips its fused inference
    kernel (which reads the projection weights directly, bypassing LoRA) when any hook is attached."""
    return None


def _guard(model: nn.Module, txn: Transaction | None) -> None:
    """Install what keeps an adapted model honest: the encoder fast-path hook, and transformers' adapter
    methods (``save_pretrained``, ``load_adapter``, ...) routed to lorakit (:mod:`lorakit.hf_adapter_api`).
    Journaled in ``txn`` (None: not journaled, e.g. when a rolled-back unload puts them back)."""
    txn = txn or _NO_JOURNAL
    _hold_quantized(model, txn)
    for m in model.modules():
        holds = any(isinstance(s, (LoraLayer, ModulesToSave)) for s in m.modules())
        if not holds:
            continue
        if isinstance(m, nn.TransformerEncoderLayer) and _no_fused_fast_path not in m._forward_pre_hooks.values():
            handle = m.register_forward_pre_hook(_no_fused_fast_path)
            txn.on_undo(handle.remove)
        if isinstance(m, nn.TransformerEncoder) and _NESTED not in m.__dict__:
            # in eval mode with a padding mask the encoder packs its input into a nested tensor, which
            # the adapted layers' matmuls cannot take: keep it padded (the function is the same)
            m.__dict__[_NESTED] = m.__dict__.get("use_nested_tensor")
            m.use_nested_tensor = False
            txn.on_undo(lambda m=m: _restore_nested(m))
        hf_adapter_api.install(model, m, txn)


class _NoJournal:
    def on_undo(self, fn) -> None:
        pass


_NO_JOURNAL = _NoJournal()
_NESTED = "_lorakit_use_nested_tensor"  # an adapted nn.TransformerEncoder's own use_nested_tensor, kept


def _restore_nested(m: nn.Module) -> None:
    if _NESTED in m.__dict__:
        m.use_nested_tensor = m.__dict__.pop(_NESTED)


_HELD = "_lorakit_held"  # a quantized layer no adapter wraps, held by lorakit: what to set back on unload


def _hold_quantized(model: nn.Module, txn) -> None:
    """Hold every quantized layer of the model that no adapter wraps, as wrapped ones are: bitsandbytes'
    in-place CPU repacking is undone by its own unverified inverse at every ``state_dict()`` (which
    ``save_adapter`` takes), which is wrong for some layouts (see :mod:`lorakit.layers.bnb_cpu_packing`).

    Raises:
        ValueError: a repacked layer whose way back does not verify (left as it was).
    """
    inside: list[str] = []
    for name, m in model.named_modules():
        if isinstance(m, (LoraLayer, ModulesToSave, TokensWrapper)):
            inside.append(name + ".")
            continue
        if _HELD in m.__dict__ or any(name.startswith(p) for p in inside):
            continue
        fmt = quant_format(m)
        if fmt is not None:
            m.__dict__[_HELD] = fmt.hold(m)
            txn.on_undo(lambda m=m: _release_held(m))


def _release_held(m: nn.Module) -> None:
    for attr, value in m.__dict__.pop(_HELD, {}).items():
        setattr(m, attr, value)


def _unguard(model: nn.Module) -> None:
    for m in model.modules():
        _restore_nested(m)
        _release_held(m)
        for key, hook in list(m._forward_pre_hooks.items()):
            if hook is _no_fused_fast_path:
                del m._forward_pre_hooks[key]
        hf_adapter_api.uninstall(m)


def _enable_checkpointing_grads(model: nn.Module) -> None:
    """With reentrant gradient checkpointing, a block whose inputs need no grad gives its LoRA
    factors no grad either; make the embeddings' output require grad, as PEFT does."""
    new_name = hasattr(type(model), "is_activation_checkpointing")  # transformers >= 5 renamed the flag
    flag = "is_activation_checkpointing" if new_name else "is_gradient_checkpointing"
    if getattr(model, flag, False) and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()


def unload(model: nn.Module, keep_trained_copy_of: str | None = None, *, txn: Transaction | None = None) -> nn.Module:
    """Replace every wrapper with the module it wraps, dropping all adapters (merged ones stay in W).

    ``modules_to_save`` become the active adapter's trained copy, as PEFT's ``unload`` does (or
    ``keep_trained_copy_of``'s); a module without such a copy gets its original back. All or
    nothing: every replacement is planned first and applied in a transaction (``txn``: an outer one).

    Returns:
        ``model``.

    Raises:
        ValueError: ``keep_trained_copy_of`` names no adapter of the model.
    """
    state = get_state(model)
    if keep_trained_copy_of is not None and (state is None or keep_trained_copy_of not in state.configs):
        raise ValueError(f"keep_trained_copy_of={keep_trained_copy_of!r} is not an adapter of this model "
                         f"({list(state.configs) if state else []})")
    keep = keep_trained_copy_of or (state.active[0] if state is not None and state.active else None)
    plan: list[tuple[str, nn.Module, str | None]] = []  # (path, wrapper, the saved copy that replaces it)
    for name, module in candidate_modules(model):
        if isinstance(module, (LoraLayer, TokensWrapper)):
            plan.append((name, module, None))
        elif isinstance(module, ModulesToSave):
            plan.append((name, module, keep if keep in module.modules_to_save else None))
    with transaction(model, txn) as t:
        t.on_undo(lambda: _guard(model, None))  # runs last, when the wrappers are back
        for name, module, copy_name in plan:
            new = module.modules_to_save[copy_name] if copy_name is not None else module.release()
            t.replace(name, new, lambda m=module: _reattached(m))
        _unguard(model)
        if state is not None:
            saved = state.copy()
            t.on_undo(lambda: (put_state(model, state), state.restore(model, saved)))
        drop_state(model)
    return model


def _reattached(module: nn.Module) -> nn.Module:
    """A released wrapper, made whole again (undo of :meth:`release` inside the wrapped module)."""
    reattach = getattr(module, "reattach", None)
    if callable(reattach):
        reattach()
    return module
