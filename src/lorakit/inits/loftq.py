"""LoftQ (Li et al., 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language Models").

QLoRA starts from ``Q(W)`` with ``B·A = 0``, so the model it fine-tunes is off by the quantization
error ``W - Q(W)``. LoftQ alternates, for ``T = loftq_iter`` steps (PEFT's ``loftq_init``):

    R_0 = W                                     (fp32, (out, in))
    Q_t = deq(Q(R_{t-1}))                       NF4 (4 bits) or int8 row-wise (8 bits), by bitsandbytes
    L_t, R_t' = top-r SVD of W - Q_t            L = U_r·√S_r (out, r), R' = √S_r·Vh_r (r, in)
    R_t = W - L_t·R_t'                          (the next step quantizes what the factors leave)

and the adapted layer starts as ``W ← Q_T``, ``s·B·A = L_T·R_T'``, so that ``Q_T + s·B·A ≈ W`` — closer
to W than QLoRA's ``Q(W)``, and ``‖W - Q_T - L_T·R_T'‖`` decreases over the steps.

Quantization is PEFT's exactly: ``bnb.nn.Params4bit(·, compress_statistics=False, quant_type="nf4")``
(blocks of 64, one fp32 absmax each) or ``bnb.nn.Int8Params`` (per-row absmax), on the weight's device —
PEFT 0.21.2 sends it to CUDA unconditionally; here the CPU works too. One deliberate difference: PEFT
assigns ``A = R', B = L`` whatever the scaling ``s = lora_alpha/r`` is, so for ``s ≠ 1`` its model starts
at ``Q + s·L·R'`` (huggingface/peft#1982, acknowledged); lorakit divides both factors by ``√s``, so that
``s·B·A = L·R'`` always. With ``lora_alpha = r`` (PEFT's LoftQ examples) the two are the same tensors.

The base weight then holds ``Q_T`` in its float dtype: quantizing it (``lorakit.models.quantized``, bitsandbytes
NF4 with the same blocks) reproduces it exactly, which is how LoftQ's quantized model is made.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from lorakit.config import LoraConfig
    from lorakit.layers.linear import Linear


def _bnb():
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ImportError("init_lora_weights='loftq' quantizes with bitsandbytes, as PEFT does: "
                          "pip install 'lorakit[quant]' (or pip install bitsandbytes)") from None
    return bnb


def quantize_dequantize(w: torch.Tensor, bits: int) -> torch.Tensor:
    """``deq(Q(w))`` for a 2-D fp32 ``w`` (out, in), quantized as PEFT's LoftQ does (see the module docstring)."""
    bnb = _bnb()
    device = w.device
    if bits == 4:
        q = bnb.nn.Params4bit(w.to("cpu"), requires_grad=False, compress_statistics=False, quant_type="nf4").to(device)
        return bnb.functional.dequantize_4bit(q.data, q.quant_state).to(torch.float32)  # (out, in)
    q = bnb.nn.Int8Params(w.to("cpu"), requires_grad=False).to(device)
    return bnb.functional.int8_vectorwise_dequant(q.data, q.SCB).to(device=device, dtype=torch.float32)


def _top_r(res: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``L = U_r·√S_r`` (out, r), ``R = √S_r·Vh_r`` (r, in) of ``res`` (PEFT's ``_low_rank_decomposition``)."""
    U, S, Vh = torch.linalg.svd(res, full_matrices=False)
    L = U @ torch.sqrt(torch.diag(S)[:, :r])  # (out, r)
    R = torch.sqrt(torch.diag(S)[:r, :]) @ Vh  # (r, in)
    return L, R


@torch.no_grad()
def loftq_init(weight: torch.Tensor, num_bits: int, reduced_rank: int, num_iter: int = 1,
               history: list[float] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoftQ's alternating steps on one weight (out, in); PEFT's ``loftq_init`` (same signature and result).

    Args:
        weight: the full-precision weight W (out, in).
        num_bits: 4 (NF4) or 8 (int8).
        reduced_rank: the LoRA rank r.
        num_iter: alternating steps T >= 1.
        history: if given, receives ``‖W - (Q_t + L_t·R_t)‖_F`` after every step t.

    Returns:
        ``(Q_T in weight's dtype, R (r, in) fp32 = lora_A, L (out, r) fp32 = lora_B)`` for ``s = 1``.

    Raises:
        ValueError: ``num_bits`` not 4 or 8, ``num_iter < 1``, or a weight that is not 2-D.
    """
    if num_bits not in (4, 8):
        raise ValueError(f"LoftQ quantizes to 4 (NF4) or 8 (int8) bits, got num_bits={num_bits!r}")
    if num_iter <= 0:
        raise ValueError(f"LoftQ needs at least one iteration, got num_iter={num_iter!r}")
    if weight.dim() != 2:
        raise ValueError(f"LoftQ decomposes 2-D weights, got shape {tuple(weight.shape)}")
    dtype = weight.dtype
    w = weight.to(torch.float32)  # (out, in)
    res = w.clone()
    for i in range(num_iter):
        q = quantize_dequantize(res, num_bits)  # (out, in)
        L, R = _top_r(w - q, reduced_rank)
        if history is not None:
            history.append(float(torch.linalg.norm(w - q - L @ R)))
        if i + 1 == num_iter:
            break
        res = w - L @ R
    return q.to(dtype), R, L


def init_layer(layer: Linear, name: str, cfg: LoraConfig) -> None:
    """``init_lora_weights="loftq"`` on a Linear / Conv1D wrapper: W ← Q_T, s·B·A = L·R'.

    Raises:
        ValueError: a base weight that is not floating point (already quantized: LoftQ needs W itself).
        ImportError: bitsandbytes is missing.
    """
    from lorakit.inits import set_factors, write_base

    weight = layer.base_weight()
    if not weight.dtype.is_floating_point or weight.dim() != 2:
        raise ValueError(f"init_lora_weights='loftq' needs the full-precision weight of the layer, but "
                         f"{type(layer.base_layer).__name__} holds a {weight.dtype} tensor of shape "
                         f"{tuple(weight.shape)}; apply LoftQ to the unquantized model, then quantize it")
    r, s = layer.r[name], layer.scaling[name]
    if r > min(layer.in_features, layer.out_features):
        raise ValueError(f"LoftQ's rank-{r} SVD of a {layer.out_features}x{layer.in_features} weight: r must be at "
                         f"most {min(layer.in_features, layer.out_features)}")
    q, R, L = loftq_init(layer._weight_out_in().detach(), cfg.loftq_config["loftq_bits"], r,
                         cfg.loftq_config["loftq_iter"])
    root = s ** 0.5
    set_factors(layer, name, R / root, L / root)
    write_base(layer, q)
