"""Saving from and loading onto models under torch.distributed: 2 processes, gloo, on the CPU.

The test launches this very file with ``torchrun --nproc_per_node 2``; :func:`worker` runs on each
rank, after the README's example script (a user's own torchrun script). References (the adapter a
single process saves, the logits it computes) come from the pytest process itself, so every
comparison is against an unsharded, single-process run.
"""

from __future__ import annotations

import os
import re
import runpy
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit as lk
from lorakit.models import tiny_llama
from runners import ROOT, torchrun

# r=3 over 2 ranks: uneven dim-0 shards (2 + 1 rows); embed_tokens targeted: its base weight goes in the file too
FULL = {"r": 3, "lora_alpha": 6.0, "target_modules": ["q_proj", "v_proj", "embed_tokens"],
        "modules_to_save": ["lm_head"]}
DORA = {"r": 3, "lora_alpha": 6.0, "target_modules": ["q_proj", "up_proj"], "use_dora": True}


def build(cfg: dict | None, seed: int = 1):
    """The tiny Llama, and (with ``cfg``) an adapter whose every factor is random and non-zero."""
    model, _ = tiny_llama(hidden_size=32, num_layers=2, seed=0)
    if cfg is not None:
        lk.inject(model, lk.LoraConfig(**cfg))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:  # the adapter's factors and the lm_head copy
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def ids() -> torch.Tensor:
    return torch.randint(4, 90, (2, 9), generator=torch.Generator().manual_seed(3))  # (B, T)


def readme_example() -> str:
    """The README's torchrun script: the python block after its ``<!-- torchrun example`` marker."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    m = re.search(r"<!-- torchrun example[^\n]*\n```python\n(.*?)```", text, re.S)
    assert m, "README.md lost its torchrun example"
    return m.group(1)


@pytest.fixture(scope="module")
def distributed_run(tmp_path_factory):
    """Single-process references, then the 2-rank worker; returns the work directory."""
    d = tmp_path_factory.mktemp("dist-io")
    for name, cfg in (("full", FULL), ("dora", DORA)):
        model = build(cfg)
        lk.save_adapter(model, d / f"ref-{name}")
        with torch.no_grad():
            save_file({"logits": model(input_ids=ids()).logits}, str(d / f"ref-{name}-logits.safetensors"))
    (d / "lora_fsdp.py").write_text(readme_example())
    proc = torchrun(os.path.abspath(__file__), str(d), cwd=d)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return d


@pytest.mark.slow
@pytest.mark.parametrize("saved", ["fsdp", "ddp"])
def test_save_from_sharded_or_replicated_model_equals_single_process_save(distributed_run, saved):
    """Every rank called save_adapter; rank 0 wrote the same file a single process writes: the same
    keys, full (unsharded) shapes, dtypes and values, tensor for tensor; the same config."""
    ref = load_file(str(distributed_run / "ref-full" / "adapter_model.safetensors"))
    got = load_file(str(distributed_run / saved / "adapter_model.safetensors"))
    assert got.keys() == ref.keys() and len(ref) == 12
    for k in ref:
        assert got[k].dtype == ref[k].dtype and got[k].shape == ref[k].shape, k
        assert torch.equal(got[k], ref[k]), k
    assert (distributed_run / saved / "adapter_config.json").read_text() == \
        (distributed_run / "ref-full" / "adapter_config.json").read_text()


def test_only_rank_0_wrote(distributed_run):
    leftovers = [p.name for p in (distributed_run / "fsdp").iterdir() if p.name.startswith(".")]
    assert not leftovers and sorted(p.name for p in (distributed_run / "fsdp").iterdir()) == \
        ["adapter_config.json", "adapter_model.safetensors"]


def test_adapter_loaded_under_fsdp_gives_single_process_outputs(distributed_run):
    """Each rank compared its logits with the single-process ones (|Δ| < 1e-5) and reported: loaded
    then sharded (LoRA + embedding + head copy; DoRA), loaded into a sharded model (inference), and
    the two refusals (training, or DoRA, on an already sharded model). Then FSDP2's bf16 policy:
    fp32 master shards and gradients, the loss within 5% of fp32's."""
    for r in (0, 1):
        report = (distributed_run / f"load-report-{r}.txt").read_text().splitlines()
        assert report == ["load-then-shard full ok", "load-then-shard dora ok", "shard-then-load full ok",
                          "full {'is_trainable': True} refused", "dora {} refused", "bf16 ok"], report


