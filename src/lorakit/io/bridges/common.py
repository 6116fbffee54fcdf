"""The hub every bridge goes through: a PEFT-format adapter held in memory.

:class:`PeftAdapter` is an ``adapter_config.json`` dict plus its tensors under PEFT's file keys
(``base_model.model.<module>.lora_A.weight``). It comes from a directory, from a model with lorakit
adapters, or from a bridge's reader (:func:`from_factors`); it goes to a directory, into a model, or
to a bridge's writer, which asks it for each module's :class:`Factors`:

    ΔW = scaling · B·A      A: (r, in), B: (out, r)   (an embedding: ΔE = scaling · (B·A)ᵀ, (vocab, dim))

with ``scaling = alpha/r`` (``alpha/√r`` with rsLoRA) and ``r``, ``alpha`` from the config's
rank and alpha patterns, as PEFT computes them for that module.
"""

from __future__ import annotations

import collections
import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.config import LoraConfig
from lorakit.io.consumers import AdapterView, Verdict, require
from lorakit.io.keymap import PREFIX
from lorakit.io.peft_format import (
    CONFIG_NAME,
    PathLike,
    read_config_dict,
    read_tensors,
    resolve_adapter_dir,
    weights_path,
)


@dataclass
class Factors:
    """One adapted module's factors in PEFT's layout.

    Attributes:
        module: the module's path, e.g. ``"model.layers.0.self_attn.q_proj"``.
        kind: ``"linear"``, ``"embedding"`` or ``"conv"``.
        A: ``(r, in)`` (``(r, vocab)`` for an embedding, ``(r, in, *k)`` for a convolution).
        B: ``(out, r)`` (``(dim, r)`` for an embedding, ``(out, r, 1, ...)`` for a convolution).
        scaling: the multiplier of ``B·A`` for this module.
    """

    module: str
    kind: str
    A: torch.Tensor
    B: torch.Tensor
    scaling: float

    @property
    def r(self) -> int:
        return self.A.shape[0]

    def delta(self) -> torch.Tensor:
        """``ΔW`` in the base weight's layout (fp32)."""
        A, B = self.A.float(), self.B.float()
        if self.kind == "embedding":
            return self.scaling * (B @ A).T  # (vocab, dim)
        if self.kind == "conv":
            return self.scaling * (B.flatten(1) @ A.flatten(1)).view(B.shape[0], *A.shape[1:])
        return self.scaling * (B @ A)  # (out, in)


@dataclass
class PeftAdapter:
    """An adapter in PEFT's format, in memory: ``config`` (adapter_config.json) and ``tensors`` (file keys)."""

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    source: str = "the adapter"

    # ------------------------------------------------------------------ in
    @classmethod
    def from_dir(cls, directory: PathLike, adapter_name: str = "default") -> PeftAdapter:
        """Read ``adapter_config.json`` + ``adapter_model.safetensors`` (or legacy ``.bin``) from ``directory``.

        Raises:
            FileNotFoundError / ValueError: as :func:`lorakit.load_adapter` for the same files.
        """
        d = resolve_adapter_dir(directory, adapter_name)
        return cls(read_config_dict(d), read_tensors(weights_path(d)), source=str(d))

    @classmethod
    def from_model(cls, model: nn.Module, adapter_name: str = "default") -> PeftAdapter:
        """The files :func:`lorakit.save_adapter` writes for ``adapter_name`` (exactly those: written, then read)."""
        from lorakit.io.adapter import save_adapter

        with tempfile.TemporaryDirectory() as tmp:
            return cls.from_dir(save_adapter(model, tmp, adapter_name=adapter_name))

    # ------------------------------------------------------------------ out
    def save(self, directory: PathLike) -> Path:
        """Write PEFT's two files into ``directory``, all or nothing."""
        from safetensors.torch import save_file

        from lorakit.io.peft_format import WEIGHTS_NAME
        from lorakit.io.safe_write import write_files_atomically, write_text_file

        tensors = {k: v.contiguous() for k, v in self.tensors.items()}
        write_files_atomically(directory, {
            WEIGHTS_NAME: lambda path: save_file(tensors, path, metadata={"format": "pt"}),
            CONFIG_NAME: lambda path: write_text_file(path, json.dumps(dict(sorted(self.config.items())), indent=2)),
        })
        return Path(directory)

    def load_into(self, model: nn.Module, adapter_name: str = "default", is_trainable: bool = False) -> nn.Module:
        """Inject and load this adapter into ``model`` with :func:`lorakit.load_adapter` (all its checks; on any
        error the model is unchanged)."""
        from lorakit.io.adapter import load_adapter

        with tempfile.TemporaryDirectory() as tmp:
            self.save(tmp)
            try:
                return load_adapter(model, tmp, adapter_name=adapter_name, is_trainable=is_trainable)
            except (ValueError, TypeError) as e:  # name the file the user gave, not the temporary copy
                raise type(e)(str(e).replace(f"'{tmp}", f"'{self.source}").replace(tmp, self.source)) from e

    # ------------------------------------------------------------------ reading it
    @property
    def view(self) -> AdapterView:
        return AdapterView(self.config, {k: tuple(v.shape) for k, v in self.tensors.items()})

    def require(self, consumer: str) -> Verdict:
        """Raise ValueError if ``consumer``'s rules refuse this adapter (see :mod:`lorakit.io.consumers`)."""
        return require(consumer, self.view, source=self.source)

    def lora_config(self) -> LoraConfig:
        return LoraConfig.from_peft_dict(dict(self.config), source=f"{self.source}/{CONFIG_NAME}")

    def factors(self) -> dict[str, Factors]:
        """Every adapted module's factors and scaling, in file order.

        Raises:
            ValueError: a module has one factor without the other, or a rank other than its config's.
        """
        cfg = self.lora_config()
        found: dict[str, dict[str, torch.Tensor]] = collections.defaultdict(dict)
        for key, t in self.tensors.items():
            k = key[len(PREFIX):] if key.startswith(PREFIX) else key
            for suffix, slot in ((".lora_A.weight", "A"), (".lora_B.weight", "B"), (".lora_embedding_A", "eA"),
                                 (".lora_embedding_B", "eB")):
                if k.endswith(suffix):
                    found[k[: -len(suffix)]][slot] = t
        out: dict[str, Factors] = {}
        for module, f in found.items():
            emb = "eA" in f or "eB" in f
            A, B = (f.get("eA"), f.get("eB")) if emb else (f.get("A"), f.get("B"))
            if A is None or B is None:
                raise ValueError(f"{self.source}: module {module!r} has only one of its two LoRA factors")
            r = cfg.rank_for(module)
            if A.shape[0] != r:
                raise ValueError(f"{self.source}: {module!r} has rank {A.shape[0]} in the file but {r} in the config")
            kind = "embedding" if emb else ("conv" if A.dim() > 2 else "linear")
            out[module] = Factors(module, kind, A, B, cfg.scaling(r, cfg.alpha_for(module)))
        return out


