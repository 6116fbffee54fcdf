"""Load a trained adapter back for inference: its base (loaded as training loaded it) plus the adapter.

``--adapter`` may be:

* a ``lorakit train`` run directory (``--out``) or its ``adapter/`` folder: the base, task, labels,
  dtype and quantization come from the run's ``run_config.json`` (:mod:`lorakit.train.run_base`);
* any PEFT-format adapter directory (``adapter_config.json`` + weights) — written by PEFT,
  ``save_pretrained``, a script's ``lk.save_adapter`` —: the base is ``--base`` or the adapter's
  ``base_model_name_or_path``, the task its ``task_type``.

``--base`` replaces the run's base model in either case (a local copy of the same model, say).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from lorakit.train.run_base import BaseSpec, load_base
from lorakit.train.settings import JobSettings

RUN_CONFIG = "run_config.json"
ADAPTER_CONFIG = "adapter_config.json"
# PEFT's task_type -> the lorakit task, and the command that serves it
TASK_OF_TYPE = {"CAUSAL_LM": "causal-lm", "SEQ_CLS": "seq-cls"}
COMMAND = {"seq-cls": "lorakit predict", "causal-lm": "lorakit generate"}


@dataclass(frozen=True)
class Trained:
    """What an ``--adapter`` argument resolves to.

    Attributes:
        adapter: the directory holding ``adapter_config.json``.
        base: how the base model is loaded.
        job: the run's settings (layout, max_length, columns...), or ``None`` for an adapter that
            did not come from ``lorakit train``.
    """

    adapter: str
    base: BaseSpec
    job: JobSettings | None = None


def find_run(path: str) -> tuple[JobSettings, str]:
    """``(settings, adapter directory)`` of the ``lorakit train`` run at ``path`` (the run or its adapter/).

    Raises:
        FileNotFoundError: neither ``path`` nor its parent holds a run_config.json, or the adapter is missing.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--adapter {path!r} is not a directory; give a lorakit train run (--out) or an "
                                f"adapter directory ({ADAPTER_CONFIG} + weights)")
    run_dir = path if os.path.isfile(os.path.join(path, RUN_CONFIG)) else os.path.dirname(os.path.abspath(path))
    cfg_path = os.path.join(run_dir, RUN_CONFIG)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path!r} holds no {RUN_CONFIG} (nor does its parent); give the --out directory "
                                "of a finished lorakit train run")
    adapter = os.path.join(run_dir, "adapter") if path == run_dir else path
    if not os.path.isfile(os.path.join(adapter, ADAPTER_CONFIG)):
        raise FileNotFoundError(f"no adapter in {adapter!r} ({ADAPTER_CONFIG} missing): did the run finish? "
                                f"An interrupted run continues with: lorakit train --resume {run_dir}")
    with open(cfg_path, encoding="utf-8") as f:
        return JobSettings.from_run_config(json.load(f)), adapter


def is_run(path: str) -> bool:
    """Whether ``path`` is a ``lorakit train`` run directory or the adapter folder inside one."""
    parent = os.path.dirname(os.path.abspath(path))
    return os.path.isfile(os.path.join(path, RUN_CONFIG)) or (
        os.path.isfile(os.path.join(path, ADAPTER_CONFIG)) and os.path.isfile(os.path.join(parent, RUN_CONFIG)))


def resolve_trained(path: str, task: str, base: str | None = None) -> Trained:
    """What ``--adapter path`` (with ``--base base``) means for ``task`` (see the module docstring).

    Raises:
        FileNotFoundError: not a run nor an adapter directory; an adapter that names no base and no ``--base``.
        ValueError: the adapter was trained for another task.
    """
    if is_run(path):
        job, adapter = find_run(path)
        if job.task != task:
            raise ValueError(f"the run in {path!r} was trained for --task {job.task}, not {task}; use "
                             f"{COMMAND.get(job.task, 'another command')}")
        spec = BaseSpec.of_job(job)
        return Trained(adapter, spec.replace(model=base) if base else spec, job)
    from lorakit.io.peft_format import read_config_dict, resolve_adapter_dir

    if not os.path.isdir(path):
        raise FileNotFoundError(f"--adapter {path!r} is not a directory; give a lorakit train run (--out) or an "
                                f"adapter directory ({ADAPTER_CONFIG} + weights)")
    try:
        adapter = resolve_adapter_dir(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"--adapter {path!r} is neither a lorakit train run ({RUN_CONFIG}) nor an adapter "
                                f"directory ({ADAPTER_CONFIG})") from None
    cfg = read_config_dict(adapter)
    task_type = cfg.get("task_type")
    if task_type is not None and TASK_OF_TYPE.get(task_type) != task:
        serve = COMMAND.get(TASK_OF_TYPE.get(task_type, ""), None)
        raise ValueError(f"the adapter in {path!r} has task_type {task_type!r}; "
                         + (f"use {serve}" if serve else f"lorakit serves {sorted(TASK_OF_TYPE)} adapters"))
    model = base or _builtin_of(cfg.get("base_model_name_or_path"))
    if not model:
        raise FileNotFoundError(f"the adapter in {path!r} does not name its base model (base_model_name_or_path); "
                                "give --base MODEL (a directory, a built-in name or a Hub id)")
    labels = _head_labels(adapter, model) if task == "seq-cls" else None
    return Trained(str(adapter), BaseSpec(model=model, task=task, labels=labels))


