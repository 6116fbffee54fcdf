"""PEFT ``LoraConfig`` fields that lorakit carries without implementing, and the checks of the
trainable-token field.

Every field of PEFT 0.21's ``LoraConfig`` is a field of lorakit's too, so a PEFT user's code and
``adapter_config.json`` files carry over and round-trip unchanged. The ones listed in
``UNIMPLEMENTED`` are methods lorakit does not implement: they are accepted at the value that
means "off" (PEFT's default) and refused, naming the field, at any other value — loading such an
adapter would give numbers different from PEFT's.
"""

from __future__ import annotations

from typing import Any

# field -> (PEFT's "off" value, the method it switches on)
UNIMPLEMENTED: dict[str, tuple[Any, str]] = {
    "layer_replication": (None, "layer replication"),
    "megatron_config": (None, "Megatron-LM parallel layers"),
    "use_qalora": (False, "QA-LoRA"),
    "velora_config": (None, "VeLoRA"),
    "alora_invocation_tokens": (None, "activated LoRA (aLoRA)"),
    "monteclora_config": (None, "MonteCLoRA"),
    "use_bdlora": (None, "BD-LoRA (block-diagonal factors)"),
    "arrow_config": (None, "Arrow routing"),
    "kasa_config": (None, "KaSA"),
}
# keys other PEFT versions write for methods lorakit lacks (not fields of 0.21's LoraConfig)
OTHER_VERSIONS_OFF: dict[str, tuple[Any, str]] = {"mica_config": (None, "MiCA initialisation")}

# init_lora_weights values of PEFT that lorakit does not implement -> the method
UNIMPLEMENTED_INITS = {"orthogonal": "orthogonal initialisation", "mica": "MiCA initialisation",
                       "pissa_niter": "fast-SVD PiSSA initialisation"}

# keys of adapter_config.json that describe the file or the run, not the numbers: skipped on read
METADATA_KEYS = {"peft_type", "peft_version", "runtime_config"}


def is_off(value: Any, off: Any) -> bool:
    """``value`` means the feature is off (``None``/``False``/empty, or PEFT's default)."""
    return value is None or value is False or value == off or (isinstance(value, (dict, list)) and not value)


def refused(values: dict[str, Any]) -> list[str]:
    """``"<field>=<value> (<method>)"`` for every unimplemented method ``values`` switches on,
    including an ``init_lora_weights`` lorakit lacks."""
    out = []
    for key, (off, what) in {**UNIMPLEMENTED, **OTHER_VERSIONS_OFF}.items():
        if key in values and not is_off(values[key], off):
            out.append(f"{key}={values[key]!r} ({what})")
    init = values.get("init_lora_weights", True)
    if isinstance(init, str):
        what = next((w for k, w in UNIMPLEMENTED_INITS.items() if init.lower().startswith(k)), None)
        if what is not None:
            out.append(f"init_lora_weights={init!r} ({what})")
    return out


def check_token_indices(v: Any) -> Any:
    """``trainable_token_indices``: None, a list of token ids (for the input embedding), or
    ``{module name: [token ids]}``; returned with lists copied.

    Raises:
        TypeError / ValueError: naming the bad entry.
    """
    if v is None:
        return None

    def ids(name: str, items: Any) -> list[int]:
        if not isinstance(items, (list, tuple)) or not items or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in items):
            raise ValueError(f"trainable_token_indices{name} must be a non-empty list of token ids (ints >= 0), "
                             f"got {items!r}")
        if len(set(items)) != len(items):
            raise ValueError(f"trainable_token_indices{name} lists a token id twice: {items!r}")
        return list(items)

    if isinstance(v, dict):
        if not v:
            raise ValueError("trainable_token_indices must not be an empty dict; give {module name: [token ids]}")
        bad = [k for k in v if not isinstance(k, str) or not k]
        if bad:
            raise TypeError(f"trainable_token_indices keys must be module names, got {bad!r}")
        return {k: ids(f"[{k!r}]", items) for k, items in v.items()}
    if isinstance(v, (list, tuple)):
        return ids("", v)
    raise TypeError(f"trainable_token_indices must be a list of token ids or {{module name: [token ids]}}, "
                    f"got {type(v).__name__} {v!r}")