def from_factors(factors: list[Factors], *, source: str, extra: dict[str, Any] | None = None) -> PeftAdapter:
    """A PEFT adapter holding exactly ``factors`` (each module's A, B and scaling), as a reader builds it.

    The factors are stored as they are; each module's scaling goes into its alpha
    (``alpha = scaling · r``): ``r`` and ``lora_alpha`` are the most common rank and alpha, and
    modules that differ get ``rank_pattern`` / ``alpha_pattern`` entries anchored to their full
    name, so PEFT and lorakit compute the same ``scaling`` for every module.
    """
    if not factors:
        raise ValueError(f"{source}: no LoRA factors found")
    ranks = {f.module: f.r for f in factors}
    alphas = {f.module: _clean(f.scaling * f.r) for f in factors}
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    pattern = lambda m: "^" + re.escape(m)  # noqa: E731 - PEFT's (.*\.)?(key)$ rule, anchored to the full name
    config: dict[str, Any] = {
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": sorted(ranks), "lora_dropout": 0.0,
        "bias": "none", "use_rslora": False, "use_dora": False, "init_lora_weights": True, "fan_in_fan_out": False,
        "rank_pattern": {pattern(m): v for m, v in ranks.items() if v != r},
        "alpha_pattern": {pattern(m): v for m, v in alphas.items() if v != alpha},
        "modules_to_save": None, "inference_mode": True, "task_type": None, "base_model_name_or_path": None,
    } | (extra or {})
    tensors: dict[str, torch.Tensor] = {}
    for f in factors:
        names = ("lora_embedding_A", "lora_embedding_B") if f.kind == "embedding" else ("lora_A.weight",
                                                                                        "lora_B.weight")
        tensors[f"{PREFIX}{f.module}.{names[0]}"] = f.A.contiguous()
        tensors[f"{PREFIX}{f.module}.{names[1]}"] = f.B.contiguous()
    return PeftAdapter(config, tensors, source=source)


def as_adapter(adapter: PeftAdapter | nn.Module | PathLike, adapter_name: str = "default") -> PeftAdapter:
    """A :class:`PeftAdapter` from an adapter, a PEFT-format directory or a model with lorakit adapters."""
    if isinstance(adapter, PeftAdapter):
        return adapter
    if isinstance(adapter, nn.Module):
        return PeftAdapter.from_model(adapter, adapter_name)
    return PeftAdapter.from_dir(adapter, adapter_name)


def _clean(x: float) -> float | int:
    """``16.000000000000004`` -> ``16``: alphas recomputed from a float scaling, kept readable and exact enough."""
    rounded = round(x, 9)
    return int(rounded) if rounded == int(rounded) else rounded


def hf_config(base: Any) -> dict[str, Any]:
    """A base model's config as a dict: from a transformers model, a ``PretrainedConfig``, a dict, or a directory
    / ``config.json`` path.

    Raises:
        FileNotFoundError: no config.json there.
    """
    if isinstance(base, dict):
        return base
    cfg = getattr(base, "config", base)
    if hasattr(cfg, "to_dict"):
        d = cfg.to_dict()
        if isinstance(base, nn.Module) and not d.get("architectures"):
            d["architectures"] = [type(base).__name__]  # a model built from a config, never saved
        return d
    path = Path(base)
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"no config.json at {str(base)!r}: give the base model's directory (only its "
                                "config.json is read)")
    return json.loads(path.read_text())
