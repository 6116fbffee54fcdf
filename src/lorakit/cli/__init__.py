"""The ``lorakit`` command line: one sub-command per module of this package.

Each sub-command module defines ``add_parser(subparsers)`` (registering its flags and help) and
``run(args) -> int``; heavy imports (transformers, matplotlib) happen inside ``run`` so that
``lorakit --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# what a user can cause (a bad flag value, a missing file): one line on stderr, exit code 1
INPUT_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError, IsADirectoryError)

# sub-command -> module defining add_parser() and run()
COMMANDS: dict[str, str] = {
    "train": "lorakit.cli.train",
    "predict": "lorakit.cli.predict",
    "generate": "lorakit.cli.generate",
    "compare": "lorakit.cli.compare",
    "inspect": "lorakit.cli.inspect",
    "merge": "lorakit.cli.merge",
    "bench": "lorakit.cli.bench",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorakit",
        description="LoRA fine-tuning for PyTorch models: train, compare methods, merge and inspect adapters.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS.values():
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(importlib.import_module(COMMANDS[args.command]).run(args) or 0)
    except INPUT_ERRORS as e:
        print(f"lorakit {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
