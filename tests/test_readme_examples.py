"""Every ```python block of README.md runs as written, and each ``# prints: TEXT`` comment in it is what
the block prints (the numbers a reader sees are the numbers the code gives). The torchrun example is
run on two ranks by tests/io/test_distributed_io.py."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
       "OMP_NUM_THREADS": "1"}
TORCHRUN_MARK = "<!-- torchrun example"
NEEDS = {"lorakit.models.quantized": "bitsandbytes", "trl": "trl", "datasets": "datasets"}


def readme_blocks() -> list[tuple[int, str]]:
    """``(line number, code)`` of every python block, except the torchrun one (run elsewhere)."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    blocks = []
    for m in re.finditer(r"```python\n(.*?)```", text, re.S):
        before = text[:m.start()].rstrip().splitlines()
        if before and before[-1].startswith(TORCHRUN_MARK):
            continue
        blocks.append((text.count("\n", 0, m.start()) + 1, m.group(1)))
    return blocks


def test_the_readme_has_its_examples_and_the_torchrun_one_is_run_elsewhere():
    assert len(readme_blocks()) >= 3
    with open(os.path.join(ROOT, "tests", "io", "test_distributed_io.py"), encoding="utf-8") as f:
        assert TORCHRUN_MARK in f.read()


@pytest.mark.slow  # a fresh interpreter per block: 4-7 s each
@pytest.mark.parametrize("line, code", readme_blocks(), ids=lambda v: f"line{v}" if isinstance(v, int) else "")
def test_readme_python_block_runs_and_prints_what_it_says(line, code, tmp_path):
    for module, package in NEEDS.items():
        if re.search(rf"^\s*(from|import) {re.escape(module)}\b", code, re.M):
            pytest.importorskip(package)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"README.md line {line}:\n{proc.stderr[-3000:]}"
    for said in re.findall(r"# prints: (.*)$", code, re.M):
        assert said.strip() in proc.stdout, f"README.md line {line} says it prints {said.strip()!r}; " \
                                            f"it printed {proc.stdout!r}"
