"""llama.cpp GGUF LoRA: written and read by lorakit, checked with the consumer's own code — the ``gguf``
package's reader and tensor names, llama.cpp's scale rule (alpha / r_t per tensor,
``llama_adapter_lora_weight::get_scale``), its converter (when a llama.cpp source tree is at hand)
and llama-cpp-python's runtime (when installed)."""

from __future__ import annotations

import os

import pytest
import torch

import lorakit as lk
from lorakit.io.bridges.common import PeftAdapter

import models

gguf = pytest.importorskip("gguf")
from lorakit.io.bridges.gguf import read_gguf, write_gguf  # noqa: E402
from runners import TESTS  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# rsLoRA, a rank pattern and an alpha pattern: the scales llama.cpp's own converter gets wrong
SCALED = dict(r=4, lora_alpha=8, use_rslora=True, rank_pattern={"v_proj": 2}, alpha_pattern={"o_proj": 3.0})


def _decoder(arch: str):
    import transformers as tf

    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=models.VOCAB, max_position_embeddings=64)
    config, cls = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM), "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
        "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM), "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM),
        "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM),
    }[arch]
    extra = {"head_dim": 8} if arch in ("qwen3", "gemma", "gemma2", "gemma3") else {}
    torch.manual_seed(0)
    return cls(config(**common, **extra, tie_word_embeddings=arch.startswith("gemma"))).eval()


def _adapted(arch: str, **cfg):
    model = _decoder(arch)
    embed = [] if arch == "gemma3" else ["embed_tokens"]  # Gemma 3's converter trims token_embd: refused
    lk.inject(model, lk.LoraConfig(target_modules=TARGETS + embed, **(cfg or SCALED)))
    models.randomize_adapters(model, seed=1)
    return model


def _llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's ``LlamaModel.permute`` (conversion/llama.py), applied by its converter to q/k weights."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3"])
def test_gguf_round_trip_gives_the_same_logits(tmp_path, arch):
    model = _adapted(arch)
    x = models.ids()
    with torch.no_grad():
        want = model(x).logits
    path = write_gguf(model, tmp_path / "a.gguf", model)
    fresh = _decoder(arch)
    read_gguf(path, fresh).load_into(fresh)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).logits, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma"])
def test_gguf_tensors_rebuild_lorakits_merged_weights_as_llama_cpp_applies_them(tmp_path, arch):
    """Per tensor, with the gguf package's reader and names and llama.cpp's rule W + (alpha / r_t)·B·A (the rank
    from lora_b's shape): the merged weight lorakit computes (in llama.cpp's layout)."""
    model = _adapted(arch)
    path = write_gguf(model, tmp_path / "a.gguf", model)
    merged = {k: v.clone() for k, v in lk.merge_and_unload(model).state_dict().items()}
    base = _decoder(arch).state_dict()
    reader = gguf.GGUFReader(str(path))
    alpha = reader.fields["adapter.lora.alpha"].contents()
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], 2)
    hf = {tmap.get_name(k, try_suffixes=(".weight",)): k for k in base if k.endswith(".weight")}
    tensors = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    assert len(tensors) == 2 * (len(TARGETS) * 2 + 1)
    for name in {n.rpartition(".")[0] for n in tensors}:
        a, b = tensors[name + ".lora_a"], tensors[name + ".lora_b"]
        scale = alpha / b.shape[1]  # get_scale: alpha / b->ne[0]
        key = hf[name]
        w, want = base[key], merged[key]
        if name == "token_embd.weight":
            got = w + scale * (a @ b.T)  # llm_build_inp_embd: rows of lora_a, then lora_b
        else:
            if arch == "llama" and ("attn_q" in name or "attn_k" in name):
                heads = 4 if "attn_q" in name else 2
                w, want = _llama_cpp_permute(w, heads), _llama_cpp_permute(want, heads)
            got = w + scale * (b @ a)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=name)


def test_gguf_refuses_what_llama_cpp_cannot_hold_and_writes_nothing(tmp_path):
    model = _decoder("llama")
    lk.inject(model, lk.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="DoRA"):
        write_gguf(model, tmp_path / "a.gguf", model)
    gpt2 = models.gpt2()
    lk.inject(gpt2, lk.LoraConfig(r=4, target_modules=["c_attn"]))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*not one lorakit maps"):
        write_gguf(gpt2, tmp_path / "a.gguf", gpt2)
    tied = _decoder("gemma")
    lk.inject(tied, lk.LoraConfig(r=4, target_modules=["lm_head", "q_proj"]))
    with pytest.raises(ValueError, match="tied"):
        write_gguf(tied, tmp_path / "a.gguf", tied)
    gemma3 = _decoder("gemma3")
    lk.inject(gemma3, lk.LoraConfig(r=4, target_modules=["embed_tokens"]))
    with pytest.raises(ValueError, match="Gemma 3's converter trims token_embd"):
        write_gguf(gemma3, tmp_path / "a.gguf", gemma3)
    assert list(tmp_path.iterdir()) == []


def test_gguf_for_another_architecture_is_refused_on_read(tmp_path):
    path = write_gguf(_adapted("llama"), tmp_path / "a.gguf", _decoder("llama"))
    with pytest.raises(ValueError, match="architecture 'llama'.*'qwen2'"):
        read_gguf(path, _decoder("qwen2"))


