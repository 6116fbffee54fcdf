"""``lorakit merge --base MODEL --adapter DIR --out OUT``: fold a LoRA adapter into its base model.

The base is a local transformers model directory, a built-in name (``minilm``, ``tiny-llama``
with ``--seed``) or a Hub id from the Hugging Face cache; with ``--adapter`` a ``lorakit train``
run directory, ``--base`` may be left out: the run's own base model (name, seed, labels) is used.
For a directory, the class comes from the adapter's ``task_type`` (``CAUSAL_LM`` ->
``AutoModelForCausalLM``, ...) or, when that is not recorded, from ``architectures`` in the base's
``config.json``. The result (form b) is a plain transformers model directory of the same
architecture, loadable with ``from_pretrained``, with the base's tokenizer beside it.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

TASK_TO_AUTO = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "added_tokens.json")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "merge",
        help="merge a LoRA adapter into its base model and save a plain transformers model",
        description="Load a local transformers base model, apply a PEFT-format LoRA adapter (from lorakit or "
                    "PEFT), fold W + ΔW into the weights and save the result as a plain model directory of the "
                    "same architecture (loadable with AutoModel*.from_pretrained, no lorakit or PEFT needed). "
                    "The base: a local model directory, a built-in name or a Hub id already in the Hugging Face "
                    "cache; left out for a lorakit train run directory, whose own base is used.",
        epilog="examples:\n  lorakit merge --adapter runs/sft --out merged/          # a lorakit run: its own base\n"
               "  lorakit merge --base ./llama --adapter peft-adapter/ --out merged/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--base", default=None, metavar="MODEL",
                   help="base model: a directory written by save_pretrained, a built-in name (minilm, tiny-llama) or "
                        "a cached Hub id (default: the run's model, when --adapter is a lorakit train run)")
    p.add_argument("--adapter", required=True, metavar="DIR",
                   help="adapter directory (adapter_config.json + adapter_model.safetensors) or a lorakit train run")
    p.add_argument("--seed", type=int, default=None,
                   help="with --base tiny-llama: the seed that built it (default: the run's, else 0)")
    p.add_argument("--out", required=True, metavar="OUT", help="output directory for the merged model (created)")
    p.add_argument("--adapter-name", default="default", metavar="NAME",
                   help="for a directory with several adapters: which one (a sub-directory name); default: default")
    p.add_argument("--quantize", choices=["nf4", "fp4", "int8", "none"], default=None,
                   help="for an adapter trained on a quantized base (QLoRA): load the base quantized the same way "
                        "(bitsandbytes, as lorakit train --quantize), so the merged weights are deq(Q(W)) + ΔW — the "
                        "function the adapter was trained with — saved in --dtype. Default: the 'quantize' setting of "
                        "the run_config.json beside the adapter (a lorakit train run directory), else none")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                   help="dtype of the merged model (default: bf16 for a quantized base, else the base's own)")


def model_class(base_dir: Path, task_type: str | None):
    """The transformers class to load ``base_dir`` with, for an adapter of ``task_type``.

    Raises:
        FileNotFoundError: no config.json. ValueError: no usable class.
    """
    import transformers

    config_path = base_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"--base {str(base_dir)!r} has no config.json; give a local model directory "
                                "written by save_pretrained")
    if task_type in TASK_TO_AUTO:
        return getattr(transformers, TASK_TO_AUTO[task_type])
    try:
        archs = json.loads(config_path.read_text()).get("architectures") or []
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(config_path)!r} is not valid JSON: {e}") from None
    for arch in archs:
        if hasattr(transformers, arch):
            return getattr(transformers, arch)
    if task_type is not None:
        raise ValueError(f"the adapter's task_type {task_type!r} is not one of {sorted(TASK_TO_AUTO)} and "
                         f"{str(config_path)!r} names no known architecture ({archs})")
    return transformers.AutoModel


def trained_quantization(adapter_dir: Path) -> str | None:
    """The ``quantize`` setting of the ``lorakit train`` run an adapter directory belongs to
    (``run_config.json`` one level up), if any."""
    path = Path(adapter_dir).resolve().parent / "run_config.json"
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("quantize") if path.is_file() else None
    except (json.JSONDecodeError, OSError, AttributeError):
        return None
    return value if value in ("nf4", "fp4", "int8") else None


def _load_base(args: argparse.Namespace, adapter_dir: Path, task_type: str | None, quantize: str):
    """``(model, tokenizer or None, description)`` of the base to merge into; quantized as the
    adapter was trained when ``quantize`` is not ``"none"`` (merged from the same 4/8-bit codes).
    A run's base is loaded as training loaded it (:func:`lorakit.train.run_base.load_base`)."""
    from lorakit.models import BUILTIN, builtin_shadow_note, is_hub_id, quiet_transformers
    from lorakit.train.inference import find_run, is_run
    from lorakit.train.run_base import BaseSpec, load_base

    quiet_transformers()  # no "Loading weights" bars from transformers
    base = args.base
    run_dir = Path(args.adapter)
    task = "seq-cls" if task_type == "SEQ_CLS" else "causal-lm"
    if base is None or base in BUILTIN or is_hub_id(base):
        spec = BaseSpec.of_job(find_run(str(run_dir))[0]) if is_run(str(run_dir)) or base is None else \
            BaseSpec(model=base, task=task)
        spec = spec.replace(model=base or spec.model, seed=args.seed if args.seed is not None else spec.seed,
                            quantize=None if quantize == "none" else quantize)
        note = builtin_shadow_note(spec.model)
        if note:
            print(f"note: {note}")
        model, tok = load_base(spec)
        return model, tok, spec.model
    base_dir = Path(base)
    if not base_dir.is_dir():
        raise FileNotFoundError(f"--base {base!r} is not a directory, a built-in name {list(BUILTIN)} or a Hub id")
    kwargs = {}
    if quantize != "none":
        from lorakit.models.quantized import load_kwargs

        kwargs = load_kwargs(quantize, task)
    cls = model_class(base_dir, task_type)
    return cls.from_pretrained(str(base_dir), local_files_only=True, **kwargs), None, str(base_dir)


