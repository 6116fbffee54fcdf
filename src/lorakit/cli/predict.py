"""``lorakit predict``: classify texts with a trained classification run, in batches, as they stream in."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "predict", help="classify texts with an adapter from lorakit train (seq-cls)",
        description="Load the base model of a classification run plus its adapter and print, for each text, "
                    "the predicted label and its probability: tab-separated (text, label, probability), or JSON "
                    "lines {text, label, probability} with --json. Texts come from the arguments, --input FILE or "
                    "standard input (one per line; empty lines are skipped); they are classified --batch-size at "
                    "a time and each batch is printed as soon as it is done, so memory stays bounded however long "
                    "the input. Texts are truncated to the run's --max-length, as in training.",
        epilog="examples:\n  lorakit predict --adapter runs/20250101-120000 wonderful awful\n"
               "  lorakit predict --adapter runs/x --json < words.txt > predictions.jsonl",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", required=True, metavar="OUT",
                   help="the --out directory of a lorakit train run (or its adapter/ folder)")
    p.add_argument("texts", nargs="*", metavar="TEXT", help="texts to classify (none: --input, else standard input)")
    p.add_argument("--input", metavar="FILE", help="read the texts from FILE, one per line")
    p.add_argument("--batch-size", type=int, default=64, help="texts per forward pass (default: 64)")
    p.add_argument("--max-length", type=int, default=None,
                   help="truncate texts to this many tokens (default: the run's, as in training)")
    p.add_argument("--device", default="cpu", help="cpu, cuda ... (default: cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print JSON lines {text, label, probability}")
    return p


def _lines(stream) -> Iterator[str]:
    """Non-empty lines of ``stream``, read one at a time (so output can follow input)."""
    for line in iter(stream.readline, ""):
        line = line.rstrip("\r\n")
        if line.strip():
            yield line


def run(args: argparse.Namespace) -> int:
    from lorakit.train.inference import load_trained, predict

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model, tok, settings = load_trained(args.adapter, "seq-cls", args.device)
    max_length = args.max_length or settings.get("max_length") or (16 if settings.get("data") == "vader" else 512)
    stream = open(args.input, encoding="utf-8") if args.input else None  # closed below
    try:
        texts = iter(args.texts) if args.texts else _lines(stream or sys.stdin)
        n = 0
        for text, label, prob in predict(model, tok, texts, max_length=max_length, batch_size=args.batch_size):
            n += 1
            if args.json:
                sys.stdout.write(json.dumps({"text": text, "label": label, "probability": round(prob, 6)},
                                            ensure_ascii=False) + "\n")
            else:
                sys.stdout.write(f"{text}\t{label}\t{prob:.4f}\n")
            if n % args.batch_size == 0:
                sys.stdout.flush()
    finally:
        if stream is not None:
            stream.close()
    if n == 0:
        raise ValueError("no text to classify: give TEXT arguments, --input FILE or lines on stdin")
    return 0
