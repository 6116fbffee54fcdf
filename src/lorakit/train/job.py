"""A whole ``lorakit train`` job from its settings (a typed :class:`~lorakit.train.settings.JobSettings`):
data, model, adapter, fit, outputs.

Outputs in the run directory:

* ``adapter/`` — PEFT-compatible adapter (``adapter_config.json`` + ``adapter_model.safetensors``);
* ``metrics.json`` — method, parameter counts, eval metrics, time, throughput, peak memory;
* ``curves.png`` — training loss (raw and smoothed) and eval curves; ``history.json`` — the raw numbers;
* ``run_config.json`` — the resolved settings (what ``--resume``, ``predict``, ``generate`` and ``merge`` read);
* ``checkpoints/step-*/`` — resumable training state; ``tensorboard/`` with ``--report-to tensorboard``.

Everything that can be checked (settings, device, data, model, optional packages) is checked
before the run directory is created, so a refused job leaves nothing behind. The settings are
resolved in visible steps — task and layout from the data, the label set, a GPU's precision, the
run directory — each a ``dataclasses.replace`` of the frozen settings, never an edit in place.
Before the first step the job says what it will do: the adapted modules and why, the trainable
parameters, the train/eval examples, the effective batch and the number of steps.

Under ``torchrun`` every rank runs the job and only rank 0 writes (see :mod:`lorakit.train.distributed`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from typing import Any

import torch

from lorakit.config import LoraConfig
from lorakit.data import TokenDataset
from lorakit.extras import available, install_hint, require
from lorakit.inject import find_targets
from lorakit.io.distributed import full_tensors, is_distributed, is_main_process, on_main_process, world_size
from lorakit.models import BUILTIN, ORIGIN, builtin_shadow_note, head_modules, load_tokenizer
from lorakit.train.checkpoint import default_modes, list_checkpoints
from lorakit.train.config import TrainConfig
from lorakit.train.inits import inject_with_init, save_run_adapter, with_init
from lorakit.train.job_data import BUILTIN_DATA, LOSS_SWITCHES, build_data
from lorakit.train.logging import (
    EvalPrinter,
    StepPrinter,
    close_all,
    make_reporters,
    notify_eval,
    parse_report_to,
)
from lorakit.train.loop import fit, plan_steps, resolve_device
from lorakit.train.optim import BNB as BNB_OPTIMIZERS
from lorakit.train.run_base import BaseSpec, load_base
from lorakit.train.settings import (
    DEFAULTS,
    LORA_KEYS,
    TRAIN_KEYS,
    JobSettings,
    check_device,
    gpu_precision,
    normalize,
    parse_modules,
    parse_parameters,
)

# every Linear but the output head: "LoRA without regret" (Schulman et al., Thinking Machines 2025: attention-only
# LoRA underperforms, the MLPs matter most) and, on the embedded task, +0.95 points of validation accuracy over
# query/value (2 seeds) and 95.7% vs 95.5% test over 3 seeds (benchmarks/results/defaults_embedded.json)
DEFAULT_TARGET_MODULES = "all-linear"
RUN_CONFIG = "run_config.json"
# what a run writes into its directory: removed by --overwrite, so that nothing of an older run survives
OUTPUTS = ("adapter", "checkpoints", "tensorboard", "wandb", "metrics.json", "history.json", "curves.png",
           "trainable.safetensors", RUN_CONFIG)
RESUME_OVERRIDES = ("device", "threads", "progress", "report_to")

__all__ = ["DEFAULTS", "TRAIN_KEYS", "LORA_KEYS", "LOSS_SWITCHES", "JobSettings", "RunInterrupted", "run_job",
           "check_keys", "build_data"]


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a job: ``out`` is the run directory (``None`` before it existed) and
    ``checkpoint`` the checkpoint that ``--resume`` would continue from (``None``: there is none)."""

    def __init__(self, out: str | None, checkpoint: str | None) -> None:
        super().__init__(out)
        self.out, self.checkpoint = out, checkpoint