def run(args: argparse.Namespace) -> int:
    import lorakit as lk
    from lorakit.io.peft_format import read_config_dict, resolve_adapter_dir
    from lorakit.train.inference import RUN_CONFIG

    adapter_arg = Path(args.adapter)
    if (adapter_arg / RUN_CONFIG).is_file() and (adapter_arg / "adapter").is_dir():
        adapter_arg = adapter_arg / "adapter"
    adapter_dir = resolve_adapter_dir(adapter_arg, args.adapter_name)
    task_type = read_config_dict(adapter_dir).get("task_type")
    quantize = args.quantize or trained_quantization(adapter_dir) or "none"
    if quantize != "none":
        print(f"loading the base quantized ({quantize}) as the adapter was trained; merging dequantized weights")
    model, tok, base_desc = _load_base(args, adapter_dir, task_type, quantize)
    n_base = sum(p.numel() for p in model.parameters())
    lk.load_adapter(model, adapter_dir, adapter_name=args.adapter_name)
    lk.set_adapter(model, args.adapter_name)
    from lorakit.models.quantized import DTYPES

    dtype = DTYPES[args.dtype] if args.dtype else (DTYPES["bf16"] if quantize != "none" else None)
    out = lk.save_merged(model, args.out, dtype=dtype)
    if tok is not None:
        tok.save_pretrained(out)
        extra = " (+ tokenizer)"
    else:
        copied = [f for f in TOKENIZER_FILES if (Path(base_desc) / f).is_file()]
        for f in copied:
            shutil.copyfile(Path(base_desc) / f, out / f)
        extra = f" (+ {len(copied)} tokenizer file(s))" if copied else ""
    print(f"merged {str(adapter_dir)!r} into {type(model).__name__} from {base_desc!r} -> {str(out)!r}{extra}")
    if quantize == "none":
        print(f"base model parameters: {n_base:,d} (the merged model has the same, unless tied weights were untied)")
    return 0
