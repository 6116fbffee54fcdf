"""``lorakit train``: fine-tune with LoRA. With no arguments: the embedded default job
(pretrained all-MiniLM-L6-v2 on VADER word sentiment, LoRA r=8 on query/value)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

DESCRIPTION = """Fine-tune a model with LoRA and write the adapter, metrics.json, curves.png and checkpoints.

With no arguments: the embedded default job — the pretrained all-MiniLM-L6-v2 encoder learns word
sentiment from the VADER lexicon (4,596 training words, 1,000 held out), LoRA r=8 on query/value plus
the classifier head, 5 epochs; about 95% test accuracy in a few minutes on 2 CPU cores.

Data: JSONL or CSV. Classification (--task seq-cls): columns text, label. Causal-LM SFT (--task
causal-lm): prompt + completion, or a chat in 'messages' ([{role, content}, ...]); the loss is taken
on completion / assistant tokens only. The task is inferred from the columns if not given.

Settings can come from --config FILE (TOML or YAML; keys are the flag names, with - or _);
flags given on the command line override it. Ctrl-C saves a checkpoint; --resume OUT continues it."""

EPILOG = """examples:
  lorakit train                                   # the default job
  lorakit train --model ./my-llama --data sft.jsonl --task causal-lm --target-modules all-linear --epochs 1
  lorakit train --config run.toml --lr 5e-4       # file settings, lr overridden
  lorakit train --resume runs/20250101-120000     # continue an interrupted run
  torchrun --nproc_per_node 4 -m lorakit train --model ./my-llama --data sft.jsonl --batch-size 8 --fsdp
                                                  # 4 ranks, FSDP2, effective batch 32
  lorakit predict --adapter runs/... "wonderful"  # try a classifier"""


def _bool_or_str(v: str) -> bool | str:
    low = v.lower()
    return {"true": True, "false": False}.get(low, low)


def _csv_list(v: str) -> list[str] | str:
    """'q_proj,v_proj' -> list; a single regex or 'all-linear' stays a string."""
    return [x.strip() for x in v.split(",") if x.strip()] if "," in v or v.isidentifier() else v


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
    ("data", "--model", str, "built-in name (minilm, tiny-llama) or a local Hugging Face model directory"),
    ("data", "--data", str, "training file (.jsonl/.csv), or 'vader' for the built-in word-sentiment data"),
    ("data", "--eval-data", str, "evaluation file; if absent, --eval-split of --data is held out"),
    ("data", "--eval-split", float, "fraction of --data held out for evaluation when --eval-data is absent"),
    ("data", "--task", ["seq-cls", "causal-lm"], "seq-cls (text -> label) or causal-lm (SFT); default: from the data"),
    ("data", "--labels", lambda v: v.split(","), "comma-separated label set (seq-cls); default: labels in --data"),
    ("data", "--max-length", int, "truncate examples to this many tokens (default 16 for vader, else 512)"),
    ("lora", "--r", int, "LoRA rank r of ΔW = (alpha/r)·B·A (also --lora-r: under torchrun, whose own options make "
                         "--r ambiguous)"),
    ("lora", "--lora-alpha", float, "LoRA alpha (scaling = alpha/r, or alpha/√r with --use-rslora)"),
    ("lora", "--lora-dropout", float, "dropout on the adapter input"),
    ("lora", "--target-modules", _csv_list, "modules to adapt: comma-separated names/suffixes, a regex, or "
                                            "all-linear (default: the model family's attention projections)"),
    ("lora", "--exclude-modules", _csv_list, "modules never adapted (same forms as --target-modules)"),
    ("lora", "--layers-to-transform", _int_list, "only these layer indices, e.g. 0,1"),
    ("lora", "--layers-pattern", str, "name of the layer list for --layers-to-transform, e.g. layers"),
    ("lora", "--modules-to-save", lambda v: v.split(","), "modules trained in full (default for seq-cls: the head)"),
    ("lora", "--bias", ["none", "all", "lora_only"], "which biases train"),
    ("lora", "--use-rslora", "bool", "rank-stabilised scaling alpha/√r"),
    ("lora", "--use-dora", "bool", "weight-decomposed LoRA (DoRA)"),
    ("lora", "--init-lora-weights", _bool_or_str, "true (B=0), false, gaussian, pissa or olora"),
    ("train", "--epochs", float, "passes over the training data"),
    ("train", "--max-steps", int, "optimizer steps in total (overrides --epochs)"),
    ("train", "--lr", float, "peak learning rate (AdamW)"),
    ("train", "--batch-size", int, "examples per micro-batch (per rank under torchrun)"),
    ("train", "--grad-accum", int, "micro-batches per optimizer step"),
    ("train", "--weight-decay", float, "AdamW weight decay"),
    ("train", "--warmup-ratio", float, "fraction of steps with linear warm-up"),
    ("train", "--warmup-steps", int, "warm-up steps (overrides --warmup-ratio when > 0)"),
    ("train", "--schedule", ["cosine", "linear", "constant"], "learning-rate decay after warm-up"),
    ("train", "--loraplus-lr-ratio", float, "LoRA+: lora_B learns at lr × this ratio"),
    ("train", "--max-grad-norm", float, "clip the gradient norm (0: off)"),
    ("train", "--gradient-checkpointing", "bool", "recompute activations in backward (less memory)"),
    ("train", "--bf16", "bool", "bfloat16 autocast for forward/backward (weights stay fp32)"),
    ("train", "--seed", int, "seed for head init, data order and dropout"),
    ("train", "--eval-every", int, "evaluate every N steps (0: every epoch)"),
    ("train", "--eval-batch-size", int, "batch size for evaluation"),
    ("train", "--checkpoint-every", int, "checkpoint every N steps (0: only on Ctrl-C and at the end)"),
    ("train", "--keep-checkpoints", int, "how many checkpoints to keep"),
    ("train", "--group-by-length", "bool", "batch similar lengths together (less padding)"),
    ("train", "--fsdp", "bool", "under torchrun: shard with FSDP2 (each decoder block, then the root) instead of "
                               "replicating with DDP"),
    ("train", "--device", str, "auto, cpu, cuda, cuda:1 ... (under torchrun, auto = this node's GPU LOCAL_RANK)"),
    ("train", "--threads", int, "torch CPU threads (default: torch's choice)"),
    ("train", "--progress", "bool", "show the progress bar"),
    ("output", "--out", str, "run directory (default runs/<timestamp>); an existing non-empty one is refused"),
    ("output", "--overwrite", "bool", "allow --out to be an existing non-empty directory"),
]
ALIASES = {"--r": ["--lora-r"]}  # torchrun's parser takes --r as an ambiguous prefix of its --rdzv-*/--role...


