"""A whole ``lorakit train`` job from a flat settings dict: data, model, adapter, fit, outputs.

Outputs in the run directory:

* ``adapter/`` — PEFT-compatible adapter (``adapter_config.json`` + ``adapter_model.safetensors``);
* ``metrics.json`` — method, parameter counts, eval metrics, time, throughput, peak memory;
* ``curves.png`` — training loss and eval curves; ``history.json`` — the numbers behind them;
* ``run_config.json`` — the resolved settings (what ``--resume``, ``predict`` and ``generate`` read);
* ``checkpoints/step-*/`` — resumable training state.

Under ``torchrun`` every rank runs the job and only rank 0 writes (see :mod:`lorakit.train.distributed`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import torch

from lorakit.config import LoraConfig
from lorakit.data import TokenDataset, classification_dataset, load_dataset, read_records, vader_split
from lorakit.data.builtin import LABELS
from lorakit.inject import inject
from lorakit.io.distributed import full_tensors, is_distributed, is_main_process, on_main_process
from lorakit.models import default_targets, head_modules, load_model, load_tokenizer
from lorakit.train.config import TrainConfig
from lorakit.train.loop import fit
from lorakit.train.plots import plot_history

BUILTIN_DATA = "vader"
RUN_CONFIG = "run_config.json"

# every setting of a job and its default; TrainConfig and LoraConfig fields keep their own names
DEFAULTS: dict[str, Any] = {
    "method": "lora", "model": "minilm", "data": BUILTIN_DATA, "eval_data": None, "eval_split": 0.1, "task": None,
    "labels": None, "max_length": None,
    "r": 8, "lora_alpha": 16.0, "lora_dropout": 0.0, "target_modules": None, "exclude_modules": None,
    "layers_to_transform": None, "layers_pattern": None, "modules_to_save": None, "bias": "none",
    "use_rslora": False, "use_dora": False, "init_lora_weights": True,
    "epochs": 5.0, "max_steps": None, "lr": 1e-3, "batch_size": 16, "grad_accum": 1, "weight_decay": 0.0,
    "warmup_ratio": 0.06, "warmup_steps": 0, "schedule": "cosine", "loraplus_lr_ratio": None, "max_grad_norm": 1.0,
    "gradient_checkpointing": False, "bf16": False, "seed": 0, "eval_every": 0, "eval_batch_size": 64,
    "checkpoint_every": 0, "keep_checkpoints": 2, "group_by_length": True, "device": "auto", "progress": True,
    "threads": None, "out": None, "overwrite": False, "fsdp": False,
}
TRAIN_KEYS = [k for k in TrainConfig.__dataclass_fields__ if k in DEFAULTS]
LORA_KEYS = ["r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "layers_to_transform",
             "layers_pattern", "modules_to_save", "bias", "use_rslora", "use_dora", "init_lora_weights"]


def check_keys(settings: dict[str, Any], source: str) -> None:
    unknown = sorted(set(settings) - set(DEFAULTS) - {"resume", "config"})
    if unknown:
        raise ValueError(f"{source}: unknown setting(s) {unknown}; valid: {sorted(DEFAULTS)}")


def new_run_dir(out: str | None, overwrite: bool) -> str:
    """``out`` (refusing a non-empty existing directory unless ``overwrite``) or ``runs/<timestamp>``.

    Raises:
        FileExistsError: ``out`` exists and is not empty.
    """
    if out is None:
        base = os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
        out, n = base, 1
        while os.path.exists(out):
            n += 1
            out = f"{base}-{n}"
    elif os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)) and not overwrite:
        raise FileExistsError(f"output directory {out!r} already exists and is not empty; choose another --out, "
                              f"pass --overwrite, or continue it with --resume {out}")
    os.makedirs(out, exist_ok=True)
    return out


def infer_task(s: dict[str, Any]) -> str:
    """``--task`` if given; the built-in data is classification; else from the file's columns."""
    if s["task"]:
        return s["task"]
    if s["data"] == BUILTIN_DATA:
        return "seq-cls"
    first = read_records(s["data"])[0]
    return "seq-cls" if "label" in first and "text" in first else "causal-lm"


