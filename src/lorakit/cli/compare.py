"""``lorakit compare``: every fine-tuning method and a LoRA rank × target sweep on the default task."""

from __future__ import annotations

import argparse
import shlex
import sys


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "compare",
        help="the LoRA paper's comparison (full FT, BitFit, prefix, adapters, LoRA, head only) on this machine",
        description=(
            "Train full fine-tuning, BitFit, prefix tuning, Houlsby adapters, LoRA and a linear probe on the "
            "built-in task (word sentiment from the VADER lexicon on the pretrained all-MiniLM-L6-v2), same split, "
            "seeds and epochs, each at its usual learning rate; then a LoRA sweep over rank r and target modules. "
            "Writes results.json, results.md (the table), methods.png and sweep.png. "
            "Budgets: small = CI smoke run (a few minutes on 2 cores), medium = all data, 3 epochs, 12 sweep "
            "points, full = all data, 5 epochs, 18 sweep points."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", default="compare-results", help="directory for the result files")
    p.add_argument("--budget", choices=["small", "medium", "full"], default="full", help="how much to run")
    p.add_argument("--seeds", type=int, default=1,
                   help="number of seeds (0..N-1); with more than one the table shows mean ± std")
    p.add_argument("--methods", default=None,
                   help="comma-separated subset of full,bitfit,prefix,adapter,lora,head (default: all)")
    p.add_argument("--no-sweep", action="store_true", help="skip the LoRA rank × target sweep")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    if args.seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {args.seeds}")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from lorakit.compare import compare

    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    command = "lorakit " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["compare"] else None
    result = compare(args.out, budget=args.budget, seeds=args.seeds, methods=methods, sweep=not args.no_sweep,
                     progress=not args.no_progress, command=command)
    for path in result["paths"].values():
        print(path)
    return 0
