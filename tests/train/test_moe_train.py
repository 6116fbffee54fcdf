"""``lorakit train`` on a Mixture-of-Experts model end to end: a tiny Qwen3-MoE directory, LoRA on its
fused experts (``--target-parameters``) beside the attention projections and the head, the loss going
down, the experts' factors trained, and the adapter it writes loading in PEFT with lorakit's outputs."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import lorakit as lk
from lorakit.cli import main
from lorakit.layers.experts import ExpertsWrapper
from lorakit.models import char_tokenizer

import models

EXPERTS = "mlp.experts.gate_up_proj,mlp.experts.down_proj"


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    """A 2-layer, 8-expert (top-2) Qwen3-MoE with the character tokenizer, saved as a model directory."""
    import transformers as tf

    tok = char_tokenizer()
    cfg = tf.Qwen3MoeConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=8, intermediate_size=64, moe_intermediate_size=16, num_experts=8,
                            num_experts_per_tok=2, vocab_size=len(tok), max_position_embeddings=256,
                            pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                            eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny-moe")
    tf.Qwen3MoeForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


def test_train_lora_on_moe_experts_end_to_end(moe_dir, tmp_path):
    data = models.write_reverse_sft(tmp_path / "sft.jsonl", n=40)
    out = tmp_path / "run"
    assert main(["train", "--model", moe_dir, "--data", data, "--task", "causal-lm", "--target-parameters", EXPERTS,
                 "--target-modules", "q_proj,v_proj", "--modules-to-save", "lm_head", "--r", "4", "--lr", "1e-2",
                 "--batch-size", "8", "--max-steps", "30", "--eval-split", "0.2", "--threads", "1", "--no-progress",
                 "--out", str(out)]) == 0
    history = json.loads((out / "history.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_loss"] < 0.8 * history["train"][0]["loss"]
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["target_parameters"] == EXPERTS.split(",")
    tensors = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    experts = {k: v for k, v in tensors.items() if ".mlp.experts." in k}
    assert len(experts) == 8  # A and B of two parameters in two layers, PEFT's nesting:
    assert "base_model.model.model.layers.0.mlp.experts.lora_A.weight" in experts  # down_proj (outer)
    assert "base_model.model.model.layers.0.mlp.experts.base_layer.lora_B.weight" in experts  # gate_up_proj
    assert all(v.abs().max() > 0 for k, v in experts.items() if "lora_B" in k)  # B left zero: the experts trained

    ids = models.ids(batch=2, seq=9)
    ours = lk.load_adapter(AutoModelForCausalLM.from_pretrained(moe_dir), str(out / "adapter")).eval()
    assert all(m.routed_reason is None for m in ours.modules() if isinstance(m, ExpertsWrapper))
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(moe_dir), str(out / "adapter"))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs.eval()(input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-5)


def test_target_parameters_alone_adapt_only_those(moe_dir):
    """``--target-parameters`` without ``--target-modules``: no default attention targets are added
    (as PEFT's config with ``target_modules=None``); with neither, the family's default modules."""
    from lorakit.cli import build_parser
    from lorakit.cli.train import settings_from_args
    from lorakit.train.job import lora_config
    from lorakit.train.settings import JobSettings

    model = AutoModelForCausalLM.from_pretrained(moe_dir)
    args = build_parser().parse_args(["train", "--target-parameters", EXPERTS])
    cfg, why = lora_config(JobSettings.from_settings({**settings_from_args(args), "task": "causal-lm"}), model)
    assert cfg.target_parameters == EXPERTS.split(",") and cfg.target_modules is None
    assert "only those parameters" in why
    cfg, _ = lora_config(JobSettings.from_settings({"task": "causal-lm"}), model)
    assert cfg.target_modules == "all-linear"
