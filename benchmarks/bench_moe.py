"""LoRA on MoE fused experts: lorakit's routed LoRA vs PEFT 0.21's W + ΔW, side by side in one process.

Model: Qwen3-MoE (transformers v5 fused experts), hidden 256, 2 layers, 64 experts of
moe_intermediate_size 256, top-2, 4 heads / 2 KV heads (head_dim 64), vocab ``--vocab`` (1024), random
init (seed 0). LoRA r=16, alpha=32 on ``mlp.experts.gate_up_proj`` and ``mlp.experts.down_proj``
(``target_parameters``), the same random factors in both libraries (B != 0). One train step = forward
with ``labels`` (the model's loss), backward, AdamW step, on 4 × 128 random tokens. Three models:

- ``base``: no adapter, every weight frozen; the embedding output requires grad
  (``enable_input_require_grads``) so that backward runs through every layer as in the adapted steps;
- ``lorakit`` and ``peft``: the adapted model (also with ``enable_input_require_grads``, for the same
  backward).

Measured, per experts implementation (``--impls``: the model's ``grouped_mm`` default and ``eager``):

- peak tensor bytes of one step (AdamW state created in it): the high-water mark of CPU tensor bytes
  allocated during the step (torch.profiler memory events; ``benchmarks/bench_train.peak_tensor_mb``);
  ``extra`` = an adapted step's peak minus the base step's, compared with PEFT's extra and with the fp32
  bytes of the adapted expert weights; the same for forward + backward alone (no optimizer: the
  LoRA computation's own cost); the largest single allocation of the step (vs one expert stack);
- step time: ``--steps`` steps per model, the three models interleaved step by step, wall-clock and
  process CPU time, min and median (reported as ratios to the base step taken side by side: the
  machine is shared, so single steps vary by 2-3x; the min is the least disturbed step);
- outputs and gradients: logits and every factor's gradient of one step, lorakit vs PEFT (relative
  error norms); files: lorakit's adapter loaded by PEFT and PEFT's by lorakit, same logits, same keys.

    PYTHONPATH=src python benchmarks/bench_moe.py [--threads 2] [--steps 5] [--impls grouped_mm,eager]
    # on a GPU, the Qwen3-30B-A3B experts (not run yet: no GPU was available):
    PYTHONPATH=src python benchmarks/bench_moe.py --device cuda --dtype bfloat16 --shape qwen3-30b-a3b \
        --layers 4 --impls grouped_mm --out benchmarks/results/bench_moe_cuda_30b.json

Writes benchmarks/results/bench_moe_<device>.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
MB = 2**20


SHAPES = {  # Qwen3-MoE configurations: the CPU shape, and Qwen3-30B-A3B's experts (GPU)
    "issue": dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64, intermediate_size=512,
                  moe_intermediate_size=256, num_experts=64, num_experts_per_tok=2),
    "qwen3-30b-a3b": dict(hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                          intermediate_size=6144, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8),
}


def build(shape: str, layers: int, vocab: int, dtype: str, device: str):
    import torch
    import transformers as tf

    cfg = tf.Qwen3MoeConfig(**SHAPES[shape], num_hidden_layers=layers, vocab_size=vocab, max_position_embeddings=4096)
    torch.manual_seed(0)
    return tf.Qwen3MoeForCausalLM(cfg).to(device=device, dtype=getattr(torch, dtype))


def peak_mb(run, device: str) -> tuple[object, float]:
    """``run()``'s result and the high-water mark of tensor bytes it allocated, MB (CPU: profiler
    allocation events; CUDA: ``max_memory_allocated`` minus what was allocated before)."""
    import torch
    from bench_train import peak_tensor_mb

    if not device.startswith("cuda"):
        return peak_tensor_mb(run)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = run()
    torch.cuda.synchronize()
    return out, (torch.cuda.max_memory_allocated() - before) / MB


def adapted(base, kind: str):
    """(model, its trainable parameters by lorakit name); PEFT's factors random (init_lora_weights=False)."""
    import peft

    import lorakit as lk

    model = copy.deepcopy(base)
    if kind == "base":
        model.requires_grad_(False)
    elif kind == "peft":
        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_parameters=TARGETS,
                                                           init_lora_weights=False))
    else:
        lk.inject(model, lk.LoraConfig(r=16, lora_alpha=32, target_parameters=TARGETS))
    model.enable_input_require_grads()
    model.config.use_cache = False
    model.train()
    params = {n.removeprefix("base_model.model."): p for n, p in model.named_parameters() if p.requires_grad}
    return model, params


