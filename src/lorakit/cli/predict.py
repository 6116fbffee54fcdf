"""``lorakit predict``: classify texts with a trained classification run."""

from __future__ import annotations

import argparse
import json
import sys


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "predict", help="classify texts with an adapter from lorakit train (seq-cls)",
        description="Load the base model of a classification run plus its adapter and print, for each text, "
                    "the predicted label and its probability (tab-separated, or JSON lines with --json).",
        epilog="example: lorakit predict --adapter runs/20250101-120000 wonderful awful")
    p.add_argument("--adapter", required=True, metavar="OUT",
                   help="the --out directory of a lorakit train run (or its adapter/ folder)")
    p.add_argument("texts", nargs="*", metavar="TEXT", help="texts to classify (none: read one per line from stdin)")
    p.add_argument("--device", default="cpu", help="cpu, cuda ... (default: cpu)")
    p.add_argument("--json", action="store_true", help="print JSON lines {text, label, probability}")
    return p


def run(args: argparse.Namespace) -> int:
    from lorakit.train.inference import load_trained, predict

    texts = args.texts or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not texts:
        raise ValueError("no text to classify: give TEXT arguments or lines on stdin")
    model, tok, _ = load_trained(args.adapter, "seq-cls", args.device)
    for text, (label, prob) in zip(texts, predict(model, tok, texts)):
        if args.json:
            print(json.dumps({"text": text, "label": label, "probability": round(prob, 6)}))
        else:
            print(f"{text}\t{label}\t{prob:.4f}")
    return 0
