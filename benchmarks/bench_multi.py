"""Many adapters at once (issue 13): cost relative to the base model, lorakit vs PEFT in one process.

The CPU proxy of the issue's H100 table: a LLaMA-shaped model from a config (hidden 256, 4 layers,
8 heads / 4 KV heads, MLP 704, vocabulary 8000, fp32), 32 adapters r=16 on all 7 projections (B
random, so no adapter is a no-op), 32 rows. Prefill: one forward of 32 × 64 tokens. Decoding:
greedy ``generate`` of 16 tokens after a 64-token prompt, KV cache on. Rows of the table:

    one adapter unmerged | mixed batch, 4 adapters | mixed batch, 32 adapters | decoding, 32 adapters | merged

each as (its time) / (the base model's time for the same work). Timings interleave the variants call
by call and keep each one's fastest call (the machine is shared); ``vs_base`` uses wall time,
``vs_base_cpu_time`` the process CPU time (which time-slicing by other processes does not inflate).
On a GPU (``--device cuda``) the same script runs the same shapes in the chosen dtype. Results: JSON
(device named) on stdout and in ``--out``.

    python benchmarks/bench_multi.py --out benchmarks/results/multi_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import lorakit as lk  # noqa: E402
from lorakit.compare.vs_peft import _best_of  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def base_model(dtype: torch.dtype, device: str, hidden: int, layers: int, vocab: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=4, vocab_size=vocab, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()


def randomise_b(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_((torch.randn(p.shape, generator=g) * 0.01).to(p.device, p.dtype))


def adapted(base: torch.nn.Module, lib: str, n: int) -> tuple[torch.nn.Module, list[str]]:
    model = copy.deepcopy(base)
    names = ["default"] + [f"a{k}" for k in range(1, n)]
    if lib == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
        for name in names[1:]:
            model.add_adapter(name, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
    else:
        for name in names:
            lk.inject(model, lk.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS), adapter_name=name)
    randomise_b(model)
    return model.eval(), names


@torch.no_grad()
def run(args: argparse.Namespace) -> dict:
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    base = base_model(dtype, args.device, args.hidden, args.layers, args.vocab)
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, args.vocab, (args.rows, args.prefill), generator=g).to(args.device)
    prompt = torch.randint(0, args.vocab, (args.rows, args.prompt), generator=g).to(args.device)
    gen = dict(max_new_tokens=args.decode, min_new_tokens=args.decode, do_sample=False, pad_token_id=0,
               use_cache=True)
    models = {lib: adapted(base, lib, args.adapters) for lib in args.libs}
    fns, decode = {"base": lambda: base(input_ids=x)}, {"base": lambda: base.generate(input_ids=prompt, **gen)}
    for lib, (m, names) in models.items():
        rows4 = [names[i % 4] for i in range(args.rows)]
        rows_all = [names[i % len(names)] for i in range(args.rows)]
        if lib == "peft":
            fns[f"{lib}_unmerged"] = lambda m=m: m(input_ids=x)
            fns[f"{lib}_mixed4"] = lambda m=m, r=rows4: m(input_ids=x, adapter_names=r)
            fns[f"{lib}_mixed_all"] = lambda m=m, r=rows_all: m(input_ids=x, adapter_names=r)
            decode[f"{lib}_mixed_all"] = lambda m=m, r=rows_all: m.generate(input_ids=prompt, adapter_names=r, **gen)
        else:
            def mixed(rows, m=m):
                with lk.mixed_batch(m, rows):
                    return m(input_ids=x)

            def mixed_gen(rows, m=m):
                with lk.mixed_batch(m, rows):
                    return m.generate(input_ids=prompt, **gen)

            fns[f"{lib}_unmerged"] = lambda m=m: m(input_ids=x)
            fns[f"{lib}_mixed4"] = lambda r=rows4, f=mixed: f(r)
            fns[f"{lib}_mixed_all"] = lambda r=rows_all, f=mixed: f(r)
            decode[f"{lib}_mixed_all"] = lambda r=rows_all, f=mixed_gen: f(r)
    if "lorakit" in models:
        merged = lk.merge_and_unload(copy.deepcopy(models["lorakit"][0]), ["default"])
        fns["lorakit_merged"] = lambda: merged(input_ids=x)
    t0 = time.time()
    prefill_ms = _best_of(fns, args.rounds, 1)
    decode_ms = _best_of(decode, args.rounds, 1)
    cpu = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    out = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else cpu,
        "torch": torch.__version__, "dtype": args.dtype,
        "setting": {k: getattr(args, k) for k in ("hidden", "layers", "vocab", "adapters", "rows", "prefill",
                                                  "prompt", "decode", "rounds")},
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "prefill_ms": {k: round(v, 3) for k, v in prefill_ms.items() if not k.endswith("@cpu")},
        "decode_ms": {k: round(v, 3) for k, v in decode_ms.items() if not k.endswith("@cpu")},
        "seconds": round(time.time() - t0, 1),
    }
    for suffix, label in (("", "vs_base"), ("@cpu", "vs_base_cpu_time")):  # wall time; process CPU time
        b, d = prefill_ms["base" + suffix], decode_ms["base" + suffix]
        out[label] = {k.removesuffix(suffix): round(v / b, 3) for k, v in prefill_ms.items()
                      if k != "base" + suffix and k.endswith(suffix) and (suffix or not k.endswith("@cpu"))}
        out[label].update({f"{k.removesuffix(suffix)}_decode": round(v / d, 3) for k, v in decode_ms.items()
                           if k != "base" + suffix and k.endswith(suffix) and (suffix or not k.endswith("@cpu"))})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--adapters", type=int, default=32)
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--prefill", type=int, default=64)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--decode", type=int, default=16)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--libs", default="lorakit,peft", type=lambda v: v.split(","))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    result = run(args)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
