"""How a run's base model is loaded: the one answer that ``train``, ``predict``, ``generate`` and ``merge`` share.

A :class:`BaseSpec` records what loading a base takes — the model (built-in name, directory or Hub
id), the task (its head), the label set and seed (a classifier's new head), the dtype, the attention
implementation and the quantization (``--quantize nf4|fp4|int8``: QLoRA). Training loads its base
with :func:`load_base`; inference and merging rebuild the same spec from the run's
``run_config.json`` and load with the same function, so an adapter trained on a 4-bit base is
evaluated, served and merged on that 4-bit base — not on the full-precision weights it never saw.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class BaseSpec:
    """What loading a run's base model takes (see the module docstring)."""

    model: str
    task: str
    labels: list[str] | None = None
    seed: int = 0
    dtype: str | None = None
    quantize: str | None = None
    attn_implementation: str | None = None

    @classmethod
    def of_job(cls, job) -> BaseSpec:
        """The spec of a :class:`~lorakit.train.settings.JobSettings` (its task resolved)."""
        return cls(model=job.model, task=job.task, labels=job.labels, seed=job.seed, dtype=job.dtype,
                   quantize=job.quantize, attn_implementation=job.attn_implementation)

    def replace(self, **changes) -> BaseSpec:
        return dataclasses.replace(self, **changes)


def load_base(spec: BaseSpec, device: str = "cpu") -> tuple[nn.Module, object]:
    """``(model, tokenizer)`` of ``spec``'s base, loaded as training loads it.

    A quantized spec is loaded by bitsandbytes with the keywords of ``lorakit train --quantize``
    (:func:`lorakit.models.quantized.load_quantized`, on ``device``) and prepared as for training
    (:func:`lorakit.models.quantized.prepare_for_kbit_training`: norms and head in fp32, bitsandbytes' CPU
    repacking held), so the adapter computes with the very function it was trained on.

    Raises:
        FileNotFoundError / ValueError: see :func:`lorakit.models.load_model`.
        ImportError: a quantized spec without bitsandbytes.
    """
    if spec.quantize:
        from lorakit.models.quantized import load_quantized, prepare_for_kbit_training

        model, tok = load_quantized(spec.model, spec.task, spec.quantize, label_names=spec.labels, seed=spec.seed,
                                    device=str(device), attn_implementation=spec.attn_implementation)
        prepare_for_kbit_training(model)
        return model, tok
    from lorakit.models import load_model

    return load_model(spec.model, spec.task, label_names=spec.labels, seed=spec.seed, dtype=spec.dtype,
                      attn_implementation=spec.attn_implementation)
