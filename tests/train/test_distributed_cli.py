"""``torchrun --standalone --nproc_per_node 2 -m lorakit train`` (gloo, CPU) on a tiny Llama.

Two ranks with ``--batch-size 2`` must end at the adapter one process reaches with ``--batch-size 4``
(same seed and data): the step's loss is the mean over the answer tokens of the *global* batch.
The data (37 training examples, global micro-batch 4) leave a last batch of one example, so one
rank runs the empty-slice path once per epoch; ``--grad-accum 2`` exercises the skipped reductions.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid

import pytest
import torch
from safetensors.torch import load_file

from lorakit.cli import main
from runners import SRC

import models

torch.set_num_threads(1)
pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="torchrun on gloo; /proc to find a rank's pid")
TIMEOUT = 300


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory):
    # 37 train + 4 eval (eval_split 0.1)
    return models.write_reverse_sft(tmp_path_factory.mktemp("data") / "sft.jsonl", n=41)


def train_args(llama_dir, sft_file, out, batch, *extra):
    # --lora-r: torchrun's own parser refuses --r (an ambiguous prefix of its --rdzv-*/--role options)
    return ["train", "--model", llama_dir, "--data", sft_file, "--task", "causal-lm", "--target-modules",
            "q_proj,v_proj", "--modules-to-save", "lm_head", "--lora-r", "4", "--lr", "1e-2", "--grad-accum", "2",
            "--batch-size", str(batch), "--eval-split", "0.1", "--threads", "1", "--no-progress", "--out", str(out),
            *extra]


def torchrun(args, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1",
           **popen.pop("env", {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "lorakit",
           *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def run_ok(args) -> str:
    proc = torchrun(args)
    out, _ = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, out[-6000:]
    return out


def adapter(run) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def assert_same_adapter(a, b, atol):
    assert a.keys() == b.keys() and len(a) == 9  # 2 layers x q,v x A,B + the lm_head copy
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


@pytest.fixture(scope="module")
def single(llama_dir, sft_file, tmp_path_factory):
    """One process with the doubled batch: the reference."""
    out = tmp_path_factory.mktemp("single") / "run"
    assert main(train_args(llama_dir, sft_file, out, 4, "--max-steps", "6")) == 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize("how", [[], ["--fsdp", "--gradient-checkpointing"]], ids=["ddp", "fsdp"])
def test_two_ranks_end_at_the_single_process_adapter(llama_dir, sft_file, single, tmp_path, how):
    out = tmp_path / "run"
    log = run_ok(train_args(llama_dir, sft_file, out, 2, "--max-steps", "6", *how))
    assert "effective batch 8 = 2 per rank × 2 ranks × 2 micro-batch(es)" in log
    assert ("FSDP2 (fully_shard per decoder block, then the root)" if how else "DDP over 2 ranks") in log
    assert log.count("lorakit train: run directory") == 1  # rank 0 alone prints
    assert_same_adapter(adapter(out), adapter(single), atol=2e-6)
    b = adapter(single)
    assert all(b[k].abs().max() > 0 for k in b)  # lora_B moved off its zero init: the comparison is not vacuous
    ours, ref = (json.loads((p / "history.json").read_text()) for p in (out, single))
    assert [r["step"] for r in ours["train"]] == [r["step"] for r in ref["train"]]
    for x, y in zip(ours["train"] + ours["eval"], ref["train"] + ref["eval"]):  # global-batch losses, eval too
        assert x.get("loss", x.get("eval_loss")) == pytest.approx(y.get("loss", y.get("eval_loss")), rel=1e-5)
    saved = load_file(str(next((out / "checkpoints").iterdir()) / "trainable.safetensors"))  # gathered, unsharded
    assert {tuple(t.shape) for k, t in saved.items() if "lora_A" in k} == {(4, 32)}
    # the checkpoint says it needs 2 ranks: a single process refuses it
    from lorakit.train.job import run_job

    with pytest.raises(ValueError, match="written by 2 process"):
        run_job({"progress": False}, resume=str(out))


@pytest.mark.slow
def test_two_ranks_packed_end_at_the_single_process_adapter(llama_dir, sft_file, single, tmp_path):
    """--packing under DDP: each rank packs its slice of the global batch into one row."""
    out = tmp_path / "run"
    log = run_ok(train_args(llama_dir, sft_file, out, 2, "--max-steps", "6", "--packing"))
    assert "packing off" not in log and "DDP over 2 ranks" in log
    assert_same_adapter(adapter(out), adapter(single), atol=1e-5)  # padded single process: same loss terms


def _rank_pid(tag: str, rank: int) -> int | None:
    """The pid of the worker with ``RANK=rank`` among the processes started with ``LK_TEST_TAG=tag``."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if f"LK_TEST_TAG={tag}".encode() in env and f"RANK={rank}".encode() in env:
            return int(pid)
    return None


def _wait_for_checkpoint(run, proc, after: int) -> int:
    """The newest checkpoint step once one beyond ``after`` exists (the run must still be going)."""
    deadline = time.time() + TIMEOUT
    while time.time() < deadline and proc.poll() is None:
        steps = [int(p.name[5:]) for p in run.glob("checkpoints/step-*")]
        if steps and max(steps) > after:
            return max(steps)
        time.sleep(0.01)
    raise AssertionError(f"no checkpoint after step {after}; the run ended: {proc.communicate()[0][-4000:]}")


