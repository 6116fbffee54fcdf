"""Padding-free packing of causal-LM batches: does this model keep packed examples apart?

:func:`lorakit.data.dataset.collate_packed` puts a batch's examples end to end in one row with
``position_ids`` restarting at each example. That is only correct if the model's attention stops
at the example boundaries. Hugging Face models do so when their mask code reads the restarts
from ``position_ids`` (transformers ≥ 4.53 ``masking_utils``; varlen ``flash_attention_2``):

* ``flash_attention_2/3`` and ``flex_attention``: each example's attention is computed alone, so a
  packed batch costs Σ T_i² in attention and nothing for padding: the fast case.
* ``sdpa`` / ``eager``: a block-diagonal mask over the whole row keeps the examples apart, but the
  attention is computed over the packed row (ΣT_i)² — padding leaves the projections and MLPs,
  attention grows. Worth it for short examples of very different lengths, measure otherwise.

Rather than trusting a list of implementations and versions, :func:`packing_problem` runs the
model once on two short examples packed and alone and compares the second example's logits.
"""

from __future__ import annotations

import torch
from torch import nn

FAST_ATTENTION = ("flash_attention_2", "flash_attention_3", "flex_attention")


def attention_implementation(model: nn.Module) -> str | None:
    """The model's attention implementation as transformers names it, if it says."""
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


def packing_problem(model: nn.Module, device: torch.device | str | None = None) -> str | None:
    """``None`` if ``model`` computes two examples packed into one row (positions restarting, no mask)
    as it computes them alone; else why not, in a sentence.

    The probe: example a (12 tokens) then example b (6 tokens) packed, against b alone; b's logits
    must agree to within 2% of their scale (bf16 rounding passes, attention leaking across the
    boundary does not). The model is put in eval mode for the probe (no dropout) and restored.
    Autograd stays on (nothing is back-propagated): on some CPUs bitsandbytes repacks a 4-bit
    weight in place at an eval-mode forward whose input does not require grad, unless the layer is
    held (LoRA-wrapped, or :func:`lorakit.models.quantized.prepare_for_kbit_training`); the probe must not
    change an unprepared model either.
    """
    config = getattr(model, "config", None)
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    if vocab < 4:
        return "the model has no config.vocab_size (not a Hugging Face causal LM)"
    if device is None:
        device = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    a = torch.randint(1, min(vocab, 1000), (1, 12), generator=g).to(device)  # (1, 12)
    b = torch.randint(1, min(vocab, 1000), (1, 6), generator=g).to(device)  # (1, 6)
    ids = torch.cat([a, b], 1)  # (1, 18)
    pos = torch.cat([torch.arange(12), torch.arange(6)]).unsqueeze(0).to(device)  # (1, 18)
    was_training = model.training
    model.eval()
    try:
        alone = model(input_ids=b, use_cache=False).logits.detach().float()  # (1, 6, V)
        packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits[:, 12:].detach().float()
    except Exception as e:  # noqa: BLE001 - any failure means: do not pack this model
        return f"a packed forward failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    finally:
        model.train(was_training)
    error = float((packed - alone).abs().max())
    scale = float(alone.abs().max()) + 1e-6
    if not error <= 0.02 * scale:
        impl = attention_implementation(model)
        return (f"its attention ({impl or type(model).__name__}) lets packed examples see each other "
                f"(logits differ by {error:.3g} against a scale of {scale:.3g})")
    return None
