"""``lorakit train --quantize nf4`` and ``lorakit merge`` of its adapter, end to end on a tiny Llama."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("bitsandbytes")

import lorakit as lk  # noqa: E402
from lorakit.cli import main  # noqa: E402
from lorakit.layers import QuantizedLinear, wrappers  # noqa: E402
from lorakit.models import tiny_llama  # noqa: E402
from lorakit.models.quantized import load_quantized, prepare_for_kbit_training  # noqa: E402
from lorakit.train.job import run_job  # noqa: E402

import models  # noqa: E402
import quantized_models as qm  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return models.save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-q"), hidden_size=64)


@pytest.fixture(scope="module")
def run(llama_dir, sft_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("qrun") / "run"
    code = main(["train", "--model", llama_dir, "--data", sft_file, "--task", "causal-lm", "--quantize", "nf4",
                 "--target-modules", "all-linear", "--modules-to-save", "lm_head", "--r", "4", "--lr", "1e-2",
                 "--batch-size", "8", "--eval-split", "0.2", "--threads", "1", "--no-progress", "--max-steps", "30",
                 "--out", str(out)])
    assert code == 0
    return out


def test_train_quantize_nf4_lowers_the_loss_and_saves_a_peft_adapter(run):
    metrics = json.loads((run / "metrics.json").read_text())
    history = json.loads((run / "history.json").read_text())
    assert metrics["eval_loss"] < 0.6 * history["train"][0]["loss"]
    assert json.loads((run / "run_config.json").read_text())["quantize"] == "nf4"
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    # 14 quantized projections have LoRA factors; lm_head (not quantized) is trained in full
    assert metrics["trainable_params"] == 2 * 4 * (4 * 64 * 2 + 3 * (64 + 160)) + 64 * tiny_llama()[0].config.vocab_size


def test_the_adapter_loads_onto_a_quantized_base_in_lorakit_and_peft_and_onto_a_plain_one(run, llama_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    x = qm.ids()
    ours = lk.load_adapter(qm.load_bnb(llama_dir, "nf4"), run / "adapter")
    assert sum(isinstance(w, QuantizedLinear) for _, w in wrappers(ours)) == 14
    theirs = PeftModel.from_pretrained(qm.load_bnb(llama_dir, "nf4"), run / "adapter")
    plain = lk.load_adapter(AutoModelForCausalLM.from_pretrained(llama_dir), run / "adapter")
    with torch.no_grad():
        y = ours(x).logits
        torch.testing.assert_close(theirs(x).logits, y, rtol=1e-6, atol=1e-6)
        # on the unquantized base the adapter computes W·x instead of deq(Q(W))·x: close, not equal
        y_plain = plain(x).logits
        with lk.disable_adapters(plain):
            moved = (y_plain - plain(x).logits).abs().max()
    assert 0 < (y_plain - y).abs().max() < moved


def test_lorakit_merge_writes_a_bf16_model_of_the_dequantized_base_plus_delta(run, llama_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    assert main(["merge", "--base", llama_dir, "--adapter", str(run / "adapter"), "--out", str(out)]) == 0
    assert "loading the base quantized (nf4)" in capsys.readouterr().out  # read from the run's run_config.json
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "quantization_config" not in config
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    # the same as merging in memory the base loaded as training loaded it
    model, _ = load_quantized(llama_dir, "causal-lm", "nf4")
    lk.load_adapter(prepare_for_kbit_training(model), run / "adapter")
    x = qm.ids()
    with torch.no_grad():
        y_adapted = model(x).logits
        expected = lk.merge_and_unload(model)
        y = merged(x).logits
        torch.testing.assert_close(y, expected(x).logits, rtol=0, atol=0)
    assert (y.float() - y_adapted).abs().max() <= 8 * 2.0 ** -8 * max(1.0, float(y_adapted.abs().max()))  # bf16


def test_quantize_refuses_methods_that_train_the_base(llama_dir, sft_file, tmp_path):
    with pytest.raises(ValueError, match="--quantize nf4 trains LoRA factors.*--method full"):
        run_job({"model": llama_dir, "data": sft_file, "task": "causal-lm", "quantize": "nf4", "method": "full",
                 "out": str(tmp_path / "r"), "progress": False})