def _llama_cpp_dir() -> str | None:
    d = os.environ.get("LORAKIT_LLAMA_CPP", "/tmp/llama/llama_cpp_python-0.3.36/vendor/llama.cpp")
    return d if os.path.isfile(os.path.join(d, "convert_lora_to_gguf.py")) else None


@pytest.mark.slow
def test_gguf_equals_llama_cpps_converter_and_folds_the_scales_it_misses(tmp_path):
    """llama.cpp's own convert_lora_to_gguf.py (a llama.cpp source tree: LORAKIT_LLAMA_CPP): a plain adapter gives
    the same tensors; an rsLoRA / alpha_pattern one differs exactly by the scale the converter leaves out."""
    import subprocess
    import sys

    src = _llama_cpp_dir()
    if src is None:
        pytest.skip("no llama.cpp source tree (set LORAKIT_LLAMA_CPP to one holding convert_lora_to_gguf.py)")
    base = _decoder("llama")
    base.save_pretrained(tmp_path / "base")
    for case, cfg in {"plain": dict(r=4, lora_alpha=8), "scaled": SCALED}.items():
        model = _adapted("llama", **cfg)
        adapter_dir = lk.save_adapter(model, tmp_path / case)
        ours = write_gguf(adapter_dir, tmp_path / f"{case}.gguf", tmp_path / "base")
        theirs = tmp_path / f"{case}-converter.gguf"
        run = subprocess.run([sys.executable, os.path.join(src, "convert_lora_to_gguf.py"), str(adapter_dir),
                              "--base", str(tmp_path / "base"), "--outfile", str(theirs), "--outtype", "f32"],
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        a = {t.name: torch.from_numpy(t.data.copy()) for t in gguf.GGUFReader(str(ours)).tensors}
        b = {t.name: torch.from_numpy(t.data.copy()) for t in gguf.GGUFReader(str(theirs)).tensors}
        assert a.keys() == b.keys()
        factors = PeftAdapter.from_dir(adapter_dir).factors()
        for name in a:
            if case == "plain" or name.endswith("lora_a"):
                torch.testing.assert_close(a[name], b[name], atol=0, rtol=0, msg=name)
        if case == "scaled":  # the converter writes B as it is: llama.cpp then applies alpha / r, not the scaling
            f = factors["model.layers.0.self_attn.o_proj"]
            fold = f.scaling * f.r / 8
            torch.testing.assert_close(a["blk.0.attn_output.weight.lora_b"],
                                       b["blk.0.attn_output.weight.lora_b"] * fold)
            assert abs(fold - 1) > 0.2


@pytest.mark.slow
def test_llama_cpp_runs_base_plus_lorakits_gguf_to_lorakits_logits(tmp_path):
    """llama.cpp itself (llama-cpp-python, LORAKIT_LLAMA_CPP_PYTHON; default /work/venvs/llama/bin/python) on a base
    converted by llama.cpp's convert_hf_to_gguf.py, with the adapter applied by its --lora code; the converter's own
    adapter file for the same rsLoRA / alpha_pattern adapter is off, lorakit's is not."""
    import json
    import subprocess
    import sys

    python = os.environ.get("LORAKIT_LLAMA_CPP_PYTHON", "/work/venvs/llama/bin/python")
    src = _llama_cpp_dir()
    spm = pytest.importorskip("sentencepiece")
    if src is None or not os.path.isfile(python):
        pytest.skip("needs llama-cpp-python (LORAKIT_LLAMA_CPP_PYTHON) and a llama.cpp source tree (LORAKIT_LLAMA_CPP)")
    (tmp_path / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 20)
    spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "sp"),
                                   vocab_size=40, model_type="char", hard_vocab_limit=False, bos_id=1, eos_id=2,
                                   unk_id=0, pad_id=-1, minloglevel=2)
    base = _decoder("llama")
    base.config.bos_token_id, base.config.eos_token_id = 1, 2
    base.save_pretrained(tmp_path / "base")
    (tmp_path / "base" / "tokenizer.model").write_bytes((tmp_path / "sp.model").read_bytes())
    run = subprocess.run([sys.executable, os.path.join(src, "convert_hf_to_gguf.py"), str(tmp_path / "base"),
                          "--outfile", str(tmp_path / "base.gguf"), "--outtype", "f32"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    model = _adapted("llama")
    adapter_dir = lk.save_adapter(model, tmp_path / "adapter")
    write_gguf(model, tmp_path / "lorakit.gguf", tmp_path / "base")
    run = subprocess.run([sys.executable, os.path.join(src, "convert_lora_to_gguf.py"), str(adapter_dir), "--base",
                          str(tmp_path / "base"), "--outfile", str(tmp_path / "converter.gguf"), "--outtype", "f32"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    tokens = [1, 5, 9, 17, 23, 42]
    with torch.no_grad():
        want = model(torch.tensor([tokens])).logits[0]

    def llama_cpp(adapter: str) -> torch.Tensor:
        out = subprocess.run([python, os.path.join(TESTS, "llama_cpp_logits.py"),
                              str(tmp_path / "base.gguf"), adapter, *map(str, tokens)],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return torch.tensor(json.loads(out.stdout))

    torch.testing.assert_close(llama_cpp(str(tmp_path / "lorakit.gguf")), want, atol=1e-3, rtol=1e-3)
    assert (llama_cpp(str(tmp_path / "converter.gguf")) - want).abs().max() > 0.05
