"""Can vLLM serve this adapter as it is? Its rules, checked on the files alone.

The rules themselves live in :mod:`lorakit.io.consumers` (the ``VLLM`` table, with the vLLM 0.32 file
and line of each), shared with ``lorakit inspect``'s consumer listing; this module keeps the
``vllm_report`` shape that ``lorakit inspect --check vllm`` and its JSON have always had.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lorakit.io.consumers import (
    VLLM,
    VLLM_DEFAULT_MAX_LORA_RANK,
    VLLM_MAX_LORA_RANKS,
    AdapterView,
    verdict,
    vllm_max_rank,
)

__all__ = ["VLLM_MAX_LORA_RANKS", "VLLM_DEFAULT_MAX_LORA_RANK", "vllm_report"]


def vllm_report(config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """Whether vLLM can serve an adapter, from its ``adapter_config.json`` and tensor shapes.

    Returns:
        ``{"servable": bool, "problems": [...], "notes": [...], "max_lora_rank": int | None}``:
        problems make vLLM refuse the adapter; notes are server flags it needs. ``max_lora_rank`` is
        the smallest allowed ``--max-lora-rank`` for ``max(r, *rank_pattern.values())``.
    """
    view = AdapterView(config, shapes)
    v = verdict(VLLM, view)
    rank = vllm_max_rank(view)
    allowed = next((m for m in VLLM_MAX_LORA_RANKS if rank is not None and m >= rank), None)
    return {"servable": v.ok, "problems": v.problems, "notes": v.notes, "max_lora_rank": allowed}
