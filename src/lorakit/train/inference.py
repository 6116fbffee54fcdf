"""Load a trained run back for inference: the base model from ``run_config.json`` plus the adapter.

``path`` may be the run directory (``--out`` of ``lorakit train``) or its ``adapter/`` folder.
"""

from __future__ import annotations

import json
import os
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
        ValueError: the run was trained for another task.
    """
    from lorakit import load_adapter

    settings, adapter = find_run(path)
    if settings["task"] != task:
        raise ValueError(f"the run in {path!r} was trained for --task {settings['task']}, not {task}; use "
                         + ("lorakit predict" if settings["task"] == "seq-cls" else "lorakit generate"))
    model, tok = load_model(settings["model"], task, label_names=settings.get("labels"), seed=settings["seed"])
    load_adapter(model, adapter)
    return model.to(device).eval(), tok, settings


@torch.no_grad()
def predict(model, tok, texts: list[str], max_length: int = 512) -> list[tuple[str, float]]:
    """``(label, probability)`` of the most likely class for each text."""
    enc = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    device = next(model.parameters()).device
    probs = model(**{k: v.to(device) for k, v in enc.items()}).logits.float().softmax(-1)  # (N, C)
    p, idx = probs.max(-1)
    names = model.config.id2label
    return [(names[int(i)], float(q)) for i, q in zip(idx, p)]


@torch.no_grad()
def generate(model, tok, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, seed: int = 0) -> str:
    """The completion of ``prompt`` (greedy, or sampled with ``temperature`` > 0)."""
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    if tok.bos_token_id is not None:
        ids = [tok.bos_token_id] + list(ids)
    device = next(model.parameters()).device
    x = torch.tensor([ids], device=device)  # (1, T)
    torch.manual_seed(seed)
    kw = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **kw)  # (1, T + new)
    return tok.decode(out[0, x.shape[1]:], skip_special_tokens=True)
