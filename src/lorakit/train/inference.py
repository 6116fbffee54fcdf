"""Load a trained run back for inference: the base model from ``run_config.json`` plus the adapter.

``path`` may be the run directory (``--out`` of ``lorakit train``) or its ``adapter/`` folder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from lorakit.models import load_model

RUN_CONFIG = "run_config.json"


def find_run(path: str) -> tuple[dict[str, Any], str]:
    """``(settings, adapter directory)`` of the run at ``path``.

    Raises:
        FileNotFoundError: neither ``path`` nor its parent holds a run_config.json, or the adapter is missing.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--adapter {path!r} is not a directory; give the --out directory of lorakit train")
    run_dir = path if os.path.isfile(os.path.join(path, RUN_CONFIG)) else os.path.dirname(os.path.abspath(path))
    cfg_path = os.path.join(run_dir, RUN_CONFIG)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path!r} holds no {RUN_CONFIG} (nor does its parent); give the --out directory "
                                "of a finished lorakit train run")
    adapter = os.path.join(run_dir, "adapter") if path == run_dir else path
    if not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
        raise FileNotFoundError(f"no adapter in {adapter!r} (adapter_config.json missing): did the run finish? "
                                f"An interrupted run continues with: lorakit train --resume {run_dir}")
    with open(cfg_path, encoding="utf-8") as f:
        return json.load(f), adapter


def load_trained(path: str, task: str, device: str = "cpu"):
    """``(model, tokenizer, settings)`` with the run's adapter loaded, in eval mode.

    Raises:
        ValueError: the run was trained for another task, or ``device`` is not usable here.
    """
    from lorakit import load_adapter
    from lorakit.train.settings import check_device

    check_device(device)
    settings, adapter = find_run(path)
    if settings["task"] != task:
        raise ValueError(f"the run in {path!r} was trained for --task {settings['task']}, not {task}; use "
                         + ("lorakit predict" if settings["task"] == "seq-cls" else "lorakit generate"))
    model, tok = load_model(settings["model"], task, label_names=settings.get("labels"), seed=settings["seed"],
                            dtype=settings.get("dtype"))
    load_adapter(model, adapter)
    return model.to(device).eval(), tok, settings


def batches(items: Iterable[str], size: int) -> Iterator[list[str]]:
    """``items`` in lists of ``size`` (the last one shorter), consumed lazily."""
    batch: list[str] = []
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
    added) — the plain ``role: content`` layout when it has no template. Greedy when ``temperature``
    is 0; else sampling at that temperature, with nucleus ``top_p`` and ``top_k`` filtering.

    Raises:
        ValueError: neither or both of ``prompt`` and ``messages``; sampling options without a temperature.
    """
    from lorakit.data.tokenize import chat_prompt_ids, prompt_ids

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
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **kw)  # (1, T + new)
    return tok.decode(out[0, x.shape[1]:], skip_special_tokens=True)
