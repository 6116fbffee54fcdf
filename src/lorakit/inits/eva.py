"""EVA (Paischer et al., 2024, "One Initialization to Rule them All: Fine-tuning via Explained Variance Adaptation").

A = the top right-singular vectors of each layer's *inputs* on the fine-tuning data (the directions the
activations actually vary in), B = 0; ranks are redistributed across layers by explained variance:

1. every targeted Linear gets an incremental PCA (:mod:`lorakit.inits.ipca`) of its input tokens with
   ``k = round(r·rho)`` components (layers that see the same input — q, k, v — share one);
2. batches are fed until, for every layer, the components it would keep have converged (cosine
   similarity to the previous batch's ``>= tau``);
3. the ``Σ r`` components with the largest explained-variance ratios over all layers are kept: layer l
   gets ``r_l`` of them (0 removes its adapter), ``lora_alpha`` scaled by ``r_l / r`` when
   ``adjust_scaling_factors``, and the config records ``rank_pattern`` / ``alpha_pattern`` /
   ``target_modules`` accordingly (so PEFT rebuilds the same shapes from the file).

PEFT 0.21.2's ``get_eva_state_dict`` / ``initialize_lora_eva_weights``, step for step (the same
batches give the same ranks and A), with these differences: a pass that cannot converge or a layer
that never gets ``k`` tokens in a batch raises instead of looping forever; ``whiten`` divides a copy
(PEFT divides the shared components in place, whitening twice for layers that share an input);
inputs are not gathered across ``torch.distributed`` ranks.

    lk.inject(model, LoraConfig(r=8, target_modules=[...], init_lora_weights="eva"))
    initialize_lora_eva_weights(model, dataloader)    # batches: dicts for model(**batch)
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from itertools import cycle
from typing import Any

import torch
from torch import nn

from lorakit.inits.ipca import IncrementalPCA

Batch = Any


def forward_fn_dict(model: nn.Module, inputs: Mapping) -> Any:
    return model(**inputs)


def prepare_model_inputs_fn_language_modeling(model_input: Mapping, peft_config) -> torch.Tensor:
    """The (row, position) indices of the tokens to use: ``attention_mask`` (else all), and, with
    ``use_label_mask``, not where per-token ``labels`` equal ``label_mask_value`` (labels of another
    shape — a classifier's one label per row — are not a token mask and are not used)."""
    if not isinstance(model_input, Mapping):
        raise TypeError("EVA's default prepare_model_inputs_fn needs batches that are dicts (input_ids, "
                        "attention_mask, ...); pass prepare_model_inputs_fn=None for other inputs")
    ids = model_input["input_ids"]
    mask = model_input.get("attention_mask", torch.ones_like(ids)).bool()
    labels = model_input.get("labels")
    ec = peft_config.eva_config
    if ec["use_label_mask"] and labels is not None and labels.shape == ids.shape:
        mask = torch.logical_and(mask, labels != ec["label_mask_value"])
    return mask.nonzero()  # (tokens, 2)


def prepare_layer_inputs_fn_language_modeling(layer_input, model_input, layer_name: str) -> torch.Tensor:
    """The layer's input rows at the token indices ``model_input`` (from the function above): (tokens, in)."""
    x = layer_input[0] if isinstance(layer_input, (tuple, list)) else layer_input
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"EVA: layer {layer_name} got a {type(x).__name__} input; pass a prepare_layer_inputs_fn")
    return x[model_input.T.unbind()]


def _flatten(layer_input, model_input, layer_name: str) -> torch.Tensor:
    x = layer_input[0] if isinstance(layer_input, (tuple, list)) else layer_input
    return x.reshape(-1, x.size(-1)) if x.ndim > 2 else x


def _to(inputs: Batch, device: torch.device | None) -> Batch:
    if device is None:
        return inputs
    if hasattr(inputs, "to"):
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return type(inputs)({k: _to(v, device) for k, v in inputs.items()})
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_to(v, device) for v in inputs)
    return inputs


class _SVDHook:
    """A forward hook: one incremental-PCA step on the layer's prepared input."""

    def __init__(self, name: str, k: int, tau: float, prepare: Callable) -> None:
        self.name, self.k, self.tau, self.prepare = name, k, tau, prepare
        self.svd = IncrementalPCA(k, seed=42)
        self.converged = torch.zeros((k,), dtype=torch.bool)
        self.model_input = None
        self.most_tokens = 0

    @torch.no_grad()
    def __call__(self, module, inputs, output) -> None:
        previous = self.svd.components_.clone() if self.svd.fitted else None
        states = self.prepare(inputs, self.model_input, self.name)  # (tokens, in)
        self.most_tokens = max(self.most_tokens, states.size(0))
        if states.size(0) < self.k:  # PEFT skips such a batch for this layer
            return
        self.svd.partial_fit(states.to(torch.float32))
        if previous is None:
            return
        comps = self.svd.components_
        if comps.dim() == 1:
            comps, previous = comps.reshape(1, -1), previous.reshape(1, -1)
        self.converged = nn.functional.cosine_similarity(comps, previous) >= self.tau


