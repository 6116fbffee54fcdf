"""Tiny random transformers models and inputs shared by the io tests (no tests here).

Each factory is seeded, so two calls give bit-identical base weights; tests take deep copies.
"""

from __future__ import annotations

import copy
import functools
import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)

VOCAB = 64


@functools.cache
def _base(kind: str):
    import transformers as tf

    torch.manual_seed(0)
    if kind in ("llama", "llama_tied"):
        cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=kind == "llama_tied")
        model = tf.LlamaForCausalLM(cfg)
    elif kind == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=16))
    elif kind == "bert_cls":
        cfg = tf.BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=16, num_labels=3)
        model = tf.BertForSequenceClassification(cfg)
    elif kind == "t5":
        cfg = tf.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                          decoder_start_token_id=0)
        model = tf.T5ForConditionalGeneration(cfg)
    else:
        raise ValueError(kind)
    return model.eval()


def base_model(kind: str):
    """A fresh copy of the tiny ``kind`` model (same weights every call)."""
    return copy.deepcopy(_base(kind))


def model_inputs(kind: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 7), generator=g)
    if kind == "t5":
        return {"input_ids": ids, "decoder_input_ids": torch.randint(0, VOCAB, (2, 5), generator=g)}
    return {"input_ids": ids}


def logits(model, kind: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**model_inputs(kind)).logits


def perturb_trainable(model, seed: int = 0, scale: float = 0.05) -> None:
    """Move every trainable tensor (LoRA factors, DoRA magnitudes, saved heads, trained biases)
    off its initial value, so no adapter part is a no-op and every saved tensor matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))


def perturb_adapters(model, seed: int = 0, scale: float = 0.05) -> None:
    """Same for every adapter's factors whether active or not (selected by module type)."""
    from lorakit.adapters import wrappers

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, w in wrappers(model):
            for name in w.adapter_names:
                for p in w.adapter_parameters(name):
                    p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))
