"""``lorakit train``: fine-tune with LoRA. With no arguments: the embedded default job
(pretrained all-MiniLM-L6-v2 on VADER word sentiment, LoRA r=8 on every linear layer)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from lorakit.train.optim import OPTIMIZERS
from lorakit.train.schedule import SCHEDULES
from lorakit.train.settings import FLAG_ALIASES, STRATEGIES, parse_modules, parse_parameters

DESCRIPTION = """Fine-tune a model with LoRA and write the adapter, metrics.json, curves.png and checkpoints.

With no arguments: the embedded default job — the pretrained all-MiniLM-L6-v2 encoder learns word
sentiment from the VADER lexicon (4,596 training words, 1,000 held out), LoRA r=8 on every linear layer
plus the classifier head, 5 epochs; about 95.7% test accuracy in a few minutes on 2 CPU cores.

Defaults follow measured evidence: all linear layers ("LoRA without regret", Schulman et al. 2025; here
+0.95 points of validation accuracy over query/value), lr 1e-3 (the paper's ~10x full fine-tuning, 5e-4,
was not better here), LoRA+ off (ratio 16 hurt) — benchmarks/results/defaults_embedded.json.

Models: a built-in name (minilm, tiny-llama), a local Hugging Face model directory, or a Hub id
(gpt2, org/name) loaded through the Hugging Face cache (HF_HOME / HF_HUB_CACHE; HF_HUB_OFFLINE=1
forbids downloads).

Data: .jsonl, .json (array or lines), .csv, .tsv, .parquet, .arrow, or a dataset directory
(datasets' save_to_disk, or a folder of data files; Parquet/Arrow/directories need lorakit[data]).
Layouts: text + label (classification, --task seq-cls); messages (chat), prompt + completion,
instruction + output [+ input] (Alpaca), or text alone (language modelling) for --task causal-lm,
with the loss on the answer / assistant tokens only (on every token for plain text). Columns with
other names: --text-column, --label-column, --prompt-column, --completion-column, --messages-column.
The task is inferred from the columns if not given. Examples longer than --max-length are truncated
(or skipped when their answer would be cut off entirely), and the count is reported.

Settings can come from --config FILE (TOML or YAML; keys are the flag names, with - or _, or the
names of transformers' TrainingArguments / TRL / PEFT: learning_rate, num_train_epochs,
per_device_train_batch_size, gradient_accumulation_steps, logging_steps, optim, lr_scheduler_type,
lr_scheduler_kwargs, eval_strategy, save_strategy, gradient_checkpointing_kwargs, neftune_noise_alpha,
completion_only_loss, assistant_only_loss, task_type, lora_r, ...; a name lorakit does not honour is
refused with the reason); flags given on the command line override it. Ctrl-C saves a checkpoint;
--resume OUT continues it."""

EPILOG = """examples:
  lorakit train                                   # the default job
  lorakit train --model ./my-llama --data sft.jsonl --task causal-lm --target-modules all-linear --epochs 1
  lorakit train --model gpt2 --data corpus.parquet --text-column body --report-to tensorboard
  lorakit train --config run.toml --lr 5e-4       # file settings, lr overridden
  lorakit train --resume runs/20250101-120000     # continue an interrupted run
  torchrun --nproc_per_node 4 -m lorakit train --model ./my-llama --data sft.jsonl --batch-size 8 --fsdp
                                                  # 4 ranks, FSDP2, effective batch 32
  lorakit predict --adapter runs/... "wonderful"  # try a classifier"""


def _bool_or_str(v: str) -> bool | str:
    low = v.lower()
    return {"true": True, "false": False}.get(low, low)


def _json_object(v: str) -> dict[str, Any]:
    try:
        value = json.loads(v)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"num_cycles\": 3}}'; got {v!r}")
    return value


