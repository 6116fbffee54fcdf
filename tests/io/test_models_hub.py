"""Models by Hub id through a local Hugging Face cache (HF_HUB_OFFLINE=1), dtypes, and exporting a built-in."""

from __future__ import annotations

import os

import pytest
import torch

from lorakit.models import export, load_model, load_tokenizer, tiny_llama

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(root, repo_id: str, model, tok) -> str:
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/...}."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / COMMIT
    model.save_pretrained(snap)
    tok.save_pretrained(snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return str(root)


@pytest.fixture
def cached(tmp_path, monkeypatch):
    model, tok = tiny_llama(hidden_size=32, num_layers=1, seed=3)
    cache = hub_cache(tmp_path / "hf" / "hub", "someorg/tiny", model, tok)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache, model


def test_hub_id_loads_from_the_cache_offline(cached):
    _, ref = cached
    model, tok = load_model("someorg/tiny", "causal-lm")
    assert type(model).__name__ == "LlamaForCausalLM"
    for (n, p), (_, q) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(p, q), n
    ref_tok = load_tokenizer("tiny-llama")
    assert tok("ab", add_special_tokens=False)["input_ids"] == ref_tok("ab", add_special_tokens=False)["input_ids"]


def test_hub_cache_env_and_dtype(cached, monkeypatch):
    cache, _ = cached
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("HF_HUB_CACHE", cache)
    model, _ = load_model("someorg/tiny", "causal-lm", dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_hub_id_not_cached_offline_is_a_clear_error(cached):
    with pytest.raises(FileNotFoundError, match=r"'someorg/absent' is not in the Hugging Face cache .* "
                                                 r"HF_HUB_OFFLINE is set.*hf download someorg/absent"):
        load_model("someorg/absent", "causal-lm")


def test_not_a_model_at_all():
    with pytest.raises(FileNotFoundError, match="neither a built-in name"):
        load_model("./no/such/dir", "causal-lm")


def test_export_tiny_llama_is_the_seeded_builtin(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export("tiny-llama", str(tmp_path / "tl"), seed=5)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "tl")
    ref, tok = tiny_llama(seed=5)
    for (n, p), (_, q) in zip(loaded.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(p, q), n
    assert AutoTokenizer.from_pretrained(tmp_path / "tl").get_vocab() == tok.get_vocab()
    assert os.path.isfile(tmp_path / "tl" / "config.json")


def test_cli_trains_and_generates_from_a_hub_id_offline(cached, tmp_path, capsys):
    import json

    from lorakit.cli import main

    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": w, "completion": w[::-1]}) + "\n" for w in ["ab", "abc", "ba"] * 4))
    out = tmp_path / "run"
    n = torch.get_num_threads()
    try:
        assert main(["train", "--model", "someorg/tiny", "--data", str(data), "--max-steps", "1", "--eval-split", "0",
                     "--threads", "1", "--no-progress", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(n)
    assert json.loads((out / "run_config.json").read_text())["model"] == "someorg/tiny"
    adapter_cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == "someorg/tiny"
    capsys.readouterr()
    assert main(["generate", "--adapter", str(out), "--prompt", "ab", "--max-new-tokens", "2"]) == 0
    assert main(["train", "--model", "someorg/absent", "--data", str(data), "--out", str(tmp_path / "r2")]) == 1
    err = capsys.readouterr().err
    assert "'someorg/absent' is not in the Hugging Face cache" in err and err.count("\n") == 1
    assert not (tmp_path / "r2").exists()
