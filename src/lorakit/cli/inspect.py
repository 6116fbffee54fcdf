"""``lorakit inspect DIR``: what a PEFT-format adapter directory holds, without loading a model.

Reads ``adapter_config.json`` and the tensor headers of ``adapter_model.safetensors`` (no tensor
data is read; a legacy ``.bin`` is read with ``torch.load(weights_only=True)``), and reports the
config, the targeted modules with their ranks, the parameter count, the size on disk and the
PEFT version that wrote the files when recorded. Non-default adapters that PEFT / lorakit keep
in sub-directories are listed too, and which consumers (PEFT, vLLM, llama.cpp, diffusers, kohya, MLX)
can take the adapter and why not — from the rule tables of :mod:`lorakit.io.consumers`, the same ones
``lorakit convert`` checks before it writes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "inspect",
        help="show what a LoRA adapter directory holds (config, modules, ranks, size)",
        description="Describe a PEFT-format LoRA adapter directory (adapter_config.json + "
                    "adapter_model.safetensors, as written by lorakit.save_adapter or PEFT's save_pretrained): "
                    "its config, the modules it adapts and their ranks, its parameter count, its size on disk "
                    "and the PEFT version that wrote it, if recorded. Reads tensor headers only.",
    )
    p.add_argument("directory", metavar="DIR",
                   help="adapter directory (the one holding adapter_config.json), or a lorakit train run directory")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a text report")
    p.add_argument("--check", choices=["vllm", "peft", "llama.cpp", "diffusers", "kohya", "mlx"],
                   help="say in detail whether that consumer can load the adapter as it is, and why not (vllm: "
                        "vLLM 0.32's and LoRAX's rules; llama.cpp / kohya / mlx: what lorakit convert can write for "
                        "them); exit 3 if it cannot")


def describe(directory: str | Path) -> dict[str, Any]:
    """A summary of the adapter in ``directory`` (and of any adapters in its sub-directories).

    Raises:
        FileNotFoundError / NotADirectoryError / ValueError: as ``lorakit.load_adapter`` for the same files.
    """
    from lorakit.config import LoraConfig
    from lorakit.io.consumers import consumer_report, vllm_report
    from lorakit.io.keymap import PREFIX, parse_file_key
    from lorakit.io.peft_format import CONFIG_NAME, read_config_dict, resolve_adapter_dir, weights_path
    from lorakit.matching import matches_any

    d = resolve_adapter_dir(directory)
    raw = read_config_dict(d)
    peft_type = str(raw.get("peft_type", "LORA"))
    shapes, dtypes = _tensor_headers(weights_path(d))
    modules: dict[str, dict[str, Any]] = {}
    other: list[str] = []
    for key, shape in shapes.items():
        parsed = parse_file_key(key)  # the key map's reading of a file key, as load_adapter's
        if parsed is None:
            other.append(key[len(PREFIX):] if key.startswith(PREFIX) else key)
            continue
        module, attr, _ = parsed
        entry = modules.setdefault(module, {"rank": None, "dora": False})
        if attr in ("lora_A", "lora_embedding_A"):
            entry["rank"] = shape[0]
        elif attr == "lora_magnitude_vector":
            entry["dora"] = True
    cfg = None
    if peft_type.upper() == "LORA":
        try:
            cfg = LoraConfig.from_peft_dict(raw, source=str(d / CONFIG_NAME))
        except ValueError as e:
            cfg = f"not loadable by lorakit: {e}"
    owners = {t.rpartition(".")[0] for t in raw.get("target_parameters") or []}
    for name, entry in modules.items():
        plain = name.replace(".base_layer", "")
        # a parameter wrapper: lora_A has rank x experts rows (PEFT's layout)
        entry["param"] = matches_any(plain, owners)
        if isinstance(cfg, LoraConfig) and not entry["param"]:
            entry["alpha"] = cfg.alpha_for(name)
    files = [p for p in sorted(d.iterdir()) if p.is_file()]
    subdirs = [p for p in sorted(d.iterdir()) if (p / CONFIG_NAME).is_file()] if d == Path(directory) else []
    return {
        "directory": str(d),
        "peft_type": peft_type,
        "task_type": raw.get("task_type"),
        "base_model_name_or_path": raw.get("base_model_name_or_path"),
        "peft_version": raw.get("peft_version"),
        "config": {k: raw[k] for k in ("r", "lora_alpha", "lora_dropout", "target_modules", "use_dora",
                                       "use_rslora", "bias", "modules_to_save", "layers_to_transform",
                                       "rank_pattern", "alpha_pattern") if k in raw}
                  | {k: raw[k] for k in ("lora_bias", "target_parameters", "trainable_token_indices") if raw.get(k)},
        "lorakit_can_load": isinstance(cfg, LoraConfig) if peft_type.upper() == "LORA" else False,
        "modules": modules,
        "other_tensors": other,
        "parameters": sum(_numel(s) for s in shapes.values()),
        "dtypes": sorted(set(dtypes.values())),
        "size_bytes": sum(p.stat().st_size for p in files),
        "files": {p.name: p.stat().st_size for p in files},
        "sub_adapters": {p.name: describe(p) for p in subdirs},
        "vllm": vllm_report(raw, shapes),
        "consumers": consumer_report(raw, shapes),
    }


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _tensor_headers(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
                dtypes = {k: str(f.get_slice(k).get_dtype()) for k in f.keys()}
        except Exception as e:
            raise ValueError(f"{str(path)!r} is not a readable safetensors file (truncated or corrupt?): {e}") from e
        return shapes, dtypes
    from lorakit.io.peft_format import read_tensors

    tensors = read_tensors(path)
    return ({k: tuple(v.shape) for k, v in tensors.items()},
            {k: str(v.dtype).replace("torch.", "").upper() for k, v in tensors.items()})


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def format_report(info: dict[str, Any], indent: str = "") -> str:
    lines = [
        f"{indent}adapter: {info['directory']}",
        f"{indent}  type: {info['peft_type']}   task_type: {info['task_type']}   "
        f"written by PEFT: {info['peft_version'] or 'not recorded'}",
        f"{indent}  base model: {info['base_model_name_or_path'] or 'not recorded'}",
        f"{indent}  config: " + ", ".join(f"{k}={v!r}" for k, v in info["config"].items()),
        f"{indent}  lorakit can load it: {'yes' if info['lorakit_can_load'] else 'no'}",
        f"{indent}  parameters: {info['parameters']:,d} ({', '.join(info['dtypes'])})   "
        f"size on disk: {_human(info['size_bytes'])} ({info['size_bytes']:,d} bytes)",
        f"{indent}  adapted modules ({len(info['modules'])}):",
    ]
    for name, m in info["modules"].items():
        extra = (f"  alpha={m['alpha']:g}" if "alpha" in m else "") + ("  DoRA" if m["dora"] else "")
        rank = f"r x experts={m['rank']} (target_parameters)" if m.get("param") else f"r={m['rank']}"
        lines.append(f"{indent}    {name}  {rank}{extra}")
    if info["other_tensors"]:
        lines.append(f"{indent}  other tensors ({len(info['other_tensors'])}): saved modules, biases, embeddings")
        lines += [f"{indent}    {k}" for k in info["other_tensors"]]
    lines.append(f"{indent}  consumers:")
    for name, c in info["consumers"].items():
        lines.append(f"{indent}    {name}: " + ("yes" if c["ok"] else "no — " + "; ".join(c["problems"])))
    for sub in info["sub_adapters"].values():
        lines.append(format_report(sub, indent + "  "))
    return "\n".join(lines)


def format_check(info: dict[str, Any], consumer: str = "vllm", indent: str = "") -> str:
    """One consumer's verdict on ``info`` (and on its sub-adapters), with every reason and note."""
    from lorakit.io.consumers import CONSUMERS

    c, v = CONSUMERS[consumer], info["consumers"][consumer]
    verb = ("can serve it", "cannot serve it") if consumer == "vllm" else ("can take it", "cannot take it")
    lines = [f"{indent}{c.title} ({info['directory']}): " + (verb[0] if v["ok"] else verb[1])]
    lines += [f"{indent}  - {p}" for p in v["problems"]] + [f"{indent}  note: {n}" for n in v["notes"]]
    if v["ok"] and c.how:
        lines.append(f"{indent}  how: {c.how}")
    for sub in info["sub_adapters"].values():
        lines.append(format_check(sub, consumer, indent + "  "))
    return "\n".join(lines)


def _servable(info: dict[str, Any], consumer: str) -> bool:
    return info["consumers"][consumer]["ok"] and all(_servable(s, consumer) for s in info["sub_adapters"].values())


def run(args: argparse.Namespace) -> int:
    directory = Path(args.directory)
    if (directory / "run_config.json").is_file() and not (directory / "adapter_config.json").is_file():
        # a lorakit train run, as predict / generate / merge accept it: its adapter is in adapter/
        if not (directory / "adapter").is_dir():
            raise FileNotFoundError(f"{str(directory)!r} is a lorakit train run without adapter/: it has not finished, "
                                    "or it trained another method (its tensors are in trainable.safetensors)")
        directory = directory / "adapter"
    info = describe(directory)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(format_report(info))
        if args.check:
            print(format_check(info, args.check))
    return 3 if args.check and not _servable(info, args.check) else 0
