"""Can a serving engine load this adapter as it is? vLLM's rules, checked on the files alone.

vLLM (``vllm/lora/peft_helper.py``, ``PEFTHelper.validate_legal``) refuses an adapter with
``modules_to_save``, with DoRA, with a trained bias unless the server enables LoRA biases, or
with a rank above the server's ``--max-lora-rank``, which must be one of
``1, 8, 16, 32, 64, 128, 256, 320, 512`` (vLLM's default is 16). LoRAX follows the same PEFT
format and rejects the same features.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lorakit.io.keymap import parse_file_key

VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_LORA_RANK = 16


def vllm_report(config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """Whether vLLM can serve an adapter, from its ``adapter_config.json`` and tensor shapes.

    Returns:
        ``{"servable": bool, "problems": [...], "notes": [...], "max_lora_rank": int | None}``:
        problems make vLLM refuse the adapter; notes are server flags it needs.
    """
    problems, notes = [], []
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')!r}; vLLM serves LoRA adapters only")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save={config['modules_to_save']} (fully trained modules): vLLM only supports "
                        "modules_to_save being None. Merge the adapter (lorakit merge) or train without them")
    if config.get("use_dora"):
        problems.append("use_dora=true: vLLM does not support DoRA. Merge the adapter (lorakit merge) instead")
    ranks = sorted({shape[0] for key, shape in shapes.items()
                    if (parsed := parse_file_key(key)) and parsed[1] in ("lora_A", "lora_embedding_A")})
    rank = max(ranks, default=config.get("r"))
    allowed = next((m for m in VLLM_MAX_LORA_RANKS if rank is not None and m >= rank), None)
    if rank is not None and allowed is None:
        problems.append(f"rank {rank} is above vLLM's largest --max-lora-rank ({VLLM_MAX_LORA_RANKS[-1]})")
    elif allowed is not None and allowed > VLLM_DEFAULT_MAX_LORA_RANK:
        notes.append(f"rank {rank}: start vLLM with --max-lora-rank {allowed} (its default is "
                     f"{VLLM_DEFAULT_MAX_LORA_RANK}; allowed values {list(VLLM_MAX_LORA_RANKS)})")
    if config.get("bias", "none") != "none":
        notes.append(f"bias={config['bias']!r}: vLLM needs LoRA biases enabled (--enable-lora-bias); versions "
                     "without that flag refuse the adapter")
    embeds = sorted({p[0] for key in shapes if (p := parse_file_key(key)) and p[1].startswith("lora_embedding")})
    if embeds:
        notes.append(f"LoRA on embeddings ({embeds}): only some vLLM versions and models serve it")
    return {"servable": not problems, "problems": problems, "notes": notes, "max_lora_rank": allowed}