def add_parser(subparsers) -> argparse.ArgumentParser:
    from lorakit.train.job import DEFAULTS  # light: no torch model code runs at import

    p = subparsers.add_parser("train", help="fine-tune with LoRA (no arguments: the embedded default job)",
                              description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE",
                   help="TOML or YAML file of settings (keys = flag names); flags override it")
    p.add_argument("--resume", metavar="OUT", help="continue the interrupted run in OUT from its newest checkpoint")
    groups = {"data": p.add_argument_group("data"), "lora": p.add_argument_group("LoRA (as PEFT's LoraConfig)"),
              "train": p.add_argument_group("training"), "output": p.add_argument_group("output")}
    for group, flag, kind, help_text in OPTIONS:
        dest = flag[2:].replace("-", "_")
        full_help = f"{help_text} (default: {DEFAULTS[dest]})"
        g = groups[group]
        flags = [flag, *ALIASES.get(flag, [])]
        if kind == "bool":
            g.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=full_help)
        elif isinstance(kind, list):
            g.add_argument(flag, dest=dest, choices=kind, default=None, help=full_help)
        else:
            g.add_argument(*flags, dest=dest, type=kind, default=None, help=full_help, metavar=dest.upper())
    return p


def read_config_file(path: str) -> dict[str, Any]:
    """Settings from a TOML (.toml) or YAML (.yaml/.yml) file; keys may use - or _.

    Raises:
        FileNotFoundError / ValueError: missing file, unknown suffix, unparsable content, unknown keys.
    """
    from lorakit.train.job import check_keys

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
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    check_keys(data, f"config file {path!r}")
    if isinstance(data.get("target_modules"), str):
        data["target_modules"] = _csv_list(data["target_modules"])
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
    from lorakit.train.job import run_job

    settings = settings_from_args(args)
    if args.resume:
        changed = sorted(set(settings) - {"progress", "device", "threads"})
        if changed:
            raise ValueError(f"--resume continues a run with its own saved settings; drop {changed} "
                             "(only --device, --threads and --progress may change)")
    started, clean, code = init_from_env(), False, 0  # under torchrun: one process per rank, DDP or --fsdp
    try:
        metrics = run_job(settings, resume=args.resume)
        clean = True
    except KeyboardInterrupt as e:
        clean, code = True, 130  # under torchrun every rank stopped after the same step
        out = e.args[0] if e.args else args.resume or settings.get("out") or "OUT"
        if is_main_process():
            ranks = int(os.environ.get("WORLD_SIZE", "1"))
            again = f"torchrun ... ({ranks} ranks in all) -m lorakit train" if ranks > 1 else "lorakit train"
            print(f"\ninterrupted: checkpoint saved; continue with: {again} --resume {out}", file=sys.stderr)
        return 130
    finally:
        shutdown(started, clean, code)  # torchrun, ranks > 0: the process ends here
    if not is_main_process():
        return 0
    keys = ("eval_accuracy", "eval_loss", "perplexity", "train_seconds", "tokens_per_second", "peak_memory_mb")
    shown = ", ".join(f"{k}={metrics[k]:.4g}" for k in keys if k in metrics)
    print(f"done: {shown}, trainable {metrics['trainable_params']:,} of {metrics['total_params']:,} params")
    stored = "adapter/" if metrics["method"] == "lora" else "trainable.safetensors"
    print(f"outputs in {metrics['out']}: {stored}, metrics.json, curves.png, checkpoints/")
    return 0
