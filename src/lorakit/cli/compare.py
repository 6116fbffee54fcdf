"""``lorakit compare``: every fine-tuning method and a LoRA rank × target sweep on the default task."""

from __future__ import annotations

import argparse
import shlex


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "compare",
        help="the LoRA paper's comparison (full FT, BitFit, prefix, adapters, LoRA, head only) on this machine",
        description=(
            "Train full fine-tuning, BitFit, prefix tuning, Houlsby adapters, LoRA and a linear probe on the "
            "built-in task (word sentiment from the VADER lexicon on the pretrained all-MiniLM-L6-v2), same split, "
            "seeds and epochs, each at its usual learning rate; then a LoRA sweep over rank r and target modules. "
            "Writes results.json, results.md (the table), methods.png and sweep.png. "
            "Budgets: quick (the default) = all data, 1 epoch, 4 sweep points, a few minutes on 2 CPU cores; "
            "small = the test suite's run (512 training words, 2 epochs); medium = all data, 1 epoch, 9 sweep "
            "points; full = all data, 5 epochs, 18 sweep points (r in 1,2,4,8,16,64 x query | query,value | "
            "all-linear), about 26 minutes. A claim about accuracy is only checked for methods that learned "
            "(5 points above the majority class). The results are rewritten after every run, so an interrupted "
            "comparison keeps its table so far."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", default="compare-results", help="directory for the result files")
    p.add_argument("--budget", choices=["small", "quick", "medium", "full"], default="quick", help="how much to run")
    p.add_argument("--seeds", type=int, default=1,
                   help="number of seeds (0..N-1); with more than one the table shows mean ± std")
    p.add_argument("--methods", default=None,
                   help="comma-separated subset of full,bitfit,prefix,adapter,lora,head; all if omitted")
    p.add_argument("--no-sweep", action="store_true", help="skip the LoRA rank × target sweep")
    p.add_argument("--inits", default=None,
                   help="also sweep LoRA initialisations: comma-separated lorakit train --init names (loftq, eva, "
                        "corda, lora-ga, pissa, olora), each at r = 1, 2, 4, 8, 16 on query,value beside the default "
                        "init; one table, rank × init")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads; torch's choice if omitted (1 is often fastest on a busy machine)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    if args.seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {args.seeds}")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from lorakit.compare import compare

    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    command = _command_line(args)
    inits = [i.strip() for i in args.inits.split(",") if i.strip()] if args.inits else ()
    result = compare(args.out, budget=args.budget, seeds=args.seeds, methods=methods, sweep=not args.no_sweep,
                     progress=not args.no_progress, command=command, inits=inits)
    for path in result["paths"].values():
        print(path)
    return 0


def _command_line(args: argparse.Namespace) -> str:
    """The ``lorakit compare`` command that reproduces this run (recorded in results.md)."""
    parts = ["lorakit", "compare", "--budget", args.budget, "--seeds", str(args.seeds), "--out", args.out]
    if args.methods:
        parts += ["--methods", args.methods]
    if args.no_sweep:
        parts.append("--no-sweep")
    if args.inits:
        parts += ["--inits", args.inits]
    if args.threads:
        parts += ["--threads", str(args.threads)]
    return shlex.join(parts)
