"""lorakit vs Hugging Face PEFT on PEFT's CPU anchor setting; prints JSON and saves it under results/.

    python benchmarks/bench_peft.py [--rounds 5] [--threads 2]

The measurements live in ``lorakit.compare.vs_peft`` (also ``lorakit bench``); this script only names
the output file after the device: ``results/peft_cpu_<threads>threads.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lorakit.compare.vs_peft import run  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    res = run(rounds=args.rounds, threads=args.threads)
    text = json.dumps(res, indent=1)
    print(text)
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"peft_cpu_{args.threads}threads.json")
    with open(out, "w") as f:
        f.write(text + "\n")
