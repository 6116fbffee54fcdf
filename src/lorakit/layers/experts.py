"""LoRA on the fused expert tensors of a Mixture-of-Experts module, computed on the routed tokens.

``target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]`` on a transformers v5
MoE model (Qwen3-MoE, Mixtral, gpt-oss, DeepSeek, OLMoE...) adapts 3-D weights ``(E, out, in)``.
PEFT (and :class:`~lorakit.layers.param.ParamWrapper`) forms ``W + ΔW`` for the whole stack on
every forward: a copy of every expert, and a gradient of that size, although each token uses k of
them. :class:`ExpertsWrapper` keeps ParamWrapper's factors, keys, merging and nesting (so files are
PEFT's, byte for byte) and changes only the forward: when it recognises the module it runs the
expert MLP itself, adding each adapter's term on the tokens routed to each expert,

    y_e = x_e·W_eᵀ + Σ_a s_a · (x_e·A_{a,e}ᵀ)·B_{a,e}ᵀ

beside the expert's own matmul (``lorakit.layers.experts_forward``), in the form the model is set to
run (``config._experts_implementation``: ``"eager"`` -> the per-expert loop; ``"grouped_mm"`` or
``"batched_mm"`` -> the grouped matmul over tokens sorted by expert). ΔW is formed only to merge.

Recognised: a module of a class decorated with transformers' ``@use_experts_implementation``
(its ``has_gate``/``has_bias``/``is_transposed``/``has_post_expert_norm`` flags describe the MLP),
the parameter one of its two expert weights, and — checked once, on random tokens, when the
wrapper is made — the class's own eager forward giving what the routed computation gives with no
adapter. Anything else (another 3-D parameter, an unknown class, a custom eager forward, expert
parallelism, another experts implementation, unexpected call arguments) runs ParamWrapper's
``W + ΔW`` path; ``routed_reason`` says why (None when routed), and a warning says so at injection.

Nested wrappers (one per targeted parameter, PEFT's nesting): the outermost computes every wrapper's
terms in one pass; the inner ones are not called. Dropout and DoRA are refused as PEFT 0.21 refuses
them for ``target_parameters``.
"""

from __future__ import annotations

import inspect
import warnings

import torch
from torch import nn

from lorakit.layers.experts_forward import Projection, Term, eager_forward, grouped_forward
from lorakit.layers.param import ParamWrapper
from lorakit.layers.routing import blocks_open, route_for

GROUPED = ("grouped_mm", "batched_mm")  # implementations computed by the grouped form
EAGER = (None, "eager")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)  # not fp8 / quantized storage


def _weight_names(module: nn.Module) -> tuple[str, str]:
    return ("gate_up_proj" if module.has_gate else "up_proj"), "down_proj"


def _is_real(t: torch.Tensor) -> bool:
    return t.device.type != "meta" and type(t) in (torch.Tensor, nn.Parameter)  # not a DTensor / subclass


def _original_forward(module: nn.Module):
    return getattr(type(module).forward, "__wrapped__", None)


_SIGNATURES: dict[type, inspect.Signature] = {}


def _signature(module: nn.Module) -> inspect.Signature:
    cls = type(module)
    if cls not in _SIGNATURES:
        _SIGNATURES[cls] = inspect.signature(_original_forward(module))
    return _SIGNATURES[cls]


def structure_refusal(module: nn.Module, parameter_name: str) -> str | None:
    """Why ``module.<parameter_name>`` cannot be adapted on the routed tokens (None: it can), from
    the module's class and shapes alone."""
    cls = type(module).__name__
    flags = ("has_gate", "has_bias", "is_transposed", "has_post_expert_norm", "num_experts", "config")
    if _original_forward(module) is None or not all(hasattr(module, f) for f in flags):
        return (f"{cls} is not a transformers experts module (@use_experts_implementation), so lorakit does not "
                "know its routed computation")
    names = _weight_names(module)
    if parameter_name not in names:
        return f"{cls}.{parameter_name} is not one of its expert weights {list(names)}"
    E = module.num_experts
    for name in names:
        w = getattr(module, name, None)
        if not isinstance(w, torch.Tensor) or w.dim() != 3 or w.shape[0] != E or w.dtype not in _DTYPES:
            shape, dtype = (None, None) if w is None else (tuple(w.shape), w.dtype)
            return (f"{cls}.{name} is not a (num_experts={E}, ., .) tensor in fp32/bf16/fp16/fp64 "
                    f"(shape {shape}, {dtype})")
    return None


