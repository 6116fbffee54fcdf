"""Regression tests for the hardening issue (#11), core part: one test per reproduced defect.

Each test names its defect number; each failed on main before the fix (see the issue's closing note).
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.adapters import wrappers
from lorakit.layers import LoraLayer

import models


class LinThenEmb(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.emb = nn.Embedding(10, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lin(self.emb(ids))


# ---------------------------------------------------------------- 6: inject is all or nothing
def test_06_inject_is_atomic_and_a_corrected_retry_works():
    model = LinThenEmb()
    model.lin.weight.requires_grad_(False)  # a user's own flag, kept as it was
    snap = models.snapshot(model)
    with pytest.raises(ValueError, match="lora_bias"):  # Linear accepts lora_bias, the Embedding (later) refuses
        lk.inject(model, lk.LoraConfig(r=2, target_modules=["lin", "emb"], lora_bias=True))
    models.assert_unchanged(model, snap)
    assert lk.adapter_names(model) == []
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["lin", "emb"]))
    assert isinstance(model.lin, LoraLayer) and isinstance(model.emb, LoraLayer)


# ---------------------------------------------------------------- 3: one adapter with bias
@pytest.mark.parametrize("first,second", [("all", "none"), ("none", "lora_only"), ("lora_only", "all")])
def test_03_two_adapters_with_bias_are_refused(first, second):
    model = models.llama()
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["q_proj"], bias=first), adapter_name="a")
    snap_names = lk.adapter_names(model)
    with pytest.raises(ValueError, match="bias"):
        lk.inject(model, lk.LoraConfig(r=2, target_modules=["q_proj"], bias=second), adapter_name="b")
    assert lk.adapter_names(model) == snap_names


# ---------------------------------------------------------------- 8: bias="all" + modules_to_save
def test_08_bias_all_keeps_the_original_head_frozen_as_peft():
    from peft import LoraConfig, get_peft_model

    base = models.bert_cls()
    ours = lk.inject(copy.deepcopy(base), lk.LoraConfig(r=2, target_modules=["query", "value"], bias="all",
                                                       modules_to_save=["classifier"]))
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["query", "value"], bias="all",
                                                            modules_to_save=["classifier"]))
    assert not ours.classifier.original_module.bias.requires_grad
    ours_names = {n for n, p in ours.named_parameters() if p.requires_grad}
    theirs_names = {n.removeprefix("base_model.model.").replace(".default", "") for n, p in theirs.named_parameters()
                    if p.requires_grad}
    ours_names = {n.replace(".default", "") for n in ours_names}
    assert ours_names == theirs_names
    assert lk.trainable_parameters(ours)[0] == sum(p.numel() for p in theirs.parameters() if p.requires_grad)


# ---------------------------------------------------------------- 13: set_adapter touches only adapters
def test_13_set_adapter_keeps_parameters_the_user_unfroze():
    model = models.llama()
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["q_proj"]), adapter_name="a")
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["v_proj"]), adapter_name="b")
    model.model.norm.weight.requires_grad_(True)
    lk.set_adapter(model, "b")
    assert model.model.norm.weight.requires_grad
    a_params = list(model.model.layers[0].self_attn.q_proj.adapter_parameters("a"))
    b_params = list(model.model.layers[0].self_attn.v_proj.adapter_parameters("b"))
    assert all(p.requires_grad for p in b_params) and not any(p.requires_grad for p in a_params)
    lk.set_adapter(model, "b", inference_mode=True)  # PEFT's keyword: active but frozen
    assert not any(p.requires_grad for p in b_params) and model.model.norm.weight.requires_grad


# ---------------------------------------------------------------- 22: a typo among several targets
def test_22_a_target_that_matches_nothing_is_an_error_with_close_names():
    model = models.llama()
    snap = models.snapshot(model)
    with pytest.raises(ValueError, match=r"q_prj.*q_proj"):
        lk.inject(model, lk.LoraConfig(r=2, target_modules=["q_prj", "v_proj"]))
    models.assert_unchanged(model, snap)
    assert lk.adapter_names(model) == []


# ---------------------------------------------------------------- 23: PEFT's task_type field
def test_23_task_type_is_accepted_and_written():
    cfg = lk.LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM")
    assert cfg.to_peft_dict()["task_type"] == "CAUSAL_LM"
    again = lk.LoraConfig.from_peft_dict(cfg.to_peft_dict())
    assert again.task_type == "CAUSAL_LM"


# ---------------------------------------------------------------- 10: torch's fused encoder fast path
def test_10_transformer_encoder_layer_fast_path_does_not_skip_lora():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True).eval()
    lk.inject(layer, lk.LoraConfig(r=2, target_modules=["self_attn", "linear1", "linear2"], init_lora_weights=False))
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        out = layer(x)  # eval + no_grad: where torch takes its fused path
        merged = lk.merge_and_unload(copy.deepcopy(layer))
        ref = merged(x)
        with lk.disable_adapters(layer):
            base = layer(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, base, atol=1e-3)


# ---------------------------------------------------------------- 14: contexts restore what they found
def test_14_nested_disable_adapters_restores_the_outer_state():
    model = models.llama()
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    x = models.ids()
    with torch.no_grad():
        adapted = model(x).logits
        with lk.disable_adapters(model):
            base = model(x).logits
            with lk.disable_adapters(model):
                pass
            torch.testing.assert_close(model(x).logits, base)  # still disabled after the inner block
        torch.testing.assert_close(model(x).logits, adapted)


def _two_adapter_llama():
    model = models.llama()
    for i, name in enumerate(["a", "b"]):
        lk.inject(model, lk.LoraConfig(r=2 + i, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
                  adapter_name=name)
    return model.eval()


def _alone(model: nn.Module, x: torch.Tensor, rows: list[str]) -> torch.Tensor:
    outs = []
    for i, name in enumerate(rows):
        lk.set_adapter(model, name)
        outs.append(model(x[i : i + 1]).logits)
    lk.set_adapter(model, "a")
    return torch.cat(outs)


def test_14_nested_mixed_batch_restores_the_outer_routing():
    model = _two_adapter_llama()
    x = models.ids(batch=2)
    with torch.no_grad():
        ab, ba = _alone(model, x, ["a", "b"]), _alone(model, x, ["b", "a"])
        with lk.mixed_batch(model, ["a", "b"]):
            with lk.mixed_batch(model, ["b", "a"]):
                torch.testing.assert_close(model(x).logits, ba)
            torch.testing.assert_close(model(x).logits, ab)


def test_14_mixed_batch_routing_is_per_thread():
    model = _two_adapter_llama()
    x = models.ids(batch=2)
    with torch.no_grad():
        expected = {"ab": _alone(model, x, ["a", "b"]), "ba": _alone(model, x, ["b", "a"])}
    barrier = threading.Barrier(2)
    results: dict[str, list] = {"ab": [], "ba": []}
    errors: list[BaseException] = []

    def work(key: str) -> None:
        try:
            with torch.no_grad(), lk.mixed_batch(model, list(key)):
                barrier.wait()  # both threads are inside their own mixed_batch now
                for _ in range(5):
                    results[key].append(model(x).logits)
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in ("ab", "ba")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for key, outs in results.items():
        for out in outs:
            torch.testing.assert_close(out, expected[key])


# ---------------------------------------------------------------- 18: sequence-first inputs
def test_18_mixed_batch_refuses_ambiguous_sequence_first_layers_and_routes_with_batch_dim():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=False).eval()
    for i, name in enumerate(["a", "b"]):
        lk.inject(layer, lk.LoraConfig(r=2, target_modules=["linear1", "linear2"], init_lora_weights=False,
                                       lora_alpha=4 + i), adapter_name=name)
    x = torch.randn(3, 3, 16)  # (L, N, E) with L == N: a batch-first reading would look valid
    with torch.no_grad():
        alone = []
        for i, name in enumerate(["a", "b", "a"]):
            lk.set_adapter(layer, name)
            alone.append(layer(x[:, i : i + 1]))
        ref = torch.cat(alone, dim=1)
        with pytest.raises(ValueError, match="batch_dim"), lk.mixed_batch(layer, ["a", "b", "a"]):
            layer(x)
        with lk.mixed_batch(layer, ["a", "b", "a"], batch_dim=1):
            out = layer(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- 12: DoRA's merge cache follows .to()
def test_12_dora_merge_state_follows_to_and_unmerges():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["0"], use_dora=True, init_lora_weights=False))
    keys = set(model.state_dict())
    lk.merge(model)
    assert set(model.state_dict()) == keys  # non-persistent: the file format is unchanged
    model.to(torch.float64)
    assert all(b.dtype == torch.float64 for b in model[0].buffers())
    assert any(True for _ in model[0].buffers())  # the cache is a buffer, so .to() moves it
    model.to("meta")  # a device change (cpu -> meta): a plain dict would stay behind on the cpu
    assert all(b.device.type == "meta" for b in model[0].buffers())
    lk.unmerge(model)  # crashed before: "found at least two devices"
    assert model[0].merged_adapters == []


def test_12_dora_unmerge_after_dtype_change_restores_w():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8))
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["0"], use_dora=True, init_lora_weights=False))
    w0 = model[0].base_layer.weight.detach().clone().double()
    lk.merge(model)
    model.to(torch.float64)
    lk.unmerge(model)
    torch.testing.assert_close(model[0].base_layer.weight, w0, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------- 27: DoRA merged beside another adapter
def test_27_dora_merged_after_another_adapter_equals_unmerged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8))
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False), adapter_name="plain")
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["0"], use_dora=True, init_lora_weights=False),
              adapter_name="dora")
    lk.set_adapter(model, ["plain", "dora"])
    x = torch.randn(4, 8)
    with torch.no_grad():
        unmerged = model(x)
        lk.merge(model)
        torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-5)
        lk.unmerge(model)
        torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-5)


def test_27_unload_keeps_the_active_adapters_trained_copy_as_peft():
    model = models.bert_cls()
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"]))
    with torch.no_grad():
        model.classifier.modules_to_save["default"].weight.add_(1.0)
    trained = model.classifier.modules_to_save["default"]
    lk.unload(model)
    assert model.classifier is trained


# ---------------------------------------------------------------- 21: save_pretrained on an injected model
def test_21_save_pretrained_on_an_injected_model_writes_the_adapter_not_base_layer_keys(tmp_path):
    """save_pretrained once wrote base_layer/lora_* keys that reload as random weights; it was then refused
    (which broke Trainer's checkpoints); now it writes PEFT's adapter files (tests/test_hf_adapter_api.py)."""
    from safetensors.torch import load_file

    model = models.llama()
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "x")
    assert (tmp_path / "x" / "adapter_config.json").is_file()
    assert not any("base_layer" in k for k in load_file(tmp_path / "x" / "adapter_model.safetensors"))
    merged = lk.merge_and_unload(model)
    merged.save_pretrained(tmp_path / "y")  # the plain model saves as usual again
    assert "model.embed_tokens.weight" in load_file(tmp_path / "y" / "model.safetensors")


# ---------------------------------------------------------------- 9: factor modules are called as modules
def test_09_factor_modules_are_called_so_their_hooks_run():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["0", "1"], init_lora_weights=False))
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["1"], use_dora=True, init_lora_weights=False),
              adapter_name="d")
    lk.set_adapter(model, ["default", "d"])
    calls: list[str] = []
    for name, m in model.named_modules():
        if name.rsplit(".", 2)[-2:-1] in (["lora_A"], ["lora_B"]):
            m.register_forward_pre_hook(lambda mod, args, n=name: calls.append(n))
    model(torch.randn(3, 8))
    assert sorted(set(calls)) == sorted(n for n, _ in model.named_modules()
                                        if n.rsplit(".", 2)[-2:-1] in (["lora_A"], ["lora_B"]))


FSDP_SCRIPT = r"""
import os, sys, torch, torch.distributed as dist
from torch import nn
sys.path.insert(0, {src!r})
dist.init_process_group("gloo", rank=0, world_size=1, init_method="tcp://127.0.0.1:{port}")
from torch.distributed.fsdp import fully_shard
import lorakit as lk
torch.manual_seed(0)
m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
lk.inject(m, lk.LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False))
x = torch.randn(3, 8)
ref = m(x).detach()
for _, w in list(m.named_modules()):
    if isinstance(w, nn.Linear) and w.weight.requires_grad:
        fully_shard(w)  # each LoRA factor its own shard unit
