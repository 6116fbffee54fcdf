"""Run vLLM's own adapter checks on adapter directories (executed with a Python that has vLLM).

    python vllm_reader.py MAX_LORA_RANK DIR [DIR ...]  ->  JSON {DIR: {"ok": bool, "error": str | None}}

What vLLM 0.32's worker does before serving an adapter (``vllm/lora/worker_manager.py``
``_load_adapter``): ``PEFTHelper.from_local_dir`` + ``validate_legal`` against a ``LoRAConfig``,
then ``LoRAModel.from_local_checkpoint`` (every tensor key parsed). The model-dependent part
(which module names the served model supports) is given every name in the file.
"""

import json
import sys

from vllm.config.lora import LoRAConfig
from vllm.lora.lora_model import LoRAModel
from vllm.lora.peft_helper import PEFTHelper


def check(path: str, max_rank: int) -> dict:
    try:
        helper = PEFTHelper.from_local_dir(path, max_position_embeddings=None)
        helper.validate_legal(LoRAConfig(max_lora_rank=max_rank))
        from safetensors import safe_open

        with safe_open(f"{path}/adapter_model.safetensors", "pt") as f:
            names = {k.split(".")[-3] if k.endswith(".weight") else k.split(".")[-2] for k in f.keys()}
        LoRAModel.from_local_checkpoint(path, names, helper, device="cpu")
        return {"ok": True, "error": None}
    except Exception as e:  # what vLLM raises is the verdict
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}


if __name__ == "__main__":
    rank = int(sys.argv[1])
    print(json.dumps({d: check(d, rank) for d in sys.argv[2:]}))
