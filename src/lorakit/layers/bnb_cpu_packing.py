"""bitsandbytes' CPU layout of a 4-bit weight, and a verified way back to the standard one.

bitsandbytes ≥ 0.48, on a CPU with AVX512-BF16, rewrites a ``Linear4bit`` weight in place at its
first inference forward (eval mode, input without grad) into the layout of its ``gemv_4bit`` CPU
kernel (``bitsandbytes.functional._convert_weight_packed_for_cpu``). For W of shape (N, K) = (out, in),
codes ``c[n, k]`` (4 bits) and one absmax per block of 64 consecutive weights of a row:

* codes: standard storage holds them two per byte in row-major order, ``byte[i] = c[2i] << 4 | c[2i+1]``
  over the flattened (N, K). The CPU layout cuts (N, K) into tiles of 32 rows × 2 columns; tile
  (n₀, k₀) is the 64 codes ``t[2b + j] = c[32·n₀ + b, 2·k₀ + j]`` (b < 32, j < 2), stored as 32 bytes
  ``t[32 + i] << 4 | t[i]``, tiles in (n₀, k₀) row-major order — a permutation of the nibbles;
* absmax: a double-quantized absmax is dequantized (``absmax = deq₈(q) + offset``); the (N·K/64,)
  absmaxes are viewed as (N, K/64), transposed to (K/64, N) and rounded to bf16. This rounding is
  the only loss: the kernel computes ``W[n, k] = code(c[n, k]) · bf16(absmax[n, k // 64])``.

bitsandbytes' private inverse (``_convert_weight_packed_for_cpu_inverse``, used by its own
``state_dict`` and ``.cuda()``) undoes the permutation and re-quantizes a double-quantized absmax,
but leaves a plain absmax transposed: for K > 64 each block is then scaled by another block's
absmax (measured on a tiny Llama's (64, 128) down_proj: 21% off in Frobenius norm) — silently.

:func:`unpack` therefore trusts no inverse unverified: a candidate is accepted only if bitsandbytes'
own packing maps it back to exactly the bytes the kernel uses (codes and bf16 absmax), so it
dequantizes to exactly the weight the packed layer computes with. It tries bitsandbytes' inverse
first (it keeps a double-quantized absmax compressed, but reproduces the bytes only when
re-quantizing the absmax lands on the same bf16 values: measured, 110,468 of the 704,512 absmaxes
of a random 4096×11008 weight do not, up to 0.8% off), then :func:`exact_inverse` (an fp32 absmax
holding the bf16 values exactly: 4 bytes per 64 weights instead of about 1, +9% of such a layer's
4-bit storage), and refuses when neither reproduces the bytes.

A related bitsandbytes 0.50 limit, not a silent one: the repacking fails (a ``RuntimeError``) when
``in_features`` is not a multiple of 64 — after un-nesting a double-quantized absmax, which stays a
valid standard state; lorakit's wrappers turn the repacking off (``Bnb4bit.hold``), so a wrapped
layer never meets either.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

TILE_ROWS = 32  # bitsandbytes' block_n: output rows per tile


def is_packed(quant_state: Any) -> bool:
    """Is this 4-bit weight in bitsandbytes' CPU kernel layout?"""
    return bool(getattr(quant_state, "packing_format_for_cpu", False))


