"""LoRA adapters for MLX (mlx-lm): ``adapters.safetensors`` + ``adapter_config.json``, both ways.

mlx-lm (``mlx_lm/tuner/utils.py`` ``load_adapters`` / ``linear_to_lora_layers``, ``tuner/lora.py``)
reads::

    adapter_config.json   {"fine_tune_type": "lora", "num_layers": N,
                           "lora_parameters": {"rank": R, "scale": S, "dropout": 0.0, "keys": [...]}}
    adapters.safetensors  <module>.lora_a  (in, R)      <module>.lora_b  (R, out)

and computes ``y = W·x + S · (x·lora_a)·lora_b`` — so ``lora_a = Aᵀ``, ``lora_b = Bᵀ`` and ``scale`` is the raw
multiplier (not an alpha). An embedding's ``lora_a`` is ``(vocab, R)`` and ``lora_b`` ``(R, dim)``:
``E' = E + S · lora_a·lora_b``. One rank and one scale serve every module, and the loader checks
shapes, so: each module's exact ``scaling`` is folded into its ``lora_b`` (``· scaling / S``, with ``S``
the most common scaling, so most modules are stored as they are), and lower ranks are zero-padded
to ``R`` (zero rows of A and columns of B add nothing; :func:`read_mlx` trims them again).

``keys`` names the adapted modules inside each repeated block (``self_attn.q_proj``) and, for modules
outside the blocks, their full names (``model.embed_tokens``, ``lm_head``); ``num_layers = -1`` adapts
every block, so the file needs no base model. A block the adapter does not touch gets mlx-lm's own
LoRA layer with ``lora_b = 0``: a no-op, as in the source adapter.
"""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.io.bridges.common import Factors, PeftAdapter, as_adapter, from_factors
from lorakit.io.peft_format import PathLike

CONFIG = "adapter_config.json"
WEIGHTS = "adapters.safetensors"
BLOCK = re.compile(r"^(?P<stack>.*\.layers)\.(?P<index>\d+)\.(?P<key>.+)$")  # model.layers.3.self_attn.q_proj


def _mlx_key(module: str) -> str:
    """The ``keys`` entry mlx-lm matches: the path inside a block, else the full name."""
    m = BLOCK.match(module)
    return m.group("key") if m else module


def write_mlx(adapter: PeftAdapter | nn.Module | PathLike, directory: PathLike, *,
              adapter_name: str = "default") -> Path:
    """Write ``adapter`` as an mlx-lm adapter directory (``adapters.safetensors`` + ``adapter_config.json``).

    Returns:
        ``directory``.

    Raises:
        ValueError: mlx-lm cannot take the adapter (the ``mlx`` rule table: DoRA, lora_bias, modules_to_save,
            trainable tokens, trained biases, PiSSA/OLoRA, target_parameters, convolutions). Nothing is written.
    """
    from safetensors.torch import save_file

    from lorakit.io.safe_write import write_files_atomically, write_text_file

    a = as_adapter(adapter, adapter_name)
    a.require("mlx")
    factors = list(a.factors().values())
    scale = collections.Counter(f.scaling for f in factors).most_common(1)[0][0]
    rank = max(f.r for f in factors)
    tensors: dict[str, torch.Tensor] = {}
    for f in factors:
        A, B = f.A.float(), f.B.float() * (f.scaling / scale)  # (r, in), (out, r)
        lora_a, lora_b = A.T, B.T  # (in, r), (r, out); an embedding: (vocab, r), (r, dim)
        pad = rank - f.r
        if pad:
            lora_a = torch.cat([lora_a, lora_a.new_zeros(lora_a.shape[0], pad)], dim=1)  # (in, R)
            lora_b = torch.cat([lora_b, lora_b.new_zeros(pad, lora_b.shape[1])], dim=0)  # (R, out)
        tensors[f"{f.module}.lora_a"] = lora_a.contiguous()
        tensors[f"{f.module}.lora_b"] = lora_b.contiguous()
    config = {"fine_tune_type": "lora", "num_layers": -1,
              "lora_parameters": {"rank": rank, "scale": scale, "dropout": 0.0,
                                  "keys": sorted({_mlx_key(f.module) for f in factors})},
              "lorakit": {"converted_from": "PEFT LoRA", "base_model_name_or_path":
                          a.config.get("base_model_name_or_path")}}
    write_files_atomically(directory, {
        WEIGHTS: lambda path: save_file(tensors, path, metadata={"format": "mlx"}),
        CONFIG: lambda path: write_text_file(path, json.dumps(config, indent=2)),
    })
    return Path(directory)


def read_mlx(directory: PathLike, base: nn.Module | None = None) -> PeftAdapter:
    """Read an mlx-lm LoRA adapter directory as a PEFT-format adapter.

    ``scale`` becomes each module's scaling (``alpha = scale · r``); zero-padded rank is trimmed. Whether a module
    is an embedding is read from ``base`` when given, else from its name (``embed_tokens`` / ``wte`` / ``embed``).

    Raises:
        FileNotFoundError: no adapter_config.json / adapters.safetensors. ValueError: not a LoRA adapter
            (``fine_tune_type`` dora or full), a module with one factor, or malformed files.
    """
    from safetensors.torch import load_file

    d = Path(directory)
    for name in (CONFIG, WEIGHTS):
        if not (d / name).is_file():
            raise FileNotFoundError(f"{str(d)!r} is not an mlx-lm adapter directory: {name} is missing")
    try:
        config: dict[str, Any] = json.loads((d / CONFIG).read_text())
    except ValueError as e:
        raise ValueError(f"{str(d / CONFIG)!r} is not valid JSON: {e}") from e
    kind = config.get("fine_tune_type", "lora")
    if kind != "lora":
        raise ValueError(f"{str(d)!r}: fine_tune_type={kind!r}; lorakit reads mlx-lm LoRA adapters only (mlx-lm's DoRA "
                         "normalises differently, and 'full' holds whole weights)")
    params = config.get("lora_parameters") or {}
    if "scale" not in params:
        raise ValueError(f"{str(d / CONFIG)!r}: lora_parameters has no 'scale' (mlx-lm's raw LoRA multiplier)")
    scale = float(params["scale"])
    tensors = load_file(str(d / WEIGHTS))
    pairs: dict[str, dict[str, torch.Tensor]] = collections.defaultdict(dict)
    for key, t in tensors.items():
        module, _, leaf = key.rpartition(".")
        if leaf not in ("lora_a", "lora_b"):
            raise ValueError(f"{str(d / WEIGHTS)!r}: {key!r} is not a lora_a / lora_b tensor (a DoRA 'm'?)")
        pairs[module][leaf] = t.float()
    embeddings = ({n for n, m in base.named_modules() if isinstance(m, nn.Embedding)} if base is not None else None)
    factors = []
    for module, p in pairs.items():
        if len(p) != 2:
            raise ValueError(f"{str(d / WEIGHTS)!r}: {module!r} lacks its lora_a or lora_b")
        lora_a, lora_b = p["lora_a"], p["lora_b"]  # (in, R), (R, out)
        keep = int(((lora_a != 0).any(0) | (lora_b != 0).any(1)).nonzero().max().item()) + 1 if lora_a.any() else 1
        A, B = lora_a[:, :keep].T, lora_b[:keep].T  # (r, in), (out, r)
        emb = (module in embeddings) if embeddings is not None else module.rpartition(".")[2] in ("embed_tokens",
                                                                                                   "wte", "embed")
        factors.append(Factors(module, "embedding" if emb else "linear", A, B, scale))
    return from_factors(factors, source=str(d))


__all__ = ["write_mlx", "read_mlx"]
