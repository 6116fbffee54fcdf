"""LoRA adapters as llama.cpp GGUF files (``llama-cli -m base.gguf --lora adapter.gguf``), both ways.

A LoRA GGUF (what llama.cpp's ``convert_lora_to_gguf.py`` writes and ``src/llama-adapter.cpp``
reads) holds ``general.architecture``, ``general.type = "adapter"``, ``adapter.type = "lora"``,
one ``adapter.lora.alpha`` for the whole file, and per adapted weight ``<name>.lora_a`` (torch
layout ``(r, in)``) and ``<name>.lora_b`` (``(out, r)``) under llama.cpp's tensor names
(``blk.0.attn_q.weight``; the ``gguf`` package's ``TensorNameMap``). llama.cpp applies

    W' = W + (alpha / r_t) · B·A      with r_t = that tensor's rank (llama_adapter_lora_weight::get_scale)

so one alpha cannot hold rsLoRA (``alpha/√r``) or per-module ``alpha_pattern`` / ``rank_pattern``
scales — llama.cpp's converter writes ``lora_alpha`` and mis-scales those adapters. Here each
module's exact ``scaling`` is folded into its ``B``: ``B_file = B · scaling · r_t / alpha``, which is
``B`` itself for a plain adapter (the file then equals the converter's).

Architectures follow the converter's ``conversion/llama.py``, ``qwen.py`` and ``gemma.py``: Llama and
Mistral (``arch = llama``) store ``q_proj`` / ``k_proj`` rows permuted for llama.cpp's RoPE
(``LlamaModel.permute``, applied to ``B``, whose rows are the output rows); Qwen2, Qwen3 and Gemma
1-3 store them as they are. A token-embedding adapter stores ``lora_a`` transposed (``(vocab, r)``), as the
converter does for ``token_embd``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.extras import require as require_module
from lorakit.io.bridges.common import Factors, PeftAdapter, as_adapter, from_factors, hf_config
from lorakit.io.peft_format import PathLike

# transformers class -> (gguf.MODEL_ARCH member, q/k rows permuted as LlamaModel.permute)
ARCHITECTURES: dict[str, tuple[str, bool]] = {
    "LlamaForCausalLM": ("LLAMA", True), "MistralForCausalLM": ("LLAMA", True),
    "Qwen2ForCausalLM": ("QWEN2", False), "Qwen3ForCausalLM": ("QWEN3", False),
    "GemmaForCausalLM": ("GEMMA", False), "Gemma2ForCausalLM": ("GEMMA2", False),
    "Gemma3ForCausalLM": ("GEMMA3", False),
}


# config.json's model_type -> the class above, for configs saved without "architectures"
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "qwen3": "Qwen3ForCausalLM", "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
               "gemma3_text": "Gemma3ForCausalLM"}


def _gguf():
    return require_module("gguf", "reading and writing llama.cpp GGUF adapters")


def _arch(config: dict[str, Any]) -> tuple[str, bool]:
    names = list(config.get("architectures") or [])
    for n in names or [MODEL_TYPES.get(config.get("model_type"), "")]:
        if n in ARCHITECTURES:
            return ARCHITECTURES[n]
    raise ValueError(f"llama.cpp GGUF: the base architecture {names or config.get('model_type')!r} is not one lorakit "
                     f"maps to llama.cpp's tensor names; supported: {sorted(ARCHITECTURES)}")


def _permute(B: torch.Tensor, n_head: int, inverse: bool = False) -> torch.Tensor:
    """llama.cpp's ``LlamaModel.permute`` on the output rows of ``B`` (out, r): per head, the two rotary halves
    interleaved (``inverse``: undone)."""
    out = B.shape[0]
    if inverse:
        return B.reshape(n_head, out // n_head // 2, 2, *B.shape[1:]).swapaxes(1, 2).reshape(B.shape)
    return B.reshape(n_head, 2, out // n_head // 2, *B.shape[1:]).swapaxes(1, 2).reshape(B.shape)


def _heads(config: dict[str, Any], module: str) -> int | None:
    """The head count ``permute`` uses for ``module`` (q: attention heads; k: key/value heads), else None."""
    n_head = config["num_attention_heads"]
    if module.endswith("q_proj"):
        return n_head
    if module.endswith("k_proj"):
        return config.get("num_key_value_heads") or n_head
    return None


class _Layout:
    """The base model's side of the mapping: tensor names, permutation, tied output."""

    def __init__(self, base: Any) -> None:
        gguf = _gguf()
        self.config = hf_config(base)
        arch_member, self.permuted = _arch(self.config)
        self.arch = getattr(gguf.MODEL_ARCH, arch_member)
        self.arch_name = gguf.MODEL_ARCH_NAMES[self.arch]
        self.tmap = gguf.get_tensor_name_map(self.arch, self.config["num_hidden_layers"])
        self.tied = bool(self.config.get("tie_word_embeddings", self.arch_name.startswith("gemma")))

    def name(self, module: str) -> str:
        """llama.cpp's tensor name of ``module``'s weight (``blk.0.attn_q.weight``).

        Raises:
            ValueError: llama.cpp has no such tensor (or, for a tied output head, does not load it).
        """
        name = self.tmap.get_name(module + ".weight", try_suffixes=(".weight",))
        if name is None:
            raise ValueError(f"llama.cpp GGUF ({self.arch_name}): module {module!r} has no llama.cpp tensor; "
                             "adapt the attention / MLP projections, embed_tokens or an untied lm_head")
        if name == "output.weight" and self.tied:
            raise ValueError(f"llama.cpp GGUF: {module!r} is tied to the token embeddings in this base, and llama.cpp "
                             "keeps no separate output tensor to adapt; drop the lm_head adapter or merge it")
        if name == "token_embd.weight" and self.arch_name == "gemma3":
            raise ValueError("llama.cpp GGUF: Gemma 3's converter trims token_embd to the tokenizer's vocabulary, "
                             "so an embedding adapter would not line up; merge it instead")
        return name

    def to_file(self, f: Factors, alpha: float) -> tuple[str, torch.Tensor, torch.Tensor]:
        """``(name, lora_a, lora_b)`` for one module, the module's exact scaling folded into lora_b."""
        A, B = f.A.float(), f.B.float()
        fold = f.scaling * f.r / alpha  # llama.cpp applies alpha / r; 1.0 for a plain adapter
        if fold != 1.0:
            B = B * fold
        heads = _heads(self.config, f.module) if self.permuted else None
        if heads is not None:
            B = _permute(B, heads)
        name = self.name(f.module)
        if f.kind == "embedding":
            A = A.T  # (vocab, r): token_embd's lora_a is stored transposed (llm_build_inp_embd)
        return name, A.contiguous(), B.contiguous()

    def from_file(self, module: str, a: torch.Tensor, b: torch.Tensor, alpha: float, embedding: bool) -> Factors:
        A = a.T if embedding else a
        heads = _heads(self.config, module) if self.permuted else None
        B = _permute(b, heads, inverse=True) if heads is not None else b
        r = A.shape[0]
        return Factors(module, "embedding" if embedding else "linear", A.contiguous(), B.contiguous(),
                       (alpha / r) if alpha else 1.0)