def _targets(model: nn.Module, cfg, adapter_name: str) -> dict[str, nn.Module]:
    """``{name: module to hook}``: the adapter's Linear wrappers (a lorakit model), else the config's
    Linear / Conv1D targets (a plain model)."""
    from lorakit.layers import LoraLayer, is_linear_like
    from lorakit.layers.linear import Linear
    from lorakit.state import get_state

    state = get_state(model)
    if state is not None and adapter_name in state.configs:
        return {n: m for n, m in model.named_modules()  # (an nn.MultiheadAttention reads its out_proj, never calls it)
                if isinstance(m, LoraLayer) and isinstance(m, Linear) and adapter_name in m.r
                and not n.endswith(".base_layer.out_proj")}
    from lorakit.inject import find_targets

    return {n: model.get_submodule(n) for n in find_targets(model, cfg) if is_linear_like(model.get_submodule(n))}


@torch.no_grad()
def get_eva_state_dict(model: nn.Module, dataloader: Iterable, peft_config=None,
                       forward_fn: Callable | None = forward_fn_dict,
                       prepare_model_inputs_fn: Callable | None = prepare_model_inputs_fn_language_modeling,
                       prepare_layer_inputs_fn: Callable | dict | None = prepare_layer_inputs_fn_language_modeling,
                       adapter_name: str = "default", show_progress_bar: bool = True,
                       max_steps: int | None = None) -> dict[str, torch.Tensor]:
    """``{layer name: A (r_l, in)}`` from the data (see the module docstring); changes nothing.

    Args:
        model: a lorakit model holding ``adapter_name`` (its base function is used: adapters are
            disabled meanwhile), or a plain model with ``peft_config``.
        dataloader: re-iterable batches with a ``len``, e.g. a DataLoader or a list of dicts.
        peft_config: the LoraConfig (default: the adapter's); its ``eva_config``, ``r``, ``rank_pattern``.
        forward_fn: ``forward_fn(model, batch)`` runs the model (default ``model(**batch)``).
        prepare_model_inputs_fn / prepare_layer_inputs_fn: which input rows count (default: tokens
            under the attention mask and, for per-token labels, not ``label_mask_value``); a dict maps
            layer names to their own function.
        show_progress_bar: a tqdm bar (when tqdm is installed) saying how many layers converged.
        max_steps: batches at most before giving up (default: 10 passes over ``dataloader``, >= 100).

    Raises:
        ValueError: no data, no config, a layer with fewer input features than ``round(r·rho)`` or
            that never sees that many tokens in a batch, or components that do not converge.
    """
    from lorakit.state import get_state

    state = get_state(model)
    lorakit_model = state is not None and adapter_name in state.configs
    if peft_config is None:
        if not lorakit_model:
            raise ValueError("get_eva_state_dict needs peft_config (a LoraConfig with init_lora_weights='eva') "
                             "for a model without lorakit adapters")
        peft_config = state.configs[adapter_name]
    ec = peft_config.eva_config
    if ec is None:
        raise ValueError("EVA needs a LoraConfig with init_lora_weights='eva' (and eva_config)")
    if len(dataloader) == 0:
        raise ValueError("EVA needs calibration data: the dataloader is empty")
    targets = _targets(model, peft_config, adapter_name)
    if not targets:
        raise ValueError("EVA found no Linear layer to initialise among the targets")
    rho = ec["rho"]
    if rho > 1000:  # PEFT's cap for unusually high rho
        rho = min(rho, max(max(p.shape) for p in model.parameters()) // peft_config.r)
    max_steps = max_steps or max(100, 10 * len(dataloader))
    devices = {p.device for p in model.parameters() if p.device.type != "meta"}
    device = next(iter(devices)) if len(devices) == 1 else None

    fns = dict(prepare_layer_inputs_fn) if isinstance(prepare_layer_inputs_fn, Mapping) else None
    prepare: dict[str, Callable] = {}
    max_components: dict[str, int] = {}
    rank_budget = 0
    for name, module in targets.items():
        fn = fns.pop(name, None) if fns is not None else prepare_layer_inputs_fn
        prepare[name] = fn or _flatten
        r = peft_config.rank_for(name)
        max_components[name] = round(r * rho)
        rank_budget += r
        in_features = getattr(module, "in_features", None)
        if in_features is not None and max_components[name] > in_features:
            raise ValueError(f"EVA keeps round(r·rho) = {max_components[name]} input components of {name}, which "
                             f"has only {in_features} input features; lower r or eva_config['rho']")
    if fns:
        raise ValueError(f"prepare_layer_inputs_fn names layers that are not EVA targets: {list(fns)}")

    def model_inputs(batch: Batch):
        if prepare_model_inputs_fn is not None:
            return prepare_model_inputs_fn(batch, peft_config)
        return copy.deepcopy(batch)

    run = forward_fn or forward_fn_dict
    training = model.training
    ctx = _disabled(model) if lorakit_model else _nothing()
    handles: dict[str, Any] = {}
    try:
        with ctx:
            model.eval()
            # one batch to find layers that see the same input (q, k, v): they share one PCA
            first = _to(next(iter(dataloader)), device)
            mi = model_inputs(first)
            seen: dict[str, torch.Tensor] = {}
            for name, module in targets.items():
                def record(mod, inputs, output, name=name):
                    seen[name] = prepare[name](inputs, mi, name).detach().clone()
                handles[name] = module.register_forward_hook(record)
            run(model, first)
            for h in handles.values():
                h.remove()
            handles.clear()
            equal_inputs_map: dict[str, str] = {}
            groups: list[list[str]] = []
            for name in targets:
                for g in groups:
                    if name in seen and g[0] in seen and seen[name].shape == seen[g[0]].shape \
                            and torch.equal(seen[name], seen[g[0]]):
                        g.append(name)
                        break
                else:
                    groups.append([name])
            for g in groups:
                for other in g[1:]:
                    equal_inputs_map[other] = g[0]
                top = max(max_components[n] for n in g)
                for n in g:
                    max_components[n] = top
            unseen = [n for n in targets if n not in seen]
            if unseen:
                raise ValueError(f"EVA: forward_fn did not run {unseen[:3]} on the first batch; every target layer "
                                 "must see the calibration data")
            seen.clear()
            hooks = {n: _SVDHook(n, max_components[n], ec["tau"], prepare[n]) for n in targets
                     if n not in equal_inputs_map}
            for n, hook in hooks.items():
                handles[n] = targets[n].register_forward_hook(hook)
            layer_hook_map = {**{n: n for n in hooks}, **equal_inputs_map}
            rank_dist = _converge(model, dataloader, run, model_inputs, targets, hooks, handles, layer_hook_map,
                                  equal_inputs_map, rank_budget, max_components, device, max_steps,
                                  show_progress_bar)
    finally:
        for h in handles.values():
            if h is not None:
                h.remove()
        model.train(training)
    out = {}
    for name, rank in rank_dist.items():
        hook = hooks[layer_hook_map[name]]
        u = hook.svd.components_[:rank]  # (r_l, in)
        if ec["whiten"]:
            u = u / hook.svd.singular_values_[:rank].sqrt().reshape(-1, 1)
        out[name] = u.to(device) if device is not None else u
    return out


def _converge(model, dataloader, run, model_inputs, targets, hooks, handles, layer_hook_map, equal_inputs_map,
              rank_budget, max_components, device, max_steps, show_progress_bar) -> dict[str, int]:
    """Feed batches until the components each layer keeps have converged (PEFT's loop); the ranks."""
    bar = None
    if show_progress_bar:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=None, desc="EVA", leave=False, unit="batch")
        except ImportError:
            bar = None
    converged_flags = dict.fromkeys(hooks, False)
    rank_dist = dict(max_components)
    steps = 0
    try:
        for batch in cycle(dataloader):
            batch = _to(batch, device)
            mi = model_inputs(batch)
            for name, hook in hooks.items():
                done = bool(torch.all(hook.converged[: rank_dist[name]]))
                if not converged_flags[name] and done and handles.get(name) is not None:
                    handles[name].remove()
                    handles[name] = None
                    converged_flags[name] = True
                    continue
                if converged_flags[name] and not done:
                    handles[name] = targets[name].register_forward_hook(hook)
                    converged_flags[name] = False
                hook.model_input = mi
            if bar is not None:
                n_done = sum(converged_flags.values()) + sum(converged_flags[v] for v in equal_inputs_map.values())
                bar.set_description(f"EVA: {n_done}/{len(layer_hook_map)} layers converged")
            if all(converged_flags.values()):
                return rank_dist
            if steps >= max_steps:
                slow = [n for n, f in converged_flags.items() if not f]
                raise ValueError(f"EVA: the input components of {slow[:3]} did not converge (cosine similarity "
                                 f">= tau) within {max_steps} batches; give more or more varied data, a lower "
                                 "eva_config['tau'], or a larger max_steps")
            run(model, batch)
            steps += 1
            if bar is not None:
                bar.update(1)
            if not all(h.svd.fitted for h in hooks.values()):
                if steps >= len(dataloader):
                    few = {n: h.most_tokens for n, h in hooks.items() if not h.svd.fitted}
                    name = next(iter(few))
                    raise ValueError(f"EVA needs at least round(r·rho) = {hooks[name].k} input tokens per batch at "
                                     f"{name}, but no batch had more than {few[name]}; use larger batches or "
                                     "longer inputs (or a lower r / eva_config['rho'])")
                continue
            rank_dist = _rank_distribution(hooks, layer_hook_map, equal_inputs_map, rank_budget, max_components)
    finally:
        if bar is not None:
            bar.close()
    raise ValueError("EVA: the dataloader yielded no batches")  # pragma: no cover - cycle() of a non-empty loader


