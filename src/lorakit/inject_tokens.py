"""``trainable_token_indices``: find the embedding layers a config trains rows of, and wrap them
(PEFT 0.21's ``set_additional_trainable_modules``, its weight-tying rules included).

* A list of ids applies to the model's input embedding; ``{name: ids}`` to the modules ``name``
  names (exact or dotted suffix).
* When the model ties its output layer to the input embedding (``tie_word_embeddings``), the output
  layer follows the embedding's rows (a follower layer, nothing saved) — if the config names both
  with the same ids, or names the embedding only; different ids for the two are refused with
  ``ensure_weight_tying`` and trained separately without it (PEFT's rules).
"""

from __future__ import annotations

import warnings

from torch import nn

from lorakit.config import LoraConfig
from lorakit.layers import LoraLayer, ModulesToSave
from lorakit.layers.tokens import TokensWrapper, TrainableTokens
from lorakit.matching import matches
from lorakit.transaction import Transaction


def _ties_embeddings(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    text = getattr(config, "get_text_config", None)
    return any(getattr(c, "tie_word_embeddings", False) for c in (config, text() if callable(text) else None))


def _input_embedding(model: nn.Module) -> tuple[str, nn.Module] | None:
    get = getattr(model, "get_input_embeddings", None)
    try:
        emb = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        emb = None
    if emb is None:
        return None
    return next(((n, m) for n, m in model.named_modules() if m is emb), None)


def _layer(module: nn.Module) -> nn.Module:
    """The module itself, or the layer inside a token wrapper."""
    return module.token_adapter.base_layer if isinstance(module, TokensWrapper) else module


def tied_to_embedding(model: nn.Module) -> list[str]:
    """Names of the modules whose weight is the input embedding's (a tied output layer)."""
    found = _input_embedding(model)
    if found is None or not _ties_embeddings(model):
        return []
    emb_name, emb = found
    weight = _layer(emb).weight
    return [n for n, m in model.named_modules() if n and n != emb_name and ".token_adapter" not in n
            and not isinstance(m, LoraLayer) and getattr(_layer(m), "weight", None) is weight]


def token_targets(model: nn.Module, cfg: LoraConfig) -> tuple[dict[str, list[int]], list[str]]:
    """``({module name: ids}, [tied output layers that follow the embedding])``. Changes nothing.

    Raises:
        ValueError: no input embedding for a list, a name matching no module, the same module in
            ``modules_to_save``, or different ids for tied layers with ``ensure_weight_tying``.
    """
    spec = cfg.trainable_token_indices
    emb = _input_embedding(model)
    if isinstance(spec, list):
        if emb is None:
            raise ValueError("trainable_token_indices is a list, which applies to the input embedding, but this "
                             f"{type(model).__name__} has no get_input_embeddings(); give {{module name: ids}}")
        spec = {emb[0]: spec}
    names = [n for n, _ in model.named_modules() if n and ".token_adapter" not in n]
    targets: dict[str, list[int]] = {}
    for key, ids in spec.items():
        hits = [n for n in names if matches(n, key)]
        if not hits:
            raise ValueError(f"trainable_token_indices names {key!r}, which matches no module of this "
                             f"{type(model).__name__}; modules include {names[:8]}")
        if key in (cfg.modules_to_save or []):
            raise ValueError(f"{key!r} is in both modules_to_save (trained in full) and trainable_token_indices; "
                             "choose one (as PEFT)")
        targets.update({n: ids for n in hits})
    tied = tied_to_embedding(model)
    followers: list[str] = []
    if emb is not None and tied:
        pair = [n for n in targets if n == emb[0] or n in tied]
        mismatch = len(pair) >= 2 and any(targets[n] != targets[pair[0]] for n in pair)
        if mismatch and cfg.ensure_weight_tying:
            raise ValueError("ensure_weight_tying=True but trainable_token_indices gives tied layers different ids: "
                             f"{ {n: targets[n] for n in pair} }; use the same ids or ensure_weight_tying=False")
        if not mismatch and emb[0] in targets:
            followers = tied
            targets = {n: ids for n, ids in targets.items() if n not in tied}
    elif cfg.ensure_weight_tying:
        warnings.warn("ensure_weight_tying=True but the model does not tie its output layer to the input embedding "
                      "(tie_word_embeddings=False); there is nothing to tie", stacklevel=4)
    return targets, followers


def _wrap(txn: Transaction, path: str, source: TrainableTokens | None) -> TrainableTokens:
    """The token layer at ``path``, wrapping the module there if needed (journaled)."""
    module = txn.model.get_submodule(path)
    if isinstance(module, TokensWrapper):
        return module.token_adapter
    if isinstance(module, (LoraLayer, ModulesToSave)):
        raise ValueError(f"trainable_token_indices names {path!r}, which another adapter adapts with LoRA "
                         "(target_modules) or trains in full (modules_to_save); a layer is adapted one way only")
    wrapper = TokensWrapper(TrainableTokens(module, source=source))
    txn.replace(path, wrapper, wrapper.release)
    return wrapper.token_adapter


def add_trainable_tokens(txn: Transaction, cfg: LoraConfig, adapter_name: str, dtype_of=None) -> None:
    """Give adapter ``adapter_name`` its trainable rows (and tied followers), journaled in ``txn``.

    Raises:
        ValueError: see ``token_targets``; an index out of range.
    """
    targets, followers = token_targets(txn.model, cfg)
    emb = _input_embedding(txn.model)
    emb_layer = None
    for path, ids in targets.items():
        layer = _wrap(txn, path, None)
        if layer.source is not None:
            raise ValueError(f"{path!r} follows the input embedding's token rows (tied weights); it cannot also train "
                             "rows of its own")
        txn.on_undo(lambda layer=layer: layer.delete_adapter(adapter_name))
        weight = layer.base_weight()
        layer.add_tokens(adapter_name, ids, cfg, dtype=None if dtype_of is None else dtype_of(weight))
        if emb is not None and path == emb[0]:
            emb_layer = layer
    for path in followers:
        layer = _wrap(txn, path, emb_layer)
        if layer.source is not emb_layer:
            raise ValueError(f"{path!r} already trains its own token rows; it cannot also follow the input embedding's")
        txn.on_undo(lambda layer=layer: layer.delete_adapter(adapter_name))
        layer.add_tokens(adapter_name, emb_layer.token_indices[adapter_name], cfg)


def check_weight_tying(model: nn.Module, cfg: LoraConfig, targets: list[str], saved: list[str]) -> None:
    """``ensure_weight_tying`` is implemented for trainable tokens; PEFT also ties the LoRA factors
    (``target_modules``) or saved copies (``modules_to_save``) of a tied embedding/output pair, which
    lorakit does not: such a config is refused rather than trained untied.

    Raises:
        ValueError: ``ensure_weight_tying`` with a tied pair in ``target_modules`` or ``modules_to_save``.
    """
    if not cfg.ensure_weight_tying:
        return
    tied = tied_to_embedding(model)
    emb = _input_embedding(model)
    pair = set(tied) | ({emb[0]} if emb is not None and tied else set())
    hit = sorted(pair & (set(targets) | set(saved)))
    if hit:
        raise ValueError(f"ensure_weight_tying=True with the tied layers {hit} in target_modules/modules_to_save: "
                         "lorakit ties trainable_token_indices only, not LoRA factors or saved copies of tied "
                         "layers; set ensure_weight_tying=False (the layers then train independently) or use PEFT")
