"""Image-model LoRA files: kohya / sd-scripts (``lora_unet_…``) and diffusers' ``pytorch_lora_weights.safetensors``.

Reading goes through diffusers' own converters: a pipeline family's ``LoraLoaderMixin.lora_state_dict``
(SD 1.x/2.x, SDXL — SGM ``input_blocks`` names —, SD3, Flux — BFL ``double_blocks`` names, fused qkv
split —) turns any file diffusers reads into diffusers keys, and ``convert_unet_state_dict_to_peft``
into PEFT's. The scale of each module is kohya's

    ΔW = (alpha / r) · up·down        (``<module>.alpha``; no alpha: 1, diffusers' convention alpha = r)

or, for a diffusers file with ``lora_adapter_metadata`` in its safetensors header, that LoraConfig.

Writing:

* :func:`write_diffusers`: ``<component>.<module>.lora_A.weight`` / ``lora_B.weight`` (PEFT's factors under the
  component's name) and the LoraConfig in the header's ``lora_adapter_metadata`` (keys ``<component>.r`` …),
  which ``load_lora_adapter(DIR, weight_name=..., prefix=component)`` and a pipeline's ``load_lora_weights`` use
  instead of assuming alpha = r. (diffusers 0.42's ``load_lora_adapter`` given a bare file path reads the header
  only with ``use_safetensors=True``; without it the metadata, and so the alpha, is dropped.) rsLoRA, rank and
  alpha patterns, DoRA and lora_bias are carried by the config as they are.
* :func:`write_kohya`: ``lora_unet_<module with _ for .>.lora_down.weight`` (= A), ``.lora_up.weight`` (= B) and
  ``.alpha`` (= scaling · r, so any per-module scale is exact), for a UNet (diffusers' module names, which
  diffusers, ComfyUI and A1111 map) and text encoders (``lora_te_`` / ``lora_te2_``). DiTs (SD3, Flux) are written
  for diffusers only: kohya names them by the original checkpoints' fused layers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.extras import require as require_module
from lorakit.io.bridges.common import Factors, PeftAdapter, as_adapter, from_factors
from lorakit.io.keymap import PREFIX
from lorakit.io.peft_format import PathLike

KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}
# pipeline family -> diffusers' LoRA loader mixin (which holds the family's converters)
PIPELINES = {"sd": "StableDiffusionLoraLoaderMixin", "sdxl": "StableDiffusionXLLoraLoaderMixin",
             "sd3": "SD3LoraLoaderMixin", "flux": "FluxLoraLoaderMixin"}
METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
# the LoraConfig fields written into lora_adapter_metadata (a set every PEFT since 0.14 accepts)
METADATA_FIELDS = ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora",
                   "lora_bias", "lora_dropout", "bias", "fan_in_fan_out", "init_lora_weights")


def _diffusers():
    return require_module("diffusers", "reading and writing diffusers / kohya LoRA files")


def _module_keys(a: PeftAdapter) -> dict[str, torch.Tensor]:
    return {(k[len(PREFIX):] if k.startswith(PREFIX) else k): v.contiguous() for k, v in a.tensors.items()}


def write_diffusers(adapter: PeftAdapter | nn.Module | PathLike, path: PathLike, component: str = "unet", *,
                    adapter_name: str = "default") -> Path:
    """Write ``adapter`` (trained on a diffusers UNet / transformer) as a diffusers LoRA file with its alpha.

    Args:
        path: a ``.safetensors`` file, or a directory (then ``pytorch_lora_weights.safetensors`` in it, the name
            ``load_lora_weights(DIR)`` looks for).
        component: the pipeline attribute the adapter belongs to: ``"unet"``, ``"transformer"``, ``"text_encoder"``…

    Raises:
        ValueError: diffusers cannot take the adapter (the ``diffusers`` rule table). Nothing is written.
    """
    from safetensors.torch import save_file

    from lorakit.io.safe_write import write_files_atomically

    a = as_adapter(adapter, adapter_name)
    a.require("diffusers")
    cfg = a.lora_config().to_peft_dict()
    meta = {f"{component}.{k}": cfg[k] for k in METADATA_FIELDS if k in cfg and (k != "lora_bias" or cfg[k])}
    tensors = {f"{component}.{k}": v for k, v in _module_keys(a).items()}
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / "pytorch_lora_weights.safetensors"
    header = {"format": "pt", METADATA_KEY: json.dumps(meta, indent=2, sort_keys=True)}
    write_files_atomically(path.parent, {path.name: lambda p: save_file(tensors, p, metadata=header)})
    return path


def write_kohya(adapter: PeftAdapter | nn.Module | PathLike, path: PathLike, component: str = "unet", *,
                adapter_name: str = "default") -> Path:
    """Write ``adapter`` as a kohya / sd-scripts LoRA file (``lora_down`` / ``lora_up`` / ``alpha`` per module).

    Raises:
        ValueError: a kohya file cannot hold the adapter (the ``kohya`` rule table), or a component without kohya
            names. Nothing is written.
    """
    from safetensors.torch import save_file

    from lorakit.io.safe_write import write_files_atomically

    if component not in KOHYA_PREFIX:
        raise ValueError(f"kohya files name {sorted(KOHYA_PREFIX)} by their modules; for {component!r} (a DiT such as "
                         "SD3 / Flux, named after the original checkpoint's fused layers) write --to diffusers")
    a = as_adapter(adapter, adapter_name)
    a.require("kohya")
    tensors: dict[str, torch.Tensor] = {}
    ranks, alphas = set(), set()
    for f in a.factors().values():
        stem = KOHYA_PREFIX[component] + f.module.replace(".", "_")
        alpha = f.scaling * f.r  # kohya: scale = alpha / r
        tensors[f"{stem}.lora_down.weight"] = f.A.contiguous()
        tensors[f"{stem}.lora_up.weight"] = f.B.contiguous()
        tensors[f"{stem}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
        ranks.add(f.r)
        alphas.add(round(alpha, 6))
    header = {"format": "pt", "ss_network_module": "networks.lora",
              "ss_network_dim": str(max(ranks)), "ss_network_alpha": str(max(alphas)),
              "lorakit_converted_from": "PEFT LoRA"}
    path = Path(path)
    write_files_atomically(path.parent, {path.name: lambda p: save_file(tensors, p, metadata=header)})
    return path


def detect_pipeline(keys: list[str]) -> str:
    """The pipeline family whose converter reads these keys: SGM names -> ``sdxl``, BFL -> ``flux``, SD3's joint
    blocks or a diffusers ``transformer.`` prefix -> ``sd3``, else ``sd``."""
    text = " ".join(keys[:2000])
    if "lora_unet_input_blocks" in text or "lora_unet_output_blocks" in text or "lora_te1_" in text:
        return "sdxl"
    if "double_blocks" in text or "single_blocks" in text:
        return "flux"
    if "joint_blocks" in text or any(k.startswith("transformer.") for k in keys):
        return "sd3"
    return "sd"


def read_lora_file(path: PathLike, pipeline: str | None = None,
                   modules: list[str] | None = None) -> dict[str, PeftAdapter | ValueError]:
    """Read a kohya / diffusers LoRA file with diffusers' converters: ``{component: PEFT adapter}`` (or the
    ValueError saying why that component cannot be read).

    Args:
        pipeline: ``"sd"``, ``"sdxl"``, ``"sd3"`` or ``"flux"`` (whose converter to use); None: guessed from the keys.
        modules: the target model's module names, when known: a kohya file whose every ``lora_<component>_<name>``
            is one of them with ``_`` for ``.`` is read by that exact match (no converter guesses where ``_`` was
            ``.``, e.g. in ``down_proj``); otherwise diffusers' converter reads it.

    Raises:
        FileNotFoundError: no such file. ValueError: keys no converter maps to LoRA factors, or a bad pipeline.
    """
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = path / "pytorch_lora_weights.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no LoRA file at {str(path)!r}")
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    if modules is not None and (exact := _read_by_names(path, keys, modules)) is not None:
        return exact
    diffusers = _diffusers()
    pipeline = pipeline or detect_pipeline(keys)
    if pipeline not in PIPELINES:
        raise ValueError(f"pipeline must be one of {sorted(PIPELINES)}, got {pipeline!r}")
    mixin = getattr(diffusers.loaders.lora_pipeline, PIPELINES[pipeline])
    out = mixin.lora_state_dict(str(path), return_lora_metadata=True)
    state, alphas, meta = (out if len(out) == 3 else (out[0], None, out[1]))
    alphas, meta = alphas or {}, meta or {}
    components = sorted({k.split(".", 1)[0] for k in state})
    bad = [k for k in state if "." not in k]
    if bad or not components:
        raise ValueError(f"{str(path)!r}: {len(bad) or len(keys)} key(s) diffusers' {pipeline} converter maps to no "
                         f"model component, e.g. {(bad or keys)[:3]}; not a kohya / diffusers LoRA file for {pipeline}")
    out: dict[str, PeftAdapter | ValueError] = {}
    for c in components:  # a part that cannot be read is an error only for whoever asks for it
        try:
            out[c] = _component(c, state, alphas, meta, source=f"{path}[{c}]")
        except ValueError as e:
            out[c] = e
    return out


def _read_by_names(path: Path, keys: list[str], modules: list[str]) -> dict[str, PeftAdapter] | None:
    """A kohya file matched against known module names (``lora_unet_a_b_c`` <- module ``a.b_c``); None unless every
    key matches."""
    from safetensors.torch import load_file

    by_kohya = {KOHYA_PREFIX[c] + m.replace(".", "_"): (c, m) for c in KOHYA_PREFIX for m in modules}
    stems = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in keys}
    if not stems or not all(s in by_kohya for s in stems):
        return None
    tensors = load_file(str(path))
    out: dict[str, list[Factors]] = {}
    for stem in stems:
        c, m = by_kohya[stem]
        down, up = tensors.get(f"{stem}.lora_down.weight"), tensors.get(f"{stem}.lora_up.weight")
        if down is None or up is None:
            raise ValueError(f"{str(path)!r}: {stem} lacks its lora_down or lora_up")
        alpha = tensors.get(f"{stem}.alpha")
        scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
        out.setdefault(c, []).append(Factors(m, "conv" if down.dim() > 2 else "linear", down, up, scale))
    return {c: from_factors(f, source=f"{path}[{c}]") for c, f in out.items()}


def _component(c: str, state: dict, alphas: dict, meta: dict, source: str) -> PeftAdapter:
    from diffusers.utils import convert_unet_state_dict_to_peft

    sub = {k[len(c) + 1:]: v for k, v in state.items() if k.startswith(c + ".")}
    peft_style = all(".lora_A." in k or ".lora_B." in k or k.endswith("lora_magnitude_vector") for k in sub)
    if not peft_style and c not in ("unet", "transformer"):
        raise ValueError(f"{source}: a kohya {c} LoRA is read by its modules' exact names: give the {c} model "
                         f"(read_kohya(..., model=...); lorakit convert --base DIR --component {c})")
    to_peft = (lambda d: d) if peft_style else convert_unet_state_dict_to_peft
    cmeta = {k[len(c) + 1:]: v for k, v in meta.items() if k.startswith(c + ".")}
    if cmeta:  # diffusers' own metadata: the LoraConfig as written
        tensors = {PREFIX + k: v for k, v in to_peft(sub).items()}
        config = {"peft_type": "LORA", "bias": "none", "modules_to_save": None, "task_type": None} | cmeta
        return PeftAdapter(config, tensors, source=source)
    pairs: dict[str, dict[str, Any]] = {}
    extra: dict[str, torch.Tensor] = {}
    converted = list(to_peft(dict(sub)))  # diffusers renames key by key, keeping the order
    if len(converted) != len(sub):
        raise ValueError(f"{source}: diffusers' conversion merged or dropped keys ({len(sub)} -> {len(converted)})")
    for (key, t), new in zip(sub.items(), converted):
        for leaf, slot in ((".lora_A.weight", "A"), (".lora_B.weight", "B")):
            if new.endswith(leaf):
                entry = pairs.setdefault(new[: -len(leaf)], {})
                entry[slot] = t
                if slot == "A":
                    entry["alpha"] = _alpha(c, key, alphas)
                break
        else:
            if not new.endswith(("lora_magnitude_vector", "lora_B.bias")):
                raise ValueError(f"{source}: {c}.{key} is not a LoRA factor after diffusers' conversion ({new!r})")
            extra[PREFIX + new] = t
    factors = []
    for module, p in pairs.items():
        if "A" not in p or "B" not in p:
            raise ValueError(f"{source}: module {module!r} lacks its down (A) or up (B) factor")
        r = p["A"].shape[0]
        kind = "conv" if p["A"].dim() > 2 else "linear"
        factors.append(Factors(module, kind, p["A"], p["B"], (p["alpha"] / r) if p["alpha"] is not None else 1.0))
    flags = {"use_dora": any(k.endswith("lora_magnitude_vector") for k in extra),
             "lora_bias": any(k.endswith("lora_B.bias") for k in extra)}
    adapter = from_factors(factors, source=source, extra=flags)
    adapter.tensors.update(extra)
    return adapter


def _alpha(component: str, key: str, alphas: dict) -> float | None:
    """kohya's alpha of the module whose down factor is ``key`` (diffusers keeps it under the key's stem)."""
    stems = [key]
    for tail in (".lora.down.weight", ".lora_linear_layer.down.weight", ".down.weight", ".lora_A.weight"):
        if key.endswith(tail):
            stems.append(key[: -len(tail)])
    for s in stems:
        for k in (f"{component}.{s}.alpha", f"{s}.alpha"):
            if k in alphas:
                v = alphas[k]
                return float(v.item() if torch.is_tensor(v) else v)
    return None


def read_kohya(path: PathLike, component: str | None = None, pipeline: str | None = None,
               model: nn.Module | None = None) -> PeftAdapter:
    """One component's adapter from a kohya / diffusers LoRA file (``component`` None: the UNet / transformer).

    ``model`` (optional): the model it is for; its module names resolve kohya's ``_``-joined names exactly.

    Raises:
        ValueError: the file has no such component (naming the ones it has), or see :func:`read_lora_file`.
    """
    modules = [n.removesuffix(".base_layer") for n, _ in model.named_modules()] if model is not None else None
    parts = read_lora_file(path, pipeline, modules)
    if component is None:
        component = next((c for c in ("unet", "transformer") if c in parts), None) or next(iter(parts))
    if component not in parts:
        raise ValueError(f"{str(path)!r} has no {component!r} LoRA; it holds {sorted(parts)}")
    if isinstance(parts[component], ValueError):
        raise parts[component]
    return parts[component]


read_diffusers = read_kohya  # one reader: diffusers' converters tell the formats apart

__all__ = ["write_diffusers", "write_kohya", "read_kohya", "read_diffusers", "read_lora_file", "detect_pipeline"]
