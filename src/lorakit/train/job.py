"""A whole ``lorakit train`` job from a flat settings dict: data, model, adapter, fit, outputs.

Outputs in the run directory:

* ``adapter/`` — PEFT-compatible adapter (``adapter_config.json`` + ``adapter_model.safetensors``);
* ``metrics.json`` — method, parameter counts, eval metrics, time, throughput, peak memory;
* ``curves.png`` — training loss (raw and smoothed) and eval curves; ``history.json`` — the raw numbers;
* ``run_config.json`` — the resolved settings (what ``--resume``, ``predict`` and ``generate`` read);
* ``checkpoints/step-*/`` — resumable training state; ``tensorboard/`` with ``--report-to tensorboard``.

Everything that can be checked (settings, device, data, model, optional packages) is checked
before the run directory is created, so a refused job leaves nothing behind.

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
from lorakit.data import Columns, TokenDataset, classification_dataset, detect_layout, load_dataset, vader_split
from lorakit.data.builtin import LABELS
from lorakit.data.files import read_records
from lorakit.data.formats import infer_task
from lorakit.extras import available, install_hint, require
from lorakit.inject import find_targets
from lorakit.io.distributed import full_tensors, is_distributed, is_main_process, on_main_process, world_size
from lorakit.models import ORIGIN, head_modules, load_model, load_tokenizer
from lorakit.train.checkpoint import default_modes, list_checkpoints
from lorakit.train.config import TrainConfig
from lorakit.train.inits import inject_with_init, save_run_adapter, with_init
from lorakit.train.logging import EvalPrinter, StepPrinter, close_all, make_reporters, parse_report_to
from lorakit.train.loop import fit, plan_steps
from lorakit.train.settings import (
    DEFAULTS,
    LORA_KEYS,
    TRAIN_KEYS,
    check_device,
    gpu_precision,
    normalize,
    parse_modules,
)

BUILTIN_DATA = "vader"
# every Linear but the output head: "LoRA without regret" (Schulman et al., Thinking Machines 2025: attention-only
# LoRA underperforms, the MLPs matter most) and, on the embedded task, +0.95 points of validation accuracy over
# query/value (2 seeds) and 95.7% vs 95.5% test over 3 seeds (benchmarks/results/defaults_embedded.json)
DEFAULT_TARGET_MODULES = "all-linear"
RUN_CONFIG = "run_config.json"
# what a run writes into its directory: removed by --overwrite, so that nothing of an older run survives
OUTPUTS = ("adapter", "checkpoints", "tensorboard", "wandb", "metrics.json", "history.json", "curves.png",
           "trainable.safetensors", RUN_CONFIG)
RESUME_OVERRIDES = ("device", "threads", "progress", "report_to")

__all__ = ["DEFAULTS", "TRAIN_KEYS", "LORA_KEYS", "RunInterrupted", "run_job", "check_keys"]


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


def build_data(s: dict[str, Any], tok) -> tuple[TokenDataset, TokenDataset | None]:
    """Train and eval datasets; sets ``s["task"]`` (when not given) and ``s["layout"]``. Every data
    check happens here, before the model is built."""
    max_len = s["max_length"]
    if s["data"] == BUILTIN_DATA:
        s["task"] = s["task"] or "seq-cls"
        if s["task"] != "seq-cls":
            raise ValueError("the built-in VADER data is for --task seq-cls")
        s["layout"] = "classification"
        tr, te = vader_split()
        src = "vaderSentiment/vader_lexicon.txt"
        return (classification_dataset(tr, tok, src, label_names=LABELS, max_length=max_len or 16),
                classification_dataset(te, tok, src, label_names=LABELS, max_length=max_len or 16))
    columns = Columns.from_settings(s)
    records = read_records(s["data"])
    s["task"] = s["task"] or infer_task(records, columns, s["data"])
    s["layout"] = detect_layout(records[0], columns, s["task"])
    kw = {"max_length": max_len or 512, "columns": columns}
    train = load_dataset(s["data"], tok, s["task"], label_names=s["labels"], **kw)
    if s["eval_data"]:
        return train, load_dataset(s["eval_data"], tok, s["task"], label_names=train.label_names or None, **kw)
    if not s["eval_split"]:
        return train, None
    n_eval = max(1, int(round(s["eval_split"] * len(train))))
    if n_eval >= len(train):
        raise ValueError(f"{s['data']}: {len(train)} example(s) are too few to hold out eval_split={s['eval_split']}; "
                         "give --eval-data or --eval-split 0")
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(s["seed"])).tolist()
    return train.subset(perm[n_eval:]), train.subset(perm[:n_eval])


def lora_config(s: dict[str, Any], model) -> LoraConfig:
    kw = {k: s[k] for k in LORA_KEYS}
    for key in ("target_modules", "exclude_modules"):
        if isinstance(kw[key], str):
            kw[key] = parse_modules(kw[key])
    if kw["target_modules"] is None:  # "LoRA without regret" (Schulman et al. 2025) + benchmarks/bench_defaults.py
        # recorded in run_config.json, so that --resume keeps this run's targets if the default changes again
        kw["target_modules"] = s["target_modules"] = DEFAULT_TARGET_MODULES
    if kw["modules_to_save"] is None and s["task"] == "seq-cls":
        kw["modules_to_save"] = head_modules(model) or None
    return LoraConfig(**kw)


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


def _resolve_settings(settings: dict[str, Any], resume: str | None) -> dict[str, Any]:
    if resume is None:
        s = {**DEFAULTS, **settings}
        for key in ("model", "data", "eval_data"):  # absolute, so --resume / predict work from anywhere
            if s[key] and os.path.exists(s[key]):
                s[key] = os.path.abspath(s[key])
        return s
    path = os.path.join(resume, RUN_CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--resume {resume!r}: no {RUN_CONFIG} there; give the --out directory of a run")
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    # the device, threads, progress display and trackers may change on resume; nothing that shapes the weights
    return {**DEFAULTS, **saved, **{k: settings[k] for k in RESUME_OVERRIDES if settings.get(k) is not None},
            "out": resume}


def run_job(settings: dict[str, Any], resume: str | None = None, callbacks=()) -> dict[str, Any]:
    """Run a training job; ``settings`` holds keys of :data:`DEFAULTS` or their aliases (missing ones
    take the default).

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
        s = _resolve_settings(normalize(settings, "settings"), resume)
        check_device(s["device"])
        trackers = parse_report_to(s["report_to"])
        require("transformers", "lorakit train")
        for name in trackers:
            require(name, f"--report-to {name}")
        plot = available("matplotlib")
        if not plot:
            _say(f"matplotlib is not installed, so curves.png will not be written ({install_hint('matplotlib')})")
        progress = s["progress"] if s["progress"] is not None else sys.stderr.isatty()
        if progress and not available("tqdm"):
            progress = False
            _say(f"tqdm is not installed: no progress bar ({install_hint('tqdm')})")
        if resume is None:
            check_run_dir(s["out"], s["overwrite"])
        if s["threads"]:
            torch.set_num_threads(int(s["threads"]))
        tok = load_tokenizer(s["model"])
        train, ev = build_data(s, tok)
        for note in train.notes + (ev.notes if ev is not None and ev.source != train.source else []):
            _say(note)
        s["labels"] = train.label_names or None
        if s["quantize"]:  # QLoRA: a bitsandbytes base, prepared for k-bit training (lorakit.quantize)
            from lorakit.quantize import load_for_job

            model, tok = load_for_job(s)
        else:
            s["dtype"], s["bf16"] = gpu_precision(s["device"], s["dtype"], s["bf16"])  # a bf16 base on a GPU
            model, tok = load_model(s["model"], s["task"], label_names=s["labels"], seed=s["seed"], dtype=s["dtype"],
                                    attn_implementation=s["attn_implementation"])
        method = None
        initial = None  # --init corda / lora-ga: the factors the saved adapter subtracts (lorakit.train.inits)
        if s["method"] == "lora":
            cfg = with_init(lora_config(s, model), s["init"], s["quantize"])
            check_rank(model, cfg)
            if s["init"] in ("corda", "lora-ga") and s["fsdp"]:
                raise ValueError(f"--init {s['init']} with --fsdp is not supported; use DDP (drop --fsdp)")
            initial = inject_with_init(model, cfg, train, batch_size=s["batch_size"], seed=s["seed"],
                                       samples=s["init_samples"], progress=bool(progress) and is_main_process())
        else:  # a baseline of lorakit.methods (full, bitfit, adapter, prefix, head): it decides what trains
            from lorakit.methods import get_method

            method = get_method(s["method"], head=head_modules(model) if s["task"] == "seq-cls" else [])
            method.apply(model)
        tcfg = TrainConfig(**{**{k: s[k] for k in TRAIN_KEYS}, "progress": bool(progress)})
        # under torchrun an optimizer step takes batch_size examples on every rank
        total = plan_steps(len(train), dataclasses.replace(tcfg, batch_size=tcfg.batch_size * world_size()))[2]
        if resume is None:
            out = s["out"] = on_main_process(lambda: new_run_dir(s["out"], s["overwrite"]), sync=True)  # rank 0's

            def write_run_config() -> None:
                with open(os.path.join(out, RUN_CONFIG), "w", encoding="utf-8") as f:
                    json.dump(s, f, indent=2)

            on_main_process(write_run_config, sync=False)
        else:
            out = resume
        _say(f"run directory {out}; {total} optimizer steps")
        watchers = [EvalPrinter(total)] + ([StepPrinter(total)] if s["progress"] is None and not progress else [])
        reporters = make_reporters(trackers, out, s) if is_main_process() else []  # files: rank 0 only
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
        model.config._name_or_path = ORIGIN.get(s["model"], s["model"])
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
        return {"method": s["method"], **metrics, "out": out}
    metrics = {"method": s["method"], "model": s["model"], "data": s["data"], "task": s["task"],
               "threads": torch.get_num_threads(), **metrics}
    with open(os.path.join(out, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=2)
    with open(os.path.join(out, "history.json"), "w", encoding="utf-8") as f:
        json.dump(history, f)
    if plot:
        from lorakit.train.plots import plot_history

        plot_history(history, os.path.join(out, "curves.png"), title=f"lorakit train: {s['model']} on {s['data']}")
    return {**metrics, "out": out}
