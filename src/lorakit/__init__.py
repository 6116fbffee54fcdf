"""lorakit: LoRA (Low-Rank Adaptation) for any PyTorch model, PEFT-compatible on disk.

    import lorakit as lk
    cfg = lk.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    lk.inject(model, cfg)            # base frozen; y = W0·x + (α/r)·B·A·x with B = 0 at start
    ...train...
    lk.merge_and_unload(model)       # plain base architecture, ΔW folded in
"""

from lorakit.adapters import (
    active_adapters,
    adapter_names,
    delete_adapter,
    disable_adapters,
    mixed_batch,
    print_trainable_parameters,
    set_adapter,
    summary,
    trainable_parameters,
)
from lorakit.config import LoraConfig
from lorakit.hotswap import hotswap_adapter
from lorakit.inject import find_targets, inject, unload
from lorakit.io import load_adapter, load_full, save_adapter, save_full, save_merged
from lorakit.layers.mixed_kernels import adapters_updated
from lorakit.merge import combine_adapters, merge, merge_and_unload, unmerge

__version__ = "0.1.0"

# Applications built on the core, loaded on first use: ``import lorakit`` needs torch and
# safetensors only, and never imports training, data, models, compare or the CLI.
_LAZY = {"TrainConfig": "lorakit.train", "fit": "lorakit.train",
         "Method": "lorakit.methods", "METHODS": "lorakit.methods", "get_method": "lorakit.methods",
         # the data-aware inits' steps (PEFT's names; lorakit.inits)
         "initialize_lora_eva_weights": "lorakit.inits.eva", "get_eva_state_dict": "lorakit.inits.eva",
         "preprocess_corda": "lorakit.inits.corda", "preprocess_loraga": "lorakit.inits.lora_ga",
         "convert_to_lora": "lorakit.inits.convert"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lorakit' has no attribute {name!r}")

__all__ = [
    "LoraConfig", "inject", "find_targets", "unload",
    "adapter_names", "active_adapters", "set_adapter", "delete_adapter", "disable_adapters", "mixed_batch",
    "hotswap_adapter", "adapters_updated",
    "trainable_parameters", "summary", "print_trainable_parameters",
    "merge", "unmerge", "merge_and_unload", "combine_adapters",
    "save_adapter", "load_adapter", "save_merged", "save_full", "load_full",
    "TrainConfig", "fit",
    "Method", "METHODS", "get_method",  # baselines for lorakit compare: full, bitfit, adapter, prefix, lora, head
    "initialize_lora_eva_weights", "get_eva_state_dict", "preprocess_corda", "preprocess_loraga", "convert_to_lora",
]
