"""Training at GPU speed (issue 12): lorakit vs PEFT vs the frozen-base floor, side by side in one run.

GPU parts (never in CI; the device is named in the JSON):

* ``train``: one LoRA train step at the 1.1B LLaMA shape (hidden 2048, 22 layers, MLP 5632, GQA 32/4,
  vocab 32000; bf16 base; r=16 on all 7 projections; batch 8 × 2048; HF forward with ``labels=``):
  lorakit at defaults (fp32 masters computed in bf16), PEFT at defaults (fp32 adapters, activations
  cast to fp32), both with bf16 adapters (matched dtypes), and the floor (frozen base, only the norms
  train); eager and ``torch.compile``; tokens/s and ``torch.cuda.max_memory_allocated``; interleaved.
* ``fit``: ``lorakit train``'s loop (``lorakit.fit``, base loaded in bf16 as it does on a bf16 GPU)
  vs ``transformers.Trainer`` + PEFT with the recipe PEFT's docs give (model loaded in bf16,
  ``bf16=True``), the same SFT data (256 examples, 64–768 prompt + 32–256 answer tokens, loss on
  the answer), batch 8, one epoch.

CPU proxy (``--proxy``, what to run where no GPU is lent; this CPU emulates bf16 matmuls, so time
means little): one train step on a bf16 base at a small LLaMA shape (hidden 512, 4 layers, MLP 1408,
vocab 8000, batch 4 × 256): peak tensor memory (torch.profiler allocation events: the CPU analogue of
``max_memory_allocated``) and step time, lorakit default vs PEFT default vs the floor.

    python benchmarks/bench_gpu.py train fit --out benchmarks/results/gpu_train.json   # on a GPU
    python benchmarks/bench_gpu.py --proxy --out benchmarks/results/gpu_proxy_cpu.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))

T7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES = {"1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                       num_key_value_heads=4, vocab_size=32000),
          "proxy": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                        num_key_value_heads=4, vocab_size=8000)}


def build(shape: str, device: str, kind: str, adapter_fp32: bool = True) -> torch.nn.Module:
    """The bf16 base, adapted by ``kind``: lorakit | peft | floor (only the norms train)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**SHAPES[shape], max_position_embeddings=4096))
    model.to(torch.bfloat16)
    model.config.use_cache = False
    if kind == "lorakit":
        import lorakit as lk

        lk.inject(model, lk.LoraConfig(r=16, lora_alpha=32, target_modules=T7), autocast_adapter_dtype=adapter_fp32)
    elif kind == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=T7,
                                                 task_type="CAUSAL_LM"), autocast_adapter_dtype=adapter_fp32)
    elif kind == "floor":
        for name, p in model.named_parameters():
            p.requires_grad_("norm" in name)
    return model


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def train_step(shape: str, device: str, kind: str, adapter_fp32: bool, bs: int, seq: int, steps: int,
               compiled: bool = False, warm: int = 3) -> dict:
    _free(device)
    model = build(shape, device, kind, adapter_fp32)
    params = [p for p in model.parameters() if p.requires_grad]
    run = torch.compile(model) if compiled else model
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device == "cuda")
    x = torch.randint(0, SHAPES[shape]["vocab_size"], (bs, seq), device=device)

    def step() -> float:
        loss = run(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    for _ in range(warm):
        step()
    _sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        peak = None
    else:
        from bench_train import peak_tensor_mb

        peak = peak_tensor_mb(step)[1] / 1024  # GiB of tensors live at the step's high-water mark
    t0 = time.perf_counter()
    best = float("inf")
    for _ in range(steps):
        t = time.perf_counter()
        step()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    mean = (time.perf_counter() - t0) / steps
    out = {"kind": kind, "adapter_fp32": adapter_fp32, "compiled": compiled, "bs": bs, "seq": seq,
           "step_ms": round(mean * 1e3, 1), "best_step_ms": round(best * 1e3, 1), "tok_s": round(bs * seq / mean),
           "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else peak, 3)}
    return out  # the model and optimizer go with this frame; the next run frees them first


def bench_train(device: str, shape: str, bs: int, seq: int, steps: int, compiled: bool) -> dict:
    runs = []
    for rnd in range(2):  # interleaved, two rounds in alternating order; each setting's best round counts
        kinds = [("lorakit", True), ("peft", True), ("lorakit", False), ("peft", False), ("floor", True)]
        for kind, fp32 in (kinds if rnd == 0 else kinds[::-1]):
            r = train_step(shape, device, kind, fp32, bs, seq, steps, compiled=compiled)
            r["round"] = rnd
            print(json.dumps(r), flush=True)
            runs.append(r)

    def best(kind: str, fp32: bool) -> dict:
        rs = [r for r in runs if r["kind"] == kind and r["adapter_fp32"] == fp32]
        return {"tok_s": max(r["tok_s"] for r in rs), "peak_gib": min(r["peak_gib"] for r in rs),
                "step_ms": min(r["step_ms"] for r in rs)}

    ours, theirs, floor = best("lorakit", True), best("peft", True), best("floor", True)
    matched_ours, matched_theirs = best("lorakit", False), best("peft", False)
    return {"runs": runs, "summary": {
        "defaults": {"lorakit": ours, "peft": theirs, "tok_s_vs_peft": round(ours["tok_s"] / theirs["tok_s"], 3),
                     "peak_vs_peft": round(ours["peak_gib"] / theirs["peak_gib"], 3),
                     "step_time_vs_peft": round(ours["step_ms"] / theirs["step_ms"], 3),
                     "tok_s_vs_floor": round(ours["tok_s"] / floor["tok_s"], 3)},
        "bf16_adapters": {"lorakit": matched_ours, "peft": matched_theirs,
                          "tok_s_vs_peft": round(matched_ours["tok_s"] / matched_theirs["tok_s"], 3),
                          "peak_vs_peft": round(matched_ours["peak_gib"] / matched_theirs["peak_gib"], 3)},
        "floor": floor}}


def sft_examples(n: int = 256, vocab: int = 32000) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        p, c = int(torch.randint(64, 768, (1,), generator=g)), int(torch.randint(32, 256, (1,), generator=g))
        ids = torch.randint(3, vocab, (p + c,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * p + ids[p:]})
    return out


def bench_fit(device: str, shape: str, kind: str) -> dict:
    """One epoch of SFT: lorakit.fit vs Trainer + PEFT (PEFT's docs recipe: model in bf16, bf16=True)."""
    from lorakit.data import TokenDataset, collate

    data = sft_examples(vocab=SHAPES[shape]["vocab_size"])
    tokens = sum(len(e["input_ids"]) for e in data)
    _free(device)
    if kind == "lorakit":
        from lorakit.train import TrainConfig, fit

        model = build(shape, device, "lorakit")
        cfg = TrainConfig(epochs=1, lr=1e-4, batch_size=8, bf16=False, progress=False, device=device, warmup_ratio=0.0)
        t0 = time.perf_counter()
        loss = fit(model, TokenDataset(data, "causal-lm", pad_id=0), None, cfg)["train_loss"]
    else:
        from transformers import Trainer, TrainingArguments

        model = build(shape, device, "peft")
        args = TrainingArguments(output_dir="/tmp/bench_gpu_trainer", per_device_train_batch_size=8, num_train_epochs=1,
                                 learning_rate=1e-4, lr_scheduler_type="cosine", bf16=True, save_strategy="no",
                                 report_to=[], logging_steps=10**6, remove_unused_columns=False, disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=data,
                          data_collator=lambda b: collate(b, "causal-lm", 0))
        t0 = time.perf_counter()
        loss = trainer.train().training_loss
    _sync(device)
    wall = time.perf_counter() - t0
    return {"kind": kind, "wall_s": round(wall, 1), "tok_s": round(tokens / wall),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if device == "cuda" else None,
            "loss": loss}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("parts", nargs="*", default=["train", "fit"], help="train, compile, fit (GPU)")
    p.add_argument("--proxy", action="store_true", help="the CPU proxy (small shape, peak tensor memory)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.proxy else "cpu"
    torch.set_num_threads(args.threads)
    import peft
    import transformers

    res = {"device": torch.cuda.get_device_name() if device == "cuda" else
           f"cpu ({platform.processor() or platform.machine()}, {args.threads} threads; bf16 matmuls emulated)",
           "torch": torch.__version__, "peft": peft.__version__, "transformers": transformers.__version__}
    if device == "cpu" and not args.proxy:
        raise SystemExit("no CUDA device: run on a GPU, or pass --proxy for the CPU proxy")
    if args.proxy:
        res["proxy"] = bench_train("cpu", "proxy", 4, 256, args.steps, compiled=False)
    for part in args.parts if not args.proxy else []:
        if part == "train":
            res["train"] = bench_train(device, "1.1b", 8, 2048, args.steps, compiled=False)
        elif part == "compile":
            res["compile"] = bench_train(device, "1.1b", 8, 2048, args.steps, compiled=True)
        elif part == "fit":
            runs = [bench_fit(device, "1.1b", k) for k in ("lorakit", "peft", "peft", "lorakit")]
            best = {k: max((r for r in runs if r["kind"] == k), key=lambda r: r["tok_s"]) for k in ("lorakit", "peft")}
            res["fit"] = {"runs": runs, "tok_s_vs_trainer": round(best["lorakit"]["tok_s"] / best["peft"]["tok_s"], 3),
                          "peak_vs_trainer": round(best["lorakit"]["peak_gib"] / best["peft"]["peak_gib"], 3)}
        print(json.dumps({part: res.get(part)}), flush=True)
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
