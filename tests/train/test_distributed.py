"""lorakit.train.distributed and lorakit.io.distributed in one process: batch slicing, the loss
scaling identity, checkpoint refusals, and (on a one-rank gloo group) FSDP2's DTensor paths.
Two real ranks under torchrun: tests/test_distributed_cli.py and tests/test_distributed_io.py."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

import lorakit as lk
from lorakit.data.dataset import IGNORE_INDEX, TokenDataset, collate
from lorakit.io import distributed as iodist
from lorakit.io.peft_format import adapter_state_dict
from lorakit.train import TrainConfig
from lorakit.train.checkpoint import check_world_size, load_checkpoint, write_checkpoint
from lorakit.train.distributed import Parallel, decoder_blocks, shard_model
from lorakit.train.losses import count_targets, loss_sum

from models import llama


def causal_ds(n: int = 7) -> TokenDataset:
    g = torch.Generator().manual_seed(0)
    examples = []
    for i in range(n):
        ids = torch.randint(4, 90, (5 + i % 3,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * 2 + ids[2:]})  # prompt of 2 tokens
    return TokenDataset(examples, "causal-lm", pad_id=0)


def as_rank(rank: int, world: int) -> Parallel:
    par = Parallel()
    par.rank, par.world, par.is_main = rank, world, rank == 0
    return par


# ------------------------------------------------------------------------------------ data
def test_one_process_is_the_identity():
    par, cfg, ds = Parallel(), TrainConfig(batch_size=3), causal_ds()
    assert par.world == 1 and par.global_config(cfg) is cfg
    assert all(torch.equal(a, b) for a, b in zip(par.local_batch([4, 1, 2], ds).values(),
                                                  collate([ds[4], ds[1], ds[2]], "causal-lm", 0).values()))
    assert par.total_count(17) == 17 and par.reduce_step(1.5, 9) == (1.5, 9)
    seen = []
    assert par.run_callbacks([lambda s, logs: seen.append(s)], 3, {}, False) is False and seen == [3]
    with pytest.raises(KeyboardInterrupt):  # a callback's KeyboardInterrupt propagates as before
        par.run_callbacks([lambda s, logs: (_ for _ in ()).throw(KeyboardInterrupt)], 3, {}, False)


@pytest.mark.parametrize("n, world", [(8, 2), (7, 2), (7, 3), (5, 4)])
def test_ranks_split_the_global_batch_into_contiguous_near_equal_slices(n, world):
    ds, idx = causal_ds(n), list(range(n))[::-1]
    parts = [as_rank(r, world).local_batch(idx, ds)["input_ids"].shape[0] for r in range(world)]
    assert sum(parts) == n and max(parts) - min(parts) <= 1
    assert TrainConfig(batch_size=4).batch_size * world == as_rank(0, world).global_config(TrainConfig(batch_size=4)
                                                                                         ).batch_size


@pytest.mark.parametrize("task", ["causal-lm", "seq-cls"])
def test_a_rank_without_examples_runs_one_that_counts_for_nothing(task):
    """A last batch of 1 example over 2 ranks: rank 1 still runs a forward/backward (its collectives
    must match) on a placeholder whose every label is ignored: zero targets, zero loss."""
    model = llama()
    if task == "seq-cls":
        ds = TokenDataset([{"input_ids": [5, 6, 7], "labels": 1}], "seq-cls", pad_id=0)
    else:
        ds = causal_ds(1)
    batches = [as_rank(r, 2).local_batch([0], ds) for r in range(2)]
    assert sorted(count_targets(b, task) for b in batches)[0] == 0  # one rank has it, the other a placeholder
    empty = min(batches, key=lambda b: count_targets(b, task))
    assert empty["input_ids"].shape[0] == 1 and (empty["labels"] == IGNORE_INDEX).all()
    if task == "causal-lm":
        loss = loss_sum(model, empty, task)
        assert float(loss) == 0.0


def test_scaling_by_ranks_gives_the_single_process_gradient():
    """Hand-derived: with N_step targets over all ranks, rank i back-propagating N·Σ_i CE / N_step
    and the ranks' gradients averaged (what DDP/FSDP do) is ∇ Σ_all CE / N_step, the gradient of
    one process with the whole batch; averaging per-rank means (HF Trainer's way) is not."""
    torch.manual_seed(0)
    model = llama()
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian"))
    params = [p for p in model.parameters() if p.requires_grad]
    ds, idx = causal_ds(5), [0, 1, 2, 3, 4]  # uneven token counts across the 2 slices

    def grads(loss):
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])

    whole = collate([ds[i] for i in idx], "causal-lm", 0)
    reference = grads(loss_sum(model, whole, "causal-lm") / count_targets(whole, "causal-lm"))
    slices = [as_rank(r, 2).local_batch(idx, ds) for r in range(2)]
    n_step = sum(count_targets(b, "causal-lm") for b in slices)
    ours = sum(grads(loss_sum(model, b, "causal-lm") * 2 / n_step) for b in slices) / 2
    per_rank_mean = sum(grads(loss_sum(model, b, "causal-lm") / count_targets(b, "causal-lm")) for b in slices) / 2
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(per_rank_mean, reference, rtol=1e-3, atol=1e-6)


