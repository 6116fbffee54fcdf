"""TrainConfig: the hyperparameters of one run of :func:`lorakit.train.fit`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass
class TrainConfig:
    """Hyperparameters of a training run (method-agnostic: it trains whatever requires grad).

    The defaults are ``lorakit train``'s (the embedded default job's recipe: 5 epochs, batch 16, lr 1e-3).

    Args:
        epochs: passes over the training set (ignored when ``max_steps`` is set).
        max_steps: optimizer steps in total; overrides ``epochs``.
        lr: peak learning rate.
        optim: the optimizer, by transformers' ``optim`` names: ``adamw_torch`` (``torch.optim.AdamW``;
            also ``adamw``), ``adamw_torch_fused``, bitsandbytes' ``adamw_8bit`` / ``adamw_bnb_8bit`` (8-bit
            state), ``paged_adamw_8bit`` / ``paged_adamw_32bit`` / ``paged_adamw`` (paged state), ``sgd``
            or ``adafactor`` (see :mod:`lorakit.train.optim`).
        adam_beta1 / adam_beta2 / adam_epsilon: AdamW's β₁, β₂ and ε.
        batch_size: examples per micro-batch (per rank under torchrun).
        grad_accum: micro-batches per optimizer step (effective batch = batch_size · ranks · grad_accum).
        weight_decay: AdamW decoupled weight decay.
        warmup_ratio: fraction of the steps with a linear warm-up from 0 (or ``warmup_steps``).
        warmup_steps: warm-up steps; overrides ``warmup_ratio`` when > 0.
        schedule: the decay after warm-up: ``"cosine"`` (to 0), ``"linear"``, ``"constant"``
            (= ``"constant_with_warmup"``), ``"cosine_with_restarts"``, ``"cosine_with_min_lr"``,
            ``"polynomial"`` or ``"inverse_sqrt"`` (transformers' ``lr_scheduler_type`` names and
            formulas; see :mod:`lorakit.train.schedule`).
        schedule_kwargs: the schedule's options, as transformers' ``lr_scheduler_kwargs``:
            ``num_cycles`` (restarts, min-lr), ``power`` / ``lr_end`` (polynomial), ``min_lr`` /
            ``min_lr_rate`` (min-lr), ``timescale`` (inverse_sqrt).
        loraplus_lr_ratio: LoRA+ (Hayou et al., 2024): the ``lora_B`` factors learn at
            ``lr · ratio``; ``None`` = same lr for all.
        max_grad_norm: clip the global gradient norm to this (``0``/``None``: no clipping).
        gradient_checkpointing: recompute activations in backward (less memory, ~30% slower).
        gradient_checkpointing_kwargs: ``{"use_reentrant": bool}`` (default non-reentrant).
        bf16: bfloat16 autocast for the forward pass (weights and optimizer stay fp32).
        seed: seeds data order, dropout and any random init done by ``fit``.
        eval_every: evaluate every N optimizer steps (``0``: after every epoch) and at the end.
        eval_batch_size: micro-batch size for evaluation.
        log_every: record the training loss every N steps.
        checkpoint_every: write a checkpoint every N steps (``0``: only on interrupt and at the end).
        keep_checkpoints: how many step checkpoints to keep.
        group_by_length: batch examples of similar length together (less padding).
        loss_chunk_size: causal LM: compute the vocabulary projection and cross-entropy for this
            many answer tokens at a time (bounds the logits' memory); ``None``: about 2²¹ logits
            per chunk (``max(16, 2**21 // vocab)`` rows).
        device: ``"auto"`` (cuda if available), ``"cpu"``, ``"cuda"``...
        progress: show a tqdm progress bar.
        fsdp: under torchrun, shard with FSDP2 instead of replicating with DDP (see
            :mod:`lorakit.train.distributed`); ``batch_size`` is then per rank either way.
        neftune_noise_alpha: NEFTune (Jain et al., 2023): in training, uniform noise of magnitude
            ``α / √(T·d)`` is added to the input embeddings (``None``: off), as transformers does.
        packing: causal LM: lay each micro-batch's examples end to end in one row, no padding
            (:func:`lorakit.data.dataset.collate_packed`), if the model's attention keeps them apart
            (checked once, see :mod:`lorakit.train.packing`; otherwise padded batches, with a note).
            The loss terms are the padded batch's. Fastest with ``flash_attention_2`` or
            ``flex_attention``; with ``sdpa``/``eager`` attention spans the packed row.
    """

    epochs: float = 5.0
    max_steps: int | None = None
    lr: float = 1e-3
    optim: str = "adamw_torch"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    batch_size: int = 16
    grad_accum: int = 1
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    warmup_steps: int = 0
    schedule: str = "cosine"
    schedule_kwargs: dict[str, Any] | None = None
    loraplus_lr_ratio: float | None = None
    max_grad_norm: float | None = 1.0
    gradient_checkpointing: bool = False
    gradient_checkpointing_kwargs: dict[str, Any] | None = None
    bf16: bool = False
    seed: int = 0
    eval_every: int = 0
    eval_batch_size: int = 64
    log_every: int = 1
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    group_by_length: bool = True
    loss_chunk_size: int | None = None
    device: str = "auto"
    progress: bool = True
    fsdp: bool = False
    packing: bool = False
    neftune_noise_alpha: float | None = None

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum", "eval_batch_size", "log_every", "keep_checkpoints", "loss_chunk_size"):
            v = getattr(self, name)
            if v is None and name == "loss_chunk_size":
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps <= 0):
            raise ValueError(f"max_steps must be a positive int or None, got {self.max_steps!r}")
        if not self.epochs > 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        from lorakit.train.optim import check_optim
        from lorakit.train.schedule import check_schedule

        check_schedule(self.schedule, self.schedule_kwargs)
        check_optim(self.optim)
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1 and self.adam_epsilon > 0):
            raise ValueError(f"adam_beta1 and adam_beta2 must be in [0, 1) and adam_epsilon > 0, got "
                             f"{self.adam_beta1!r}, {self.adam_beta2!r}, {self.adam_epsilon!r}")
        if self.neftune_noise_alpha is not None and not self.neftune_noise_alpha > 0:
            raise ValueError(f"neftune_noise_alpha must be > 0 (or None: off), got {self.neftune_noise_alpha!r}")
        extra = set(self.gradient_checkpointing_kwargs or {}) - {"use_reentrant"}
        if extra:
            raise ValueError(f"gradient_checkpointing_kwargs: only 'use_reentrant' is read, got {sorted(extra)}")
        if self.loraplus_lr_ratio is not None and not self.loraplus_lr_ratio > 0:
            raise ValueError(f"loraplus_lr_ratio must be > 0, got {self.loraplus_lr_ratio!r}")
        for name in ("eval_every", "checkpoint_every", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
