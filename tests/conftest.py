import os
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))  # tests/models.py
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny Llama (hidden 32) saved as a transformers directory, with its tokenizer (one per test module)."""
    import models

    return models.save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), hidden_size=32)


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory):
    """60 prompt/completion lines of the reverse-a-word task (JSONL)."""
    import models

    return models.write_reverse_sft(tmp_path_factory.mktemp("data") / "sft.jsonl", n=60)
