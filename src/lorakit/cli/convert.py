"""``lorakit convert SRC --to FORMAT --out PATH``: an adapter from one consumer's format to another's.

Formats: ``peft`` (adapter_config.json + adapter_model.safetensors: PEFT, lorakit, vLLM, transformers),
``gguf`` (llama.cpp), ``mlx`` (mlx-lm), ``diffusers`` (pytorch_lora_weights.safetensors with its alpha in the
header) and ``kohya`` (lora_unet_… .lora_down / .lora_up / .alpha). Every conversion goes through the PEFT
form; the source format is detected from the files unless ``--from`` says it. Before writing, the adapter
is checked against the target consumer's rules (those ``lorakit inspect`` lists), and a refused or failed
conversion writes nothing.
"""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

FORMATS = ("peft", "gguf", "mlx", "diffusers", "kohya")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "convert", help="convert a LoRA adapter between PEFT, llama.cpp GGUF, MLX, diffusers and kohya files",
        description=textwrap.fill(
                    "Convert a LoRA adapter from one format to another, exactly: per-module scales (rsLoRA, "
                    "alpha_pattern, rank_pattern) are folded into the factors or written as per-module alphas where "
                    "the target has one scale. Reads PEFT directories (or a lorakit train run), llama.cpp LoRA GGUFs, "
                    "mlx-lm adapter directories and kohya / diffusers .safetensors files (through diffusers' own "
                    "converters: SD 1.x/2.x, SDXL, SD3, Flux). What the target cannot hold (DoRA for GGUF / MLX / "
                    "kohya, modules_to_save, trainable tokens, trained biases, PiSSA/OLoRA files...) is refused "
                    "with the reason, and nothing is written; `lorakit inspect DIR` lists which targets can take "
                    "an adapter.", width=100),
        epilog="examples:\n"
               "  lorakit convert runs/x/adapter --to gguf --base ./llama --out adapter.gguf\n"
               "  lorakit convert runs/x/adapter --to mlx --out mlx-adapter/\n"
               "  lorakit convert lora.safetensors --to peft --out unet-adapter/      # a kohya file's UNet part\n"
               "  lorakit convert unet-adapter/ --to diffusers --out lora/   # then pipe.load_lora_weights('lora/')\n"
               "  lorakit convert adapter.gguf --to peft --base ./llama --out peft-adapter/",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="SRC", help="the adapter: a PEFT directory or lorakit run, a .gguf file, an "
                                                 "mlx-lm adapter directory, or a kohya / diffusers .safetensors file")
    p.add_argument("--to", required=True, choices=FORMATS, help="the format to write")
    p.add_argument("--out", required=True, metavar="PATH",
                   help="where to write: a directory (peft, mlx; diffusers: pytorch_lora_weights.safetensors in it) "
                        "or a file (gguf, kohya, diffusers *.safetensors)")
    p.add_argument("--from", dest="source_format", choices=FORMATS, default=None,
                   help="the source's format (default: detected from the files)")
    p.add_argument("--base", metavar="DIR", default=None,
                   help="the base model's directory (its config.json is read, no weights): needed for gguf both ways "
                        "(architecture, head counts, tensor names; writing defaults to the adapter's recorded "
                        "base_model_name_or_path when that is a local directory); otherwise, if given, every adapted "
                        "module is checked to exist in it")
    p.add_argument("--component", default=None,
                   help="diffusers / kohya: which pipeline component (unet, transformer, text_encoder, ...); reading "
                        "defaults to the UNet / transformer, writing to unet")
    p.add_argument("--pipeline", choices=["sd", "sdxl", "sd3", "flux"], default=None,
                   help="kohya / diffusers source: whose converter reads it (default: guessed from the key names)")
    p.add_argument("--adapter-name", default="default", help="PEFT source: a non-default adapter's sub-directory")


def detect(source: Path) -> str:
    """The format of ``source`` from its files.

    Raises:
        FileNotFoundError: nothing there. ValueError: no format recognised.
    """
    if not source.exists():
        raise FileNotFoundError(f"no adapter at {str(source)!r}")
    if source.is_file():
        if source.suffix == ".gguf":
            return "gguf"
        if source.suffix == ".safetensors":
            return _safetensors_format(source)
        raise ValueError(f"{str(source)!r}: not a .gguf or .safetensors file; give --from")
    if (source / "adapters.safetensors").is_file():
        return "mlx"
    if (source / "adapter_config.json").is_file() or (source / "run_config.json").is_file():
        return "peft"
    if (source / "pytorch_lora_weights.safetensors").is_file():
        return "diffusers"
    raise ValueError(f"{str(source)!r} holds no adapter lorakit recognises (adapter_config.json, adapters.safetensors, "
                     "pytorch_lora_weights.safetensors); give the file itself or --from")


