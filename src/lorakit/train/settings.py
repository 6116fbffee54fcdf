"""The settings of a ``lorakit train`` job: one typed object, its names, the names other tools use, checks.

:class:`JobSettings` holds every setting of a job (frozen: a job resolves it step by step with
``dataclasses.replace``, so what was given and what was derived stay apart). Fields that are also
:class:`~lorakit.train.config.TrainConfig` or :class:`~lorakit.config.LoraConfig` fields keep their
names, and their defaults come from those classes, so the CLI and the library cannot disagree.

Config files may also use the names of Hugging Face ``TrainingArguments`` / TRL / PEFT
(``learning_rate``, ``num_train_epochs``, ``logging_steps``, ``optim``, ``lr_scheduler_type``,
``eval_strategy``, ``neftune_noise_alpha``, ``completion_only_loss``, ``task_type``, ``lora_r`` ...):
:data:`ALIASES` maps them; :data:`UNSUPPORTED` names the others that lorakit does not honour,
each with the reason, rather than ignoring them.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from lorakit.train.config import TrainConfig

_TRAIN_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
TRAIN_KEYS = ["epochs", "max_steps", "lr", "optim", "adam_beta1", "adam_beta2", "adam_epsilon", "batch_size",
              "grad_accum", "weight_decay", "warmup_ratio", "warmup_steps", "schedule", "schedule_kwargs",
              "loraplus_lr_ratio", "max_grad_norm", "gradient_checkpointing", "gradient_checkpointing_kwargs", "bf16",
              "seed", "eval_every", "eval_batch_size", "log_every", "checkpoint_every", "keep_checkpoints",
              "group_by_length", "device", "progress", "fsdp", "packing", "neftune_noise_alpha"]
LORA_KEYS = ["r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "layers_to_transform",
             "layers_pattern", "modules_to_save", "bias", "use_rslora", "use_dora", "init_lora_weights",
             "target_parameters"]
STRATEGIES = ("no", "steps", "epoch")


def _t(name: str) -> Any:
    """TrainConfig's default for ``name`` (one source of truth)."""
    return field(default=_TRAIN_DEFAULTS[name])


