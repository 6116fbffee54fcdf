"""The three save forms, and PEFT-compatible adapter files both ways.

* (a) ``save_full`` / ``load_full``: the model with all its adapter layers, resumable.
* (b) ``save_merged``: ``W + ΔW`` in the base architecture (``AutoModel*.from_pretrained`` reads it).
* (c) ``save_adapter`` / ``load_adapter``: PEFT's ``adapter_config.json`` + ``adapter_model.safetensors``.
"""

from lorakit.io.adapter import load_adapter, save_adapter
from lorakit.io.merged_and_full import load_full, save_full, save_merged

__all__ = ["save_adapter", "load_adapter", "save_merged", "save_full", "load_full"]
