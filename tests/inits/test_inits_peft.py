"""The data-aware inits against PEFT 0.21.2 on the same model, seed and data: LoftQ's factors and
quantized base, EVA's ranks and A, CorDA's decomposition, LoRA-GA's A, B and adjusted base — and
their files both ways."""

from __future__ import annotations

import copy
import inspect
import json
import warnings

import pytest
import torch

import lorakit as lk
from lorakit.inits.convert import convert_to_lora, initial_factors
from lorakit.inits.corda import preprocess_corda
from lorakit.inits.eva import initialize_lora_eva_weights
from lorakit.inits.lora_ga import preprocess_loraga
from lorakit.state import get_state

import models

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]


def batches(n: int = 6, bs: int = 4, seq: int = 12) -> list[dict]:
    out = []
    for i in range(n):
        ids = models.ids(bs, seq, seed=i)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


def assert_same_adapter(ours, ref) -> int:
    """Every factor and every wrapped base tensor of ``ours`` equals PEFT's (bit for bit); returns how many."""
    ref_sd = {k.removeprefix("base_model.model."): v for k, v in ref.state_dict().items()}
    n = 0
    for k, v in ours.state_dict().items():
        if ".lora_" in k or "base_layer" in k:
            assert torch.equal(v, ref_sd[k]), k
            n += 1
    assert n > 0
    return n


def logits(model, x=None):
    with torch.no_grad():
        return model(input_ids=models.ids() if x is None else x).logits


@pytest.fixture
def peft_loftq_on_cpu(monkeypatch):
    """PEFT 0.21.2's own ``loftq_init``, with its hard-wired CUDA device replaced by the CPU (the one
    change; the quantization and SVD steps are PEFT's code)."""
    import peft.tuners.lora.layer as layer
    import peft.utils.loftq_utils as lu

    src = inspect.getsource(lu.loftq_init)
    assert '"xpu" if is_xpu_available() else "cuda"' in src
    ns = dict(vars(lu))
    exec(src.replace('"xpu" if is_xpu_available() else "cuda"', '"cpu"'), ns)
    monkeypatch.setattr(layer, "loftq_init", ns["loftq_init"])


@pytest.mark.parametrize("bits", [4, 8])
def test_loftq_factors_and_quantized_base_equal_peft(bits, peft_loftq_on_cpu):
    pytest.importorskip("bitsandbytes")
    base = models.llama()
    ours = copy.deepcopy(base)
    kw = dict(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights="loftq")  # s = 1, PEFT's examples
    ref = peft.get_peft_model(base, peft.LoraConfig(**kw, loftq_config=peft.LoftQConfig(loftq_bits=bits,
                                                                                       loftq_iter=3)))
    lk.inject(ours, lk.LoraConfig(**kw, loftq_config={"loftq_bits": bits, "loftq_iter": 3}))
    assert assert_same_adapter(ours, ref) == 3 * len(TARGETS) * 2
    torch.testing.assert_close(logits(ours), logits(ref), atol=0, rtol=0)


def test_eva_ranks_and_A_equal_peft():
    base = models.llama()
    ours = copy.deepcopy(base)
    kw = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="eva")
    data = batches()
    ref = peft.get_peft_model(base, peft.LoraConfig(**kw))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.initialize_lora_eva_weights(ref, data, show_progress_bar=False)
    lk.inject(ours, lk.LoraConfig(**kw))
    initialize_lora_eva_weights(ours, data, show_progress_bar=False)
    assert_same_adapter(ours, ref)
    mine, theirs = get_state(ours).configs["default"], ref.peft_config["default"]
    assert mine.rank_pattern == dict(theirs.rank_pattern) and len(mine.rank_pattern) > 0  # ranks were moved
    assert mine.alpha_pattern == dict(theirs.alpha_pattern)
    assert sorted(mine.target_modules) == sorted(theirs.target_modules)
    ranks = {n: m.r["default"] for n, m in ours.named_modules() if isinstance(m, lk.layers.LoraLayer)}
    assert sum(ranks.values()) == 4 * 2 * len(TARGETS)  # the budget: r per targeted layer, redistributed


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_corda_decomposition_and_residual_equal_peft(method):
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda as peft_preprocess

    base = models.llama()
    ours, plain = copy.deepcopy(base), copy.deepcopy(base)
    kw = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="corda")
    calib = [models.ids(1, 10, seed=i) for i in range(24)]  # one sample per call, PEFT's recipe
    pcfg = peft.LoraConfig(**kw, corda_config=CordaConfig(corda_method=method))
    peft_preprocess(base, pcfg, run_model=lambda: [base(input_ids=x) for x in calib])
    ref = peft.get_peft_model(base, pcfg)
    cfg = lk.LoraConfig(**kw, corda_config={"corda_method": method})
    preprocess_corda(ours, cfg, run_model=lambda: [ours(input_ids=x) for x in calib])
    lk.inject(ours, cfg)
    assert_same_adapter(ours, ref)
    torch.testing.assert_close(logits(ours), logits(plain), atol=1e-4, rtol=0)  # W_res + s·B·A = W
    assert not any("eigens" in vars(m) for m in ours.modules())  # the data is dropped once used, as PEFT


@pytest.mark.parametrize("direction, scale", [("ArB2r", "stable"), ("ArBr", "weight_svd"), ("random", "gd_scale"),
                                              ("A2rBr", "unit")])