@dataclass(frozen=True)
class JobSettings:
    """Every setting of a ``lorakit train`` job (see ``lorakit train --help`` for each one's meaning).

    Settings a job resolves itself — ``task`` (from the data), ``labels`` (the label set found),
    ``layout`` (which data layout the file has), ``dtype`` / ``bf16`` (a GPU's precision), ``out``
    (the run directory) — are filled in with ``dataclasses.replace`` by :func:`lorakit.train.job.run_job`
    and written to ``run_config.json``, which ``--resume``, ``predict``, ``generate`` and ``merge`` read.
    """

    # what to train and on what
    method: str = "lora"
    model: str = "minilm"
    dtype: str | None = None
    attn_implementation: str | None = None
    quantize: str | None = None
    data: str = "vader"
    eval_data: str | None = None
    eval_split: float = 0.1
    task: str | None = None
    labels: list[str] | None = None
    max_length: int | None = None
    text_column: str | None = None
    label_column: str | None = None
    prompt_column: str | None = None
    completion_column: str | None = None
    messages_column: str | None = None
    completion_only_loss: bool | None = None  # TRL's switch; None/True: loss on the completion only
    assistant_only_loss: bool | None = None  # TRL's switch; None/True: loss on the assistant turns only
    # the adapter (LoraConfig's fields)
    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | None = None
    layers_pattern: str | None = None
    modules_to_save: list[str] | None = None
    bias: str = "none"
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: bool | str = True
    init: str | None = None  # --init: a data-aware or weight-reading init, calibrated on the training set
    init_samples: int | None = None  # examples for CorDA's / LoRA-GA's calibration (None: 256)
    target_parameters: list[str] | str | None = None  # nn.Parameters (MoE expert tensors); given alone: only those
    # the training loop (TrainConfig's fields and defaults)
    epochs: float = _t("epochs")
    max_steps: int | None = _t("max_steps")
    lr: float = _t("lr")
    optim: str = _t("optim")
    adam_beta1: float = _t("adam_beta1")
    adam_beta2: float = _t("adam_beta2")
    adam_epsilon: float = _t("adam_epsilon")
    batch_size: int = _t("batch_size")
    grad_accum: int = _t("grad_accum")
    weight_decay: float = _t("weight_decay")
    warmup_ratio: float = _t("warmup_ratio")
    warmup_steps: int = _t("warmup_steps")
    schedule: str = _t("schedule")
    schedule_kwargs: dict[str, Any] | None = _t("schedule_kwargs")
    loraplus_lr_ratio: float | None = _t("loraplus_lr_ratio")
    max_grad_norm: float | None = _t("max_grad_norm")
    gradient_checkpointing: bool = _t("gradient_checkpointing")
    gradient_checkpointing_kwargs: dict[str, Any] | None = _t("gradient_checkpointing_kwargs")
    bf16: bool = _t("bf16")
    seed: int = _t("seed")
    eval_every: int = _t("eval_every")
    eval_strategy: str | None = None  # TrainingArguments': no / steps / epoch (None: lorakit's, every epoch)
    eval_batch_size: int = _t("eval_batch_size")
    log_every: int = _t("log_every")
    checkpoint_every: int = _t("checkpoint_every")
    save_strategy: str | None = None  # TrainingArguments': no / steps / epoch (None: checkpoint_every)
    keep_checkpoints: int = _t("keep_checkpoints")
    group_by_length: bool = _t("group_by_length")
    device: str = _t("device")
    progress: bool | None = None  # None: a bar on a terminal, plain lines in a log
    fsdp: bool = _t("fsdp")
    packing: bool = _t("packing")
    neftune_noise_alpha: float | None = _t("neftune_noise_alpha")
    # the process and its outputs
    threads: int | None = None
    report_to: str | list[str] = "none"
    out: str | None = None
    overwrite: bool = False
    # resolved by the job, not given
    layout: str | None = None

    @classmethod
    def from_settings(cls, settings: dict[str, Any], source: str = "settings") -> JobSettings:
        """From user settings (lorakit's names or their aliases; missing ones take the default).

        Raises:
            ValueError: see :func:`normalize`.
        """
        return cls(**normalize(settings, source))

    @classmethod
    def from_run_config(cls, saved: dict[str, Any]) -> JobSettings:
        """From a ``run_config.json`` (every field, resolved ones included; keys of other lorakit versions ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        """Every field, as written to ``run_config.json``."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def train_config(self, progress: bool) -> TrainConfig:
        """The loop's :class:`TrainConfig` (``progress``: the resolved bar switch)."""
        return TrainConfig(**{**{k: getattr(self, k) for k in TRAIN_KEYS}, "progress": progress})


RESOLVED = ("layout",)  # fields a job fills in that are never given
# every setting a user may give, and its default
DEFAULTS: dict[str, Any] = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
                            for f in dataclasses.fields(JobSettings) if f.name not in RESOLVED}

# names from transformers' TrainingArguments, TRL's SFTConfig and PEFT's LoraConfig -> ours
ALIASES: dict[str, str] = {
    "learning_rate": "lr", "num_train_epochs": "epochs", "num_epochs": "epochs", "max_epochs": "epochs",
    "per_device_train_batch_size": "batch_size", "train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum", "per_device_eval_batch_size": "eval_batch_size",
    "lr_scheduler_type": "schedule", "lr_scheduler_kwargs": "schedule_kwargs", "eval_steps": "eval_every",
    "evaluation_strategy": "eval_strategy", "save_steps": "checkpoint_every", "save_total_limit": "keep_checkpoints",
    "logging_steps": "log_every", "output_dir": "out", "overwrite_output_dir": "overwrite",
    "model_name_or_path": "model", "max_seq_length": "max_length", "max_seq_len": "max_length", "lora_r": "r",
    "rank": "r", "lora_target_modules": "target_modules", "dataset": "data", "train_file": "data",
    "dataset_path": "data", "validation_file": "eval_data", "eval_file": "eval_data",
    "dataset_text_field": "text_column", "torch_dtype": "dtype", "padding_free": "packing",
}
# the same, as command-line flags (--learning-rate ...)
FLAG_ALIASES: dict[str, list[str]] = {}
for _alias, _name in ALIASES.items():
    FLAG_ALIASES.setdefault(_name, []).append("--" + _alias.replace("_", "-"))
