"""Quantized bases for QLoRA: loading through transformers' BitsAndBytesConfig, preparing a k-bit
model for training, torchao NF4 in memory, and the bytes a model's weights take.

    model, tok = load_quantized("path/to/llama", "causal-lm", "nf4")   # NF4 + double quant, bf16 compute
    prepare_for_kbit_training(model)
    lk.inject(model, cfg)                                              # LoRA on the 4-bit layers

Needs ``pip install 'lorakit[quant]'`` (bitsandbytes, torchao). Not part of the core: ``import
lorakit`` never imports this module.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lorakit.layers.quant_formats import quant_format
from lorakit.matching import matches_any

QUANTIZE = ("nf4", "fp4", "int8")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def bnb_config(kind: str, compute_dtype: torch.dtype = torch.bfloat16, double_quant: bool = True,
               skip_modules: list[str] | None = None):
    """transformers' ``BitsAndBytesConfig`` for ``kind``: ``nf4`` / ``fp4`` (4-bit, double
    quantization by default, compute in ``compute_dtype``) or ``int8`` (LLM.int8()).

    Raises:
        ValueError: an unknown kind.
        ImportError: bitsandbytes is not installed.
    """
    if kind not in QUANTIZE:
        raise ValueError(f"quantize must be one of {list(QUANTIZE)}, got {kind!r}")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ImportError("quantized loading needs bitsandbytes: pip install 'lorakit[quant]'") from None
    from transformers import BitsAndBytesConfig

    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=skip_modules)


def load_kwargs(kind: str, task: str, device: str = "cpu", compute_dtype: torch.dtype = torch.bfloat16,
                double_quant: bool = True) -> dict[str, Any]:
    """``from_pretrained`` keywords of a quantized load: the BitsAndBytesConfig, the device, and
    the non-quantized parameters in ``compute_dtype``. ``lorakit merge`` loads with the same
    keywords as ``lorakit train --quantize``, so it dequantizes exactly the codes trained on
    (4-bit codes of a bf16-cast weight may differ from those of the fp32 one)."""
    from lorakit.models import HEAD_NAMES

    skip = list(HEAD_NAMES) if task == "seq-cls" else None
    return {"quantization_config": bnb_config(kind, compute_dtype, double_quant, skip_modules=skip),
            "device_map": {"": device}, "dtype": compute_dtype}


def load_quantized(name_or_path: str, task: str, kind: str, *, label_names: list[str] | None = None, seed: int = 0,
                   device: str = "cpu", compute_dtype: torch.dtype = torch.bfloat16, double_quant: bool = True,
                   attn_implementation: str | None = None):
    """Load ``(model, tokenizer)`` with its Linear layers quantized by bitsandbytes: a built-in
    name, a local directory or a Hub id, as :func:`lorakit.models.load_model` loads them.

    The non-quantized parameters are loaded in ``compute_dtype``, as in the QLoRA recipe; the
    output head (``lm_head``, a classifier's new head) is not quantized.

    Raises:
        FileNotFoundError / ValueError: see :func:`lorakit.models.load_model` and :func:`bnb_config`.
    """
    from lorakit.models import load_model

    return load_model(name_or_path, task, label_names=label_names, seed=seed, attn_implementation=attn_implementation,
                      load_kwargs=load_kwargs(kind, task, device, compute_dtype, double_quant))


def _is_norm(module: nn.Module) -> bool:
    name = type(module).__name__.lower()
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or name.endswith(("norm", "rmsnorm", "layernorm"))


def prepare_for_kbit_training(model: nn.Module, *, gradient_checkpointing: bool = False, use_reentrant: bool = True,
                              upcast_embeddings: bool = False) -> nn.Module:
    """Get a quantized model ready for LoRA training — what PEFT's ``prepare_model_for_kbit_training`` does:

    1. freeze every parameter (LoRA factors added later are the only trainable ones);
    2. cast every half-precision parameter that is not quantized to fp32: norms (their statistics
       and gains), the output head (fp32 logits), biases. The layer norms' fp32 output then
       makes the hidden states fp32 from the first block on, so the frozen head sees fp32 input.
       Unlike PEFT, the input embeddings stay as loaded (``upcast_embeddings=True`` casts them
       too): a lookup is exact in any dtype, and at vocab 32000 × 2048 that is 131 MB saved.
       (A head tied to the embeddings shares its weight and is cast with it.)
    3. bitsandbytes' in-place CPU repacking of 4-bit weights at inference is turned off (see
       ``Bnb4bit.hold``), so training and evaluation compute with the same W and its bytes stay
       those loaded;
    4. with ``gradient_checkpointing``: enable it, and (reentrant checkpointing only) make the
       input embeddings' output require grad, so the checkpointed blocks pass gradients to the
       LoRA factors inside them.

    Returns:
        ``model``.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    get_in = getattr(model, "get_input_embeddings", None)
    embed = get_in() if callable(get_in) else None
    embed_ids = {id(p) for p in embed.parameters()} if isinstance(embed, nn.Module) and not upcast_embeddings else set()
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if head is not None:
        embed_ids -= {id(p) for p in head.parameters()}  # tied: the head needs fp32
    for module in model.modules():
        if quant_format(module) is not None:
            fmt = quant_format(module)
            fmt.hold(module)
            for name, p in module.named_parameters(recurse=False):
                if name != "weight" and p.dtype in (torch.float16, torch.bfloat16):
                    p.data = p.data.to(torch.float32)
            continue
        for p in module.parameters(recurse=False):
            if p.dtype in (torch.float16, torch.bfloat16) and id(p) not in embed_ids:
                p.data = p.data.to(torch.float32)
    if gradient_checkpointing:
        kwargs = {"use_reentrant": use_reentrant}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if use_reentrant and hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    return model


