"""The sub-configurations of PEFT's data-aware LoRA initialisations, as plain dicts with PEFT's keys.

``LoraConfig(init_lora_weights=..., <field>=...)`` takes each as a dict (or PEFT's dataclass, e.g.
``peft.LoftQConfig(...)``); it is checked and completed with PEFT 0.21's defaults here, so the
``adapter_config.json`` lorakit writes holds what PEFT's ``asdict`` would write, and PEFT's files read back.

| field            | init_lora_weights | PEFT class     | keys (defaults)                                              |
|------------------|-------------------|----------------|--------------------------------------------------------------|
| ``loftq_config`` | ``"loftq"``       | LoftQConfig    | loftq_bits (4), loftq_iter (1)                               |
| ``eva_config``   | ``"eva"``         | EvaConfig      | rho (2.0), tau (0.99), use_label_mask (True),                |
|                  |                   |                | label_mask_value (-100), whiten (False),                     |
|                  |                   |                | adjust_scaling_factors (True)                                |
| ``corda_config`` | ``"corda"``       | CordaConfig    | cache_file, covariance_file (None), corda_method ("ipm"),    |
|                  |                   |                | verbose (False), use_float16_for_covariance (False),         |
|                  |                   |                | prune_temporary_fields (True)                                |
| ``lora_ga_config`` | ``"lora_ga"``   | LoraGAConfig   | direction ("ArB2r"), scale ("stable"), stable_gamma (16)     |

PEFT's rules: ``init_lora_weights="loftq"`` needs a non-empty ``loftq_config`` (a ``loftq_config``
with another init is reset to ``{}``, with a warning); ``"eva"`` / ``"corda"`` / ``"lora_ga"`` without
their config get the defaults; their configs beside another init are kept (PEFT's CorDA and PiSSA
recipes save the trained adapter with ``init_lora_weights=True`` and the sub-config still set).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

# field -> (the init it configures, PEFT's defaults)
SUBCONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "loftq_config": ("loftq", {"loftq_bits": 4, "loftq_iter": 1}),
    "eva_config": ("eva", {"rho": 2.0, "tau": 0.99, "use_label_mask": True, "label_mask_value": -100,
                           "whiten": False, "adjust_scaling_factors": True}),
    "corda_config": ("corda", {"cache_file": None, "covariance_file": None, "corda_method": "ipm", "verbose": False,
                               "use_float16_for_covariance": False, "prune_temporary_fields": True}),
    "lora_ga_config": ("lora_ga", {"direction": "ArB2r", "scale": "stable", "stable_gamma": 16}),
}
DATA_INITS = ("eva", "corda", "lora_ga")  # need data: calibration inputs, covariances, gradients
LORA_GA_DIRECTIONS = ("ArBr", "A2rBr", "ArB2r", "random")
LORA_GA_SCALES = ("stable", "weight_svd", "gd_scale", "unit")


def _as_dict(field: str, value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if not isinstance(value, dict):
        raise TypeError(f"{field} must be a dict (PEFT's keys: {list(SUBCONFIGS[field][1])}) or None, "
                        f"got {type(value).__name__} {value!r}")
    defaults = SUBCONFIGS[field][1]
    unknown = [k for k in value if k not in defaults]
    if unknown:
        raise ValueError(f"{field} has unknown key(s) {unknown}; valid keys (PEFT 0.21): {list(defaults)}")
    return {**defaults, **value}


def _check_values(field: str, d: dict[str, Any]) -> None:
    def bad(key: str, valid: str) -> ValueError:
        return ValueError(f"{field}[{key!r}] must be {valid}, got {d[key]!r}")

    def is_num(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    bools = [k for k, v in SUBCONFIGS[field][1].items() if isinstance(v, bool)]
    for key in bools:
        if not isinstance(d[key], bool):
            raise bad(key, "True or False")
    if field == "loftq_config":
        if d["loftq_bits"] not in (4, 8) or isinstance(d["loftq_bits"], bool):
            raise bad("loftq_bits", "4 (NF4) or 8 (int8), the two quantizations PEFT's LoftQ has")
        if not isinstance(d["loftq_iter"], int) or isinstance(d["loftq_iter"], bool) or d["loftq_iter"] < 1:
            raise bad("loftq_iter", "a positive int (alternating quantize / SVD steps)")
    elif field == "eva_config":
        if not is_num(d["rho"]) or d["rho"] < 1.0:
            raise bad("rho", "a number >= 1.0 (a layer's rank may grow to r·rho)")
        if not is_num(d["tau"]) or not 0.0 <= d["tau"] <= 1.0:
            raise bad("tau", "a cosine similarity threshold in [0, 1]")
        if not isinstance(d["label_mask_value"], int) or isinstance(d["label_mask_value"], bool):
            raise bad("label_mask_value", "an int (the ignored-label value, usually -100)")
    elif field == "corda_config":
        if d["corda_method"] not in ("ipm", "kpm"):
            raise bad("corda_method", "'ipm' (instruction-previewed) or 'kpm' (knowledge-preserved)")
        for key in ("cache_file", "covariance_file"):
            if d[key] is not None and not isinstance(d[key], str):
                raise bad(key, "a file path or None")
    elif field == "lora_ga_config":
        if d["direction"] not in LORA_GA_DIRECTIONS:
            raise bad("direction", f"one of {LORA_GA_DIRECTIONS}")
        if d["scale"] not in LORA_GA_SCALES:
            raise bad("scale", f"one of {LORA_GA_SCALES}")
        if not is_num(d["stable_gamma"]) or d["stable_gamma"] <= 0:
            raise bad("stable_gamma", "a number > 0")


def check_init_configs(init: Any, values: dict[str, Any]) -> dict[str, Any]:
    """The four sub-config fields of a LoraConfig, checked and completed (see the module docstring).

    Args:
        init: the config's ``init_lora_weights``.
        values: ``{field: value}`` for the fields of :data:`SUBCONFIGS`.

    Returns:
        ``{field: new value}``.

    Raises:
        TypeError / ValueError: a bad sub-config, or ``init_lora_weights="loftq"`` without ``loftq_config``.
    """
    out = {}
    for field, (own_init, _) in SUBCONFIGS.items():
        value = values.get(field)
        d = _as_dict(field, value) if value not in ({},) else None
        if d is not None:
            _check_values(field, d)
        if field == "loftq_config":
            if init == "loftq" and d is None:
                raise ValueError("init_lora_weights='loftq' needs loftq_config (as in PEFT), e.g. "
                                 "{'loftq_bits': 4, 'loftq_iter': 1}")
            if init != "loftq" and d is not None:
                warnings.warn("loftq_config is ignored (reset to {}) when init_lora_weights is not 'loftq', "
                              "as in PEFT", stacklevel=4)
                d = None
            out[field] = d if d is not None else {}
            continue
        if init == own_init and d is None:
            d = dict(SUBCONFIGS[field][1])
        out[field] = d
    return out
