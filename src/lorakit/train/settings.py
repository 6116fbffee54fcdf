"""The settings of a ``lorakit train`` job: names, defaults, the names other tools use for them, checks.

One flat dict; :class:`~lorakit.train.config.TrainConfig` and
:class:`~lorakit.config.LoraConfig` fields keep their own names, and their defaults come from
those classes, so the CLI and the library cannot disagree. Config files may also use the names
of Hugging Face ``TrainingArguments`` / TRL / PEFT (``learning_rate``, ``num_train_epochs``,
``per_device_train_batch_size``, ``lora_r`` ...): :data:`ALIASES` maps them.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from typing import Any

from lorakit.train.config import TrainConfig

_TRAIN_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
TRAIN_KEYS = ["epochs", "max_steps", "lr", "batch_size", "grad_accum", "weight_decay", "warmup_ratio", "warmup_steps",
              "schedule", "loraplus_lr_ratio", "max_grad_norm", "gradient_checkpointing", "bf16", "seed", "eval_every",
              "eval_batch_size", "checkpoint_every", "keep_checkpoints", "group_by_length", "device", "progress",
              "fsdp", "packing"]
LORA_KEYS = ["r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "layers_to_transform",
             "layers_pattern", "modules_to_save", "bias", "use_rslora", "use_dora", "init_lora_weights"]

# every setting of a job and its default
DEFAULTS: dict[str, Any] = {
    "method": "lora", "model": "minilm", "dtype": None, "attn_implementation": None, "data": "vader",
    "eval_data": None, "eval_split": 0.1,
    "task": None, "labels": None, "max_length": None, "text_column": None, "label_column": None,
    "prompt_column": None, "completion_column": None, "messages_column": None,
    "r": 8, "lora_alpha": 16.0, "lora_dropout": 0.0, "target_modules": None, "exclude_modules": None,
    "layers_to_transform": None, "layers_pattern": None, "modules_to_save": None, "bias": "none",
    "use_rslora": False, "use_dora": False, "init_lora_weights": True, "init": None, "init_samples": None,
    **{k: _TRAIN_DEFAULTS[k] for k in TRAIN_KEYS},
    "progress": None,  # None: a bar on a terminal, plain lines in a log
    "threads": None, "report_to": "none", "out": None, "overwrite": False, "quantize": None,
}

# names from transformers' TrainingArguments, TRL's SFTConfig and PEFT's LoraConfig -> ours
ALIASES: dict[str, str] = {
    "learning_rate": "lr", "num_train_epochs": "epochs", "num_epochs": "epochs", "max_epochs": "epochs",
    "per_device_train_batch_size": "batch_size", "train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum", "per_device_eval_batch_size": "eval_batch_size",
    "lr_scheduler_type": "schedule", "eval_steps": "eval_every", "save_steps": "checkpoint_every",
    "save_total_limit": "keep_checkpoints", "output_dir": "out", "model_name_or_path": "model",
    "max_seq_length": "max_length", "max_seq_len": "max_length", "lora_r": "r", "rank": "r",
    "lora_target_modules": "target_modules", "dataset": "data", "train_file": "data", "dataset_path": "data",
    "validation_file": "eval_data", "eval_file": "eval_data", "dataset_text_field": "text_column",
    "torch_dtype": "dtype",
}
# the same, as command-line flags (--learning-rate ...)
FLAG_ALIASES: dict[str, list[str]] = {}
for _alias, _name in ALIASES.items():
    FLAG_ALIASES.setdefault(_name, []).append("--" + _alias.replace("_", "-"))


def normalize(settings: dict[str, Any], source: str) -> dict[str, Any]:
    """Settings with ``-`` read as ``_`` and alias names mapped to lorakit's.

    Raises:
        ValueError: an unknown name (with the closest valid ones), or a name given twice through an alias.
    """
    out: dict[str, Any] = {}
    for key, value in settings.items():
        k = str(key).replace("-", "_")
        name = ALIASES.get(k, k)
        if name not in DEFAULTS and name not in ("resume", "config"):
            close = difflib.get_close_matches(k, [*DEFAULTS, *ALIASES], n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(repr(ALIASES.get(c, c)) for c in close)}?" if close else ""
            raise ValueError(f"{source}: unknown setting {key!r}{hint} Valid settings: {sorted(DEFAULTS)}")
        if name in out:
            raise ValueError(f"{source}: {name!r} is given twice (as {key!r} and under another name)")
        out[name] = value
    return out


_REGEX_CHARS = re.compile(r"[\\^$*+?()\[\]{}|]")


def parse_modules(value: str | list[str]) -> list[str] | str:
    """``--target-modules``: ``"q_proj,v_proj"`` or one dotted name (``"self_attn.q_proj"``) -> a list of
    names / suffixes; a value with regex characters (``".*\\.(q|v)_proj"``) or ``"all-linear"`` stays a string."""
    if isinstance(value, list):
        return value
    if value == "all-linear" or (_REGEX_CHARS.search(value) and "," not in value):
        return value
    return [x.strip() for x in value.split(",") if x.strip()]


def check_device(name: str) -> None:
    """Refuse a device this torch cannot use, before anything is written.

    Raises:
        ValueError: not a device name, or CUDA / MPS asked for where there is none.
    """
    import torch

    if name == "auto":
        return
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"--device {name!r} is not a device name ({e}); use auto, cpu, cuda, cuda:1 or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else "no CUDA device is visible"
            raise ValueError(f"--device {name}: this torch {torch.__version__} cannot use CUDA ({build}); "
                             "use --device cpu (or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available here; use --device cpu (or auto)")
    elif dev.type not in ("cpu", "cuda", "mps", "xpu"):
        raise ValueError(f"--device {name!r}: use auto, cpu, cuda, cuda:N or mps")


def gpu_precision(device: str, dtype: str | None, bf16: bool, *, cuda: bool | None = None,
                  bf16_supported: bool | None = None) -> tuple[str | None, bool]:
    """``(dtype, bf16 autocast)`` for a run: on a CUDA device with bf16 support and no ``--dtype``
    given, the frozen base is loaded in bf16 (half the bytes, no per-forward casts) and autocast is
    off — the adapters stay fp32 masters, their term computed in bf16 (``lorakit.layers.factors``).
    Elsewhere, and whenever ``--dtype`` is given, the settings are kept as they are.

    ``cuda`` / ``bf16_supported`` default to what this torch sees (given explicitly in tests).
    """
    import torch

    if dtype is not None:
        return dtype, bf16
    name = "cuda" if device == "auto" else device
    on_cuda = (torch.cuda.is_available() if cuda is None else cuda) and name.startswith("cuda")
    if on_cuda and (torch.cuda.is_bf16_supported() if bf16_supported is None else bf16_supported):
        return "bfloat16", False
    return dtype, bf16