def copy_factors(src: dict, dst: dict) -> None:
    import torch

    assert src.keys() == dst.keys(), (sorted(src)[:4], sorted(dst)[:4])
    with torch.no_grad():
        for k in src:
            dst[k].copy_(src[k])


def rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def step_fn(model, params: dict, ids):
    import torch

    opt = torch.optim.AdamW(list(params.values()) or [torch.nn.Parameter(torch.zeros(1))], lr=1e-4)

    def step() -> float:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def largest_allocation(run) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    return max((e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), default=0)


def parity(base, ids) -> dict:
    """lorakit vs PEFT on the same random factors: logits, factor gradients, files both ways."""
    import peft
    import torch
    from safetensors.torch import load_file

    import lorakit as lk

    ref, ref_params = adapted(base, "peft")
    ours, our_params = adapted(base, "lorakit")
    copy_factors(ref_params, our_params)
    out = {}
    for model in (ref, ours):
        model(input_ids=ids, labels=ids).loss.backward()
    with torch.no_grad():
        ref.eval(), ours.eval()
        a, b = ours(input_ids=ids).logits, ref(input_ids=ids).logits
    out["logits_rel_err"] = rel(a, b)
    out["grad_rel_err_max"] = max(rel(our_params[k].grad, ref_params[k].grad) for k in ref_params)
    with tempfile.TemporaryDirectory() as d:
        lk.save_adapter(ours, os.path.join(d, "lk"))
        ref.save_pretrained(os.path.join(d, "peft"))
        mine, theirs = (load_file(os.path.join(d, x, "adapter_model.safetensors")) for x in ("lk", "peft"))
        out["file_keys_equal"] = mine.keys() == theirs.keys()
        out["file_tensors_equal"] = out["file_keys_equal"] and all(torch.equal(mine[k], theirs[k]) for k in mine)
        with torch.no_grad():
            in_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), os.path.join(d, "lk")).eval()
            out["lorakit_file_in_peft_logits_rel_err"] = rel(in_peft(input_ids=ids).logits, a)
            in_lk = lk.load_adapter(copy.deepcopy(base), os.path.join(d, "peft")).eval()
            out["peft_file_in_lorakit_logits_rel_err"] = rel(in_lk(input_ids=ids).logits, b)
    return out


