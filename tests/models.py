"""Tiny models for tests: HF architectures from small configs, a conv net, and a Transformer block
on nn.MultiheadAttention (the shape of seed 000's LoRATransformerBlock). Random init, no downloads."""

from __future__ import annotations

import torch
from torch import nn

VOCAB = 96


class TransformerBlock(nn.Module):
    """Pre-norm Transformer block: x + MHA(LN(x)), then x + FFN(LN(x))."""

    def __init__(self, d: int = 32, heads: int = 4, ff: int = 64, vocab: int = VOCAB, n_classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, ff), nn.GELU(), nn.Linear(ff, d))
        self.head = nn.Linear(d, n_classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)  # (B, T, d)
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.ff(self.ln2(x))
        return self.head(x.mean(1))  # (B, n_classes)


class ConvNet(nn.Module):
    def __init__(self, n_classes: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, dilation=1)
        self.conv1d = nn.Conv1d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))  # (B, 8, H, W)
        x = torch.relu(self.conv2(x))  # (B, 16, H/2, W/2)
        x = torch.relu(self.conv1d(x.flatten(2)))  # (B, 16, HW/4)
        return self.fc(x.mean(-1))


def llama(tie: bool = False, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


def bert_cls():
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     vocab_size=VOCAB, max_position_embeddings=64, num_labels=3)
    return BertForSequenceClassification(cfg).eval()


def t5():
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(d_model=32, d_ff=64, d_kv=8, num_layers=2, num_decoder_layers=2, num_heads=4, vocab_size=VOCAB)
    return T5ForConditionalGeneration(cfg).eval()


def ids(batch: int = 2, seq: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def run(model: nn.Module, kind: str, x) -> torch.Tensor:
    """The model's main output tensor for input x."""
    if kind == "t5":
        return model(input_ids=x, decoder_input_ids=x).logits
    if kind in ("llama", "gpt2", "bert"):
        return model(input_ids=x).logits
    return model(x)


def copy_from_peft(ours: nn.Module, peft_model: nn.Module) -> int:
    """Copy every adapter tensor of a PEFT model into the same-named lorakit tensor.

    PEFT's in-memory key is ``base_model.model.<our key>``: the structures are identical.
    Returns the number of tensors copied; raises if a PEFT adapter tensor has no twin.
    """
    sd = ours.state_dict()
    n = 0
    copied: set[int] = set()
    with torch.no_grad():
        for k, v in peft_model.state_dict().items():
            # PEFT keeps DoRA's m in a module (`...lora_magnitude_vector.<name>.weight`), lorakit in a
            # ParameterDict (`...lora_magnitude_vector.<name>`): PEFT's on-disk key once the name is stripped
            ours_k = k.removeprefix("base_model.model.")
            if ".lora_magnitude_vector." in ours_k:
                ours_k = ours_k.removesuffix(".weight")
            is_adapter = any(t in ours_k for t in (".lora_", ".modules_to_save.", ".trainable_tokens_delta."))
            if not is_adapter:
                continue
            if ours_k not in sd and v.data_ptr() in copied:
                continue  # PEFT's tied token adapter lists the embedding's rows a second time
            if ours_k not in sd:
                raise KeyError(f"PEFT tensor {k} has no lorakit twin {ours_k}")
            sd[ours_k].copy_(v)
            copied.add(v.data_ptr())
            n += 1
    return n


def randomize_adapters(model: nn.Module, seed: int = 0, std: float = 0.1) -> None:
    """Give every adapter tensor random values (so that B != 0 and adapters are not no-ops)."""
    import lorakit as lk
    from lorakit.adapters import wrappers

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in lk.adapter_names(model):
            for _, w in wrappers(model):
                if hasattr(w, "r"):
                    for p in w.adapter_parameters(name):
                        p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if p.dim() == 1 else 0.0))


# ---------------------------------------------------------------- shared test helpers
def snapshot(model: nn.Module) -> tuple[dict, dict, list]:
    """Everything a failed operation must leave as it was: tensors (cloned), flags, module types."""
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    types = [(n, type(m).__name__) for n, m in model.named_modules()]
    return tensors, flags, types


def assert_unchanged(model: nn.Module, snap: tuple[dict, dict, list]) -> None:
    """``model`` is as ``snapshot`` found it: the same modules, flags, and every tensor bit for bit."""
    tensors, flags, types = snapshot(model)
    assert types == snap[2]
    assert flags == snap[1]
    assert tensors.keys() == snap[0].keys()
    for k in tensors:
        assert torch.equal(tensors[k], snap[0][k]), k


def rows_alone(model: nn.Module, rows: list[str], run, restore: str) -> list:
    """The reference for a mixed batch: ``run(i)`` with row i's adapter alone (``set_adapter``, or
    ``disable_adapters`` for "__base__"); ``restore`` is made active again afterwards."""
    import lorakit as lk

    outs = []
    for i, name in enumerate(rows):
        if name == "__base__":
            with lk.disable_adapters(model):
                outs.append(run(i))
        else:
            lk.set_adapter(model, name)
            outs.append(run(i))
    lk.set_adapter(model, restore)
    return outs


def save_tiny_llama(directory, hidden_size: int = 32) -> str:
    """lorakit's built-in tiny-llama (seed 0) and its tokenizer, saved as a transformers directory."""
    from lorakit.models import tiny_llama

    model, tok = tiny_llama(hidden_size=hidden_size, num_layers=2, seed=0)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return str(directory)


def write_reverse_sft(path, n: int = 60) -> str:
    """``n`` prompt/completion lines teaching to reverse a short word (``"abc="`` -> ``"cba"``)."""
    import json

    g = torch.Generator().manual_seed(0)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            k = int(torch.randint(2, 6, (1,), generator=g))
            word = "".join(chr(97 + int(c)) for c in torch.randint(0, 5, (k,), generator=g))
            f.write(json.dumps({"prompt": f"{word}=", "completion": word[::-1]}) + "\n")
    return str(path)


EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]  # the fused expert tensors of transformers v5 MoE


def moe(kind: str) -> nn.Module:
    """A 2-layer, 4-expert model of ``kind`` (seed 0)."""
    import transformers as tf

    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                  vocab_size=VOCAB, max_position_embeddings=64, num_experts_per_tok=2)
    torch.manual_seed(0)
    if kind == "qwen3_moe":
        return tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(intermediate_size=64, moe_intermediate_size=16,
                                                         num_experts=4, **common)).eval()
    if kind == "mixtral":
        return tf.MixtralForCausalLM(tf.MixtralConfig(intermediate_size=16, num_local_experts=4, **common)).eval()
    cfg = tf.GptOssConfig(intermediate_size=16, num_local_experts=4, layer_types=["full_attention"] * 2,
                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **common)
    return tf.GptOssForCausalLM(cfg).eval()


BERT_SHAPE = (32, 2, 4, 64, 2)  # hidden, layers, heads, feed-forward width, classes


def tiny_bert(impl: str = "eager") -> nn.Module:
    """A 2-layer BERT sequence classifier of shape :data:`BERT_SHAPE` (seed 0)."""
    from transformers import BertConfig, BertForSequenceClassification

    D, L, H, FF, LABELS = BERT_SHAPE
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=D, num_hidden_layers=L, num_attention_heads=H, intermediate_size=FF,
                     vocab_size=100, max_position_embeddings=32, num_labels=LABELS, attn_implementation=impl)
    return BertForSequenceClassification(cfg).eval()
