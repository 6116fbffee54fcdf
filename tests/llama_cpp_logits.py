"""Logits from llama.cpp itself (run with a Python that has llama-cpp-python).

    python llama_cpp_logits.py BASE.gguf ADAPTER.gguf|- TOKEN [TOKEN ...]  ->  JSON [[logit, ...], ...] per position

Loads the base GGUF, applies the LoRA GGUF with llama.cpp's own adapter code (``--lora``) unless ``-``,
and evaluates the tokens as given (no BOS added).
"""

import json
import sys

from llama_cpp import Llama

if __name__ == "__main__":
    base, lora, tokens = sys.argv[1], sys.argv[2], [int(t) for t in sys.argv[3:]]
    llm = Llama(model_path=base, lora_path=None if lora == "-" else lora, n_ctx=64, logits_all=True, verbose=False,
                n_threads=1, n_batch=64)
    llm.eval(tokens)
    print(json.dumps(llm.scores[: len(tokens)].tolist()))