def _int_list(v: str) -> list[int]:
    try:
        return [int(x) for x in v.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices like 0,1,2; got {v!r}") from None


# (flag, type / action, help); defaults live in lorakit.train.job.DEFAULTS and are shown in --help
OPTIONS: list[tuple[str, str, Any, str]] = [
    ("train", "--method", ["lora", "full", "bitfit", "adapter", "prefix", "head"],
     "what trains: LoRA (the --r/--lora-* flags apply), full fine-tuning, BitFit (biases), Houlsby adapters, "
     "prefix tuning, or the head only; non-LoRA runs store trainable.safetensors instead of adapter/"),
    ("data", "--model", str, "built-in name (minilm, tiny-llama), a local Hugging Face model directory or a Hub id"),
    ("data", "--dtype", ["float32", "bfloat16", "float16", "auto"],
     "weights' dtype when loading the model (default: bfloat16 on a CUDA GPU with bf16 support — the adapters stay "
     "fp32 masters — else float32; auto: the checkpoint's)"),
    ("data", "--attn-implementation", str, "the model's attention: eager, sdpa, flash_attention_2, flex_attention... "
                                         "(default: what transformers picks, usually sdpa)"),
    ("data", "--data", str, "training data (file or dataset directory, see above), or 'vader' for the built-in "
                            "word-sentiment data"),
    ("data", "--eval-data", str, "evaluation file; if absent, --eval-split of --data is held out"),
    ("data", "--eval-split", float, "fraction of --data held out for evaluation when --eval-data is absent"),
    ("data", "--task", ["seq-cls", "causal-lm"], "seq-cls (text -> label) or causal-lm (SFT); default: from the data"),
    ("data", "--labels", lambda v: v.split(","), "comma-separated label set (seq-cls); default: labels in --data"),
    ("data", "--max-length", int, "truncate examples to this many tokens (default: 16 for vader, else 512)"),
    ("data", "--text-column", str, "column holding the text (default: text)"),
    ("data", "--label-column", str, "column holding the label (default: label)"),
    ("data", "--prompt-column", str, "column holding the prompt (default: prompt)"),
    ("data", "--completion-column", str, "column holding the completion (default: completion)"),
    ("data", "--messages-column", str, "column holding a chat, a list of {role, content} (default: messages)"),
    ("data", "--completion-only-loss", "bool", "TRL's switch: loss on the completion only (prompt/completion "
                                               "and Alpaca data; default: on)"),
    ("data", "--assistant-only-loss", "bool", "TRL's switch: loss on the assistant turns only (chat data; default: "
                                              "on; TRL's default is off)"),
    ("lora", "--r", int, "LoRA rank r of ΔW = (alpha/r)·B·A (also --lora-r: under torchrun, whose own options make "
                         "--r ambiguous)"),
    ("lora", "--lora-alpha", float, "LoRA alpha (scaling = alpha/r, or alpha/√r with --use-rslora)"),
    ("lora", "--lora-dropout", float, "dropout on the adapter input"),
    ("lora", "--target-modules", parse_modules, "modules to adapt: comma-separated names or dotted suffixes "
                                                "(self_attn.q_proj), a regex, or all-linear (default: all-linear, "
                                                "every Linear but the output head, as 'LoRA without regret' "
                                                "(Schulman et al. 2025) advises; on the embedded task it beat "
                                                "query,value: benchmarks/results/defaults_embedded.json)"),
    ("lora", "--exclude-modules", parse_modules, "modules never adapted (same forms as --target-modules)"),
    ("lora", "--target-parameters", parse_parameters, "nn.Parameters to adapt directly, comma-separated "
                                                      "<module>.<parameter> names or suffixes, e.g. MoE experts: "
                                                      "mlp.experts.gate_up_proj,mlp.experts.down_proj (alone, without "
                                                      "--target-modules, only these are adapted)"),
    ("lora", "--layers-to-transform", _int_list, "only these layer indices, e.g. 0,1"),
    ("lora", "--layers-pattern", str, "name of the layer list for --layers-to-transform, e.g. layers"),
    ("lora", "--modules-to-save", lambda v: v.split(","), "modules trained in full (default for seq-cls: the head)"),
    ("lora", "--bias", ["none", "all", "lora_only"], "which biases train"),
    ("lora", "--use-rslora", "bool", "rank-stabilised scaling alpha/√r"),
    ("lora", "--use-dora", "bool", "weight-decomposed LoRA (DoRA)"),
    ("lora", "--init-lora-weights", _bool_or_str, "true (B=0), false, gaussian, pissa, olora, loftq, eva, corda or "
                                                  "lora_ga (PEFT's values; see --init)"),
    ("lora", "--init", ["loftq", "eva", "corda", "lora-ga", "pissa", "olora"],
     "initialise the adapter from the weights or the data, as PEFT: loftq (4-bit NF4 base + the quantization "
     "residual's SVD), eva (A from an SVD of each layer's inputs, ranks redistributed), corda (from input "
     "covariances), lora-ga (from the gradient), pissa / olora (SVD / QR of W); the data is drawn from the training "
     "set, with a progress bar (default: none, A random and B = 0)"),
    ("lora", "--init-samples", int, "training examples for the --init calibration pass (default: 256 for corda and "
                                    "lora-ga; eva reads batches until its components converge)"),
    ("train", "--epochs", float, "passes over the training data"),
    ("train", "--max-steps", int, "optimizer steps in total (overrides --epochs)"),
    ("train", "--lr", float, "peak learning rate (AdamW) (default: 1e-3; 'LoRA without regret''s ~10x full "
                             "fine-tuning's, here 5e-4, was measured and not better on the embedded task: "
                             "benchmarks/results/defaults_embedded.json)"),
    ("train", "--batch-size", int, "examples per micro-batch (per rank under torchrun)"),
    ("train", "--grad-accum", int, "micro-batches per optimizer step"),
    ("train", "--weight-decay", float, "AdamW weight decay"),
    ("train", "--warmup-ratio", float, "fraction of steps with linear warm-up"),
    ("train", "--warmup-steps", int, "warm-up steps (overrides --warmup-ratio when > 0)"),
    ("train", "--optim", list(OPTIMIZERS), "optimizer, by transformers' names: AdamW (torch, fused), bitsandbytes' "
                                          "8-bit / paged AdamW (lorakit[quant]), SGD or Adafactor"),
    ("train", "--schedule", list(SCHEDULES), "learning-rate decay after warm-up (transformers' lr_scheduler_type "
                                             "names; options with --schedule-kwargs)"),
    ("train", "--schedule-kwargs", _json_object, "the schedule's options as JSON, e.g. '{\"num_cycles\": 3}' "
                                                 "(default: none)"),
    ("train", "--loraplus-lr-ratio", float, "LoRA+ (Hayou et al. 2024): lora_B learns at lr × this ratio (default: "
                                           "off; ratio 16 lowered accuracy on the embedded task and diverged with "
                                           "all-linear: benchmarks/results/defaults_embedded.json)"),
    ("train", "--max-grad-norm", float, "clip the gradient norm (0: off)"),
    ("train", "--gradient-checkpointing", "bool", "recompute activations in backward (less memory)"),
    ("train", "--bf16", "bool", "bfloat16 autocast for forward/backward (weights stay fp32)"),
    ("train", "--seed", int, "seed for head init, data order and dropout"),
    ("train", "--eval-every", int, "evaluate every N steps (0: every epoch)"),
    ("train", "--eval-strategy", list(STRATEGIES), "TrainingArguments' switch: no (no evaluation), steps "
                                                   "(--eval-every) or epoch (default: epoch, or --eval-every)"),
    ("train", "--log-every", int, "record the loss (history.json, trackers, log lines) every N steps"),
    ("train", "--eval-batch-size", int, "batch size for evaluation"),
    ("train", "--checkpoint-every", int, "checkpoint every N steps (0: only on Ctrl-C and at the end)"),
    ("train", "--save-strategy", list(STRATEGIES), "TrainingArguments' switch: no periodic checkpoints, steps "
                                                   "(--checkpoint-every) or epoch (default: --checkpoint-every)"),
    ("train", "--keep-checkpoints", int, "how many checkpoints to keep"),
    ("train", "--neftune-noise-alpha", float, "NEFTune: uniform noise of this alpha on the input embeddings in "
                                              "training (default: off)"),
    ("train", "--group-by-length", "bool", "batch similar lengths together (less padding)"),
    ("train", "--packing", "bool", "causal LM: each batch's examples end to end in one row, no padding, if the "
                                  "model's attention keeps them apart (checked; fastest with --attn-implementation "
                                  "flash_attention_2 or flex_attention)"),
    ("train", "--quantize", ["nf4", "fp4", "int8"], "QLoRA: load the base quantized by bitsandbytes (nf4/fp4 with "
                                                    "double quant and bf16 compute, or int8) and train LoRA on it"),
    ("train", "--fsdp", "bool", "under torchrun: shard with FSDP2 (each decoder block, then the root) instead of "
                               "replicating with DDP"),
    ("train", "--device", str, "auto, cpu, cuda, cuda:1 ... (under torchrun, auto = this node's GPU LOCAL_RANK)"),
    ("train", "--threads", int, "torch CPU threads (default: torch's choice)"),
    ("train", "--progress", "bool", "show the progress bar (default: a bar on a terminal, plain lines in a log)"),
    ("train", "--report-to", str, "experiment tracking: tensorboard, wandb, mlflow or none; comma-separated for "
                                  "several (tensorboard writes OUT/tensorboard/)"),
    ("output", "--out", str, "run directory (default runs/<timestamp>); an existing non-empty one is refused"),
    ("output", "--overwrite", "bool", "allow --out to be an existing non-empty directory"),
]


def add_parser(subparsers) -> argparse.ArgumentParser:
    from lorakit.train.settings import DEFAULTS  # light: no torch model code runs at import

    p = subparsers.add_parser("train", help="fine-tune with LoRA (no arguments: the embedded default job)",
                              description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE",
                   help="TOML or YAML file of settings (keys = flag names); flags override it")
    p.add_argument("--resume", metavar="OUT", help="continue the interrupted run in OUT from its newest checkpoint "
                                                   "(only --device, --threads, --progress, --report-to may change)")
    groups = {"data": p.add_argument_group("data"), "lora": p.add_argument_group("LoRA (as PEFT's LoraConfig)"),
              "train": p.add_argument_group("training"), "output": p.add_argument_group("output")}
    for group, flag, kind, help_text in OPTIONS:
        dest = flag[2:].replace("-", "_")
        # a default is shown once: the help's own wording, else the value
        full_help = help_text if "default" in help_text else f"{help_text} (default: {DEFAULTS[dest]})"
        flags = [flag, *FLAG_ALIASES.get(dest, [])]  # HF/TRL names too (--lora-r, --learning-rate...)
        g = groups[group]
        if kind == "bool":
            g.add_argument(*flags, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=full_help)
        elif isinstance(kind, list):
            g.add_argument(*flags, dest=dest, choices=kind, default=None, help=full_help)
        else:
            g.add_argument(*flags, dest=dest, type=kind, default=None, help=full_help, metavar=dest.upper())
    return p


def read_config_file(path: str) -> dict[str, Any]:
    """Settings from a TOML (.toml) or YAML (.yaml/.yml) file; keys may use - or _.

    Raises:
        FileNotFoundError / ValueError: missing file, unknown suffix, unparsable content, unknown keys.
    """
    from lorakit.train.settings import normalize

    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    suffix = os.path.splitext(path)[1].lower()
    with open(path, "rb") as f:
        raw = f.read()
    try:
        if suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10: the same parser, from PyPI
                import tomli as tomllib

            data = tomllib.loads(raw.decode("utf-8"))
        elif suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(raw.decode("utf-8")) or {}
        else:
            raise ValueError(f"config file {path!r}: use a .toml, .yaml or .yml file")
    except (UnicodeDecodeError, ValueError) as e:  # tomllib.TOMLDecodeError is a ValueError
        raise ValueError(f"config file {path!r} cannot be parsed: {e}") from None
    except Exception as e:  # yaml.YAMLError
        raise ValueError(f"config file {path!r} cannot be parsed: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path!r} must hold a table/mapping of settings")
    data = normalize(data, f"config file {path!r}")
    for key in ("target_modules", "exclude_modules"):
        if isinstance(data.get(key), str):
            data[key] = parse_modules(data[key])
    if isinstance(data.get("target_parameters"), str):
        data["target_parameters"] = parse_parameters(data["target_parameters"])
    return data


def settings_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Config-file settings overridden by the flags actually given."""
    settings = read_config_file(args.config) if args.config else {}
    for _, flag, _, _ in OPTIONS:
        dest = flag[2:].replace("-", "_")
        value = getattr(args, dest, None)
        if value is not None:
            settings[dest] = value
    return settings


def run(args: argparse.Namespace) -> int:
    from lorakit.train.distributed import init_from_env, is_main_process, shutdown
    from lorakit.train.job import RESUME_OVERRIDES, RunInterrupted, run_job

    settings = settings_from_args(args)
    if args.resume:
        changed = sorted(set(settings) - set(RESUME_OVERRIDES))
        if changed:
            raise ValueError(f"--resume continues a run with its own saved settings; drop {changed} "
                             f"(only {', '.join('--' + k.replace('_', '-') for k in RESUME_OVERRIDES)} may change)")
    started, clean, code = init_from_env(), False, 0  # under torchrun: one process per rank, DDP or --fsdp
    try:
        metrics = run_job(settings, resume=args.resume)
        clean = True
    except RunInterrupted as e:
        clean, code = True, 130  # under torchrun every rank stopped after the same step
        if is_main_process():
            ranks = int(os.environ.get("WORLD_SIZE", "1"))
            again = f"torchrun ... ({ranks} ranks in all) -m lorakit train" if ranks > 1 else "lorakit train"
            if e.checkpoint is not None:
                print(f"\ninterrupted: checkpoint saved ({os.path.basename(e.checkpoint)}); continue with: "
                      f"{again} --resume {e.out}", file=sys.stderr)
            else:
                print("\ninterrupted before training started: no checkpoint was written, nothing to resume"
                      + (f" (the run directory {e.out} can be removed)" if e.out else ""), file=sys.stderr)
        return 130
    finally:
        shutdown(started, clean, code)  # torchrun, ranks > 0: the process ends here
    if not is_main_process():
        return 0
    keys = ("eval_accuracy", "eval_loss", "perplexity", "train_seconds", "tokens_per_second", "peak_memory_mb")
    shown = ", ".join(f"{k}={metrics[k]:.4g}" for k in keys if k in metrics)
    print(f"done: {shown}, trainable {metrics['trainable_params']:,} of {metrics['total_params']:,} params")
    stored = "adapter/" if metrics["method"] == "lora" else "trainable.safetensors"
    plot = ", curves.png" if os.path.isfile(os.path.join(metrics["out"], "curves.png")) else ""
    print(f"outputs in {metrics['out']}: {stored}, metrics.json{plot}, checkpoints/")
    return 0