def check_keys(settings: dict[str, Any], source: str) -> None:
    """Raises ValueError for an unknown setting (see :func:`lorakit.train.settings.normalize`)."""
    normalize(settings, source)


def _say(msg: str) -> None:
    if is_main_process():  # under torchrun: once, from rank 0
        print(f"lorakit train: {msg}", file=sys.stderr, flush=True)


def check_run_dir(out: str | None, overwrite: bool) -> None:
    """Raises FileExistsError when ``out`` is an existing non-empty directory (or a file) and not ``overwrite``."""
    if out is not None and os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)) and not overwrite:
        raise FileExistsError(f"output directory {out!r} already exists and is not empty; choose another --out, "
                              f"pass --overwrite, or continue it with --resume {out}")


def new_run_dir(out: str | None, overwrite: bool) -> str:
    """``out`` or ``runs/<timestamp>``, created; with ``overwrite`` an older run's outputs (checkpoints
    included, so that a later ``--resume`` cannot pick them up) are removed first.

    Raises:
        FileExistsError: ``out`` exists and is not empty, without ``overwrite``.
    """
    if out is None:
        base = os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
        out, n = base, 1
        while os.path.exists(out):
            n += 1
            out = f"{base}-{n}"
    check_run_dir(out, overwrite)
    if os.path.isdir(out):
        for name in OUTPUTS:
            path = os.path.join(out, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
    os.makedirs(out, exist_ok=True)
    return out


def lora_config(job: JobSettings, model) -> tuple[LoraConfig, str]:
    """The adapter's config, and why its targets are what they are (for the start-of-run summary)."""
    kw = {k: getattr(job, k) for k in LORA_KEYS}
    for key in ("target_modules", "exclude_modules"):
        if isinstance(kw[key], str):
            kw[key] = parse_modules(kw[key])
    if isinstance(kw["target_parameters"], str):
        kw["target_parameters"] = parse_parameters(kw["target_parameters"])
    why = "as given (--target-modules)"
    if kw["target_modules"] is None and kw["target_parameters"]:
        why = "none: --target-parameters given alone adapts only those parameters"
    elif kw["target_modules"] is None:  # "LoRA without regret" (Schulman et al. 2025) + benchmarks/bench_defaults.py
        kw["target_modules"] = DEFAULT_TARGET_MODULES
        why = ("the default, all-linear ('LoRA without regret', Schulman et al. 2025; measured on the embedded task: "
               "benchmarks/results/defaults_embedded.json); --target-modules to choose")
    if kw["modules_to_save"] is None and job.task == "seq-cls":
        kw["modules_to_save"] = head_modules(model) or None
    return LoraConfig(**kw), why


def check_rank(model, cfg: LoraConfig) -> None:
    """ΔW = B·A has rank at most min(out, in): a larger r only adds parameters.

    Raises:
        ValueError: ``r`` (or a ``rank_pattern`` rank) above a targeted module's smallest dimension.
    """
    for name in find_targets(model, cfg):
        module = model.get_submodule(name)
        w = getattr(module, "weight", None)
        dims = (getattr(module, "out_features", None), getattr(module, "in_features", None))
        if all(isinstance(d, int) for d in dims):
            shape = dims  # a linear layer, packed (4-bit) weights included
        elif isinstance(w, torch.Tensor) and w.dim() >= 2:
            shape = (w.shape[0], w[0].numel())
        else:
            continue
        cap, r = min(shape), cfg.rank_for(name)
        if r > cap:
            raise ValueError(f"--r {r} is larger than {name} allows: it maps {shape[1]} to {shape[0]} features, so "
                             f"ΔW = B·A has rank at most {cap} and a larger r only adds parameters; "
                             f"use --r {cap} or less")


def _resolve_settings(settings: dict[str, Any] | JobSettings, resume: str | None) -> JobSettings:
    """The job's settings: given ones over the defaults (paths made absolute, so that ``--resume``
    and ``predict`` work from anywhere), or with ``resume`` the run's own, with only
    :data:`RESUME_OVERRIDES` given anew."""
    if resume is None:
        job = settings if isinstance(settings, JobSettings) else JobSettings.from_settings(settings)
        changes = {}
        for key in ("model", "data", "eval_data"):
            value = getattr(job, key)
            if (key == "model" and value in BUILTIN) or (key == "data" and value == BUILTIN_DATA):
                note = builtin_shadow_note(value) if key == "model" else (
                    f"{value!r} is lorakit's built-in data and is used as such; the path ./{value} here is not "
                    f"(write ./{value} to use it)" if os.path.exists(value) else None)
                if note:
                    _say(note)
            elif value and os.path.exists(value):
                changes[key] = os.path.abspath(value)
        return dataclasses.replace(job, **changes)
    path = os.path.join(resume, RUN_CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--resume {resume!r}: no {RUN_CONFIG} there; give the --out directory of a run")
    with open(path, encoding="utf-8") as f:
        saved = JobSettings.from_run_config(json.load(f))
    given = settings.to_dict() if isinstance(settings, JobSettings) else normalize(settings, "settings")
    # the device, threads, progress display and trackers may change on resume; nothing that shapes the weights
    return dataclasses.replace(saved, out=resume,
                               **{k: given[k] for k in RESUME_OVERRIDES if given.get(k) is not None})


def _apply_strategies(job: JobSettings, per_epoch: int) -> JobSettings:
    """TrainingArguments' ``eval_strategy`` / ``save_strategy`` as lorakit's ``eval_every`` /
    ``checkpoint_every`` (``"no"`` evaluation was already applied to the data).

    Raises:
        ValueError: a strategy that contradicts the step setting given with it.
    """
    changes: dict[str, Any] = {}
    for strategy, every, steps_name in (("eval_strategy", "eval_every", "eval_steps"),
                                        ("save_strategy", "checkpoint_every", "save_steps")):
        kind, n = getattr(job, strategy), getattr(job, every)
        if kind == "steps" and not n:
            raise ValueError(f"{strategy} 'steps' needs {steps_name} ({every}) > 0")
        if kind in ("no", "epoch") and n:
            raise ValueError(f"{strategy} {kind!r} contradicts {steps_name} ({every}) = {n}; drop one")
    if job.save_strategy == "epoch":
        changes["checkpoint_every"] = per_epoch
    return dataclasses.replace(job, **changes)


class _Every:
    """A callback called only every ``n``-th step (and at the last): ``log_every`` for the trackers."""

    def __init__(self, cb, n: int, total: int) -> None:
        self.cb, self.n, self.total = cb, n, total

    def __call__(self, step: int, logs: dict[str, float]) -> None:
        if step % self.n == 0 or step == self.total:
            self.cb(step, logs)

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        notify_eval([self.cb], step, metrics)

    def close(self) -> None:
        close_all([self.cb])


def _summary(job: JobSettings, model, train: TokenDataset, ev: TokenDataset | None, targets: str,
             tcfg: TrainConfig, per_epoch: int, total: int) -> list[str]:
    """What the run will do, said before its first step: targets and why, parameters, data, batch, steps."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    if ev is None:
        held = "no evaluation" + (" (eval_strategy 'no')" if job.eval_strategy == "no" else " (--eval-split 0)")
    elif job.eval_data:
        held = f"{len(ev)} eval examples from {job.eval_data}"
    elif job.data == BUILTIN_DATA:
        held = f"{len(ev)} eval examples (the built-in held-out test words)"
    else:
        held = f"{len(ev)} eval examples ({job.eval_split:.0%} of --data held out, --eval-split)"
    ranks = world_size()
    eff = tcfg.batch_size * ranks * tcfg.grad_accum
    length = f"{tcfg.max_steps} (--max-steps)" if tcfg.max_steps is not None else \
        f"{total} = {tcfg.epochs:g} epoch(s) × {per_epoch} per epoch"
    return [targets,
            f"trainable parameters: {trainable:,} of {n_all:,} ({100 * trainable / max(1, n_all):.3f}%)",
            f"data: {len(train)} training examples, {held}",
            f"effective batch {eff} = {tcfg.batch_size} per step × {tcfg.grad_accum} accumulation"
            + (f" × {ranks} ranks" if ranks > 1 else "") + f"; optimizer steps: {length}"]


def run_job(settings: dict[str, Any] | JobSettings, resume: str | None = None, callbacks=()) -> dict[str, Any]:
    """Run a training job; ``settings`` holds keys of :data:`DEFAULTS` or their aliases (missing ones
    take the default), or is a :class:`~lorakit.train.settings.JobSettings`.

    With ``resume`` (a run directory), its ``run_config.json`` supplies the settings (only
    ``device``, ``threads``, ``progress`` and ``report_to`` may be given anew) and training continues
    from its newest checkpoint.

    Returns:
        The metrics written to ``metrics.json`` plus ``out`` (the run directory).

    Raises:
        FileNotFoundError / FileExistsError / ValueError: bad data, model, settings or output directory.
        lorakit.extras.MissingDependency: a package the job needs is not installed.
        RunInterrupted: Ctrl-C; says whether a checkpoint exists to resume from.
    """
    out = None
    try:
        job = _resolve_settings(settings, resume)
        check_device(job.device)
        trackers = parse_report_to(job.report_to)
        require("transformers", "lorakit train")
        for name in trackers:
            require(name, f"--report-to {name}")
        plot = available("matplotlib")
        if not plot:
            _say(f"matplotlib is not installed, so curves.png will not be written ({install_hint('matplotlib')})")
        progress = job.progress if job.progress is not None else sys.stderr.isatty()
        if progress and not available("tqdm"):
            progress = False
            _say(f"tqdm is not installed: no progress bar ({install_hint('tqdm')})")
        if job.quantize and job.method != "lora":
            raise ValueError(f"--quantize {job.quantize} trains LoRA factors on a frozen quantized base; "
                             f"--method {job.method} would train the base weights themselves. Use --method lora")
        job.train_config(bool(progress))  # every loop setting checked before anything is loaded
        if job.optim in BNB_OPTIMIZERS:
            require("bitsandbytes", f"optim {job.optim}")
        if resume is None:
            check_run_dir(job.out, job.overwrite)
        if job.threads:
            torch.set_num_threads(int(job.threads))
        tok = load_tokenizer(job.model)
        job, train, ev = build_data(job, tok)
        for note in train.notes + (ev.notes if ev is not None and ev.source != train.source else []):
            _say(note)
        job = dataclasses.replace(job, labels=train.label_names or None)
        if not job.quantize:  # a bf16 base on a GPU
            dtype, bf16 = gpu_precision(job.device, job.dtype, job.bf16)
            job = dataclasses.replace(job, dtype=dtype, bf16=bf16)
        model, tok = load_base(BaseSpec.of_job(job), device=str(resolve_device(job.device)))
        method = None
        initial = None  # --init corda / lora-ga: the factors the saved adapter subtracts (lorakit.train.inits)
        if job.method == "lora":
            cfg, why = lora_config(job, model)
            cfg = with_init(cfg, job.init, job.quantize)
            if job.target_modules is None and cfg.target_modules == DEFAULT_TARGET_MODULES:
                # recorded in run_config.json, so that --resume keeps this run's targets if the default changes
                job = dataclasses.replace(job, target_modules=DEFAULT_TARGET_MODULES)
            check_rank(model, cfg)
            if job.init in ("corda", "lora-ga") and job.fsdp:
                raise ValueError(f"--init {job.init} with --fsdp is not supported; use DDP (drop --fsdp)")
            names = find_targets(model, cfg)  # the dry run: what inject adapts
            initial = inject_with_init(model, cfg, train, batch_size=job.batch_size, seed=job.seed,
                                       samples=job.init_samples, progress=bool(progress) and is_main_process())
            shown = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in names}))
            targets = (f"LoRA r={cfg.r}, alpha {cfg.lora_alpha:g} on {len(names)} modules ({shown}): {why}"
                       + (f"; init {job.init}" if job.init else "")
                       + (f"; trained in full: {', '.join(cfg.modules_to_save)}" if cfg.modules_to_save else ""))
        else:  # a baseline of lorakit.methods (full, bitfit, adapter, prefix, head): it decides what trains
            from lorakit.methods import get_method

            method = get_method(job.method, head=head_modules(model) if job.task == "seq-cls" else [])
            method.apply(model)
            targets = f"method {job.method} (not LoRA): it chooses what trains"
        # under torchrun an optimizer step takes batch_size examples on every rank
        per_epoch = plan_steps(len(train), dataclasses.replace(job.train_config(False),
                                                               batch_size=job.batch_size * world_size()))[1]
        job = _apply_strategies(job, per_epoch)
        tcfg = job.train_config(bool(progress))
        total = plan_steps(len(train), dataclasses.replace(tcfg, batch_size=tcfg.batch_size * world_size()))[2]
        if resume is None:
            out = on_main_process(lambda: new_run_dir(job.out, job.overwrite), sync=True)  # rank 0's
            job = dataclasses.replace(job, out=out)

            def write_run_config() -> None:
                with open(os.path.join(out, RUN_CONFIG), "w", encoding="utf-8") as f:
                    f.write(job.to_json())

            on_main_process(write_run_config, sync=False)
        else:
            out = resume
        for line in _summary(job, model, train, ev, targets, tcfg, per_epoch, total):
            _say(line)
        _say(f"run directory {out}; {total} optimizer steps")
        every = job.log_every if job.log_every > 1 else None
        watchers = [EvalPrinter(total)] + ([StepPrinter(total, every)] if job.progress is None and not progress else [])
        reporters = make_reporters(trackers, out, job.to_dict()) if is_main_process() else []  # files: rank 0 only
        reporters = [_Every(r, job.log_every, total) for r in reporters] if job.log_every > 1 else reporters
        try:
            metrics = fit(model, train, ev, tcfg, out_dir=out, resume=resume,
                          callbacks=[*watchers, *reporters, *callbacks])
        finally:
            close_all(reporters)
    except KeyboardInterrupt:
        found = list_checkpoints(out) if out is not None else []
        raise RunInterrupted(out, found[-1] if found else None) from None
    history = metrics.pop("history")
    from lorakit import save_adapter

    if not is_distributed():
        model.to("cpu")
    if method is None:
        # record where the base model comes from, portably (not a path inside the installed package)
        model.config._name_or_path = ORIGIN.get(job.model, job.model)
        if initial is None:
            save_adapter(model, os.path.join(out, "adapter"))  # torchrun: on every rank (FSDP2 gathers); rank 0 writes
        else:  # CorDA / LoRA-GA moved W: plain LoRA for the original base
            on_main_process(lambda: save_run_adapter(model, os.path.join(out, "adapter"), initial), sync=True)
    else:  # what the method must store beside the base model
        from safetensors.torch import save_file

        stored = full_tensors(method.stored_state(model))  # torchrun + FSDP2: gathered (collective)

        def write_trainable() -> None:
            save_file(stored, os.path.join(out, "trainable.safetensors"))
            default_modes(os.path.join(out, "trainable.safetensors"))

        on_main_process(write_trainable, sync=True)
    if not is_main_process():
        return {"method": job.method, **metrics, "out": out}
    metrics = {"method": job.method, "model": job.model, "data": job.data, "task": job.task,
               "threads": torch.get_num_threads(), **metrics}
    with open(os.path.join(out, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=2)
    with open(os.path.join(out, "history.json"), "w", encoding="utf-8") as f:
        json.dump(history, f)
    if plot:
        from lorakit.train.plots import plot_history

        plot_history(history, os.path.join(out, "curves.png"), title=f"lorakit train: {job.model} on {job.data}")
    return {**metrics, "out": out}