def _builtin_of(name: str | None) -> str | None:
    """A built-in model's recorded origin (an adapter written by lorakit train) back to its name."""
    from lorakit.models import ORIGIN

    back = {origin: builtin for builtin, origin in ORIGIN.items()}
    return back.get(name, name) if name else None


def _head_labels(adapter, model: str) -> list[str] | None:
    """A classification adapter's label names: as many as its saved head has rows, named by the base's
    ``id2label`` when that has the same count, else ``"0"``, ``"1"``, ... (``None``: no head saved)."""
    from lorakit.io.peft_format import read_tensors, weights_path

    rows = [t.shape[0] for k, t in read_tensors(weights_path(adapter)).items()
            if k.endswith((".classifier.weight", ".score.weight", ".classifier.out_proj.weight"))]
    if not rows:
        return None
    config = os.path.join(model, "config.json")
    if os.path.isfile(config):
        with open(config, encoding="utf-8") as f:
            id2label = json.load(f).get("id2label") or {}
        if len(id2label) == rows[0]:
            return [id2label[k] for k in sorted(id2label, key=int)]
    return [str(i) for i in range(rows[0])]


def load_trained(path: str, task: str, device: str = "cpu", base: str | None = None):
    """``(model, tokenizer, trained)``: the base loaded as in training, the adapter on it, in eval mode.

    Raises:
        FileNotFoundError / ValueError: see :func:`resolve_trained`; ``device`` not usable here.
    """
    from lorakit import load_adapter
    from lorakit.train.settings import check_device

    check_device(device)
    trained = resolve_trained(path, task, base)
    model, tok = load_base(trained.base, device)
    load_adapter(model, trained.adapter)
    if not trained.base.quantize:  # a quantized base is loaded on its device (and cannot be moved)
        model.to(device)
    return model.eval(), tok, trained


def batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """``items`` in lists of ``size`` (the last one shorter), consumed lazily."""
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@torch.no_grad()
def predict(model, tok, texts: Iterable[str], max_length: int = 512, batch_size: int = 64
            ) -> Iterator[tuple[str, str, float]]:
    """``(text, label, probability)`` of the most likely class for each text, ``batch_size`` texts at
    a time: a generator, so memory stays bounded by one batch however many texts stream in.

    Texts are truncated to ``max_length`` tokens (the run's ``--max-length``, as in training).
    """
    device = next(model.parameters()).device
    names = model.config.id2label
    for chunk in batches(texts, batch_size):
        enc = tok(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        probs = model(**{k: v.to(device) for k, v in enc.items()}).logits.float().softmax(-1)  # (B, C)
        p, idx = probs.max(-1)  # (B,), (B,)
        yield from ((text, names[int(i)], float(q)) for text, i, q in zip(chunk, idx.tolist(), p.tolist()))


@torch.no_grad()
def generate(model, tok, prompt: str | None = None, max_new_tokens: int = 64, temperature: float = 0.0, seed: int = 0,
             *, messages: list[dict[str, str]] | None = None, top_p: float | None = None,
             top_k: int | None = None) -> str:
    """The completion of ``prompt``, or the assistant's reply to the chat ``messages``.

    The input is built as in training: ``[bos] + tok(prompt)`` (no second BOS when the prompt
    already starts with it), or for a chat the tokenizer's chat template with the generation prompt
    (``apply_chat_template(messages, add_generation_prompt=True)``: the template's own BOS, none
    added) — the plain ``role: content`` layout when it has no template. (An Alpaca run's prompt is
    formatted by :func:`lorakit.train.prompts.format_prompt` first.) Generation stops at any of
    :func:`lorakit.train.prompts.terminators` — the model's generation config's end tokens, the
    tokenizer's EOS and, for a chat, the template's end-of-turn token — which is not returned.
    Greedy when ``temperature`` is 0; else sampling at that temperature, with nucleus ``top_p``
    and ``top_k`` filtering.

    Raises:
        ValueError: neither or both of ``prompt`` and ``messages``; sampling options without a temperature.
    """
    from lorakit.data.tokenize import chat_prompt_ids, prompt_ids
    from lorakit.train.prompts import terminators

    if (prompt is None) == (messages is None):
        raise ValueError("give either a prompt or chat messages")
    if temperature <= 0 and (top_p is not None or top_k is not None):
        raise ValueError("--top-p / --top-k apply to sampling: give --temperature > 0 as well")
    ids = chat_prompt_ids(tok, messages) if messages is not None else prompt_ids(tok, prompt)
    device = next(model.parameters()).device
    x = torch.tensor([ids], device=device)  # (1, T)
    torch.manual_seed(seed)
    kw: dict[str, Any] = {"do_sample": False}
    if temperature > 0:
        kw = {"do_sample": True, "temperature": temperature, "top_p": 1.0 if top_p is None else top_p,
              "top_k": 0 if top_k is None else top_k}
    stop = terminators(model, tok, chat=messages is not None)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (stop[0] if stop else None)
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                         pad_token_id=pad, eos_token_id=stop or None, **kw)  # (1, T + new)
    new = out[0, x.shape[1]:].tolist()
    end = next((i for i, t in enumerate(new) if t in stop), len(new))
    return tok.decode(new[:end], skip_special_tokens=True)
