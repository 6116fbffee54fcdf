"""Padding-free packing (``TrainConfig.packing`` / ``lorakit train --packing``) against padded batches.

Same model as ``bench_train.py`` (random-init LLaMA shape: hidden 512, 4 layers, 8 heads / 4 KV
heads, MLP 1408, vocab 8000; LoRA r=16 on all seven projections), same variable-length SFT
examples (prompt 16..400 tokens, completion 16..200), batch 8, AdamW. Variants, interleaved in one
process, best of ``--rounds``:

- ``padded_random``: padded batches in random order (``group_by_length=False``);
- ``padded_grouped``: padded, length-grouped batches (lorakit's default);
- ``packed_<impl>``: each batch's examples end to end in one row, for each attention
  implementation in ``--attn`` (``sdpa``/``eager`` mask the packed row block-diagonally, so their
  attention spans the whole row; ``flex_attention`` computes each example's blocks only).

Throughput = non-padding tokens / wall time of the optimizer steps (``fit``'s own
``tokens_per_second``); the padding fraction is what the padded variants compute for nothing.

    python benchmarks/bench_packing.py [--rounds 3] [--threads 2] [--steps 12] [--attn sdpa,eager]

Writes benchmarks/results/bench_packing_cpu.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_train import TARGETS, examples  # noqa: E402  (same data as the training-loop benchmark)


def build(impl: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import lorakit as lk

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=4, vocab_size=8000, max_position_embeddings=1024, use_cache=False)
    model = LlamaForCausalLM(cfg)
    model.set_attn_implementation(impl)
    lk.inject(model, lk.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
    return model


def padding_fraction(ds, batch_size: int, grouped: bool, steps: int) -> float:
    from lorakit.data.dataset import batch_order

    lengths = ds.lengths()
    batches = batch_order(lengths, batch_size, 0, 0, grouped)[:steps]
    real = sum(lengths[i] for b in batches for i in b)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 1 - real / padded


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--attn", default="sdpa,eager", help="attention implementations for the packed variants")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "bench_packing_cpu.json"))
    args = ap.parse_args()

    import torch

    from lorakit.data.dataset import TokenDataset
    from lorakit.train.config import TrainConfig
    from lorakit.train.loop import fit

    torch.set_num_threads(args.threads)
    n = args.steps * args.batch_size
    ds = TokenDataset(examples(n), "causal-lm", pad_id=0)
    variants = {"padded_random": ("sdpa", False, False), "padded_grouped": ("sdpa", True, False),
                **{f"packed_{a}": (a, True, True) for a in args.attn.split(",") if a}}
    best: dict[str, float] = {}
    for r in range(args.rounds):
        for name, (impl, grouped, packing) in variants.items():
            model = build(impl)
            cfg = TrainConfig(max_steps=args.steps, batch_size=args.batch_size, lr=1e-4, progress=False,
                              group_by_length=grouped, packing=packing, device="cpu", seed=0)
            out = fit(model, ds, None, cfg)
            best[name] = max(best.get(name, 0.0), out["tokens_per_second"])
            print(f"round {r} {name}: {out['tokens_per_second']:.0f} tok/s", file=sys.stderr, flush=True)
    result = {
        "device": f"cpu ({platform.machine()}, {args.threads} threads)", "torch": torch.__version__,
        "setting": {"model": "LLaMA shape hidden 512, 4 layers, MLP 1408, vocab 8000; LoRA r=16 on 7 projections",
                    "examples": n, "batch_size": args.batch_size, "steps": args.steps, "rounds": args.rounds,
                    "mean_length": sum(ds.lengths()) / n},
        "padding_fraction": {"random": round(padding_fraction(ds, args.batch_size, False, args.steps), 3),
                             "grouped": round(padding_fraction(ds, args.batch_size, True, args.steps), 3)},
        "tokens_per_second": {k: round(v) for k, v in best.items()},
        "vs_padded_grouped": {k: round(v / best["padded_grouped"], 3) for k, v in best.items()},
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