@pytest.mark.slow
def test_ctrl_c_then_killed_rank_then_resume_ends_at_uninterrupted_weights(llama_dir, sft_file, tmp_path):
    """FSDP2 with dropout (each rank's RNG stream matters): Ctrl-C (torchrun forwards SIGINT to every
    rank: they stop after the same step and save together); resume; SIGKILL rank 1 (the last
    periodic checkpoint is what is left); resume to the end: the weights of the uninterrupted run."""
    steps = ["--max-steps", "14", "--checkpoint-every", "1", "--lora-dropout", "0.1", "--fsdp"]
    full = tmp_path / "full"
    reference = torchrun(train_args(llama_dir, sft_file, full, 2, *steps))  # uninterrupted, alongside
    part, tag = tmp_path / "part", uuid.uuid4().hex
    proc = torchrun(train_args(llama_dir, sft_file, part, 2, *steps))
    first = _wait_for_checkpoint(part, proc, 1)
    proc.send_signal(signal.SIGINT)  # what Ctrl-C in the terminal does
    log, _ = proc.communicate(timeout=TIMEOUT)
    assert log.count("interrupted: checkpoint saved") == 1, log[-4000:]
    assert not (part / "adapter").exists()  # it really stopped early

    proc = torchrun(["train", "--resume", str(part), "--no-progress"], env={"LK_TEST_TAG": tag})
    seen = _wait_for_checkpoint(part, proc, first + 2)
    pid = _rank_pid(tag, 1)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    log, _ = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode != 0 and not (part / "adapter").exists(), log[-4000:]
    assert seen < 14

    run_ok(["train", "--resume", str(part), "--no-progress"])
    log, _ = reference.communicate(timeout=TIMEOUT)
    assert reference.returncode == 0, log[-6000:]
    assert_same_adapter(adapter(part), adapter(full), atol=0)


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_every_rank_after_one_step_with_a_checkpoint(llama_dir, sft_file, tmp_path):
    """SIGTERM (a scheduler's preemption, ``kill``) to torchrun: it forwards SIGTERM to the workers,
    which finish the step in progress, agree to stop and save one checkpoint together."""
    part = tmp_path / "part"
    proc = torchrun(train_args(llama_dir, sft_file, part, 2, "--max-steps", "400", "--checkpoint-every", "1"))
    seen = _wait_for_checkpoint(part, proc, 1)
    proc.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=TIMEOUT)
    assert log.count("terminate signal: finishing this step") == 1, log[-4000:]  # rank 0 alone speaks
    assert log.count("interrupted: checkpoint saved") == 1, log[-4000:]  # rank 0 alone reports
    steps = sorted(int(p.name[5:]) for p in part.glob("checkpoints/step-*"))
    assert steps and seen <= steps[-1] < 400 and not (part / "adapter").exists()
    assert (part / "checkpoints" / f"step-{steps[-1]:06d}" / "trainable.safetensors").is_file()


QUANT_WORKER = '''
import sys, torch, torch.distributed as dist
import lorakit as lk
from lorakit.models.quantized import load_quantized, prepare_for_kbit_training
from lorakit.train.distributed import shard_model
dist.init_process_group("gloo")
model = prepare_for_kbit_training(load_quantized(sys.argv[1], "causal-lm", "nf4")[0])  # as lorakit train --quantize
lk.inject(model, lk.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian"))
torch.manual_seed(0)
with torch.no_grad():
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.normal_(0, 0.1)
x = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    want = model(input_ids=x).logits.float()
w = model.model.layers[0].self_attn.q_proj.base_layer.weight
before = tuple(w.shape)
shard_model(model)
w = model.model.layers[0].self_attn.q_proj.base_layer.weight
with torch.no_grad():
    got = model(input_ids=x).logits.float()
with open(f"{sys.argv[2]}/rank{dist.get_rank()}.txt", "w") as f:  # a file per rank: stdout lines interleave
    f.write(f"rank {dist.get_rank()}: packed {before} local {tuple(w.to_local().shape)} "
            f"max diff {float((got - want).abs().max()):.3g}")
dist.destroy_process_group()
'''


@pytest.mark.slow
def test_fsdp2_over_a_4bit_base(sft_file, tmp_path):
    """FSDP2 shards a bitsandbytes NF4 base's packed weights (each rank holds half the bytes), its
    outputs are the unsharded model's, and ``--quantize nf4 --fsdp`` on 2 ranks ends at the adapter
    of one process with the doubled batch."""
    pytest.importorskip("bitsandbytes")
    llama_dir = models.save_tiny_llama(tmp_path / "llama64", hidden_size=64)
    script = tmp_path / "worker.py"
    script.write_text(QUANT_WORKER)
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), str(llama_dir), str(tmp_path)], env=env, capture_output=True, text=True,
                         timeout=TIMEOUT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lines = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    for line in lines:
        packed = tuple(int(v) for v in re.search(r"packed \((\d+), (\d+)\)", line).groups())
        local = tuple(int(v) for v in re.search(r"local \((\d+), (\d+)\)", line).groups())
        assert local == (packed[0] // 2, packed[1]), line  # half the packed 4-bit bytes on each rank
        assert float(line.rsplit(" ", 1)[1]) == 0.0, line  # gathered, dequantized: the same numbers

    q = ["--quantize", "nf4", "--max-steps", "4"]
    single = tmp_path / "single"
    assert main(train_args(llama_dir, sft_file, single, 4, *q)) == 0
    out = tmp_path / "fsdp"
    log = run_ok(train_args(llama_dir, sft_file, out, 2, *q, "--fsdp", "--gradient-checkpointing"))
    assert "FSDP2 (fully_shard per decoder block, then the root) over 2 ranks" in log
    assert_same_adapter(adapter(out), adapter(single), atol=1e-5)
    assert all(t.abs().max() > 0 for k, t in adapter(single).items() if "lora_B" in k)