def _probe_refusal(module: nn.Module) -> str | None:
    """Run the class's own eager forward and the routed computation (no adapters) on a few random
    tokens; a difference means this class computes something else (None: the same, or not
    checkable here: weights on the meta device or sharded)."""
    up_name, down_name = _weight_names(module)
    up, down = getattr(module, up_name), getattr(module, down_name)
    if not (_is_real(up) and _is_real(down)):
        return None
    E = module.num_experts
    hidden_dim = up.shape[1] if module.is_transposed else up.shape[2]
    g = torch.Generator().manual_seed(0)
    k = min(2, E)
    index = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(6)]).to(up.device)  # (6, k)
    weights = torch.rand(6, k, generator=g).to(up.device, up.dtype)
    hidden = torch.randn(6, hidden_dim, generator=g).to(up.device, up.dtype)
    bias = (lambda n: getattr(module, f"{n}_bias")) if module.has_bias else (lambda n: None)
    try:
        with torch.no_grad():
            theirs = _original_forward(module)(module, hidden, index, weights)
            ours = eager_forward(module, hidden, index, weights,
                                 Projection(up, bias(up_name), module.is_transposed, []),
                                 Projection(down, bias(down_name), module.is_transposed, []))
    except Exception as e:  # a forward with another signature or other assumptions
        return f"{type(module).__name__}'s eager forward could not be checked against the routed computation ({e})"
    if not (torch.isfinite(theirs).all() and torch.isfinite(ours).all()):
        return None  # uninitialised weights: nothing to compare
    tol = 1e-2 if up.dtype in (torch.float16, torch.bfloat16) else 1e-5
    if theirs.shape != ours.shape or not torch.allclose(theirs, ours, rtol=tol, atol=tol * float(theirs.abs().max())):
        return (f"{type(module).__name__}'s eager forward computes something other than the standard expert MLP "
                "(checked on random tokens)")
    return None


