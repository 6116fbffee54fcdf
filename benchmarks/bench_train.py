"""lorakit's training loop vs transformers.Trainer + PEFT on the same causal-LM SFT job.

Same model (random-init LLaMA shape of ../shared/anchors/peft_cpu_anchor.py: hidden 512, 4 layers,
8 heads / 4 KV heads, MLP 1408, vocab 8000), same LoRA (r=16, alpha 32, all seven projections),
same tokenized examples (variable-length prompt/completion pairs, loss on the completion), same
hyperparameters (AdamW lr 1e-4, batch 4, 1 epoch, cosine, clip 1.0). Each run is a fresh
subprocess, so its resident-memory high-water mark (``ru_maxrss``) is its own; the two kinds
alternate, several rounds, and the best round of each counts.

Throughput = non-padding tokens processed / wall time of the training call.

Memory, three ways (all reported):
- peak tensor memory: the high-water mark of CPU tensor bytes allocated during the training call,
  from torch.profiler's allocation events (one extra profiled run per kind) — what
  ``torch.cuda.max_memory_allocated`` reports on a GPU, and what the training loop controls;
- peak RSS of the whole process (includes Python, torch, transformers and the model: ~475 MB
  common to both before training starts);
- peak RSS growth during the training call (adds malloc's free-but-kept pages to the tensors).

    python benchmarks/bench_train.py [--rounds 3] [--threads 2] [--examples 64]

Writes benchmarks/results/bench_train.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
HP = {"lr": 1e-4, "batch_size": 4, "epochs": 1, "max_grad_norm": 1.0, "seed": 0}


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def examples(n: int, seed: int = 0) -> list[dict]:
    """Prompt 16..400 chars, completion 16..200 chars of random text (char tokenizer: 1 char = 1 token)."""
    import torch

    from lorakit.models import char_tokenizer

    tok = char_tokenizer()
    g = torch.Generator().manual_seed(seed)
    letters = "abcdefghijklmnopqrstuvwxyz "
    out = []
    for _ in range(n):
        lp, lc = int(torch.randint(16, 400, (1,), generator=g)), int(torch.randint(16, 200, (1,), generator=g))
        text = "".join(letters[int(i)] for i in torch.randint(0, len(letters), (lp + lc,), generator=g))
        p = [tok.bos_token_id] + tok(text[:lp], add_special_tokens=False)["input_ids"]
        c = tok(text[lp:], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        out.append({"input_ids": p + c, "labels": [-100] * len(p) + c})
    return out


def build_model():
    from lorakit.models import tiny_llama

    model, tok = tiny_llama(hidden_size=512, num_layers=4, vocab_size=8000, intermediate_size=1408, num_heads=8,
                            num_kv_heads=4, seed=0)
    return model, tok


def peak_tensor_mb(run) -> tuple[object, float]:
    """Run ``run()`` under torch.profiler with memory profiling; return its result and the peak of
    CPU tensor bytes allocated and not yet freed during the call (the CPU analogue of CUDA's
    ``max_memory_allocated`` minus what was allocated before), in MB."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = run()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return out, peak / 2**20


