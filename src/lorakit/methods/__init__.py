"""Fine-tuning methods behind one small interface (:class:`Method`), compared by ``lorakit compare``.

    method = lorakit.methods.get_method("adapter", bottleneck=32)
    method.apply(model)                  # in place: adds modules, sets requires_grad
    ...train whatever requires grad...
    method.stored_state(model)           # what must be stored beside the base checkpoint
    served = method.for_inference(model) # LoRA: merged, zero overhead
"""

from __future__ import annotations

from lorakit.methods.base import DEFAULT_HEADS, Method, head_names, trainable_state
from lorakit.methods.houlsby import Bottleneck, HoulsbyAdapters
from lorakit.methods.lora import LoRA
from lorakit.methods.prefix import PrefixSelfAttention, PrefixTuning, extend_mask
from lorakit.methods.selective import BitFit, FullFineTuning, LinearProbe

# name -> the class implementing it; keyword arguments of get_method go to the class.
METHODS: dict[str, type] = {
    "full": FullFineTuning,
    "bitfit": BitFit,
    "adapter": HoulsbyAdapters,
    "prefix": PrefixTuning,
    "lora": LoRA,
    "head": LinearProbe,
}


def get_method(name: str, **kwargs) -> Method:
    """A method by name (``full``, ``bitfit``, ``adapter``, ``prefix``, ``lora``, ``head``).

    Raises:
        ValueError: an unknown name.
        TypeError: a keyword the method does not take.
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid: {list(METHODS)}")
    return METHODS[name](**kwargs)


__all__ = ["Method", "METHODS", "get_method", "DEFAULT_HEADS", "head_names", "trainable_state",
           "FullFineTuning", "BitFit", "LinearProbe", "HoulsbyAdapters", "Bottleneck",
           "PrefixTuning", "PrefixSelfAttention", "extend_mask", "LoRA"]