class ExpertsWrapper(ParamWrapper):
    """LoRA on a 3-D expert weight, computed on the routed tokens when the module is recognised.

    Attributes:
        routed_reason: None when the forward runs on the routed tokens; else why it forms
            ``W + ΔW`` instead (ParamWrapper's path). ``fallback_reason`` is the reason of the
            last forward that fell back, for conditions only a call can show.
    """

    def __init__(self, base_layer: nn.Module, parameter_name: str) -> None:
        super().__init__(base_layer, parameter_name)
        real = self.real_module()
        self.routed_reason = structure_refusal(real, parameter_name) or _probe_refusal(real)
        self.fallback_reason: str | None = None

    def _create(self, name: str, r: int, cfg) -> None:
        for field, bad in (("lora_dropout", cfg.lora_dropout > 0), ("use_dora", cfg.use_dora)):
            if bad:
                raise ValueError(f"target_parameters on expert weights does not work with {field}="
                                 f"{getattr(cfg, field)!r}: PEFT 0.21 refuses it for target_parameters, so the adapter "
                                 "could not be used in PEFT; set it to its default")
        super()._create(name, r, cfg)

    def _chain(self) -> list[ParamWrapper]:
        out, module = [], self
        while isinstance(module, ParamWrapper):
            out.append(module)
            module = module.base_layer
        return out

    def _refusal(self, chain: list[ParamWrapper], hidden: torch.Tensor, args: tuple, kwargs: dict):
        """``(reason, (top_k_index, top_k_weights))``: why this call cannot be routed (None: it can)."""
        for w in chain:
            reason = getattr(w, "routed_reason", f"parameter {w.parameter_name!r} is not an expert weight")
            if reason is not None:
                return reason, None
        real = self.real_module()
        if getattr(real, "_is_expert_parallel", False):
            return "the experts are sharded by expert parallelism", None
        impl = getattr(real.config, "_experts_implementation", None)
        if impl not in EAGER + GROUPED:
            return f"experts_implementation={impl!r} (lorakit computes eager, grouped_mm and batched_mm)", None
        sig = _signature(real)
        names = list(sig.parameters)  # self, hidden_states, top_k_index, top_k_weights (their names vary)
        try:
            bound = sig.bind(real, hidden, *args, **kwargs).arguments
        except TypeError as e:
            return f"unexpected call arguments ({e})", None
        if len(names) < 4 or set(bound) - set(names[:4]):
            return "the experts module was called with more than (hidden_states, top_k_index, top_k_weights)", None
        index, weights = bound.get(names[2]), bound.get(names[3])
        ok = (isinstance(index, torch.Tensor) and isinstance(weights, torch.Tensor) and hidden.dim() == 2
              and index.dim() == 2 and not index.dtype.is_floating_point and weights.shape == index.shape
              and index.shape[0] == hidden.shape[0])
        if not ok:
            return "the routing inputs are not (tokens, hidden), (tokens, k) indices and (tokens, k) weights", None
        return None, (index, weights)

    # ------------------------------------------------------------------ forward
    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        """The experts' output with every wrapped weight's active adapters added on the routed
        tokens; inside ``mixed_batch``, each batch row's own adapter (rows are blocks of
        ``tokens / rows`` consecutive tokens, the flattened batch-first layout)."""
        chain = self._chain()
        reason, routing = self._refusal(chain, hidden_states, args, kwargs)
        if reason is not None:
            self.fallback_reason = reason
            return super().forward(hidden_states, *args, **kwargs)
        route = route_for(self) if blocks_open() else None
        real = self.real_module()
        terms: dict[str, list[Term]] = {}
        for w in chain:
            terms[w.parameter_name] = w._terms(route, hidden_states.shape[0])
        if not any(terms.values()):
            return real(hidden_states, *args, **kwargs)
        up_name, down_name = _weight_names(real)
        bias = (lambda n: getattr(real, f"{n}_bias")) if real.has_bias else (lambda n: None)
        up = Projection(getattr(real, up_name), bias(up_name), real.is_transposed, terms.get(up_name, []))
        down = Projection(getattr(real, down_name), bias(down_name), real.is_transposed, terms.get(down_name, []))
        impl = getattr(real.config, "_experts_implementation", None)
        run = eager_forward if impl in EAGER else grouped_forward
        return run(real, hidden_states, *routing, up, down)

    def _terms(self, route, tokens: int) -> list[Term]:
        """This wrapper's LoRA terms for one call: its active, unmerged adapters, or in a mixed
        batch each adapter on the tokens of its rows."""
        def term(name: str, rows: torch.Tensor | None) -> Term:
            A, B = self.lora_A[name], self.lora_B[name]
            return Term(lambda dtype: (A(dtype), B(dtype)), self.scaling[name], self.num_experts, A.weight.dtype,
                        self.peft_numerics, rows)

        if route is None:
            return [] if self.disabled else [term(n, None) for n in self.unmerged_active()]
        if self.merged_adapters:
            raise ValueError("mixed_batch needs unmerged adapters; call lorakit.unmerge(model) first")
        n_rows = len(route.rows)
        if tokens % n_rows:
            raise ValueError(f"mixed_batch was given {n_rows} adapter names but the experts of "
                             f"{type(self.real_module()).__name__} got {tokens} tokens, not a multiple of the rows")
        device = self.lora_A[next(iter(self.r))].weight.device
        slots = route.slots(device)  # (N,)
        per_row = tokens // n_rows  # (N, L) flattened, or (L, N) for sequence-first rows
        per_token = slots.repeat_interleave(per_row) if route.batch_dim == 0 else slots.repeat(per_row)  # (T,)
        out = []
        for j, name in enumerate(route.order, start=1):
            if name in self.r and name in route.names:
                out.append(term(name, per_token == j))  # (T,) bool
        return out

    def extra_repr(self) -> str:
        how = "routed" if self.routed_reason is None else f"W + ΔW ({self.routed_reason})"
        return super().extra_repr() + f", forward={how}"


def param_wrapper(module: nn.Module, parameter_name: str) -> ParamWrapper:
    """The wrapper for ``module.<parameter_name>``: :class:`ExpertsWrapper` for a 3-D parameter
    (with a warning when its forward cannot be routed), else :class:`ParamWrapper`."""
    real = module.real_module() if isinstance(module, ParamWrapper) else module
    param = getattr(real, parameter_name, None)
    if not isinstance(param, torch.Tensor) or param.dim() != 3:
        return ParamWrapper(module, parameter_name)
    wrapper = ExpertsWrapper(module, parameter_name)
    if wrapper.routed_reason is not None:
        warnings.warn(f"target_parameters {type(real).__name__}.{parameter_name}: each forward forms W + ΔW for the "
                      f"whole expert stack, because {wrapper.routed_reason}", stacklevel=4)
    return wrapper