def worker(kind: str, n: int, threads: int, profile_memory: bool = False) -> dict:
    import torch

    torch.set_num_threads(threads)
    from lorakit.data import TokenDataset, collate

    data = examples(n)
    model, tok = build_model()
    real_tokens = sum(len(e["input_ids"]) for e in data) * HP["epochs"]
    if kind == "lorakit":
        import lorakit as lk
        from lorakit.train import TrainConfig, fit

        lk.inject(model, lk.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
        ds = TokenDataset(data, "causal-lm", pad_id=tok.pad_token_id)
        cfg = TrainConfig(epochs=HP["epochs"], lr=HP["lr"], batch_size=HP["batch_size"], warmup_ratio=0.0,
                          max_grad_norm=HP["max_grad_norm"], seed=HP["seed"], progress=False, device="cpu")
        base = rss_mb()
        t0 = time.perf_counter()
        m, tensor_peak = (peak_tensor_mb(lambda: fit(model, ds, None, cfg)) if profile_memory
                          else (fit(model, ds, None, cfg), None))
        wall = time.perf_counter() - t0
        loss = m["train_loss"]
    else:
        from peft import LoraConfig, get_peft_model
        from transformers import Trainer, TrainingArguments
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS,
                                                 task_type="CAUSAL_LM"))
        args = TrainingArguments(output_dir=os.path.join("/tmp", f"bench_trainer_{os.getpid()}"),
                                 per_device_train_batch_size=HP["batch_size"], num_train_epochs=HP["epochs"],
                                 learning_rate=HP["lr"], lr_scheduler_type="cosine", warmup_steps=0,
                                 max_grad_norm=HP["max_grad_norm"], seed=HP["seed"], logging_steps=10_000,
                                 save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
                                 remove_unused_columns=False, disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=data,
                          data_collator=lambda b: collate(b, "causal-lm", tok.pad_token_id))
        base = rss_mb()
        t0 = time.perf_counter()
        out, tensor_peak = peak_tensor_mb(trainer.train) if profile_memory else (trainer.train(), None)
        wall = time.perf_counter() - t0
        loss = out.training_loss
    if profile_memory:  # the profiler slows the run: report only the memory figure
        return {"kind": kind, "peak_tensor_mb": tensor_peak, "train_loss": loss}
    return {"kind": kind, "wall_s": wall, "tokens_per_second": real_tokens / wall, "peak_rss_mb": rss_mb(),
            "rss_before_train_mb": base, "train_peak_delta_mb": rss_mb() - base, "train_loss": loss,
            "threads": threads, "loadavg_1m_at_end": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("THREADS", "2")))
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--worker", choices=["lorakit", "trainer"], help=argparse.SUPPRESS)
    ap.add_argument("--profile-memory", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "bench_train.json"))
    a = ap.parse_args()
    sys.path.insert(0, os.path.join(ROOT, "src"))
    if a.worker:
        print(json.dumps(worker(a.worker, a.examples, a.threads, a.profile_memory)))
        return
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src"), "HF_HUB_OFFLINE": "1"}

    def run(kind: str, *extra: str) -> dict:
        res = subprocess.run([sys.executable, __file__, "--worker", kind, "--examples", str(a.examples),
                              "--threads", str(a.threads), *extra], env=env, capture_output=True, text=True, check=True)
        out = json.loads(res.stdout.strip().splitlines()[-1])
        print(json.dumps(out), flush=True)
        return out

    runs = [{"round": r, **run(kind)} for r in range(a.rounds)
            for kind in (("lorakit", "trainer") if r % 2 == 0 else ("trainer", "lorakit"))]
    tensor_peak = {kind: run(kind, "--profile-memory")["peak_tensor_mb"] for kind in ("lorakit", "trainer")}
    best = {k: max((x for x in runs if x["kind"] == k), key=lambda x: x["tokens_per_second"])
            for k in ("lorakit", "trainer")}
    low = {k: min(x["peak_rss_mb"] for x in runs if x["kind"] == k) for k in best}
    low_delta = {k: min(x["train_peak_delta_mb"] for x in runs if x["kind"] == k) for k in best}
    import peft
    import torch
    import transformers

    summary = {
        "job": {"model": "LlamaForCausalLM hidden 512, 4 layers, 8/4 heads, MLP 1408, vocab 8000 (random init)",
                "lora": "r=16 alpha=32 on q,k,v,o,gate,up,down", "examples": a.examples, **HP,
                "note": "lorakit: length-grouped batches, logits only at completion positions, chunked CE; "
                        "Trainer: its defaults (random batches, full logits), same collate/padding"},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        "threads": a.threads, "rounds": a.rounds, "runs": runs,
        "best_tokens_per_second": {k: v["tokens_per_second"] for k, v in best.items()},
        "throughput_ratio": best["lorakit"]["tokens_per_second"] / best["trainer"]["tokens_per_second"],
        "min_peak_rss_mb": low, "peak_rss_ratio": low["lorakit"] / low["trainer"],
        "peak_tensor_mb": tensor_peak, "peak_tensor_ratio": tensor_peak["lorakit"] / tensor_peak["trainer"],
        "min_train_peak_delta_mb": low_delta,
        "train_peak_delta_ratio": low_delta["lorakit"] / max(low_delta["trainer"], 1e-9),
    }
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps({k: summary[k] for k in ("best_tokens_per_second", "throughput_ratio", "peak_tensor_mb",
                                               "peak_tensor_ratio", "min_peak_rss_mb",
                                               "peak_rss_ratio", "min_train_peak_delta_mb", "train_peak_delta_ratio")},
                     indent=1))


if __name__ == "__main__":
    main()