fully_shard(m)
out = m(x)
out.sum().backward()
assert torch.allclose(out.detach(), ref, atol=1e-6), (out, ref)
print("FSDP-OK")
dist.destroy_process_group()
"""


def test_09_fsdp2_with_each_factor_its_own_shard_unit(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    src = os.path.join(os.path.dirname(os.path.dirname(__file__)), "src")
    script = tmp_path / "fsdp.py"
    script.write_text(FSDP_SCRIPT.format(src=src, port=port))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert "FSDP-OK" in proc.stdout, proc.stderr[-2000:]


# ---------------------------------------------------------------- structure: the core stands alone
def test_import_lorakit_loads_only_the_core():
    import subprocess
    import sys

    code = ("import sys, torch, safetensors; before = set(sys.modules); import lorakit; "
            "mods = sorted(m for m in sys.modules if m.startswith('lorakit')); "
            "heavy = [m for m in ('transformers', 'tqdm', 'matplotlib', 'peft', 'yaml', 'bitsandbytes', 'torchao') "
            "         if m in sys.modules and m not in before]; "
            "print(len(mods)); print(','.join(mods)); print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    count, mods, heavy = int(out[0]), out[1].split(","), out[2]
    apps = ("lorakit.train", "lorakit.data", "lorakit.models", "lorakit.methods", "lorakit.compare", "lorakit.cli",
            "lorakit.compare.vs_peft", "lorakit.models.quantized")
    assert not [m for m in mods if m.startswith(apps)], mods
    assert heavy == ""
    # the core: config, layers (one file per layer type, and per concern: merging, routed, replacing, registry,
    # protocol), io, inject, merge, state...; 34 before the state/registry split, the MoE / bnb-packing files and
    # the data-aware inits' sub-configs (lorakit.inits, lorakit.inits.configs: LoraConfig validates them)
    assert count <= 47, mods
    assert lk.fit is not None and lk.TrainConfig is not None  # applications still reachable, lazily


def test_wrappers_hold_no_routing_or_disable_state_across_threads():
    """Structure: mixed-batch routing is per call (a context variable), not written onto layers."""
    model = _two_adapter_llama()
    with lk.mixed_batch(model, ["a", "b"]):
        assert all(getattr(w, "row_adapters", None) is None for _, w in wrappers(model))