def measure(base, impl: str, ids, steps: int) -> dict:
    import torch

    from lorakit.layers.experts import ExpertsWrapper

    device = str(ids.device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    base = copy.deepcopy(base)
    base.set_experts_implementation(impl)
    experts_bytes = sum(p.numel() * 4 for n, p in base.named_parameters() if n.endswith(("gate_up_proj", "down_proj")))
    stack_bytes = min(p.numel() * p.element_size() for n, p in base.named_parameters()
                      if n.endswith(("gate_up_proj", "down_proj")))
    runs: dict[str, dict] = {}
    models = {}
    for kind in ("base", "lorakit", "peft"):
        model, params = adapted(base, kind)
        models[kind] = (model, params)
    copy_factors(models["peft"][1], models["lorakit"][1])
    for kind, (model, params) in models.items():
        loss, peak = peak_mb(step_fn(model, params, ids), device)  # AdamW state created in this step
        _, fwd_bwd = peak_mb(lambda m=model: m(input_ids=ids, labels=ids).loss.backward(), device)
        for p in params.values():
            p.grad = None
        runs[kind] = {"loss": loss, "peak_step_tensor_mb": peak, "peak_forward_backward_tensor_mb": fwd_bwd,
                      "trainable_params": sum(p.numel() for p in params.values()),
                      "largest_allocation_mb": None if device.startswith("cuda") else
                      largest_allocation(step_fn(model, params, ids)) / MB}
    routed = [m for m in models["lorakit"][0].modules() if isinstance(m, ExpertsWrapper)]
    runs["lorakit"]["routed"] = bool(routed) and all(m.routed_reason is None and m.fallback_reason is None
                                                     for m in routed)
    fns = {k: step_fn(m, p, ids) for k, (m, p) in models.items()}
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(steps):
        for k, fn in fns.items():
            sync()
            t, c = time.perf_counter(), time.process_time()
            fn()
            sync()
            wall[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
    for k in fns:
        runs[k].update({"step_wall_s_min": min(wall[k]), "step_wall_s_median": statistics.median(wall[k]),
                        "step_cpu_s_min": min(cpu[k]), "step_cpu_s_median": statistics.median(cpu[k]),
                        "step_wall_s_all": wall[k]})
    b = runs["base"]
    extra = {k: runs[k]["peak_step_tensor_mb"] - b["peak_step_tensor_mb"] for k in ("lorakit", "peft")}
    extra_fb = {k: runs[k]["peak_forward_backward_tensor_mb"] - b["peak_forward_backward_tensor_mb"]
                for k in ("lorakit", "peft")}
    return {
        "experts_implementation": impl, "runs": runs,
        "adapted_expert_weights_fp32_mb": experts_bytes / MB, "one_expert_stack_mb": stack_bytes / MB,
        "extra_mb": extra, "extra_forward_backward_only_mb": extra_fb,
        "ratios": {
            "lorakit_extra_over_peft_extra": extra["lorakit"] / extra["peft"],
            "lorakit_extra_over_expert_weights_fp32": extra["lorakit"] * MB / experts_bytes,
            "peft_extra_over_expert_weights_fp32": extra["peft"] * MB / experts_bytes,
            **{f"{k}_step_over_base_step_{stat}": runs[k][f"step_{stat}"] / b[f"step_{stat}"]
               for k in ("lorakit", "peft") for stat in ("wall_s_min", "wall_s_median", "cpu_s_min", "cpu_s_median")},
        },
        "targets_met": {
            "extra <= 0.20 x peft extra": extra["lorakit"] <= 0.20 * extra["peft"],
            "extra <= 0.25 x fp32 expert weights": extra["lorakit"] * MB <= 0.25 * experts_bytes,
            "step <= 1.5 x base step (wall, min of the interleaved steps)":
                runs["lorakit"]["step_wall_s_min"] <= 1.5 * b["step_wall_s_min"],
            "step <= 1.5 x base step (wall, median)":
                runs["lorakit"]["step_wall_s_median"] <= 1.5 * b["step_wall_s_median"],
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per model (min and median reported)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="issue")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="the base's dtype (the factors are fp32 masters either way)")
    ap.add_argument("--impls", default="grouped_mm,eager", help="experts implementations to measure")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/bench_moe_<device>.json")
    a = ap.parse_args()
    sys.path.insert(0, os.path.join(ROOT, "src"))
    sys.path.insert(0, HERE)
    import peft
    import torch
    import transformers
    from bench_qlora import device_name

    torch.set_num_threads(a.threads)
    base = build(a.shape, a.layers, a.vocab, a.dtype, a.device)
    ids = torch.randint(0, a.vocab, (a.batch, a.seq), generator=torch.Generator().manual_seed(0)).to(a.device)
    t0 = time.perf_counter()
    shape = SHAPES[a.shape]
    summary = {
        "device": device_name(a.device), "threads": a.threads if a.device == "cpu" else None,
        "note": None if a.device != "cpu" else
        "shared CPU (other jobs running): memory is exact tensor bytes, time only as ratios taken side by side",
        "model": f"Qwen3-MoE ({a.shape}) hidden {shape['hidden_size']}, {a.layers} layers, {shape['num_experts']} "
                 f"experts (moe_intermediate_size {shape['moe_intermediate_size']}), "
                 f"top-{shape['num_experts_per_tok']}, vocab {a.vocab}, {a.dtype}, random init",
        "lora": "r=16 alpha=32 on mlp.experts.gate_up_proj and mlp.experts.down_proj (target_parameters)",
        "step": {"batch": a.batch, "seq": a.seq, "optimizer": "AdamW, state created in the measured step"},
        "memory_method": "torch.cuda.max_memory_allocated" if a.device.startswith("cuda") else
        "torch.profiler allocation events: high-water mark of tensor bytes allocated during the step",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        "parity": parity(base, ids),
    }
    print(json.dumps(summary["parity"]), flush=True)
    summary["by_implementation"] = {}
    for impl in a.impls.split(","):
        res = measure(base, impl, ids, a.steps)
        summary["by_implementation"][impl] = res
        print(json.dumps({impl: {"extra_mb": res["extra_mb"], "ratios": res["ratios"]}}), flush=True)
    summary["loadavg_1m_at_end"] = os.getloadavg()[0]
    summary["wall_s"] = time.perf_counter() - t0
    out = a.out or os.path.join(HERE, "results", f"bench_moe_{a.device.split(':')[0]}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
