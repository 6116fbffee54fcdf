"""``lorakit convert``: every format through the command line and back, refusals that write nothing, and
``lorakit inspect``'s consumer listing agreeing with what the writers do."""

from __future__ import annotations

import json

import pytest
import torch

import lorakit as lk
from lorakit.cli import main

import models

pytest.importorskip("gguf")

SCALED = dict(r=4, lora_alpha=8, use_rslora=True, rank_pattern={"v_proj": 2}, alpha_pattern={"o_proj": 3.0},
              target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"])


def _model(**cfg):
    torch.manual_seed(0)
    model = models.llama()
    if cfg:
        lk.inject(model, lk.LoraConfig(**cfg))
        models.randomize_adapters(model, seed=3)
    return model


@pytest.fixture()
def saved(tmp_path):
    model = _model(**SCALED)
    base = _model()
    base.save_pretrained(tmp_path / "base")
    return model, lk.save_adapter(model, tmp_path / "adapter"), tmp_path


@pytest.mark.parametrize("fmt,out", [("gguf", "a.gguf"), ("mlx", "mlx"), ("kohya", "k.safetensors"),
                                     ("diffusers", "d")])
def test_convert_there_and_back_gives_the_same_logits(saved, capsys, fmt, out):
    model, adapter, tmp = saved
    base = ["--base", str(tmp / "base")]
    assert main(["convert", str(adapter), "--to", fmt, "--out", str(tmp / out), *base]) == 0
    assert f"wrote {fmt} adapter (10 adapted modules, from peft)" in capsys.readouterr().out
    src = tmp / out / "pytorch_lora_weights.safetensors" if fmt == "diffusers" else tmp / out
    assert main(["convert", str(src), "--to", "peft", "--out", str(tmp / "back"), *base]) == 0
    fresh = _model()
    lk.load_adapter(fresh, tmp / "back")
    x = models.ids()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).logits, model(x).logits, atol=1e-5, rtol=1e-5)


def test_convert_refuses_dora_for_gguf_in_one_line_and_writes_nothing(tmp_path, capsys):
    model = _model(r=4, target_modules=["q_proj"], use_dora=True)
    adapter = lk.save_adapter(model, tmp_path / "adapter")
    _model().save_pretrained(tmp_path / "base")
    capsys.readouterr()
    assert main(["convert", str(adapter), "--to", "gguf", "--base", str(tmp_path / "base"),
                 "--out", str(tmp_path / "a.gguf")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lorakit convert: error: llama.cpp (GGUF LoRA) cannot take") and "DoRA" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "a.gguf").exists()


def test_convert_without_base_for_gguf_and_with_a_wrong_base_say_so(saved, capsys):
    model, adapter, tmp = saved
    assert main(["convert", str(adapter), "--to", "gguf", "--out", str(tmp / "a.gguf")]) == 1
    assert "needs --base" in capsys.readouterr().err
    gpt2 = models.gpt2()
    gpt2.save_pretrained(tmp / "gpt2")
    assert main(["convert", str(adapter), "--to", "mlx", "--base", str(tmp / "gpt2"), "--out", str(tmp / "m")]) == 1
    assert "match nothing in GPT2LMHeadModel" in capsys.readouterr().err
    assert not (tmp / "m").exists() and not (tmp / "a.gguf").exists()


# ---------------------------------------------------------------- inspect's listing = the writers' rules
CASES = {"plain": dict(r=4, target_modules=["q_proj"]), "dora": dict(r=4, target_modules=["q_proj"], use_dora=True),
         "lora_bias": dict(r=4, target_modules=["q_proj"], lora_bias=True),
         "saved_head": dict(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]),
         "tokens": dict(r=4, target_modules=["q_proj"], trainable_token_indices=[1, 2]),
         "bias_all": dict(r=4, target_modules=["q_proj"], bias="all"),
         "pissa": dict(r=4, target_modules=["q_proj"], init_lora_weights="pissa"),
         "embedding": dict(r=4, target_modules=["q_proj", "embed_tokens"])}


@pytest.mark.parametrize("case", list(CASES))
def test_inspect_lists_a_consumer_exactly_when_its_writer_accepts_the_adapter(tmp_path, capsys, case):
    from lorakit.io.bridges.gguf import write_gguf
    from lorakit.io.bridges.kohya import write_diffusers, write_kohya
    from lorakit.io.bridges.mlx import write_mlx

    model = _model(**CASES[case])
    adapter = lk.save_adapter(model, tmp_path / "adapter")
    assert main(["inspect", str(adapter), "--json"]) == 0
    listed = {k: v["ok"] for k, v in json.loads(capsys.readouterr().out)["consumers"].items()}
    writers = {"llama.cpp": lambda: write_gguf(adapter, tmp_path / "a.gguf", _model()),
               "mlx": lambda: write_mlx(adapter, tmp_path / "mlx"),
               "kohya": lambda: write_kohya(adapter, tmp_path / "k.safetensors"),
               "diffusers": lambda: write_diffusers(adapter, tmp_path / "d.safetensors")}
    for consumer, write in writers.items():
        try:
            write()
            accepted = True
        except ValueError as e:
            accepted = False
            assert "cannot take" in str(e), (consumer, e)
        assert accepted == listed[consumer], (case, consumer)
    assert listed["peft"]
    code = main(["inspect", str(adapter), "--check", "llama.cpp"])
    text = capsys.readouterr().out
    assert (code == 0) == listed["llama.cpp"] and ("can take it" if code == 0 else "cannot take it") in text
