"""Memory of one QLoRA train step: lorakit on a 4-bit base vs lorakit bf16 LoRA vs PEFT's QLoRA.

Model: the 1.1B LLaMA shape (TinyLlama: hidden 2048, 22 layers, MLP 5632, 32 heads / 4 KV heads,
vocab 32000), random init, written once as a bf16 checkpoint. Each kind runs in a fresh subprocess:

- ``qlora``: loaded through BitsAndBytesConfig (NF4, double quant, bf16 compute; the rest bf16),
  ``lorakit.models.quantized.prepare_for_kbit_training`` (norms and head fp32, embeddings bf16), lorakit LoRA;
- ``lora_bf16``: the same checkpoint in bf16, lorakit LoRA (fp32 master factors, computed in bf16);
- ``peft_qlora``: the same 4-bit load, ``peft.prepare_model_for_kbit_training`` (every non-quantized
  parameter fp32, embeddings included; gradient checkpointing off like the others), PEFT LoRA.

LoRA r=16, alpha 32 on q,k,v,o,gate,up,down; one train step = forward with ``labels`` (the model's
own loss), backward, AdamW step (its state created in this step), on ``--batch`` × ``--seq`` random
tokens. Measured:

- weights' bytes on the device (``lorakit.models.quantized.weight_bytes``: 4-bit codes + statistics, and
  everything else: embeddings, norms, head, LoRA factors);
- peak tensor memory of the step: on CPU, the high-water mark of tensor bytes allocated during the
  step (torch.profiler allocation events) plus the bytes live before it (weights) — what
  ``torch.cuda.max_memory_allocated`` reports on a GPU, which is used there instead;
- the process's peak RSS after loading, before the step and at the end, and the step's wall time
  (informative: the CPU profiler slows the step and keeps its own event records in RSS).

    python benchmarks/bench_qlora.py [--layers 22] [--seq 256] [--batch 1] [--threads 2] [--device cpu]

Writes benchmarks/results/bench_qlora_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPE = {"hidden_size": 2048, "intermediate_size": 5632, "num_attention_heads": 32, "num_key_value_heads": 4,
         "vocab_size": 32000}
KINDS = ("qlora", "lora_bf16", "peft_qlora")
MB = 2**20


def write_checkpoint(directory: str, layers: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**SHAPE, num_hidden_layers=layers, max_position_embeddings=2048, tie_word_embeddings=False)
    model = LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(directory)


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or "cpu"
    return f"{name} ({os.cpu_count()} cores visible)"


def load(kind: str, ckpt: str, device: str):
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if kind == "lora_bf16":
        return AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16, device_map={"": device})
    from lorakit.models.quantized import load_kwargs

    return AutoModelForCausalLM.from_pretrained(ckpt, **load_kwargs("nf4", "causal-lm", device))


def worker(kind: str, ckpt: str, device: str, seq: int, batch: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from bench_train import peak_tensor_mb

    from lorakit.models.quantized import prepare_for_kbit_training, weight_bytes

    def rss() -> float:  # the process's peak resident set so far, MB
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    t0 = time.perf_counter()
    model = load(kind, ckpt, device)
    load_s, rss_load = time.perf_counter() - t0, rss()
    if kind == "peft_qlora":
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, task_type="CAUSAL_LM"))
    else:
        import lorakit as lk

        if kind == "qlora":
            prepare_for_kbit_training(model)
        lk.inject(model, lk.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
    model.config.use_cache = False
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    x = torch.randint(0, SHAPE["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    weights = weight_bytes(model)
    rss_ready = rss()

    def step() -> float:
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    t1 = time.perf_counter()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        loss = step()
        torch.cuda.synchronize()
        peak_total = torch.cuda.max_memory_allocated() / MB
        step_peak = peak_total - before / MB
    else:
        loss, step_peak = peak_tensor_mb(step)
        peak_total = weights["total"] / MB + step_peak
    return {"kind": kind, "load_s": load_s, "step_s": time.perf_counter() - t1, "loss": loss,
            "trainable_params": sum(p.numel() for p in params),
            "weights_mb": {k: v / MB for k, v in weights.items()},
            "step_peak_above_weights_mb": step_peak, "peak_tensor_mb": peak_total,
            "peak_rss_after_load_mb": rss_load, "peak_rss_before_step_mb": rss_ready, "peak_rss_mb": rss(),
            "loadavg_1m_at_end": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=22, help="decoder layers (22: the 1.1B shape)")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--worker", choices=KINDS, help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    sys.path.insert(0, os.path.join(ROOT, "src"))
    if a.worker:
        print(json.dumps(worker(a.worker, a.ckpt, a.device, a.seq, a.batch, a.threads)))
        return
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src"), "HF_HUB_OFFLINE": "1"}
    tmp = tempfile.mkdtemp(prefix="bench_qlora_")
    try:
        t0 = time.perf_counter()
        write_checkpoint(tmp, a.layers)
        print(f"checkpoint written in {time.perf_counter() - t0:.0f} s", flush=True)
        runs = {}
        for kind in a.kinds.split(","):
            res = subprocess.run([sys.executable, __file__, "--worker", kind, "--ckpt", tmp, "--device", a.device,
                                  "--seq", str(a.seq), "--batch", str(a.batch), "--threads", str(a.threads)],
                                 env=env, capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(f"{kind} failed:\n{res.stderr[-3000:]}")
            runs[kind] = json.loads(res.stdout.strip().splitlines()[-1])
            print(json.dumps(runs[kind]), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    import bitsandbytes
    import peft
    import torch
    import transformers

    summary = {
        "device": device_name(a.device), "threads": a.threads if a.device == "cpu" else None,
        "model": {**SHAPE, "num_hidden_layers": a.layers, "note": "LLaMA 1.1B shape (TinyLlama) when 22 layers"},
        "lora": "r=16 alpha=32 on q,k,v,o,gate,up,down", "step": {"batch": a.batch, "seq": a.seq, "optimizer": "AdamW"},
        "memory_method": "torch.cuda.max_memory_allocated" if a.device.startswith("cuda") else
        "torch.profiler allocation events during the step + bytes of the weights live before it",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                     "bitsandbytes": bitsandbytes.__version__},
        "runs": runs,
    }
    if "qlora" in runs:
        q = runs["qlora"]
        summary["ratios"] = {f"{k}_over_qlora_peak": runs[k]["peak_tensor_mb"] / q["peak_tensor_mb"]
                             for k in runs if k != "qlora"}
        summary["ratios"].update({f"{k}_over_qlora_weights": runs[k]["weights_mb"]["total"] / q["weights_mb"]["total"]
                                  for k in runs if k != "qlora"})
    out = a.out or os.path.join(HERE, "results", f"bench_qlora_{a.device.split(':')[0]}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary.get("ratios", {}), indent=1))


if __name__ == "__main__":
    main()
