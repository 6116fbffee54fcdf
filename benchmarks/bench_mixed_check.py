"""What the mixed-batch stack check costs: one ``mixed_batch`` block per forward, with and without it.

Every ``lk.mixed_batch`` block starts by checking, per layer, that the cached stack of factors was built
from the factors as they are now (identity, storage, version and a content checksum
``Σ t·p``: see ``lorakit.layers.mixed_kernels.fingerprint``), so that writes through ``param.data`` and
``load_state_dict(assign=True)`` are seen. This measures that check where it costs most: a new block
for every forward. PEFT's anchor setting (``lorakit.compare.vs_peft.anchor_model``: LLaMA shape,
hidden 512, 4 layers, r=16 on all 7 projections), 4 adapters over 8 rows × 128 tokens, fp32, no grad.
Variants are interleaved call by call; each one's fastest call is kept (the machine is shared).

    python benchmarks/bench_mixed_check.py --out benchmarks/results/mixed_check_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

import lorakit as lk
import lorakit.layers.mixed_kernels as kernels
from lorakit.compare.vs_peft import TARGETS, _randomise_b, anchor_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randint(0, 8000, (8, 128), generator=torch.Generator().manual_seed(3))
    names = [["default", "a1", "a2", "a3"][i % 4] for i in range(8)]
    base, ours = anchor_model("base").eval(), anchor_model("lorakit").eval()
    for k in range(1, 4):
        lk.inject(ours, lk.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS), adapter_name=f"a{k}")
    _randomise_b(ours)
    check = kernels.check

    def mixed(checked: bool):
        kernels.check = check if checked else (lambda owner, sources: None)
        try:
            with lk.mixed_batch(ours, names):
                return ours(input_ids=x)
        finally:
            kernels.check = check

    fns = {"base": lambda: base(input_ids=x), "mixed4_checked": lambda: mixed(True),
           "mixed4_unchecked": lambda: mixed(False)}
    best = {k: float("inf") for k in fns}
    with torch.no_grad():
        for f in fns.values():
            f()
        for _ in range(args.rounds):
            for k, f in fns.items():
                for _ in range(3):
                    t = time.perf_counter()
                    f()
                    best[k] = min(best[k], time.perf_counter() - t)
    layers = [w for _, w in lk.adapters.wrappers(ours)]
    check_ms = float("inf")
    for _ in range(10):  # the check alone, every layer, as a block's start runs it (fastest of 10)
        t = time.perf_counter()
        for w in layers:
            check(w, w._stack_sources(["default", "a1", "a2", "a3"]))
        check_ms = min(check_ms, (time.perf_counter() - t) * 1000)
    result = {
        "device": platform.processor() or platform.machine(), "threads": args.threads, "torch": torch.__version__,
        "ms": {k: round(v * 1000, 2) for k, v in best.items()},
        "vs_base": {k: round(v / best["base"], 4) for k, v in best.items() if k != "base"},
        "check_all_layers_ms": round(check_ms, 2), "layers": len(layers),
        "check_vs_base_forward": round(check_ms / 1000 / best["base"], 4),
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