# PEFT's task_type -> lorakit's --task
TASK_TYPES = {"CAUSAL_LM": "causal-lm", "SEQ_CLS": "seq-cls"}
# names of TrainingArguments / TRL / PEFT that lorakit does not honour, and why (never silently ignored)
UNSUPPORTED: dict[str, str] = {
    **dict.fromkeys(("fp16", "fp16_opt_level", "half_precision_backend"),
                    "fp16 autocast needs a loss scaler, which lorakit's loop has not; use bf16 (--bf16), or "
                    "--dtype float16 for the frozen base"),
    "tf32": "set torch.backends.cuda.matmul.allow_tf32 in your own script; lorakit train leaves it as torch has it",
    **dict.fromkeys(("deepspeed", "fsdp_config", "accelerator_config"),
                    "lorakit distributes with torchrun: DDP, or FSDP2 with fsdp = true"),
    **dict.fromkeys(("local_rank", "ddp_backend", "ddp_find_unused_parameters", "ddp_timeout"),
                    "torchrun sets the ranks and lorakit picks the backend (NCCL for CUDA, gloo on the CPU)"),
    **dict.fromkeys(("push_to_hub", "hub_model_id", "hub_token", "hub_strategy", "hub_private_repo"),
                    "lorakit does not upload; push OUT/adapter/ with `hf upload`"),
    **dict.fromkeys(("load_best_model_at_end", "metric_for_best_model", "greater_is_better"),
                    "lorakit keeps the final adapter and does not track a best checkpoint; every evaluation is in "
                    "history.json and the checkpoints in OUT/checkpoints/"),
    "save_only_model": "a lorakit checkpoint always holds what --resume needs (trainable tensors, optimizer, RNG)",
    "save_safetensors": "lorakit always writes safetensors",
    "logging_dir": "--report-to tensorboard writes OUT/tensorboard/",
    "logging_first_step": "lorakit records the loss of every log_every-th step and of the last one",
    "run_name": "a run is named after its --out directory",
    **dict.fromkeys(("dataloader_num_workers", "dataloader_pin_memory", "dataloader_drop_last",
                     "dataloader_prefetch_factor", "dataset_num_proc"),
                    "lorakit tokenizes the data once, before training, and collates batches in the training "
                    "process: there is no DataLoader to configure"),
    "remove_unused_columns": "lorakit reads only the columns its data layout names",
    "label_names": "Trainer's names of the label tensors; lorakit's label set is 'labels'",
    **dict.fromkeys(("do_train", "do_eval", "do_predict"),
                    "lorakit train always trains, and evaluates as eval_strategy / --eval-split say"),
    **dict.fromkeys(("resume_from_checkpoint", "resume"), "give --resume OUT on the command line"),
    "config": "a settings file cannot name another one; give --config FILE on the command line",
    "data_seed": "lorakit's data order follows 'seed'",
    "torch_compile": "lorakit train's loop does not compile the model",
    **dict.fromkeys(("use_cpu", "no_cuda"), "use device = \"cpu\""),
    "auto_find_batch_size": "lorakit does not retry with smaller batches; set batch_size",
    "label_smoothing_factor": "lorakit's losses have no label smoothing",
    "optim_args": "lorakit's optimizers take lr, weight_decay and the adam_* settings only",
    "optim_target_modules": "used by GaLore/APOLLO, which lorakit does not build",
    "use_liger_kernel": "lorakit computes the loss itself, in chunks (no logits for the whole vocabulary)",
    **dict.fromkeys(("model_init_kwargs",), "use dtype and attn_implementation"),
    **dict.fromkeys(("chat_template_path", "eos_token", "pad_token"),
                    "lorakit uses the tokenizer's own chat template and special tokens"),
    "packing_strategy": "lorakit packs each batch's examples (packing = true), it does not re-bin the dataset",
    "dataset_kwargs": "lorakit reads files itself; map columns with text_column, prompt_column, ...",
    **dict.fromkeys(("rank_pattern", "alpha_pattern", "layers_to_transform_pattern"),
                    "give a LoraConfig through the library (lorakit.inject) for per-module ranks"),
    "peft_type": "lorakit train trains LoRA (method = \"lora\"); see --method for the baselines",
    "fan_in_fan_out": "lorakit detects GPT-2's Conv1D layout itself",
}