def write_gguf(adapter: PeftAdapter | nn.Module | PathLike, path: PathLike, base: Any, *,
               adapter_name: str = "default") -> Path:
    """Write ``adapter`` as a llama.cpp LoRA GGUF (fp32 tensors), checked first, all or nothing.

    Args:
        adapter: a :class:`PeftAdapter`, a PEFT-format directory, or a model with lorakit adapters.
        path: the ``.gguf`` file to write.
        base: the base model (a transformers model, its config, a config dict, or its directory): its
            architecture, head counts and layer count pick the tensor names and permutations.

    Returns:
        ``path``.

    Raises:
        ValueError: llama.cpp cannot take the adapter (DoRA, lora_bias, modules_to_save, trainable tokens,
            trained biases, PiSSA/OLoRA, convolutions: the ``llama.cpp`` rule table), an architecture lorakit
            does not map, or a module llama.cpp has no tensor for. Nothing is written.
        MissingDependency: the ``gguf`` package is not installed.
    """
    a = as_adapter(adapter, adapter_name)
    a.require("llama.cpp")
    layout = _Layout(base)
    alpha = float(a.lora_config().lora_alpha)
    entries = [layout.to_file(f, alpha) for f in a.factors().values()]  # every check before the first byte
    gguf = _gguf()
    path = Path(path)

    def write(tmp: str) -> None:
        writer = gguf.GGUFWriter(tmp, layout.arch_name)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_string("general.name", "lorakit adapter")
        for name, A, B in entries:
            writer.add_tensor(name + ".lora_a", A.numpy())
            writer.add_tensor(name + ".lora_b", B.numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    from lorakit.io.safe_write import write_files_atomically

    write_files_atomically(path.parent, {path.name: write})
    return path


def read_gguf(path: PathLike, base: Any) -> PeftAdapter:
    """Read a llama.cpp LoRA GGUF back into a PEFT-format adapter for ``base`` (as :func:`write_gguf` takes it).

    Each tensor's scale ``alpha / r_t`` becomes its module's alpha, the permutation is undone, and the module
    names are the base model's own (found by mapping every Linear / Embedding of ``base`` to its llama.cpp name).

    Raises:
        ValueError: not a LoRA adapter GGUF, another architecture than the base's, or a tensor the base has no
            module for.
    """
    gguf = _gguf()
    layout = _Layout(base)
    try:
        reader = gguf.GGUFReader(str(path))
    except (OSError, ValueError) as e:
        raise ValueError(f"{str(path)!r} is not a readable GGUF file: {e}") from e
    fields = {k: _field(f) for k, f in reader.fields.items()}
    if fields.get("general.type") != "adapter" or fields.get("adapter.type") != "lora":
        raise ValueError(f"{str(path)!r} is not a LoRA adapter GGUF (general.type={fields.get('general.type')!r}, "
                         f"adapter.type={fields.get('adapter.type')!r})")
    if fields.get("general.architecture") != layout.arch_name:
        raise ValueError(f"{str(path)!r} is for architecture {fields.get('general.architecture')!r}, but the base is "
                         f"{layout.arch_name!r}")
    alpha = float(fields.get("adapter.lora.alpha") or 0.0)
    names: dict[str, str] = {}
    for m in _module_names(base):
        if (g := layout.tmap.get_name(m + ".weight", try_suffixes=(".weight",))) is not None:
            names.setdefault(g, m)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for t in reader.tensors:
        stem, _, part = t.name.rpartition(".")
        if part not in ("lora_a", "lora_b"):
            raise ValueError(f"{str(path)!r}: tensor {t.name!r} is not a .lora_a / .lora_b tensor")
        pairs.setdefault(stem, {})[part] = torch.from_numpy(t.data.copy()).float().reshape(
            [int(n) for n in reversed(t.shape)])
    factors = []
    for stem, p in pairs.items():
        if stem not in names or len(p) != 2:
            why = "has no module in the base model" if stem not in names else "lacks its lora_a or lora_b"
            raise ValueError(f"{str(path)!r}: tensor {stem!r} {why}")
        factors.append(layout.from_file(names[stem], p["lora_a"], p["lora_b"], alpha, stem == "token_embd.weight"))
    return from_factors(factors, source=str(path))


def _field(f) -> Any:
    try:
        return f.contents()
    except Exception:  # an array or type contents() does not decode
        return None


def _module_names(base: Any) -> list[str]:
    """The module names of the base (a model — lorakit wrappers looked through —, or a config from which one is
    built on the meta device, costing no memory)."""
    model = base if isinstance(base, nn.Module) else None
    if model is None:
        transformers = require_module("transformers", "reading a GGUF adapter for a config-only base")
        if isinstance(base, dict):
            d = dict(base)
            cfg = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
        elif hasattr(base, "to_dict"):
            cfg = base
        else:
            cfg = transformers.AutoConfig.from_pretrained(str(base))
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(cfg)
    return [n.removesuffix(".base_layer") for n, _ in model.named_modules()]


__all__ = ["ARCHITECTURES", "write_gguf", "read_gguf"]
