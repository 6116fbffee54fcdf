"""Tiny quantized Llamas for the QLoRA tests: one random base written once per session, loaded in
4-bit NF4 / FP4 and 8-bit through transformers' BitsAndBytesConfig (device_map="cpu"), and a torchao
NF4 copy built in memory. Hidden 64 (bitsandbytes' 4-bit blocks are 64 wide); the torchao model is
hidden 128 so that every weight is a multiple of torchao's 64·256 double-quantization block."""

from __future__ import annotations

import copy
import os
import warnings

import torch

from lorakit.layers.quant_formats import quant_format

VOCAB = 96
KINDS = ("nf4", "int8", "torchao")  # the three supported formats


def write_base(directory: str, bias: bool = False) -> str:
    """The tiny random Llama, saved in ``directory``; ``bias``: every projection has a bias."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, tie_word_embeddings=False,
                      attention_bias=bias, mlp_bias=bias)
    LlamaForCausalLM(cfg).save_pretrained(directory)
    return directory


def hold(model: torch.nn.Module) -> torch.nn.Module:
    """Turn bitsandbytes' in-place CPU repacking off on every quantized layer (lorakit's wrappers
    do it for the layers they wrap), so a PEFT model and a lorakit model compute with the same bytes."""
    for m in model.modules():
        fmt = quant_format(m)
        if fmt is not None:
            fmt.hold(m)
    return model


def load_bnb(directory: str, kind: str, dtype: torch.dtype | None = None, *, held: bool = True,
             double_quant: bool = True):
    """The base in ``directory`` quantized by bitsandbytes: ``nf4`` / ``fp4`` (double quant unless
    ``double_quant=False``, bf16 compute) or ``int8``. ``dtype``: of the non-quantized parameters
    (default fp32). ``held=False``: as transformers loads it, bitsandbytes' CPU repacking on."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from lorakit.models.quantized import bnb_config

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    kwargs = {"dtype": dtype} if dtype is not None else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = bnb_config(kind, double_quant=double_quant)
        model = AutoModelForCausalLM.from_pretrained(directory, quantization_config=config, device_map="cpu", **kwargs)
    return hold(model.eval()) if held else model.eval()


_NF4_BASE = {}


def torchao_nf4():
    """``(model, fp32 original)``: a hidden-128 Llama whose Linear weights (not the head) are
    torchao NF4Tensors, the rest bf16."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorakit.models.quantized import quantize_nf4_

    if "base" not in _NF4_BASE:
        torch.manual_seed(0)
        cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=64,
                          tie_word_embeddings=False)
        _NF4_BASE["base"] = LlamaForCausalLM(cfg).eval()
    base = _NF4_BASE["base"]
    model = copy.deepcopy(base).to(torch.bfloat16)
    quantize_nf4_(model)
    return model.eval(), base


def load(kind: str, directory: str):
    """A quantized tiny Llama of ``kind`` (``nf4``, ``fp4``, ``int8``, ``torchao``)."""
    if kind == "torchao":
        return torchao_nf4()[0]
    return load_bnb(directory, kind)


def ids(batch: int = 2, seq: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def quantized_bytes(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every quantized weight's stored tensors (codes and statistics), keyed by layer."""
    out = {}
    for name, m in model.named_modules():
        fmt = quant_format(m)
        if fmt is None:
            continue
        w = m.weight
        parts = {} if type(w).__name__ == "NF4Tensor" else {"data": w.data}
        qs = getattr(w, "quant_state", None)
        if qs is not None:
            parts.update(absmax=qs.absmax, state2=getattr(getattr(qs, "state2", None), "absmax", None))
        if getattr(w, "SCB", None) is not None or getattr(getattr(m, "state", None), "SCB", None) is not None:
            parts["scb"] = fmt._scales(m)
        if type(w).__name__ == "NF4Tensor":
            parts.update({k: getattr(w, k) for k in w.__tensor_flatten__()[0]})
        for k, t in parts.items():
            if isinstance(t, torch.Tensor):
                out[f"{name}.{k}"] = t.detach().clone()
    return out


os.environ.setdefault("HF_HUB_OFFLINE", "1")
