"""LoraConfig: what to adapt and how, validated on construction, PEFT-json compatible.

Field names and meanings follow Hugging Face PEFT's ``LoraConfig`` so that a PEFT user's code
and ``adapter_config.json`` files carry over unchanged.

The update a targeted layer learns is ``ΔW = scaling · B·A`` with ``A: (r, in)``, ``B: (out, r)``
and ``scaling = lora_alpha / r`` (or ``lora_alpha / √r`` with ``use_rslora``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Union

from lorakit.inits.configs import SUBCONFIGS, check_init_configs
from lorakit.matching import pattern_key
from lorakit.peft_fields import METADATA_KEYS, OTHER_VERSIONS_OFF, UNIMPLEMENTED, check_token_indices, refused

TargetSpec = Union[list[str], str, None]

BIAS_MODES = ("none", "all", "lora_only")
INIT_MODES = (True, False, "gaussian", "pissa", "olora", "loftq", "eva", "corda", "lora_ga")
# inits that derive the factors from W and write W - s·B·A (or LoftQ's Q(W')) into it: Linear layers only
WEIGHT_INITS = ("pissa", "olora", "loftq", "corda", "lora_ga")
ALL_LINEAR = "all-linear"

TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "SEQ_2_SEQ_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
# PEFT's target_modules for an adapter with no module targets (token rows only), which it writes and reads
DUMMY_TARGET_MODULES = "dummy-target-modules"
# task types whose PEFT model class trains these heads in full (adds them to modules_to_save)
TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
              "QUESTION_ANS": ("qa_outputs",)}


@dataclass
class LoraConfig:
    """Configuration of one LoRA adapter.

    Args:
        r: Rank of the update, a positive int.
        lora_alpha: Numerator of the scaling ``lora_alpha / r`` (``/ √r`` with ``use_rslora``).
        lora_dropout: Dropout probability applied to the adapter's input, in ``[0, 1)``.
        target_modules: Which modules to adapt: a list of names matched exactly or as a dotted
            suffix (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``), a regex string
            matched against the full module name with ``re.fullmatch``, or ``"all-linear"``
            (every Linear / GPT-2 Conv1D except the output head).
        exclude_modules: Modules never adapted, in the same forms as ``target_modules``.
        layers_to_transform: Layer index or indices to adapt (list targets only); the index is
            the number after ``layers_pattern`` (or after any ``.<name>.`` if that is unset).
        layers_pattern: Name(s) of the module list holding the layers, e.g. ``"layers"``, ``"h"``.
        rank_pattern: ``{pattern: r}`` overriding ``r`` for modules whose name ends in a match
            of ``pattern`` (regex, PEFT's ``(.*\\.)?(pattern)$`` rule).
        alpha_pattern: Same, for ``lora_alpha``.
        bias: ``"none"``, ``"all"`` (every bias trains) or ``"lora_only"`` (biases of adapted
            layers train).
        modules_to_save: Modules trained in full (a trainable copy per adapter), e.g. a
            classifier head; names or dotted suffixes.
        init_lora_weights: ``True`` (A Kaiming-uniform, B = 0), ``False`` (random B: the adapter
            is not a no-op; for tests), ``"gaussian"`` (A ~ N(0, 1/r), B = 0), ``"pissa"``
            (A, B from the top-r SVD of W; W keeps the residual), ``"olora"`` (from a QR of W), or the
            data-aware inits of :mod:`lorakit.inits`: ``"loftq"`` (W ← Q(W'), B·A the quantization
            residual; ``loftq_config``), ``"eva"`` (A from an SVD of the layer inputs, ranks redistributed
            by ``initialize_lora_eva_weights``; ``eva_config``), ``"corda"`` (from ``preprocess_corda``'s
            covariances; ``corda_config``) and ``"lora_ga"`` (from ``preprocess_loraga``'s gradients;
            ``lora_ga_config``).
        use_rslora: Rank-stabilised scaling ``lora_alpha / √r``.
        use_dora: Weight-decomposed LoRA: ``W' = m · (W + ΔW) / ‖W + ΔW‖`` (norms per output row of a
            Linear, per output channel of a convolution, per embedding dimension of an nn.Embedding).
        fan_in_fan_out: The base weight is stored ``(in, out)`` (GPT-2's Conv1D); set
            automatically for Conv1D layers.
        task_type: PEFT's task type (``"CAUSAL_LM"``, ``"SEQ_CLS"``, ...), recorded in the file; PEFT
            picks its model class from it. ``None``: inferred from a transformers model when saved.
        base_model_name_or_path, revision: the base model the adapter belongs to (metadata).
        inference_mode: PEFT's flag for an adapter loaded for inference (metadata; written as True).
        lora_bias: ``lora_B`` gets a bias ``b`` (init 0): ``y += scaling·(B·A·x + b)``; merging folds
            ``scaling·b`` into the base bias (Linear and Conv layers with a bias).
        target_parameters: ``nn.Parameter`` names to adapt directly (``"lin0.weight"``,
            ``"experts.gate_up_proj"``, as dotted suffixes), e.g. the fused expert tensors of MoE models:
            a 2-D parameter gets ``ΔW = scaling·B·A``, a 3-D ``(experts, d1, d2)`` one a rank-``r``
            update per expert (PEFT's ``ParamWrapper``).
        trainable_token_indices: train only these rows of an embedding (a list: the input embedding;
            or ``{module name: [token ids]}``), stored as the new rows themselves (PEFT's
            ``trainable_tokens_delta``), so a few new tokens cost a few rows, not the whole matrix.
        ensure_weight_tying: with tied input/output embeddings, keep the trainable tokens of the
            output layer tied to those of the input embedding (PEFT's flag).
        megatron_core, qalora_group_size, auto_mapping: PEFT's metadata, carried unchanged.
        loftq_config, eva_config, corda_config, lora_ga_config: the data-aware inits' settings, dicts
            with PEFT's keys, completed with PEFT's defaults (see :mod:`lorakit.inits.configs`).
        layer_replication, megatron_config, use_qalora, velora_config, alora_invocation_tokens,
            monteclora_config, use_bdlora, arrow_config, kasa_config: PEFT methods lorakit does not
            implement; accepted at PEFT's default ("off") so configs round-trip, refused otherwise.

    Raises:
        ValueError / TypeError: naming the field, the bad value and what is valid.
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: TargetSpec = None
    exclude_modules: TargetSpec = None
    layers_to_transform: Union[int, list[int], None] = None
    layers_pattern: Union[str, list[str], None] = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    bias: str = "none"
    modules_to_save: Union[list[str], None] = None
    init_lora_weights: Union[bool, str] = True
    use_rslora: bool = False
    use_dora: bool = False
    fan_in_fan_out: bool = False
    task_type: Union[str, None] = None
    base_model_name_or_path: Union[str, None] = None
    revision: Union[str, None] = None
    inference_mode: bool = False
    lora_bias: bool = False
    target_parameters: Union[list[str], None] = None
    trainable_token_indices: Union[list[int], dict[str, list[int]], None] = None
    ensure_weight_tying: bool = False
    # PEFT's metadata, carried unchanged
    megatron_core: Union[str, None] = "megatron.core"
    qalora_group_size: int = 16
    auto_mapping: Union[dict, None] = None
    # the data-aware inits' settings (lorakit.inits.configs)
    loftq_config: dict = field(default_factory=dict)
    eva_config: Union[dict, None] = None
    corda_config: Union[dict, None] = None
    lora_ga_config: Union[dict, None] = None
    # PEFT methods lorakit does not implement (accepted only when off; see lorakit.peft_fields)
    layer_replication: Union[list, None] = None
    megatron_config: Union[dict, None] = None
    use_qalora: bool = False
    velora_config: Union[dict, None] = None
    alora_invocation_tokens: Union[list, None] = None
    monteclora_config: Union[dict, None] = None
    use_bdlora: Union[dict, None] = None
    arrow_config: Union[dict, None] = None
    kasa_config: Union[dict, None] = None

    def __post_init__(self) -> None:
        not_here = refused({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        if not_here:
            raise ValueError(f"lorakit does not implement {', '.join(not_here)}; set the field back to PEFT's "
                             "default or use PEFT for this method")
        _check_positive_int("r", self.r)
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)):
            raise TypeError(f"lora_alpha must be a number, got {self.lora_alpha!r}")
        if not math.isfinite(self.lora_alpha) or self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be a finite number > 0, got {self.lora_alpha!r}")
        if isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, (int, float)):
            raise TypeError(f"lora_dropout must be a float in [0, 1), got {self.lora_dropout!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        self.target_parameters = _check_parameter_targets(self.target_parameters)
        self.trainable_token_indices = check_token_indices(self.trainable_token_indices)
        beside = self.target_parameters is not None or self.trainable_token_indices is not None
        if beside and (self.target_modules in ([], ()) or self.target_modules == DUMMY_TARGET_MODULES):
            self.target_modules = None  # PEFT's ways to say "parameters / token rows only"
        self.target_modules = _check_targets("target_modules", self.target_modules)
        self.exclude_modules = _check_targets("exclude_modules", self.exclude_modules)
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError(
                "layers_to_transform cannot be combined with a regex target_modules string "
                f"({self.target_modules!r}); write the layer indices into the regex instead"
            )
        self.layers_to_transform = _check_layers(self.layers_to_transform)
        if self.layers_pattern is not None:
            pats = [self.layers_pattern] if isinstance(self.layers_pattern, str) else self.layers_pattern
            if not isinstance(pats, (list, tuple)) or not all(isinstance(p, str) and p for p in pats):
                raise TypeError(f"layers_pattern must be a non-empty str or list of str, got {self.layers_pattern!r}")
            if self.layers_to_transform is None:
                raise ValueError("layers_pattern is only used together with layers_to_transform; set both")
        _check_pattern_dict("rank_pattern", self.rank_pattern, "r")
        _check_pattern_dict("alpha_pattern", self.alpha_pattern, "alpha")
        if self.bias not in BIAS_MODES:
            raise ValueError(f"bias must be one of {BIAS_MODES}, got {self.bias!r}")
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str):
                self.modules_to_save = [self.modules_to_save]
            if not isinstance(self.modules_to_save, (list, tuple, set)) or not all(
                isinstance(m, str) and m for m in self.modules_to_save
            ):
                raise TypeError(f"modules_to_save must be a list of module names, got {self.modules_to_save!r}")
            self.modules_to_save = list(self.modules_to_save)
        if not (isinstance(self.init_lora_weights, bool) or self.init_lora_weights in INIT_MODES[2:]):
            raise ValueError(f"init_lora_weights must be one of {INIT_MODES}, got {self.init_lora_weights!r}")
        for key, value in check_init_configs(self.init_lora_weights,
                                             {k: getattr(self, k) for k in SUBCONFIGS}).items():
            setattr(self, key, value)
        if self.lora_bias and self.use_dora:
            raise ValueError("lora_bias=True cannot be combined with use_dora=True (as in PEFT); set one of them")
        if self.lora_bias and not isinstance(self.init_lora_weights, bool):
            raise ValueError(f"lora_bias=True needs init_lora_weights True or False (as in PEFT), got "
                             f"{self.init_lora_weights!r}")
        if not isinstance(self.qalora_group_size, int) or isinstance(self.qalora_group_size, bool):
            raise TypeError(f"qalora_group_size must be an int, got {self.qalora_group_size!r}")
        if self.megatron_core is not None and not isinstance(self.megatron_core, str):
            raise TypeError(f"megatron_core must be a module name string, got {self.megatron_core!r}")
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise ValueError(f"task_type must be one of {TASK_TYPES} or None, got {self.task_type!r}")
        for meta in ("base_model_name_or_path", "revision"):
            if getattr(self, meta) is not None and not isinstance(getattr(self, meta), str):
                raise TypeError(f"{meta} must be a string or None, got {getattr(self, meta)!r}")
        for flag in ("use_rslora", "use_dora", "fan_in_fan_out", "inference_mode", "lora_bias", "ensure_weight_tying"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"{flag} must be True or False, got {getattr(self, flag)!r}")

    # ------------------------------------------------------------------ per-module values
    def rank_for(self, module_name: str) -> int:
        """The rank for ``module_name``: the first matching ``rank_pattern`` key, else ``r``."""
        key = pattern_key(self.rank_pattern, module_name)
        return self.rank_pattern[key] if key is not None else self.r

    def alpha_for(self, module_name: str) -> float:
        """The alpha for ``module_name``: the first matching ``alpha_pattern`` key, else ``lora_alpha``."""
        key = pattern_key(self.alpha_pattern, module_name)
        return self.alpha_pattern[key] if key is not None else self.lora_alpha

    def scaling(self, r: int, alpha: float) -> float:
        """``alpha / r``, or ``alpha / √r`` with rsLoRA."""
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    # ------------------------------------------------------------------ PEFT json
    def to_peft_dict(self, base_model_name_or_path: str | None = None, task_type: str | None = None) -> dict[str, Any]:
        """The ``adapter_config.json`` content PEFT (>= 0.10) reads; the arguments, when given,
        override the config's own metadata fields."""
        d = dataclasses.asdict(self)
        if isinstance(d["target_modules"], list):
            d["target_modules"] = sorted(set(d["target_modules"]))
        elif d["target_modules"] is None:  # parameters / token rows only. PEFT reads null as "this architecture's
            # default modules" (LoRA on q/v); it writes [] beside target_parameters, and its dummy name for token
            # rows alone, where [] is refused on load ("No target_modules passed") — what PEFT 0.21 does itself
            d["target_modules"] = [] if self.target_parameters else DUMMY_TARGET_MODULES
        if d["exclude_modules"] is None:
            del d["exclude_modules"]  # a PEFT >= 0.14 key; left out when unset so PEFT 0.10-0.13 read the file
        for key in _NEWER_PEFT_KEYS:  # likewise: only when not PEFT's default (PEFT < 0.13 refuses unknown keys)
            if d[key] == _DEFAULTS[key]:
                del d[key]
        d.update(peft_type="LORA", task_type=task_type or self.task_type, inference_mode=True,
                 base_model_name_or_path=base_model_name_or_path or self.base_model_name_or_path)
        return d

    @classmethod
    def from_peft_dict(cls, d: dict[str, Any], source: str = "adapter_config.json") -> LoraConfig:
        """Build from a PEFT config dict.

        Unknown keys from newer PEFT versions are ignored with a warning; a method lorakit does not
        implement (another ``peft_type``, LoftQ, VeLoRA, ...) raises rather than silently loading
        wrong numbers.

        Raises:
            ValueError: another PEFT method, or an unsupported feature is switched on.
        """
        if not isinstance(d, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
        peft_type = d.get("peft_type", "LORA")
        if str(peft_type).upper() != "LORA":
            raise ValueError(f"{source}: peft_type is {peft_type!r}; lorakit reads LoRA adapters only "
                             "(peft_type 'LORA')")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        unsupported = refused(d)
        init = kwargs.get("init_lora_weights", True)
        if not unsupported and not (isinstance(init, bool) or init in INIT_MODES[2:]):
            unsupported.append(f"init_lora_weights={init!r}")
        if unsupported:
            raise ValueError(f"{source}: lorakit does not implement {', '.join(unsupported)}; refusing to load "
                             "an adapter whose outputs it cannot reproduce")
        unknown = [k for k in d if k not in known and k not in METADATA_KEYS and k not in OTHER_VERSIONS_OFF]
        if unknown:
            warnings.warn(f"{source}: ignoring config keys lorakit does not know: {unknown}", stacklevel=2)
        adapts_other = d.get("target_parameters") or d.get("trainable_token_indices")
        if kwargs.get("target_modules") is None and "target_modules" in d and not adapts_other:
            raise ValueError(f"{source}: target_modules is null; the file does not say which modules it adapts")
        if kwargs.get("task_type") not in (None, *TASK_TYPES):
            warnings.warn(f"{source}: unknown task_type {kwargs['task_type']!r}; ignored", stacklevel=2)
            kwargs["task_type"] = None
        if kwargs.get("inference_mode") is not None:
            kwargs["inference_mode"] = bool(kwargs["inference_mode"])
        if isinstance(kwargs.get("layers_pattern"), str) and not kwargs.get("layers_pattern"):
            kwargs["layers_pattern"] = None
        if kwargs.get("layers_pattern") is not None and kwargs.get("layers_to_transform") is None:
            kwargs["layers_pattern"] = None
        return cls(**kwargs)

    def to_json(self) -> str:
        """The PEFT json text; key order is kept (rank/alpha patterns: the first match wins)."""
        return json.dumps(self.to_peft_dict(), indent=2)


# fields newer PEFT versions added (lorakit's features beyond plain LoRA, PEFT's metadata and the methods
# lorakit does not implement), and their defaults
_NEWER_PEFT_KEYS = ("lora_bias", "target_parameters", "trainable_token_indices", "ensure_weight_tying",
                    "megatron_core", "qalora_group_size", "auto_mapping", *SUBCONFIGS, *UNIMPLEMENTED)
_DEFAULTS = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
             for f in dataclasses.fields(LoraConfig)}


def _check_positive_int(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be a positive int, got {v!r}")
    if v <= 0:
        raise ValueError(f"{name} must be a positive int, got {v!r}")


def _check_targets(name: str, v: Any) -> TargetSpec:
    if v is None:
        return None
    if isinstance(v, str):
        if not v:
            raise ValueError(f"{name} must not be an empty string; give names, a regex or 'all-linear'")
        if v != ALL_LINEAR:
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"{name}={v!r} is not a valid regular expression: {e}") from None
        return v
    if isinstance(v, (list, tuple, set, frozenset)):
        items = list(v)
        bad = [x for x in items if not isinstance(x, str) or not x]
        if bad:
            raise TypeError(f"{name} entries must be non-empty strings, got {bad!r}")
        if not items:
            raise ValueError(f"{name} must not be an empty list; give names, a regex or 'all-linear'")
        return sorted(set(items)) if isinstance(v, (set, frozenset)) else items
    raise TypeError(f"{name} must be a list of module names, a regex string or 'all-linear', "
                    f"got {type(v).__name__} {v!r}")


def _check_parameter_targets(v: Any) -> Union[list[str], None]:
    if v is None:
        return None
    if isinstance(v, str) or not isinstance(v, (list, tuple, set)):
        raise TypeError(f"target_parameters must be a list of parameter names (e.g. ['experts.gate_up_proj']), "
                        f"got {type(v).__name__} {v!r}")
    items = list(v)
    bad = [x for x in items if not isinstance(x, str) or not x or "." not in x]
    if bad:
        raise ValueError(f"target_parameters entries must be '<module>.<parameter>' names, got {bad!r}")
    if not items:
        raise ValueError("target_parameters must not be an empty list; give names like 'experts.gate_up_proj'")
    return sorted(set(items)) if isinstance(v, set) else items


def _check_layers(v: Any) -> Union[int, list[int], None]:
    if v is None:
        return None
    items = [v] if isinstance(v, int) and not isinstance(v, bool) else v
    if not isinstance(items, (list, tuple)) or not items or not all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items
    ):
        raise ValueError(f"layers_to_transform must be a non-negative int or a non-empty list of them, got {v!r}")
    return v if isinstance(v, int) else list(items)


def _check_pattern_dict(name: str, d: Any, kind: str) -> None:
    if not isinstance(d, dict):
        raise TypeError(f"{name} must be a dict {{pattern: {kind}}}, got {type(d).__name__}")
    for k, v in d.items():
        if not isinstance(k, str) or not k:
            raise TypeError(f"{name} keys must be non-empty module-name patterns, got {k!r}")
        try:
            re.compile(k)
        except re.error as e:
            raise ValueError(f"{name} key {k!r} is not a valid regular expression: {e}") from None
        if kind == "r":
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name}[{k!r}] must be a positive int rank, got {v!r}")
        elif isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ValueError(f"{name}[{k!r}] must be a positive number, got {v!r}")