def test_lora_ga_factors_and_adjusted_base_equal_peft(direction, scale):
    from peft.tuners.lora.loraga import preprocess_loraga as peft_preprocess

    base = models.llama()
    ours, plain = copy.deepcopy(base), copy.deepcopy(base)
    kw = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="lora_ga")
    data = batches()

    def step(m):
        return lambda: [m(**b, labels=b["input_ids"]).loss.backward() for b in data]

    pcfg = peft.LoraConfig(**kw, lora_ga_config=peft.LoraGAConfig(direction=direction, scale=scale))
    peft_preprocess(base, pcfg, step(base))
    torch.manual_seed(5)  # the randomized SVD (and "random"'s draw) use the global generator, in layer order
    ref = peft.get_peft_model(base, pcfg)
    cfg = lk.LoraConfig(**kw, lora_ga_config={"direction": direction, "scale": scale})
    flags = {n: p.requires_grad for n, p in ours.named_parameters()}
    preprocess_loraga(ours, cfg, step(ours))
    assert flags == {n: p.requires_grad for n, p in ours.named_parameters()}
    assert all(p.grad is None for p in ours.parameters())
    torch.manual_seed(5)
    lk.inject(ours, cfg)
    assert_same_adapter(ours, ref)
    torch.testing.assert_close(logits(ours), logits(plain), atol=1e-4, rtol=0)


def _perturb(model, seed: int = 7) -> None:
    """Stand-in for training: every factor moves."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_" in n:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def test_eva_files_both_ways(tmp_path):
    base = models.llama()
    ours = copy.deepcopy(base)
    lk.inject(ours, lk.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="eva"))
    initialize_lora_eva_weights(ours, batches(), show_progress_bar=False)
    _perturb(ours)
    lk.save_adapter(ours, tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert written["init_lora_weights"] == "eva" and written["eva_config"]["rho"] == 2.0
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(logits(theirs), logits(ours), atol=1e-5, rtol=0)
    theirs.save_pretrained(tmp_path / "theirs")
    back = lk.load_adapter(copy.deepcopy(base), tmp_path / "theirs")  # needs no data: A, B are in the file
    torch.testing.assert_close(logits(back), logits(ours), atol=1e-5, rtol=0)
    assert get_state(back).configs["default"].init_lora_weights == "eva"


@pytest.mark.parametrize("init", ["corda", "lora_ga"])
def test_adapters_that_moved_W_from_data_convert_to_plain_lora_for_the_original_base(init, tmp_path):
    base = models.llama()
    ours = copy.deepcopy(base)
    cfg = lk.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init)
    data = batches()
    if init == "corda":
        preprocess_corda(ours, cfg, run_model=lambda: [ours(**b) for b in data])
    else:
        preprocess_loraga(ours, cfg, lambda: [ours(**b, labels=b["input_ids"]).loss.backward() for b in data])
    lk.inject(ours, cfg)
    start = initial_factors(ours)
    _perturb(ours)
    convert_to_lora(ours, tmp_path, start)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["init_lora_weights"] is True and written["r"] == 8 and written["lora_alpha"] == 16
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)  # the ORIGINAL base
    torch.testing.assert_close(logits(theirs), logits(ours), atol=1e-5, rtol=0)
    mine = lk.load_adapter(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(logits(mine), logits(ours), atol=1e-5, rtol=0)


def test_loftq_adapter_reloads_onto_the_original_weights_in_peft_and_lorakit(tmp_path, peft_loftq_on_cpu):
    pytest.importorskip("bitsandbytes")
    base = models.llama()
    ours = copy.deepcopy(base)
    lk.inject(ours, lk.LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights="loftq",
                                  loftq_config={"loftq_bits": 4, "loftq_iter": 2}))
    _perturb(ours)
    lk.save_adapter(ours, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["loftq_config"] == {"loftq_bits": 4,
                                                                                           "loftq_iter": 2}
    mine = lk.load_adapter(copy.deepcopy(base), tmp_path)  # W -> Q(W') again, then the file's A, B
    torch.testing.assert_close(logits(mine), logits(ours), atol=0, rtol=0)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(logits(theirs), logits(ours), atol=1e-6, rtol=0)
    theirs.save_pretrained(tmp_path / "theirs")
    back = lk.load_adapter(copy.deepcopy(base), tmp_path / "theirs")
    torch.testing.assert_close(logits(back), logits(ours), atol=1e-6, rtol=0)


def test_sub_configs_round_trip_through_peft():
    """lorakit writes PEFT's defaults into each sub-config, and PEFT's LoraConfig reads them back."""
    for init, field in (("eva", "eva_config"), ("corda", "corda_config"), ("lora_ga", "lora_ga_config"),
                        ("loftq", "loftq_config")):
        extra = {"loftq_config": {"loftq_bits": 8}} if init == "loftq" else {}
        d = lk.LoraConfig(target_modules=["q"], init_lora_weights=init, **extra).to_peft_dict()
        ref = peft.LoraConfig(**{k: v for k, v in d.items() if k != "peft_type"})
        theirs = ref.to_dict()[field]
        assert (theirs if isinstance(theirs, dict) else vars(theirs)) == d[field], field
        assert lk.LoraConfig.from_peft_dict(json.loads(json.dumps(ref.to_dict(), default=sorted))) == \
            lk.LoraConfig.from_peft_dict(d)
