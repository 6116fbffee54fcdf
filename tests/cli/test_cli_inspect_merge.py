"""``lorakit inspect`` and ``lorakit merge`` on real files (PEFT's and lorakit's)."""

from __future__ import annotations

import json
import subprocess
import sys

import peft
import pytest
import torch
import transformers as tf

import lorakit as lk
from io_models import base_model, logits, perturb_adapters, perturb_trainable
from lorakit.cli import main
from runners import SRC


@pytest.fixture(scope="module")
def peft_dora_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("peft_dora")
    cfg = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}, use_dora=True,
                          init_lora_weights=False, task_type="CAUSAL_LM")
    pm = peft.get_peft_model(base_model("llama"), cfg)
    perturb_trainable(pm)
    pm.save_pretrained(d)
    return d, pm.eval()


def test_inspect_reports_a_peft_adapter(peft_dora_dir, capsys):
    d, _ = peft_dora_dir
    assert main(["inspect", str(d), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["peft_version"] == peft.__version__ and info["task_type"] == "CAUSAL_LM"
    assert info["lorakit_can_load"] is True
    assert {m: (v["rank"], v["dora"]) for m, v in info["modules"].items()} == {
        f"model.layers.{i}.self_attn.{p}_proj": (4 if p == "q" else 2, True) for i in (0, 1) for p in "qv"}
    # parameters: A (r, 32) + B (out, r) + magnitude (out,) per module; q out 32, v out 16
    assert info["parameters"] == 2 * ((4 * 32 + 32 * 4 + 32) + (2 * 32 + 16 * 2 + 16))
    assert info["size_bytes"] == sum(p.stat().st_size for p in d.iterdir() if p.is_file())
    assert main(["inspect", str(d)]) == 0
    text = capsys.readouterr().out
    assert f"written by PEFT: {peft.__version__}" in text
    assert "model.layers.1.self_attn.v_proj  r=2  alpha=8  DoRA" in text


def test_inspect_lists_sub_adapters_and_refuses_bad_input(tmp_path, capsys):
    model = lk.inject(base_model("llama"), lk.LoraConfig(r=4, target_modules=["q_proj"]))
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["o_proj"]), "second")
    lk.save_adapter(model, tmp_path)
    lk.save_adapter(model, tmp_path, "second")
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["peft_version"] is None
    assert [v["rank"] for v in info["sub_adapters"]["second"]["modules"].values()] == [2, 2]
    assert main(["inspect", str(tmp_path / "missing")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_merge_cli_gives_a_plain_model_with_the_adapted_outputs(peft_dora_dir, tmp_path, capsys):
    d, pm = peft_dora_dir
    base_dir = tmp_path / "base"
    base_model("llama").save_pretrained(base_dir)
    assert main(["merge", "--base", str(base_dir), "--adapter", str(d), "--out", str(tmp_path / "out")]) == 0
    assert "LlamaForCausalLM" in capsys.readouterr().out
    merged = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(logits(merged, "llama"), logits(pm, "llama"), atol=1e-5, rtol=0)


def test_merge_cli_uses_architectures_without_task_type(tmp_path):
    model = lk.inject(base_model("bert_cls"), lk.LoraConfig(r=4, target_modules=["query"], init_lora_weights=False))
    perturb_adapters(model)
    lk.save_adapter(model, tmp_path / "adapter", task_type=None)  # no head saved: task_type not recorded
    assert json.loads((tmp_path / "adapter/adapter_config.json").read_text())["task_type"] is None
    base_model("bert_cls").save_pretrained(tmp_path / "base")
    assert main(["merge", "--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(tmp_path / "out")]) == 0
    merged = tf.BertForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(logits(merged, "bert_cls"), logits(model.eval(), "bert_cls"), atol=1e-5, rtol=0)


def test_merge_cli_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "base").mkdir()
    assert main(["merge", "--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "none"),
                 "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lorakit merge: error: adapter directory") and err.count("\n") == 1


@pytest.mark.parametrize("command", ["inspect", "merge"])
def test_help_explains_itself(command):
    out = subprocess.run([sys.executable, "-m", "lorakit", command, "--help"], capture_output=True, text=True,
                         check=True, env={"PYTHONPATH": SRC}).stdout
    assert ("PEFT-format" in out) and ("usage: lorakit " + command) in out
