"""Paths and process launchers shared by tests in several folders (no tests here)."""

from __future__ import annotations

import os
import subprocess
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))  # helper modules (models.py, ...) live here
ROOT = os.path.dirname(TESTS)
SRC = os.path.join(ROOT, "src")


def torchrun(*args: str, cwd, timeout: int = 300) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 ARGS`` with lorakit's sources and these helpers importable."""
    path = os.pathsep.join([SRC, TESTS, os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)
