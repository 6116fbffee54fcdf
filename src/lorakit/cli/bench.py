"""``lorakit bench``: lorakit against Hugging Face PEFT on PEFT's CPU anchor setting, as JSON."""

from __future__ import annotations

import argparse
import json
import os
import warnings


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="time lorakit against PEFT (train step, unmerged/merged/mixed-batch inference, memory)",
        description="Run lorakit and Hugging Face PEFT in the same process on a LLaMA-shaped random model "
                    "(hidden 512, 4 layers, LoRA r=16 on all 7 projections) and print ratios as JSON: train step vs "
                    "PEFT and vs a frozen-base floor, unmerged / merged / 4-adapter mixed-batch forward vs the base "
                    "model, and peak train-step memory vs PEFT (each in a fresh subprocess). Variants are interleaved "
                    "call by call and each one's fastest call is kept, which is robust on a shared machine. Needs "
                    "peft and transformers installed; takes several minutes.")
    p.add_argument("--rounds", type=int, default=5,
                   help="interleaved rounds of timed calls; more rounds, steadier minima (default 5)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--output", help="also write the JSON to this file")


def run(args: argparse.Namespace) -> int:
    if args.rounds < 1 or args.threads < 1:
        raise ValueError(f"--rounds and --threads must be >= 1; got {args.rounds} and {args.threads}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # PEFT calls transformers APIs that transformers has deprecated (FutureWarning): nothing a user of this
    # command can act on, and it would land above the JSON; the memory subprocesses inherit the filter
    os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [os.environ.get("PYTHONWARNINGS"), "ignore::FutureWarning"]))
    from lorakit.compare.vs_peft import run as run_bench

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        result = run_bench(rounds=args.rounds, threads=args.threads)
    text = json.dumps(result, indent=1)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    return 0