def _rank_distribution(hooks, layer_hook_map, equal_inputs_map, rank_budget, max_components) -> dict[str, int]:
    """The ``rank_budget`` largest explained-variance ratios over all layers: how many each layer gets."""
    exp_vars = {n: h.svd.explained_variance_ratio_[: max_components[n]] for n, h in hooks.items()}
    keys, values = zip(*[(k, c) for k, name in layer_hook_map.items() for c in exp_vars[name]])
    idx = torch.stack(values).argsort(descending=True)
    counts = Counter([keys[i] for i in idx[:rank_budget]])
    counts = {k: counts.get(k, 0) for k in layer_hook_map}
    for k, k_hook in equal_inputs_map.items():  # the hooked layer of a group holds its largest rank
        rank, rank_hook = counts[k], counts[k_hook]
        if rank_hook >= rank:
            continue
        counts[k_hook], counts[k] = rank, rank_hook
    return counts


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _disabled(model: nn.Module):
    from lorakit.adapters import disable_adapters

    return disable_adapters(model)


def initialize_lora_eva_weights(model: nn.Module, dataloader: Iterable | None = None,
                                eva_state_dict: dict[str, torch.Tensor] | None = None,
                                forward_fn: Callable | None = forward_fn_dict,
                                prepare_model_inputs_fn: Callable | None = prepare_model_inputs_fn_language_modeling,
                                prepare_layer_inputs_fn: Callable | dict | None = (
                                    prepare_layer_inputs_fn_language_modeling),
                                adapter_name: str = "default", show_progress_bar: bool = True,
                                max_steps: int | None = None) -> nn.Module:
    """Give adapter ``adapter_name`` (injected with ``init_lora_weights="eva"``) EVA's ranks and A.

    All or nothing: on any error the model is exactly as it was. See :func:`get_eva_state_dict` for the
    arguments; ``eva_state_dict`` (from it) skips the data pass.

    Returns:
        ``model``.

    Raises:
        ValueError: the adapter was not injected with ``init_lora_weights="eva"``, the model has other
            adapters (EVA may remove layers), the adapter is merged, neither data nor a state dict is
            given, or the data pass fails (see :func:`get_eva_state_dict`).
    """
    from lorakit.inits.eva_apply import apply_eva_state_dict
    from lorakit.state import require_state

    state = require_state(model)
    if adapter_name not in state.configs:
        raise ValueError(f"no adapter named {adapter_name!r}; this model has {list(state.configs)}")
    cfg = state.configs[adapter_name]
    if cfg.init_lora_weights != "eva":
        raise ValueError(f"initialize_lora_eva_weights needs an adapter injected with init_lora_weights='eva', "
                         f"but {adapter_name!r} has {cfg.init_lora_weights!r}")
    others = [n for n in state.configs if n != adapter_name]
    if others:
        raise ValueError(f"EVA redistributes ranks and may remove {adapter_name!r} from some layers; initialise it "
                         f"on a model whose only adapter it is (this one also has {others})")
    if eva_state_dict is None:
        if dataloader is None:
            raise ValueError("initialize_lora_eva_weights needs a dataloader (calibration batches) or an "
                             "eva_state_dict")
        eva_state_dict = get_eva_state_dict(model, dataloader, forward_fn=forward_fn,
                                            prepare_model_inputs_fn=prepare_model_inputs_fn,
                                            prepare_layer_inputs_fn=prepare_layer_inputs_fn, adapter_name=adapter_name,
                                            show_progress_bar=show_progress_bar, max_steps=max_steps)
    apply_eva_state_dict(model, eva_state_dict, adapter_name)
    return model