def quantize_nf4_(model: nn.Module, *, dtype: torch.dtype = torch.bfloat16, block_size: int = 64,
                  scaler_block_size: int = 256, skip: tuple[str, ...] = ()) -> list[str]:
    """Quantize every ``nn.Linear`` weight of ``model`` in place to a torchao ``NF4Tensor`` (as
    torchtune's QLoRA models hold it), except the output head and modules whose name ends with
    an entry of ``skip``. The layer's forward is unchanged: ``F.linear`` on an NF4Tensor runs
    torchao's ``linear_nf4``. Biases are cast to ``dtype``.

    Returns:
        The names of the quantized layers.

    Raises:
        ValueError: a weight's size is not a multiple of ``block_size · scaler_block_size`` (what
            torchao's double quantization needs); nothing was changed.
        ImportError: torchao is not installed.
    """
    try:
        from torchao.quantization import to_nf4  # torchao >= 0.18 (before: torchao.dtypes.nf4tensor)
    except ImportError:
        raise ImportError("NF4 quantization needs torchao: pip install 'lorakit[quant]'") from None
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    chosen = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear and m is not head
              and not matches_any(n, skip)]
    bad = [f"{n} {tuple(m.weight.shape)}" for n, m in chosen if m.weight.numel() % (block_size * scaler_block_size)]
    if bad:
        raise ValueError(f"torchao NF4 needs weight sizes that are multiples of block_size·scaler_block_size = "
                         f"{block_size}·{scaler_block_size}; these are not: {bad[:4]}. Pass a smaller "
                         "scaler_block_size or skip them")
    for _, m in chosen:
        m.weight = nn.Parameter(to_nf4(m.weight.detach().to(dtype), block_size, scaler_block_size), requires_grad=False)
        if m.bias is not None:
            m.bias = nn.Parameter(m.bias.detach().to(dtype), requires_grad=m.bias.requires_grad)
    return [n for n, _ in chosen]


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the model's weights on their device: ``quantized`` (4/8-bit weights with their
    statistics and code tables), ``other`` (every other parameter and buffer: norms, embeddings,
    head, LoRA factors) and ``total``; a tensor shared by several modules is counted once."""
    seen: set[tuple[int, int]] = set()

    def new(t: torch.Tensor) -> int:
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.device.type != "meta" else (id(t), 0)
        if key in seen:
            return 0
        seen.add(key)
        return t.numel() * t.element_size()

    quantized = other = 0
    held = set()
    for module in model.modules():
        fmt = quant_format(module)
        if fmt is not None:
            held.add(id(module.weight))
            quantized += sum(new(t) for t in fmt.storage(module))
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in held:
            other += new(t)
    return {"quantized": quantized, "other": other, "total": quantized + other}
