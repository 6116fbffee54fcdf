"""``lorakit train --init``: inject LoRA with an initialisation that reads the weights or the data, the
data taken from the training set.

| ``--init``   | what runs before / after ``inject``                              | data                          |
|--------------|------------------------------------------------------------------|-------------------------------|
| pissa, olora | nothing (SVD / QR of W)                                          | none                          |
| loftq        | nothing (NF4 quantization + SVD of W; ``loftq_iter`` 1, as PEFT) | none                          |
| corda        | ``preprocess_corda``: input covariances, one example per forward | ``--init-samples`` examples   |
| lora-ga      | ``preprocess_loraga``: mean gradient of the task loss            | ``--init-samples``, batched   |
| eva          | ``initialize_lora_eva_weights`` after inject: SVD of layer inputs | training batches, to converge |

The examples are a seeded random draw from the training set (``--seed``); each calibration pass shows
a progress bar (or one line in a log). CorDA and LoRA-GA move W from data a reloaded adapter cannot
recompute, so the run saves their adapter converted to plain LoRA (rank 2r) for the original base
(:mod:`lorakit.inits.convert`); the others reload as they are (PEFT re-applies PiSSA / OLoRA / LoftQ to W).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterator

import torch
from torch import nn

from lorakit.config import LoraConfig

INITS = ("loftq", "eva", "corda", "lora-ga", "pissa", "olora")
DEFAULT_SAMPLES = 256  # CorDA's recipe: a few hundred samples; LoRA-GA: 16 batches of 16


def init_value(name: str) -> str:
    """``--init`` name -> ``init_lora_weights`` value (``lora-ga`` -> ``"lora_ga"``).

    Raises:
        ValueError: an unknown name.
    """
    if name not in INITS:
        raise ValueError(f"--init {name!r}: choose one of {', '.join(INITS)}")
    return name.replace("-", "_")


def with_init(cfg: LoraConfig, init: str | None, quantize: str | None) -> LoraConfig:
    """``cfg`` with ``init_lora_weights`` (and its sub-config's defaults) for ``--init``.

    Raises:
        ValueError: an unknown ``--init``, or one that writes into W with ``--quantize``.
    """
    if init is None:
        return cfg
    value = init_value(init)
    if cfg.init_lora_weights is not True and cfg.init_lora_weights != value:
        raise ValueError(f"--init {init} and --init-lora-weights {cfg.init_lora_weights} disagree; give one of them")
    if quantize and value in ("loftq", "corda", "lora_ga", "pissa", "olora"):
        raise ValueError(f"--init {init} writes into the base weights, which --quantize {quantize} stores quantized "
                         f"(read-only); drop --quantize (LoftQ's base Q(W) is then held in full precision: the same "
                         f"numbers as NF4), or use --init eva, which only reads the layer inputs")
    extra = {"loftq_config": {"loftq_bits": 4, "loftq_iter": 1}} if value == "loftq" else {}
    return dataclasses.replace(cfg, init_lora_weights=value, **extra)


def _sample(ds, n: int, seed: int) -> list[int]:
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed)).tolist()
    return perm[: min(n, len(ds))]


def _batches(ds, indices: list[int], batch_size: int, device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    from lorakit.data.dataset import collate

    for i in range(0, len(indices), batch_size):
        b = collate([ds[j] for j in indices[i:i + batch_size]], ds.task, ds.pad_id)
        yield {k: v.to(device) for k, v in b.items()}


class _Bar:
    """tqdm over ``total`` steps when ``progress``, else one line when done."""

    def __init__(self, total: int, desc: str, progress: bool) -> None:
        self.desc, self.n, self.bar = desc, 0, None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="batch", leave=False, dynamic_ncols=True)

    def update(self) -> None:
        self.n += 1
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        print(f"lorakit train: {self.desc}: {self.n} calibration batches", file=sys.stderr, flush=True)


def inject_with_init(model: nn.Module, cfg: LoraConfig, train_ds, *, batch_size: int, seed: int,
                     samples: int | None = None, progress: bool = False) -> dict | None:
    """``lorakit.inject(model, cfg)``, with the calibration ``cfg.init_lora_weights`` needs done on
    ``train_ds`` (see the module docstring).

    Returns:
        For CorDA / LoRA-GA, the adapter's initial factors (what the saved adapter subtracts,
        :func:`lorakit.inits.convert.initial_factors`); else None.

    Raises:
        ValueError: from the init's checks (e.g. too few tokens for EVA); the model is then unchanged.
    """
    from lorakit.inject import inject

    init = cfg.init_lora_weights
    device = next(model.parameters()).device
    n = samples or DEFAULT_SAMPLES
    if init == "corda":
        from lorakit.inits.corda import preprocess_corda

        idx = _sample(train_ds, n, seed)
        bar = _Bar(len(idx), "CorDA covariances", progress)

        def run_model() -> None:
            for batch in _batches(train_ds, idx, 1, device):  # one example per call: no padding rows
                model(**{k: v for k, v in batch.items() if k != "labels"})
                bar.update()

        try:
            preprocess_corda(model, cfg, run_model=run_model)
        finally:
            bar.close()
    elif init == "lora_ga":
        from lorakit.inits.lora_ga import preprocess_loraga

        idx = _sample(train_ds, n, seed)
        bar = _Bar(-(-len(idx) // batch_size), "LoRA-GA gradients", progress)

        def train_step() -> None:
            for batch in _batches(train_ds, idx, batch_size, device):
                model(**batch).loss.backward()
                bar.update()

        try:
            preprocess_loraga(model, cfg, train_step)
        finally:
            bar.close()
    torch.manual_seed(seed)  # LoRA-GA's randomized SVD draws from the global generator
    inject(model, cfg)
    if init == "eva":
        _eva(model, train_ds, batch_size, seed, samples, progress, device)
    if init in ("corda", "lora_ga"):
        from lorakit.inits.convert import initial_factors

        return initial_factors(model)
    return None


def _eva(model, train_ds, batch_size: int, seed: int, samples: int | None, progress: bool, device) -> None:
    from lorakit.inits.eva import initialize_lora_eva_weights
    from lorakit.inject import unload

    idx = _sample(train_ds, samples or len(train_ds), seed)
    batches = list(_batches(train_ds, idx, batch_size, device))
    try:
        initialize_lora_eva_weights(model, batches, show_progress_bar=progress)
    except ValueError:
        unload(model)  # EVA's own changes were rolled back; the injected adapter goes too: nothing changed
        raise
    print(f"lorakit train: EVA ranks set from {len(batches)} training batches at most", file=sys.stderr, flush=True)


def save_run_adapter(model: nn.Module, directory: str, initial: dict | None) -> None:
    """The run's ``adapter/``: PEFT's files; converted to plain LoRA when ``initial`` is given."""
    if initial is None:
        from lorakit import save_adapter

        save_adapter(model, directory)
        return
    from lorakit.inits.convert import convert_to_lora

    convert_to_lora(model, directory, initial)