def exact_inverse(packed: torch.Tensor, quant_state: Any) -> tuple[torch.Tensor, Any]:
    """The standard ``(codes, QuantState)`` of a CPU-packed weight, written from the layout above:
    the permutation undone, the absmax transposed back as the bf16 values the kernel uses, held
    exactly in fp32 (not double-quantized: that would round them again).

    Args:
        packed: (N, K/2) uint8, the packed codes.
        quant_state: the packed weight's state (``packing_format_for_cpu`` set); not modified.
    """
    import bitsandbytes.functional as bf

    n, k_half = packed.shape
    k = 2 * k_half
    tiles = packed.reshape(-1, TILE_ROWS)  # (N/32 · K/2, 32) bytes, one tile per row
    t = torch.cat([tiles & 0xF, tiles >> 4], dim=1)  # (tiles, 64): t[i], t[32 + i]
    codes = t.reshape(n // TILE_ROWS, k_half, TILE_ROWS, 2).transpose(1, 2).reshape(n, k)  # (N, K): c[n, k]
    flat = codes.reshape(-1)  # (N·K,)
    data = ((flat[0::2] << 4) | flat[1::2]).to(torch.uint8)  # (N·K/2,) standard: c[2i] << 4 | c[2i+1]
    data = data.reshape(quant_state.original_qshape)
    storage = getattr(quant_state, "original_storage_type", None)
    if storage is not None:
        data = data.view(storage)
    absmax = quant_state.absmax.T.reshape(-1).to(torch.float32)  # (K/64, N) -> (N·K/64,), exact
    state = bf.QuantState(absmax=absmax, shape=quant_state.shape, code=quant_state.code.clone(),
                          blocksize=quant_state.blocksize, quant_type=quant_state.quant_type,
                          dtype=quant_state.original_dtype)
    return data, state


def _bitsandbytes_inverse(packed: torch.Tensor, quant_state: Any) -> tuple[torch.Tensor, Any]:
    import bitsandbytes.functional as bf

    return bf._convert_weight_packed_for_cpu_inverse(packed, quant_state)


def repack_mismatch(candidate: tuple[torch.Tensor, Any], packed: torch.Tensor, quant_state: Any) -> str | None:
    """None if bitsandbytes' packing maps ``candidate`` (standard codes, state) to exactly ``packed``
    and ``quant_state``'s absmax; else what differs. Works on copies."""
    import bitsandbytes.functional as bf

    data, state = candidate
    if is_packed(state):
        return "it is still marked as packed"
    if tuple(state.shape) != tuple(quant_state.shape) or state.blocksize != quant_state.blocksize:
        return f"it has shape {tuple(state.shape)} / blocksize {state.blocksize}"
    again, again_state = bf._convert_weight_packed_for_cpu(data.clone(), copy.deepcopy(state))
    if again.shape != packed.shape or not torch.equal(again, packed):
        return "re-packing it gives other code bytes"
    a, b = again_state.absmax, quant_state.absmax
    if a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a, b):
        diff = (a.float() - b.float()).abs().max() / b.float().abs().max() if a.shape == b.shape else float("nan")
        return f"re-packing it gives another absmax (max difference {float(diff):.1%} of the largest)"
    return None


def unpack(packed: torch.Tensor, quant_state: Any, what: str = "Linear4bit") -> tuple[torch.Tensor, Any]:
    """The standard-layout ``(codes, QuantState)`` of a CPU-packed 4-bit weight, verified to
    re-pack to exactly its bytes (see the module docstring). Built on copies: the inputs are not
    changed.

    Raises:
        ValueError: no inverse reproduces the packed bytes; names each one tried and the fix.
    """
    tried = []
    for name, inverse in (("bitsandbytes' _convert_weight_packed_for_cpu_inverse", _bitsandbytes_inverse),
                          ("lorakit's exact inverse", exact_inverse)):
        try:
            candidate = inverse(packed.clone(), copy.deepcopy(quant_state))
            problem = repack_mismatch(candidate, packed, quant_state)
        except Exception as e:  # noqa: BLE001 - a failing inverse is one more candidate refused
            problem = f"{type(e).__name__}: {e}"
        if problem is None:
            return candidate
        tried.append(f"{name}: {problem}")
    raise ValueError(
        f"cannot read the 4-bit weight of {what}: bitsandbytes repacked it for its CPU kernel (at an inference "
        f"forward) and no way back to its standard layout reproduces the packed bytes ({'; '.join(tried)}), so "
        "lorakit would compute and merge with a wrong W. Load the model again and add LoRA (lorakit.inject, or "
        "lorakit.models.quantized.prepare_for_kbit_training) before any eval-mode forward, or set "
        "`layer.support_avx512bf16_for_cpu = False` on every bitsandbytes Linear4bit before running inference")
