"""``lorakit inspect DIR --check vllm``: whether vLLM (and LoRAX) can serve an adapter, and why not —
vLLM's own rules (PEFTHelper.validate_legal): no modules_to_save, no DoRA, rank within
--max-lora-rank (one of 1, 8, 16, 32, 64, 128, 256, 320, 512), bias only when enabled."""

from __future__ import annotations

import json

import pytest

import lorakit as lk
from lorakit.cli import main
from lorakit.io.keymap import parse_file_key

import models


def _saved(tmp_path, **cfg):
    model = models.llama()
    lk.inject(model, lk.LoraConfig(target_modules=["q_proj", "v_proj"], **cfg))
    return lk.save_adapter(model, tmp_path)


def _check(capsys, directory) -> tuple[int, str]:
    code = main(["inspect", str(directory), "--check", "vllm"])
    return code, capsys.readouterr().out


def test_a_plain_adapter_is_servable(tmp_path, capsys):
    code, out = _check(capsys, _saved(tmp_path, r=8))
    assert code == 0 and "can serve it" in out and "note" not in out


@pytest.mark.parametrize("cfg,problem", [
    (dict(r=8, use_dora=True), "DoRA"),
    (dict(r=8, modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(r=1024), "above vLLM's largest --max-lora-rank"),
])
def test_what_vllm_refuses_is_named_and_exits_3(tmp_path, capsys, cfg, problem):
    code, out = _check(capsys, _saved(tmp_path, **cfg))
    assert code == 3 and "cannot serve it" in out and problem in out


def test_a_rank_above_the_default_needs_a_flag(tmp_path, capsys):
    code, out = _check(capsys, _saved(tmp_path, r=8, rank_pattern={"q_proj": 48}))
    assert code == 0 and "--max-lora-rank 64" in out  # the largest rank in the file, not the config's r


def test_json_carries_the_verdict(tmp_path, capsys):
    assert main(["inspect", str(_saved(tmp_path, r=4, use_dora=True)), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["vllm"]["servable"] is False and info["modules"]["model.layers.0.self_attn.q_proj"]["dora"]


def test_file_keys_are_read_with_the_layer_classes_attributes():
    assert parse_file_key("base_model.model.model.layers.0.mlp.lora_A.weight") == ("model.layers.0.mlp", "lora_A",
                                                                                   "weight")
    assert parse_file_key("base_model.model.embed.lora_embedding_B") == ("embed", "lora_embedding_B", "")
    assert parse_file_key("base_model.model.lora_A.lora_B.weight") == ("lora_A", "lora_B", "weight")
    assert parse_file_key("base_model.model.classifier.weight") is None
