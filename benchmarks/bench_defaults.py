"""Do the evidence-based LoRA defaults help on the embedded task? Measured on a validation split.

"LoRA without regret" (Schulman et al., Thinking Machines Lab, 2025) recommends adapting all linear
layers (the MLPs above all) and a learning rate about 10x full fine-tuning's; LoRA+ (Hayou et al.,
2024) gives ``lora_B`` a larger learning rate (ratio ~16). Each candidate changes one thing of the
default job (pretrained MiniLM on VADER words, LoRA r=8 alpha 16 on query,value + the head, 5 epochs,
batch 16, lr 1e-3 with warm-up + cosine) and is trained with the same seeds.

The decision data is a validation split carved from the *training* words (1,000 words, seeded), so the
test words never choose a recipe; the test accuracy of each run is recorded too, for information.

    PYTHONPATH=src python benchmarks/bench_defaults.py [--seeds 0,1] [--only "all-linear|LoRA+ ratio 16"]

Writes benchmarks/results/defaults_embedded.json after every run (an interrupted run keeps its rows).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time

import torch

# name -> (LoRA config changes, TrainConfig changes)
CANDIDATES: dict[str, tuple[dict, dict]] = {
    "baseline (q,v; lr 1e-3)": ({}, {}),
    "all-linear": ({"target_modules": "all-linear"}, {}),
    "lr 5e-4 (10x full FT's 5e-5)": ({}, {"lr": 5e-4}),
    "all-linear, lr 5e-4": ({"target_modules": "all-linear"}, {"lr": 5e-4}),
    "LoRA+ ratio 16": ({}, {"loraplus_lr_ratio": 16.0}),
    "all-linear, LoRA+ ratio 16": ({"target_modules": "all-linear"}, {"loraplus_lr_ratio": 16.0}),
    "all-linear, LoRA+ ratio 4": ({"target_modules": "all-linear"}, {"loraplus_lr_ratio": 4.0}),
}
VAL_SIZE = 1000
VAL_SEED = 1234  # the validation words: carved from the training words only


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--only", default=None, help="candidate names, separated by '|' (names hold commas)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/defaults_embedded.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    import lorakit as lk
    from lorakit.data import classification_dataset, vader_split
    from lorakit.data.builtin import LABELS
    from lorakit.models import load_model
    from lorakit.train import TrainConfig, evaluate, fit
    from lorakit.train.task import DEFAULT_MAX_LENGTH, default_lora_config

    train_recs, test_recs = vader_split()
    perm = torch.randperm(len(train_recs), generator=torch.Generator().manual_seed(VAL_SEED)).tolist()
    val_recs = [train_recs[i] for i in perm[:VAL_SIZE]]
    fit_recs = [train_recs[i] for i in perm[VAL_SIZE:]]
    seeds = [int(s) for s in args.seeds.split(",")]
    wanted = None if args.only is None else [o.strip() for o in args.only.split("|")]
    unknown = [o for o in wanted or [] if o not in CANDIDATES]
    if unknown:
        raise SystemExit(f"unknown candidate(s) {unknown}; valid: {list(CANDIDATES)}")
    names = [n for n in CANDIDATES if wanted is None or n in wanted]
    rows: list[dict] = []
    src = "vaderSentiment/vader_lexicon.txt"

    def write() -> None:
        summary = {}
        for n in names:
            accs = [r["val_accuracy"] for r in rows if r["candidate"] == n]
            tests = [r["test_accuracy"] for r in rows if r["candidate"] == n]
            if accs:
                summary[n] = {"val_accuracy_mean": statistics.mean(accs), "test_accuracy_mean": statistics.mean(tests),
                              "seeds": len(accs)}
        out = {
            "command": "PYTHONPATH=src python benchmarks/bench_defaults.py --seeds " + args.seeds
                       + (f" --only {args.only}" if args.only else ""),
            "task": f"pretrained all-MiniLM-L6-v2 + 2-way head on VADER words; {len(fit_recs)} training words, "
                    f"{len(val_recs)} validation words carved from the training split (seed {VAL_SEED}), "
                    f"{len(test_recs)} test words (recorded, not used to decide)",
            "recipe": "LoRA r=8 alpha 16 + head, 5 epochs, batch 16, AdamW, warm-up 6% + cosine, clip 1.0; "
                      "each candidate changes what its name says",
            "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, shared with other jobs "
                       f"(times are not comparable), torch {torch.__version__}",
            "summary": summary, "runs": rows,
        }
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2)

    for seed in seeds:
        base, tok = load_model("minilm", "seq-cls", label_names=LABELS, seed=seed)
        fit_ds = classification_dataset(fit_recs, tok, src, label_names=LABELS, max_length=DEFAULT_MAX_LENGTH)
        val_ds = classification_dataset(val_recs, tok, src, label_names=LABELS, max_length=DEFAULT_MAX_LENGTH)
        test_ds = classification_dataset(test_recs, tok, src, label_names=LABELS, max_length=DEFAULT_MAX_LENGTH)
        for name in names:
            lora_kw, train_kw = CANDIDATES[name]
            model = copy.deepcopy(base)
            cfg = default_lora_config()
            cfg = lk.LoraConfig(**{**{k: getattr(cfg, k) for k in ("r", "lora_alpha", "target_modules",
                                                                      "modules_to_save")}, **lora_kw})
            lk.inject(model, cfg)
            tcfg = TrainConfig(**{"seed": seed, "progress": False, **train_kw})
            t0 = time.perf_counter()
            metrics = fit(model, fit_ds, val_ds, tcfg)
            test = evaluate(model, test_ds)
            rows.append({"candidate": name, "seed": seed, "val_accuracy": 100 * metrics["eval_accuracy"],
                         "val_loss": metrics["eval_loss"], "test_accuracy": 100 * test["eval_accuracy"],
                         "trainable_params": metrics["trainable_params"], "lr": tcfg.lr,
                         "loraplus_lr_ratio": tcfg.loraplus_lr_ratio, "target_modules": cfg.target_modules,
                         "wall_seconds": time.perf_counter() - t0})
            print(f"{name:32s} seed={seed} val={rows[-1]['val_accuracy']:.1f} test={rows[-1]['test_accuracy']:.1f} "
                  f"({rows[-1]['wall_seconds']:.0f}s)", flush=True)
            write()


if __name__ == "__main__":
    main()