def test_readme_example_script_saves_a_whole_trained_adapter(distributed_run):
    """The README's own-script example ran on 2 ranks (FSDP2, 3 steps) and rank 0 wrote a full adapter."""
    saved = load_file(str(distributed_run / "out" / "adapter" / "adapter_model.safetensors"))
    assert len(saved) == 8  # 2 layers x q_proj, v_proj x lora_A, lora_B
    for k, t in saved.items():
        assert t.shape == ((8, 64) if "lora_A" in k else (64, 8)), (k, t.shape)  # whole, not a 1/2 shard
    assert all(t.abs().max() > 0 for k, t in saved.items() if "lora_B" in k)  # it trained: B left zero


# ---------------------------------------------------------------------------- the worker, per rank
def worker(d: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from lorakit.io.distributed import has_dtensors
    from lorakit.train.distributed import shard_model, shutdown

    dist.init_process_group("gloo")
    _run_readme_script(os.path.join(d, "lora_fsdp.py"))
    rank = dist.get_rank()
    torch.manual_seed(0)

    # saving: from an FSDP2-sharded model, and through a DDP wrapper
    model = shard_model(build(FULL))
    assert has_dtensors(model)
    lk.save_adapter(model, os.path.join(d, "fsdp"))  # collective: every rank calls it
    lk.save_adapter(DistributedDataParallel(build(FULL)), os.path.join(d, "ddp"))
    dist.barrier()  # DDP saves need no gathering, so the other ranks do not wait for rank 0's write

    report = []
    # loading, then sharding: the adapter's tensors are sharded with their blocks
    for name in ("full", "dora"):
        model = build(None)
        lk.load_adapter(model, os.path.join(d, f"ref-{name}"))
        shard_model(model)
        report.append(_compare(model, os.path.join(d, f"ref-{name}-logits.safetensors"), f"load-then-shard {name}"))
    # loading onto an already sharded model (inference): the new tensors (factors, the head copy) join whole
    model = shard_model(build(None))
    lk.load_adapter(model, os.path.join(d, "ref-full"))
    report.append(_compare(model, os.path.join(d, "ref-full-logits.safetensors"), "shard-then-load full"))
    for name, kw in (("full", {"is_trainable": True}), ("dora", {})):
        try:
            lk.load_adapter(shard_model(build(None)), os.path.join(d, f"ref-{name}"), **kw)
            report.append(f"{name} {kw} accepted")
        except ValueError as e:
            report.append(f"{name} {kw} refused" if "fully_shard" in str(e) else f"wrong error: {e}")
    # bf16 mixed precision: bf16 compute, fp32 master shards and fp32 gradients for the adapter
    model = build(FULL).train()
    with torch.no_grad():
        ref = model(input_ids=ids(), labels=ids()).loss
    shard_model(model, bf16=True)
    model(input_ids=ids(), labels=ids()).loss.backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    fp32 = all(p.dtype == p.grad.dtype == torch.float32 for p in trained)
    with torch.no_grad():
        loss = model(input_ids=ids(), labels=ids()).loss
    report.append("bf16 ok" if fp32 and abs(float(loss) - float(ref)) < 0.05 * float(ref)
                  else f"bf16: fp32 masters/grads {fp32}, loss {float(loss):.4f} vs fp32 {float(ref):.4f}")
    with open(os.path.join(d, f"load-report-{rank}.txt"), "w") as f:
        f.write("\n".join(report))
    shutdown(started=True)  # barrier, destroy; ranks > 0 leave at once (see its docstring)


def _run_readme_script(path: str) -> None:
    """The README's script, verbatim, in this worker's process group: its own init and destroy are
    no-ops here (a second default group in one torchrun worker reuses the launcher's rendezvous
    keys, and may hang)."""
    import torch.distributed as dist

    init, destroy = dist.init_process_group, dist.destroy_process_group
    dist.init_process_group = dist.destroy_process_group = lambda *a, **k: None
    try:
        runpy.run_path(path, run_name="__main__")
    finally:
        dist.init_process_group, dist.destroy_process_group = init, destroy


def _compare(model, ref_path: str, what: str) -> str:
    with torch.no_grad():
        logits = model(input_ids=ids()).logits  # (B, T, V)
    ref = load_file(ref_path)["logits"]
    err = (logits - ref).abs().max().item()
    return f"{what} ok" if err < 1e-5 else f"{what}: max |Δlogits| = {err:.3g}"


if __name__ == "__main__":
    worker(sys.argv[1])
