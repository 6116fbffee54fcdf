"""``lorakit predict``: classify texts with a classification adapter, in batches, as they stream in;
with ``--eval``, score a labelled file (accuracy and the confusion matrix)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from collections.abc import Iterator


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "predict", help="classify texts with a classification adapter (a lorakit train run or a PEFT adapter)",
        description="Load the base model of a classification adapter as it was trained plus the adapter and print, "
                    "for each text, the predicted label and its probability: tab-separated (text, label, "
                    "probability), or JSON lines {text, label, probability} with --json. Texts come from the "
                    "arguments, standard input (one per line; empty lines are skipped) or --input FILE: a data file "
                    "(.csv, .tsv, .jsonl, .json, .parquet...) is read as lorakit train reads it, the text from "
                    "--text-column (default: the run's, else 'text'); a .txt file (or any other) one text per line. "
                    "With --eval the file's --label-column holds the gold labels: accuracy and the confusion "
                    "matrix are printed at the end (on stderr; stdout keeps the predictions). Texts are classified "
                    "--batch-size at a time and each batch is printed as soon as it is done; they are truncated to "
                    "the run's --max-length, as in training.",
        epilog="examples:\n  lorakit predict --adapter runs/20250101-120000 wonderful awful\n"
               "  lorakit predict --adapter runs/x --json < words.txt > predictions.jsonl\n"
               "  lorakit predict --adapter runs/x --input test.csv --text-column sentence --label-column gold --eval\n"
               "  lorakit predict --adapter peft-adapter/ --base ./bert-cls \"great film\"",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", required=True, metavar="DIR",
                   help="a lorakit train run (--out) or its adapter/ folder, or a PEFT-format adapter directory")
    p.add_argument("--base", default=None, metavar="MODEL",
                   help="the base model: a directory, a built-in name or a Hub id (default: the run's, else the "
                        "adapter's base_model_name_or_path)")
    p.add_argument("texts", nargs="*", metavar="TEXT", help="texts to classify (none: --input, else standard input)")
    p.add_argument("--input", metavar="FILE", help="a data file read as lorakit train reads data, or a .txt file of "
                                                   "one text per line")
    p.add_argument("--text-column", default=None, help="column of --input holding the text (default: the run's "
                                                       "--text-column, else text)")
    p.add_argument("--label-column", default=None, help="column of --input holding the gold label, for --eval "
                                                        "(default: the run's --label-column, else label)")
    p.add_argument("--eval", action="store_true", help="compare with --input's gold labels: accuracy and the "
                                                       "confusion matrix (stderr)")
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


def _is_data_file(path: str) -> bool:
    from lorakit.data.files import SUFFIXES

    return os.path.isdir(path) or os.path.splitext(path)[1].lower() in SUFFIXES


def read_labelled(path: str, text_column: str, label_column: str, need_labels: bool) -> tuple[list[str], list | None]:
    """``(texts, gold labels or None)`` of a data file, read with ``lorakit train``'s readers.

    Raises:
        ValueError: a missing column (naming the file, the line and the columns found).
    """
    from lorakit.data.files import read_records, require_columns

    records = read_records(path)
    hint = "map yours with --text-column / --label-column"
    require_columns(records, (text_column, label_column) if need_labels else (text_column,), path, hint)
    texts = [str(r[text_column]) for r in records]
    gold = [str(r[label_column]) for r in records] if need_labels or all(label_column in r for r in records) else None
    return texts, gold


def confusion_report(gold: list[str], predicted: list[str], labels: list[str]) -> str:
    """Accuracy and the confusion matrix (rows: gold label, columns: predicted), as text."""
    counts = Counter(zip(gold, predicted))
    names = list(dict.fromkeys([*labels, *sorted(set(gold) - set(labels))]))
    right = sum(counts[(g, g)] for g in names)
    corner = "gold \\ predicted"
    width = max(len(corner), *(len(n) for n in names))
    cell = max(5, *(len(n) for n in names))
    lines = [f"accuracy: {right / max(1, len(gold)):.4f} ({right} of {len(gold)})",
             f"{corner:<{width}} " + " ".join(f"{n:>{cell}}" for n in names)]
    lines += [f"{g:<{width}} " + " ".join(f"{counts[(g, p)]:>{cell}}" for p in names) for g in names]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from lorakit.train.inference import load_trained, predict

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.eval and not args.input:
        raise ValueError("--eval scores the gold labels of --input FILE; give --input")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model, tok, trained = load_trained(args.adapter, "seq-cls", args.device, base=args.base)
    job = trained.job
    max_length = args.max_length or (job.max_length if job else None) or \
        (16 if job is not None and job.data == "vader" else 512)
    gold = None
    stream = None
    if args.input and _is_data_file(args.input):
        text_col = args.text_column or (job.text_column if job else None) or "text"
        label_col = args.label_column or (job.label_column if job else None) or "label"
        texts, gold = read_labelled(args.input, text_col, label_col, need_labels=args.eval)
        source = iter(texts)
    elif args.eval:
        raise ValueError(f"--eval needs a data file with a label column (.csv, .tsv, .jsonl, ...), not {args.input!r}")
    elif args.input:
        stream = open(args.input, encoding="utf-8")  # closed below
        source = _lines(stream)
    else:
        source = iter(args.texts) if args.texts else _lines(sys.stdin)
    predicted: list[str] = []
    n = 0
    try:
        for text, label, prob in predict(model, tok, source, max_length=max_length, batch_size=args.batch_size):
            n += 1
            if args.eval:
                predicted.append(label)
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
    sys.stdout.flush()
    if n == 0:
        raise ValueError("no text to classify: give TEXT arguments, --input FILE or lines on stdin")
    if args.eval:
        labels = [model.config.id2label[i] for i in sorted(model.config.id2label)]
        print(confusion_report(gold, predicted, labels), file=sys.stderr)
    return 0