def normalize(settings: dict[str, Any], source: str) -> dict[str, Any]:
    """Settings with ``-`` read as ``_``, alias names mapped to lorakit's, PEFT's ``task_type`` read as ``task``.

    Raises:
        ValueError: a name lorakit does not honour (with the reason), an unknown name (with close
            valid ones, if any), a name given twice through an alias, or a ``task_type`` lorakit
            does not train.
    """
    out: dict[str, Any] = {}
    for key, value in settings.items():
        k = str(key).replace("-", "_")
        if k == "task_type":
            k, value = "task", _task_from_type(value, source)
        if k == "logging_strategy":  # lorakit logs by steps (log_every); "steps" says just that
            if value != "steps":
                raise ValueError(f"{source}: logging_strategy {value!r} is not supported: lorakit logs every "
                                 "log_every (logging_steps) steps; use logging_strategy = \"steps\" or leave it out")
            continue
        name = ALIASES.get(k, k)
        if name in UNSUPPORTED:
            raise ValueError(f"{source}: setting {key!r} is not supported by lorakit train: {UNSUPPORTED[name]}")
        if name not in DEFAULTS:
            valid = [*DEFAULTS, *ALIASES]
            close = difflib.get_close_matches(k, valid, n=3, cutoff=0.75)
            hint = f"; did you mean {' or '.join(repr(ALIASES.get(c, c)) for c in close)}?" if close else ";"
            raise ValueError(f"{source}: unknown setting {key!r}{hint} Valid settings: {sorted(DEFAULTS)} "
                             f"(and the TrainingArguments/TRL/PEFT names {sorted(ALIASES)})")
        if name in out:
            raise ValueError(f"{source}: {name!r} is given twice (as {key!r} and under another name)")
        out[name] = value
    for key in ("eval_strategy", "save_strategy"):
        if out.get(key) is not None and out[key] not in STRATEGIES:
            raise ValueError(f"{source}: {key} must be one of {list(STRATEGIES)}, got {out[key]!r}")
    return out


def _task_from_type(value: Any, source: str) -> str:
    if value not in TASK_TYPES:
        raise ValueError(f"{source}: task_type {value!r} is not one lorakit train trains; use "
                         f"{' or '.join(repr(t) for t in TASK_TYPES)} (task = causal-lm / seq-cls)")
    return TASK_TYPES[value]


_REGEX_CHARS = re.compile(r"[\\^$*+?()\[\]{}|]")


def parse_modules(value: str | list[str]) -> list[str] | str:
    """``--target-modules``: ``"q_proj,v_proj"`` or one dotted name (``"self_attn.q_proj"``) -> a list of
    names / suffixes; a value with regex characters (``".*\\.(q|v)_proj"``) or ``"all-linear"`` stays a string."""
    if isinstance(value, list):
        return value
    if value == "all-linear" or (_REGEX_CHARS.search(value) and "," not in value):
        return value
    return [x.strip() for x in value.split(",") if x.strip()]


def parse_parameters(value: str | list[str]) -> list[str]:
    """``--target-parameters``: ``"mlp.experts.gate_up_proj,mlp.experts.down_proj"`` -> a list of names."""
    if isinstance(value, list):
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
