"""``lorakit export NAME --out DIR``: write a built-in model as a plain transformers directory."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="write a built-in model (tiny-llama, minilm) to a directory, e.g. for lorakit merge --base",
        description="Write a built-in model and its tokenizer with save_pretrained, so that transformers, PEFT "
                    "and lorakit merge --base can load it from a directory. tiny-llama is random: --seed picks it "
                    "(a run trained with --seed S used seed S; lorakit merge --adapter RUN needs no export at all).",
        epilog="example: lorakit export tiny-llama --out base/ && lorakit merge --base base/ --adapter runs/x/adapter "
               "--out merged/")
    p.add_argument("name", choices=["tiny-llama", "minilm"], help="the built-in model")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write (created)")
    p.add_argument("--seed", type=int, default=0, help="tiny-llama's init seed; minilm's new head's (default: 0)")
    p.add_argument("--task", choices=["seq-cls", "causal-lm"], default=None,
                   help="minilm: seq-cls writes BertForSequenceClassification with a new 2-way head "
                        "(default: the bare encoder)")


def run(args: argparse.Namespace) -> int:
    from lorakit.models import export

    out = export(args.name, args.out, task=args.task, seed=args.seed)
    print(f"wrote {args.name} to {out}")
    return 0