def _safetensors_format(path: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    return "kohya" if any(k.startswith(("lora_unet_", "lora_te", "lora_transformer_")) for k in keys) else "diffusers"


def _read(fmt: str, source: Path, args: argparse.Namespace):
    from lorakit.io.bridges.common import PeftAdapter

    if fmt == "peft":
        if (source / "run_config.json").is_file() and not (source / "adapter_config.json").is_file():
            source = source / "adapter"  # a lorakit train run
        return PeftAdapter.from_dir(source, args.adapter_name)
    if fmt == "gguf":
        from lorakit.io.bridges.gguf import read_gguf

        if args.base is None:
            raise ValueError("reading a GGUF adapter needs --base (the base model's directory: its config.json names "
                             "the architecture and its modules)")
        return read_gguf(source, args.base)
    if fmt == "mlx":
        from lorakit.io.bridges.mlx import read_mlx

        return read_mlx(source)
    from lorakit.io.bridges.kohya import read_lora_file

    modules = sorted(_base_modules(args.base, args.component)) if args.base is not None else None
    parts = read_lora_file(source, args.pipeline, modules)
    component = args.component or next((c for c in ("unet", "transformer") if c in parts), None) or next(iter(parts))
    if component not in parts:
        raise ValueError(f"{str(source)!r} has no {component!r} LoRA; it holds {sorted(parts)} (pick one: --component)")
    if len(parts) > 1:
        print(f"{source.name} holds LoRAs for {sorted(parts)}; converting {component!r} (--component picks another)")
    if isinstance(parts[component], ValueError):
        raise parts[component]
    return parts[component]


def _check_base(adapter, base: str, component: str | None) -> None:
    """Every adapted module exists in the base model."""
    names, model = _base_modules(base, component, with_class=True)
    missing = [m for m in adapter.factors() if m not in names]
    if missing:
        raise ValueError(f"{len(missing)} adapted module(s) match nothing in {model} at {base!r}, e.g. "
                         f"{missing[:3]}; some modules are, e.g. {sorted(names)[1:4]}")


def _base_modules(base: str, component: str | None, with_class: bool = False):
    """The module names of the base model (a transformers or diffusers directory; built from its config on the
    meta device: no weights are read, no memory is used)."""
    import torch

    d = Path(base)
    cfg_path = next((p for p in (d / (component or "") / "config.json", d / "config.json") if p.is_file()), None)
    if cfg_path is None:
        raise FileNotFoundError(f"--base {base!r}: no config.json there")
    config = json.loads(cfg_path.read_text())
    with torch.device("meta"):
        if "_class_name" in config:  # a diffusers model
            from lorakit.extras import require

            cls = getattr(require("diffusers", "checking a diffusers base"), config["_class_name"])
            model = cls.from_config(config)
        else:
            from lorakit.extras import require

            transformers = require("transformers", "checking a transformers base")
            model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(
                str(cfg_path.parent)))
    names = {n for n, _ in model.named_modules()}
    return (names, type(model).__name__) if with_class else names


def _recorded_base(adapter) -> str | None:
    """The adapter's ``base_model_name_or_path`` when it is a local directory holding a config.json."""
    name = adapter.config.get("base_model_name_or_path")
    return name if name and (Path(name) / "config.json").is_file() else None


def run(args: argparse.Namespace) -> int:
    from lorakit.io.consumers import verdict

    source, out = Path(args.source), Path(args.out)
    fmt = args.source_format or detect(source)
    if fmt == args.to and fmt != "peft":
        raise ValueError(f"{str(source)!r} is already a {fmt} adapter; nothing to convert")
    adapter = _read(fmt, source, args)
    if args.base is not None and args.to != "gguf" and fmt != "gguf":
        _check_base(adapter, args.base, args.component)
    consumer = {"peft": "peft", "gguf": "llama.cpp", "mlx": "mlx", "diffusers": "diffusers", "kohya": "kohya"}[args.to]
    notes = verdict(consumer, adapter.view).notes
    if args.to == "peft":
        adapter.require("peft")
        written = adapter.save(out)
    elif args.to == "gguf":
        from lorakit.io.bridges.gguf import write_gguf

        base = args.base or _recorded_base(adapter)
        if base is None:
            raise ValueError("--to gguf needs --base (the base model's directory: its config.json names the "
                             "architecture, head counts and layers)")
        written = write_gguf(adapter, out, base)
    elif args.to == "mlx":
        from lorakit.io.bridges.mlx import write_mlx

        written = write_mlx(adapter, out)
    elif args.to == "diffusers":
        from lorakit.io.bridges.kohya import write_diffusers

        written = write_diffusers(adapter, out, args.component or "unet")
    else:
        from lorakit.io.bridges.kohya import write_kohya

        written = write_kohya(adapter, out, args.component or "unet")
    n = len(adapter.factors())
    print(f"wrote {args.to} adapter ({n} adapted module{'s' * (n != 1)}, from {fmt}) to {written}")
    for note in notes:
        print(f"  note: {note}")
    return 0