def build_data(s: dict[str, Any], tok) -> tuple[TokenDataset, TokenDataset | None]:
    """Train and eval datasets; every data check happens here, before the model is built."""
    task, max_len = s["task"], s["max_length"]
    if s["data"] == BUILTIN_DATA:
        if task != "seq-cls":
            raise ValueError("the built-in VADER data is for --task seq-cls")
        tr, te = vader_split()
        src = "vaderSentiment/vader_lexicon.txt"
        return (classification_dataset(tr, tok, src, label_names=LABELS, max_length=max_len or 16),
                classification_dataset(te, tok, src, label_names=LABELS, max_length=max_len or 16))
    labels = s["labels"]
    train = load_dataset(s["data"], tok, task, label_names=labels, max_length=max_len or 512)
    if s["eval_data"]:
        ev = load_dataset(s["eval_data"], tok, task, label_names=train.label_names or None, max_length=max_len or 512)
        return train, ev
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
    if kw["target_modules"] is None:
        kw["target_modules"] = default_targets(model)
    if kw["modules_to_save"] is None and s["task"] == "seq-cls":
        kw["modules_to_save"] = head_modules(model) or None
    return LoraConfig(**kw)


def run_job(settings: dict[str, Any], resume: str | None = None, callbacks=()) -> dict[str, Any]:
    """Run a training job; ``settings`` holds keys of :data:`DEFAULTS` (missing ones take the default).

    With ``resume`` (a run directory), its ``run_config.json`` supplies the settings and training
    continues from its newest checkpoint.

    Returns:
        The metrics written to ``metrics.json`` plus ``out`` (the run directory).

    Raises:
        FileNotFoundError / FileExistsError / ValueError: bad data, model, settings or output directory.
        KeyboardInterrupt: interrupted; a checkpoint was saved in the run directory.
    """
    check_keys(settings, "settings")
    if resume is not None:
        path = os.path.join(resume, RUN_CONFIG)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--resume {resume!r}: no {RUN_CONFIG} there; give the --out directory of a run")
        with open(path, encoding="utf-8") as f:
            s = {**DEFAULTS, **json.load(f), "progress": settings.get("progress", True)}
        out = resume
    else:
        s = {**DEFAULTS, **settings}
        for key in ("model", "data", "eval_data"):  # absolute, so --resume / predict work from anywhere
            if s[key] and os.path.exists(s[key]):
                s[key] = os.path.abspath(s[key])
        s["task"] = infer_task(s)
    if s["threads"]:
        torch.set_num_threads(int(s["threads"]))
    tok = load_tokenizer(s["model"])
    train, ev = build_data(s, tok)
    s["labels"] = train.label_names or None
    if resume is None:
        out = on_main_process(lambda: new_run_dir(s["out"], s["overwrite"]), sync=True)  # torchrun: rank 0's
        s["out"] = out
    model, tok = load_model(s["model"], s["task"], label_names=s["labels"], seed=s["seed"])
    method = None
    if s["method"] == "lora":
        inject(model, lora_config(s, model))
    else:  # a baseline of lorakit.methods (full, bitfit, adapter, prefix, head): it decides what trains
        from lorakit.methods import get_method

        method = get_method(s["method"], head=head_modules(model) if s["task"] == "seq-cls" else [])
        method.apply(model)
    if resume is None and is_main_process():
        with open(os.path.join(out, RUN_CONFIG), "w", encoding="utf-8") as f:
            json.dump(s, f, indent=2)
    tcfg = TrainConfig(**{k: s[k] for k in TRAIN_KEYS})
    if is_main_process():
        print(f"lorakit train: run directory {out}", file=sys.stderr)
    try:
        metrics = fit(model, train, ev, tcfg, out_dir=out, resume=resume, callbacks=callbacks)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(out) from None
    history = metrics.pop("history")
    from lorakit import save_adapter

    if not is_distributed():
        model.to("cpu")
    if method is None:
        save_adapter(model, os.path.join(out, "adapter"))  # torchrun: on every rank (FSDP2 gathers); rank 0 writes
    else:  # what the method must store beside the base model
        from safetensors.torch import save_file

        stored = full_tensors(method.stored_state(model))  # torchrun + FSDP2: gathered (collective)
        on_main_process(lambda: save_file(stored, os.path.join(out, "trainable.safetensors")), sync=True)
    if not is_main_process():
        return {"method": s["method"], **metrics, "out": out}
    metrics = {"method": s["method"], "model": s["model"], "data": s["data"], "task": s["task"], **metrics}
    with open(os.path.join(out, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=2)
    with open(os.path.join(out, "history.json"), "w", encoding="utf-8") as f:
        json.dump(history, f)
    plot_history(history, os.path.join(out, "curves.png"), title=f"lorakit train: {s['model']} on {s['data']}")
    return {**metrics, "out": out}
