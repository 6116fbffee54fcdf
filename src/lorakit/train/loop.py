"""``fit``: one readable training loop for any parameter-efficient method.

It trains exactly the parameters with ``requires_grad=True`` — LoRA factors after
``lorakit.inject``, biases for BitFit, everything for full fine-tuning — with AdamW, linear
warm-up then cosine decay (or ``cfg.optim`` / ``cfg.schedule``), gradient accumulation and clipping. One optimizer step:

    for each of grad_accum micro-batches b:   loss_b = Σ_{targets in b} CE / N_step ;  backward
    clip ‖g‖ to max_grad_norm ; AdamW step ; scheduler step

where ``N_step`` counts the loss terms (answer tokens, or examples) of the whole step, so the
step's gradient is that of the mean over all its targets whatever the split into micro-batches.

Batch order is a pure function of ``(seed, epoch)``; together with the RNG states saved at each
step boundary, a run resumed from a checkpoint reproduces the uninterrupted run's weights.

Under ``torchrun`` (N ranks, DDP or FSDP2) each rank takes its slice of every global batch of
``batch_size · N`` and ``N_step`` is summed over ranks, so the update is the one a single
process makes with the whole batch; see :mod:`lorakit.train.distributed`.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from lorakit.data.dataset import TokenDataset, batch_order
from lorakit.layers import wrappers
from lorakit.train.checkpoint import rng_state, set_rng_state
from lorakit.train.config import TrainConfig
from lorakit.train.distributed import Parallel, local_device
from lorakit.train.logging import notify_eval
from lorakit.train.losses import count_targets, loss_sum
from lorakit.train.measure import evaluate, peak_memory_mb, to_device
from lorakit.train.neftune import neftune
from lorakit.train.optim import make_optimizer
from lorakit.train.schedule import make_scheduler

Callback = Callable[[int, dict[str, Any]], None]


def resolve_device(name: str) -> torch.device:
    return local_device(name)  # "auto": cuda if available (under torchrun: this node's GPU LOCAL_RANK)


def enable_activation_checkpointing(model: nn.Module, use_reentrant: bool = False) -> None:
    """Hugging Face activation (gradient) checkpointing, non-reentrant by default; transformers ≥ 5.23
    names it ``activation_checkpointing_enable`` (the old name still works there, with a FutureWarning).
    Reentrant checkpointing also makes the input embeddings' output require grad, so that the
    checkpointed blocks pass gradients to the adapters inside them.

    Raises:
        ValueError: not a Hugging Face model.
    """
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ValueError(f"gradient_checkpointing needs a Hugging Face model; {type(model).__name__} has no "
                         "activation_checkpointing_enable() / gradient_checkpointing_enable()")
    if use_reentrant and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Optimizer groups over the trainable parameters. With LoRA+ the "B" factors (each layer's
    ``b_parameters``: ``lora_B``, ``lora_embedding_B``) get ``lr · loraplus_lr_ratio``.

    Raises:
        ValueError: nothing to train.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no parameters with requires_grad=True; nothing to train "
                         "(inject an adapter or unfreeze some parameters first)")
    if cfg.loraplus_lr_ratio is None:
        return [{"params": trainable, "lr": cfg.lr}]
    b_ids = {id(p) for _, w in wrappers(model) for name in w.adapter_names for p in w.b_parameters(name)}
    fast = [p for p in trainable if id(p) in b_ids]
    slow = [p for p in trainable if id(p) not in b_ids]
    return [g for g in ({"params": slow, "lr": cfg.lr}, {"params": fast, "lr": cfg.lr * cfg.loraplus_lr_ratio})
            if g["params"]]


class _StopOnSignal:
    """First Ctrl-C (SIGINT) or SIGTERM (what ``kill``, SLURM's preemption and torchrun's shutdown of
    a job send): finish the current optimizer step, then stop (a checkpoint gets saved). A second
    signal of either kind: the usual immediate KeyboardInterrupt."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, speak: bool = True) -> None:
        self.requested, self.speak = False, speak  # speak: under torchrun every rank hears it, rank 0 says so
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if not self.speak:
            return
        what = "interrupt" if signum == signal.SIGINT else "terminate signal"
        print(f"\n{what}: finishing this step and saving a checkpoint (Ctrl-C again to abort at once)", flush=True)

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)


