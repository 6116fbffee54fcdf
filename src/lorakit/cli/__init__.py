"""The ``lorakit`` command line: one sub-command per module of this package.

Each sub-command module defines ``add_parser(subparsers)`` (registering its flags and help) and
``run(args) -> int``; heavy imports (transformers, matplotlib) happen inside ``run`` so that
``lorakit --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys

from lorakit.extras import MissingDependency

# what a user can cause (a bad flag value, a missing file, a missing optional package): one line on stderr, exit 1
INPUT_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError, IsADirectoryError,
                MissingDependency)

# sub-command -> module defining add_parser() and run()
COMMANDS: dict[str, str] = {
    "train": "lorakit.cli.train",
    "predict": "lorakit.cli.predict",
    "generate": "lorakit.cli.generate",
    "compare": "lorakit.cli.compare",
    "inspect": "lorakit.cli.inspect",
    "merge": "lorakit.cli.merge",
    "export": "lorakit.cli.export",
    "convert": "lorakit.cli.convert",
    "bench": "lorakit.cli.bench",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorakit",
        description="LoRA fine-tuning for PyTorch models: train, compare methods, merge and inspect adapters.",
    )
    from lorakit import __version__

    parser.add_argument("--version", action="version", version=f"lorakit {__version__}")
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
        code = int(importlib.import_module(COMMANDS[args.command]).run(args) or 0)
        sys.stdout.flush()  # here, so that a closed pipe (lorakit inspect DIR | head) is handled below
        return code
    except INPUT_ERRORS as e:
        print(f"lorakit {args.command}: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # the reader went away (| head): stop quietly, and keep Python's exit-time flush from failing again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports it
    except KeyboardInterrupt:
        print(f"\nlorakit {args.command}: interrupted", file=sys.stderr)
        return 130


def entry_point() -> None:
    """The ``lorakit`` console script: :func:`main`; after Ctrl-C, exit without running the interpreter's
    exit handlers, where a second Ctrl-C would print an "Exception ignored in atexit callback" traceback."""
    try:
        code = main()
    except KeyboardInterrupt:
        code = 130
    if code != 130:
        sys.exit(code)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(130)


if __name__ == "__main__":
    entry_point()