# ----------------------------------------------------------------------------- checkpoints
def test_checkpoints_resume_only_with_the_number_of_ranks_that_wrote_them(tmp_path):
    check_world_size({}, 1, "ckpt")  # older single-process checkpoints carry no world_size
    check_world_size({"world_size": 2}, 2, "ckpt")
    with pytest.raises(ValueError, match="written by 2 process.*this run has 1.*torchrun with 2 ranks"):
        check_world_size({"world_size": 2}, 1, "ckpt")
    with pytest.raises(ValueError, match="written by 1 process.*has 4.*single process"):
        check_world_size({}, 4, "ckpt")
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ckpt = write_checkpoint(str(tmp_path), 3, {n: p.detach() for n, p in model.named_parameters()},
                            {"step": 3, "optimizer": {}, "world_size": 2}, keep=2)
    with pytest.raises(ValueError, match="written by 2 process"):
        load_checkpoint(ckpt, model, opt, sched)


# ------------------------------------------------------------------------ models and errors
def test_decoder_blocks_are_the_repeated_layers():
    model = llama(layers=3)
    assert decoder_blocks(model) == list(model.model.layers)
    seq = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(4)]))
    assert decoder_blocks(seq) == list(seq[1])  # no _no_split_modules: the longest ModuleList


def test_shard_model_needs_a_process_group():
    with pytest.raises(ValueError, match="torchrun --nproc_per_node"):
        shard_model(llama())


def test_one_process_writes_and_unwraps_nothing_special(tmp_path):
    assert iodist.rank() == 0 and iodist.world_size() == 1 and iodist.is_main_process()
    assert iodist.on_main_process(lambda: 5, sync=True) == 5
    model = llama()
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["q_proj"]))
    assert iodist.unwrap(model) is model and not iodist.has_dtensors(model)
    got = iodist.gather_adapter_state(model, adapter_state_dict, "default", "auto")
    ref = adapter_state_dict(model, "default", "auto")
    assert got.keys() == ref.keys() and all(got[k] is not None and torch.equal(got[k], ref[k]) for k in ref)


def test_torchrun_refuses_dash_dash_r_so_the_cli_also_takes_dash_dash_lora_r():
    from torch.distributed.run import get_args_parser

    from lorakit.cli import build_parser

    launch = ["--standalone", "--nproc_per_node", "2", "-m", "lorakit", "train"]
    assert get_args_parser().parse_args([*launch, "--lora-r", "4"]).training_script_args == ["train", "--lora-r", "4"]
    with pytest.raises(SystemExit):
        get_args_parser().parse_args([*launch, "--r", "4"])
    assert build_parser().parse_args(["train", "--lora-r", "4"]).r == 4


# --------------------------------------------------- FSDP2 on a one-rank gloo group, in process
@pytest.fixture
def one_rank_mesh(tmp_path):
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def _base():
    torch.manual_seed(0)
    return llama()


def _adapted(cfg: lk.LoraConfig):
    model = _base()
    lk.inject(model, cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05)  # lora_B off zero
    return model


def test_save_adapter_of_a_sharded_model_gathers_only_the_files_tensors(one_rank_mesh, tmp_path):
    cfg = lk.LoraConfig(r=2, target_modules=["q_proj", "v_proj", "embed_tokens"], modules_to_save=["lm_head"])
    lk.save_adapter(_adapted(cfg), tmp_path / "ref")
    model = shard_model(_adapted(cfg), mesh=one_rank_mesh)
    assert iodist.has_dtensors(model)
    with pytest.raises(RuntimeError, match="data pointer"):  # what the issue reports: the plain path fails
        adapter_state_dict(model, "default")
    gathered = []
    real_full_tensor = iodist.full_tensor
    iodist.full_tensor = lambda t: gathered.append(t.shape) or real_full_tensor(t)
    try:
        lk.save_adapter(model, tmp_path / "sharded")
    finally:
        iodist.full_tensor = real_full_tensor
    a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("ref", "sharded"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(gathered) == len(a) == 12  # each of the file's tensors once; the frozen projections never
    assert (96, 32) in gathered  # embed_tokens' base weight goes in the file (embedding targeted), so it is gathered


def test_loading_onto_a_sharded_model(one_rank_mesh, tmp_path):
    cfg = lk.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    src = _adapted(cfg)
    lk.save_adapter(src, tmp_path / "a")
    lk.save_adapter(_adapted(lk.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)), tmp_path / "dora")
    x = torch.randint(0, 90, (2, 6))
    with torch.no_grad():
        ref = src.eval()(input_ids=x).logits
    model = shard_model(_base(), mesh=one_rank_mesh)
    lk.load_adapter(model, tmp_path / "a")  # the head copy is made whole, not a stray DTensor
    assert not any(iodist.is_dtensor(p) for p in model.lm_head.modules_to_save["default"].parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, ref)
    for path, kw, what in ((tmp_path / "a", {"is_trainable": True}, "is_trainable=True"),
                           (tmp_path / "dora", {}, "a DoRA adapter")):
        with pytest.raises(ValueError, match=f"{what} on a model already sharded"):
            lk.load_adapter(shard_model(llama(), mesh=one_rank_mesh), path, **kw)