def _can_pack(model: nn.Module, task: str, device: torch.device, speak: bool) -> bool:
    """Whether ``cfg.packing`` can be honoured: a causal LM whose attention keeps packed examples
    apart (:func:`lorakit.train.packing.packing_problem`); otherwise say why and pad instead."""
    from lorakit.train.packing import FAST_ATTENTION, attention_implementation, packing_problem

    if task != "causal-lm":
        raise ValueError(f"packing applies to causal-lm training, not {task!r}")
    problem = packing_problem(model, device)
    impl = attention_implementation(model)
    if problem is not None and speak:
        print(f"lorakit: packing off: {problem}; batches are padded (length-grouped) instead",
              file=sys.stderr, flush=True)
    elif impl not in FAST_ATTENTION and speak:
        print(f"lorakit: packing with {impl} attention: each packed row's attention is computed whole (masked "
              "block-diagonally), which can be slower than padded length-grouped batches; flash_attention_2 or "
              "flex_attention compute each example alone (--attn-implementation)", file=sys.stderr, flush=True)
    return problem is None


def plan_steps(n_examples: int, cfg: TrainConfig) -> tuple[int, int, int]:
    """``(micro-batches per epoch, optimizer steps per epoch, total optimizer steps)``."""
    n_batches = math.ceil(n_examples / cfg.batch_size)
    per_epoch = max(1, math.ceil(n_batches / cfg.grad_accum))
    total = cfg.max_steps if cfg.max_steps is not None else max(1, math.ceil(cfg.epochs * per_epoch))
    return n_batches, per_epoch, total


