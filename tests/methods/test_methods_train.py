"""``lorakit train --method NAME`` on a tiny BERT classifier: each baseline trains and stores what it must."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import BertConfig, BertForSequenceClassification

from lorakit.cli import main
from lorakit.models import char_tokenizer

torch.set_num_threads(1)
D, L = 32, 2


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-bert")
    tok = char_tokenizer()
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=D, num_hidden_layers=L, num_attention_heads=4, intermediate_size=64,
                     vocab_size=len(tok), max_position_embeddings=32, pad_token_id=tok.pad_token_id)
    BertForSequenceClassification(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def words_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "words.csv"
    rows = [f"{w},{lab}" for w, lab in [("good", "pos"), ("bad", "neg"), ("nice", "pos"), ("awful", "neg")] * 8]
    path.write_text("text,label\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("method,expected", [
    ("adapter", 2 * L * (2 * D * 16 + 16 + D) + (2 * L + 1) * 2 * D + D * 2 + 2),  # m=16, LayerNorms, head
    ("prefix", L * 2 * 10 * D + D * 2 + 2),  # P=10 keys and values per layer, head
    ("head", D * 2 + 2),
])
def test_train_with_a_baseline_method_stores_its_trainable_tensors(bert_dir, words_csv, tmp_path, method, expected):
    out = tmp_path / "run"
    assert main(["train", "--method", method, "--model", bert_dir, "--data", words_csv, "--max-steps", "3",
                 "--batch-size", "8", "--lr", "1e-3", "--threads", "1", "--no-progress", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == method and metrics["trainable_params"] == expected
    stored = load_file(out / "trainable.safetensors")
    assert sum(t.numel() for t in stored.values()) == expected
    assert not (out / "adapter").exists()


def test_bitfit_on_a_model_without_biases_is_an_input_error(tmp_path, capsys):
    from lorakit.models import tiny_llama

    model, tok = tiny_llama(hidden_size=32, num_layers=1)
    model.save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    data = tmp_path / "sft.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": "ab=", "completion": "ba"}) for _ in range(10)) + "\n")
    rc = main(["train", "--method", "bitfit", "--model", str(tmp_path / "llama"), "--data", str(data),
               "--max-steps", "1", "--no-progress", "--out", str(tmp_path / "run")])
    assert rc == 1
    assert "BitFit needs bias parameters" in capsys.readouterr().err