def fit(model: nn.Module, train_ds: TokenDataset, eval_ds: TokenDataset | None = None,
        cfg: TrainConfig | None = None, *, out_dir: str | None = None, resume: str | None = None,
        callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Train ``model``'s trainable parameters on ``train_ds``; evaluate on ``eval_ds``.

    Args:
        model: a model whose parameters to train have ``requires_grad=True``. Under torchrun pass
            the plain model: ``fit`` wraps it in DDP, or shards it in place with FSDP2
            (``cfg.fsdp``; it stays sharded afterwards: save with ``lk.save_adapter`` on every rank).
        train_ds: a :class:`~lorakit.data.TokenDataset` (its ``task`` picks the loss).
        eval_ds: evaluated after every epoch (or every ``cfg.eval_every`` steps) and at the end.
        cfg: hyperparameters; ``TrainConfig()`` if omitted.
        out_dir: where checkpoints go (``<out_dir>/checkpoints``); ``None``: no checkpoints.
        resume: a run directory or checkpoint to continue from (same model, data and cfg).
        callbacks: ``cb(step, logs)`` after every optimizer step; raising KeyboardInterrupt
            stops the run like Ctrl-C (a checkpoint is saved, then it propagates). A callback
            with an ``on_eval(step, metrics)`` method also gets every evaluation's metrics. Under
            torchrun they run on rank 0 only, and all ranks stop together.

    Returns:
        ``trainable_params``, ``total_params``, the final eval metrics (``eval_accuracy`` or
        ``eval_loss``/``perplexity``), ``train_loss``, ``steps``, ``train_seconds`` (optimizer
        steps only, not eval), ``tokens_per_second`` (non-padding tokens / train_seconds),
        ``peak_memory_mb`` and ``history`` (``train``: step/loss/lr; ``eval``: step/metrics).

    Raises:
        ValueError: nothing to train, an empty dataset, or eval data of another task.
        KeyboardInterrupt: after saving a checkpoint (when ``out_dir`` is set).
    """
    cfg = cfg or TrainConfig()
    if len(train_ds) == 0:
        raise ValueError("the training set is empty")
    if eval_ds is not None and eval_ds.task != train_ds.task:
        raise ValueError(f"eval data is for task {eval_ds.task!r} but training data is for {train_ds.task!r}")
    device = resolve_device(cfg.device)
    par = Parallel(cfg.fsdp, device)  # torchrun: this rank's share of the work; one process: the identity
    model.to(device)
    packed = cfg.packing and _can_pack(model, train_ds.task, device, par.is_main)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(cfg.seed)
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(model, **(cfg.gradient_checkpointing_kwargs or {}))
    fwd = par.wrap(model, cfg.bf16, device)  # DDP / FSDP2 (in place) / the model itself: what the loss runs
    task, lengths = train_ds.task, train_ds.lengths()
    groups = param_groups(model, cfg)
    params = [p for g in groups for p in g["params"]]
    optimizer = make_optimizer(groups, cfg, device)  # cfg.optim: AdamW (fused on CUDA), 8-bit/paged AdamW...
    gcfg = par.global_config(cfg)  # batch_size × ranks: the global batch
    n_batches, per_epoch, total = plan_steps(len(train_ds), gcfg)
    warmup = cfg.warmup_steps or int(cfg.warmup_ratio * total)
    scheduler = make_scheduler(optimizer, total, warmup, cfg.schedule, cfg.schedule_kwargs, cfg.lr)

    step, train_seconds, tokens = 0, 0.0, 0
    history: dict[str, list[dict[str, Any]]] = {"train": [], "eval": []}
    if resume is not None:
        state = par.load_checkpoint(resume, model, optimizer, scheduler)
        step, train_seconds, tokens, history = state["step"], state["train_seconds"], state["tokens"], state["history"]
        set_rng_state(state["rng"])
    orders: dict[int, list[list[int]]] = {}

    def micro_batch(k: int) -> dict[str, torch.Tensor]:
        epoch, pos = divmod(k, n_batches)
        if epoch not in orders:
            orders.clear()
            orders[epoch] = batch_order(lengths, gcfg.batch_size, cfg.seed, epoch, cfg.group_by_length)
        return par.local_batch(orders[epoch][pos], train_ds, packed)  # one process: the whole batch, collated

    def run_eval() -> dict[str, float]:
        if eval_ds is None:
            return {}
        metrics = evaluate(fwd, eval_ds, cfg.eval_batch_size, device, cfg.bf16, cfg.loss_chunk_size)
        history["eval"].append({"step": step, **metrics})
        if par.is_main:  # callbacks run on rank 0 only
            notify_eval(callbacks, step, metrics)
        return metrics

    def checkpoint(rng: dict[str, Any]) -> None:
        if out_dir is not None:
            par.save_checkpoint(out_dir, step, model, optimizer, scheduler, rng,
                                {"train_seconds": train_seconds, "tokens": tokens, "history": history},
                                keep=cfg.keep_checkpoints)

    eval_every = cfg.eval_every or per_epoch
    par.announce(cfg)
    bar = _progress(cfg, total, step) if par.is_main else None
    model.train()
    rng_at_step: dict[str, Any] | None = None  # RNG at the start of the step in progress
    stopped_together = False  # torchrun: every rank left the loop at the same step (a collective save is safe)
    try:
        with _StopOnSignal(speak=par.is_main) as stop, neftune(model, cfg.neftune_noise_alpha):
            while step < total:
                rng_at_step = rng_state()
                t0 = time.perf_counter()
                batches = [micro_batch(step * cfg.grad_accum + j) for j in range(cfg.grad_accum)]
                n_targets = max(1, par.total_count(sum(count_targets(b, task) for b in batches)))  # over all ranks
                step_loss, step_tokens = 0.0, 0
                for j, b in enumerate(batches):
                    b = to_device(b, device)
                    with par.no_sync(fwd, last=j == len(batches) - 1):
                        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                            # × ranks: DDP/FSDP average the ranks' gradients; the sum is what we want
                            loss = loss_sum(fwd, b, task, cfg.loss_chunk_size) * par.world / n_targets
                        loss.backward()
                    step_loss += float(loss.detach())
                    step_tokens += int(b["attention_mask"].sum())
                if cfg.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step_loss, step_tokens = par.reduce_step(step_loss, step_tokens)
                tokens += step_tokens
                train_seconds += time.perf_counter() - t0
                step += 1
                rng_at_step = None  # at a step boundary: the current RNG state is the one to save
                lr = optimizer.param_groups[0]["lr"]
                if step % cfg.log_every == 0 or step == total:
                    history["train"].append({"step": step, "loss": step_loss, "lr": lr})
                logs = {"loss": step_loss, "lr": lr, "tok/s": tokens / max(train_seconds, 1e-9)}
                if bar is not None:
                    bar.update(1)
                    gpu = {"mem": f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f}GiB"} \
                        if device.type == "cuda" else {}
                    bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{logs['tok/s']:.0f}", **gpu)
                if par.run_callbacks(callbacks, step, logs, stop.requested):  # torchrun: did any rank stop?
                    stopped_together = True
                    raise KeyboardInterrupt
                if step % eval_every == 0 and step < total:
                    run_eval()
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total:
                    checkpoint(rng_state())
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        optimizer.zero_grad(set_to_none=True)
        if par.world == 1 or stopped_together:  # a rank interrupted alone cannot join a collective save
            checkpoint(rng_at_step or rng_state())
        raise
    if bar is not None:
        bar.close()
    final = run_eval()
    checkpoint(rng_state())
    trainable, total_params = (sum(p.numel() for p in model.parameters() if p.requires_grad),
                               sum(p.numel() for p in model.parameters()))
    last = history["train"][-1]["loss"] if history["train"] else float("nan")
    return {"trainable_params": trainable, "total_params": total_params, **final, "train_loss": last,
            "steps": step, "train_seconds": train_seconds, "tokens_per_second": tokens / max(train_seconds, 1e-9),
            "peak_memory_mb": peak_memory_mb(device), "device": str(device), "history": history}


def _progress(cfg: TrainConfig, total: int, start: int):
    if not cfg.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)
