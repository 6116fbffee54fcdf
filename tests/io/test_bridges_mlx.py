"""MLX (mlx-lm) adapters: written and read by lorakit, checked against mlx-lm's own loader and model when mlx
installs (``pip install mlx[cpu] mlx-lm`` on Linux), else against its documented layout alone."""

from __future__ import annotations

import json

import pytest
import torch

import lorakit as lk
from lorakit.io.bridges.mlx import read_mlx, write_mlx

import models

# rsLoRA, per-module ranks and alphas (folded into lora_b, ranks zero-padded), embeddings and the head
CFG = dict(r=4, lora_alpha=8, use_rslora=True, rank_pattern={"v_proj": 2}, alpha_pattern={"o_proj": 3.0},
           target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj", "embed_tokens", "lm_head"])


def _adapted(**cfg):
    torch.manual_seed(0)
    model = models.llama()
    lk.inject(model, lk.LoraConfig(**(cfg or CFG)))
    models.randomize_adapters(model, seed=2)
    return model


def _base():
    torch.manual_seed(0)
    return models.llama()


def test_mlx_round_trip_gives_the_same_logits(tmp_path):
    model, x = _adapted(), models.ids()
    with torch.no_grad():
        want = model(x).logits
    out = write_mlx(model, tmp_path / "mlx")
    config = json.loads((out / "adapter_config.json").read_text())
    from safetensors import safe_open

    with safe_open(str(out / "adapters.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    # mlx-lm's documented layout: lora_a (in, rank), lora_b (rank, out), one rank, scale the raw multiplier
    params = config["lora_parameters"]
    assert config["fine_tune_type"] == "lora" and config["num_layers"] == -1
    assert shapes["model.layers.0.self_attn.q_proj.lora_a"] == (32, params["rank"])
    assert shapes["model.layers.0.self_attn.v_proj.lora_b"] == (params["rank"], 16)  # rank 2 padded to 4
    assert shapes["model.embed_tokens.lora_a"] == (models.VOCAB, params["rank"])
    assert params["scale"] == pytest.approx(8 / 4 ** 0.5) and "lora_alpha" not in params
    assert set(params["keys"]) >= {"self_attn.q_proj", "model.embed_tokens", "lm_head"}
    back = read_mlx(out, _base())
    assert back.factors()["model.layers.0.self_attn.v_proj"].r == 2  # the padding trimmed again
    fresh = _base()
    back.load_into(fresh)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).logits, want, atol=1e-5, rtol=1e-5)


def test_mlx_refuses_dora_and_writes_nothing(tmp_path):
    model = models.llama()
    lk.inject(model, lk.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="MLX.*DoRA"):
        write_mlx(model, tmp_path / "mlx")
    assert not (tmp_path / "mlx").exists()


def test_mlx_lm_loads_the_adapter_and_gives_lorakits_logits(tmp_path):
    """mlx-lm's own ``load_adapters`` (shape checks included) on mlx-lm's Llama holding the same base weights."""
    mx = pytest.importorskip("mlx.core")
    pytest.importorskip("mlx_lm")
    from mlx_lm.models.llama import Model, ModelArgs
    from mlx_lm.tuner.utils import load_adapters

    model = _adapted()
    base = _base()
    c = base.config
    mlx_model = Model(ModelArgs(model_type="llama", hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
                                intermediate_size=c.intermediate_size, num_attention_heads=c.num_attention_heads,
                                num_key_value_heads=c.num_key_value_heads, rms_norm_eps=c.rms_norm_eps,
                                vocab_size=c.vocab_size, rope_theta=10000.0, tie_word_embeddings=False))
    mlx_model.load_weights([(k, mx.array(v.numpy())) for k, v in base.state_dict().items()])
    load_adapters(mlx_model, str(write_mlx(model, tmp_path / "mlx")))
    x = models.ids()
    got = torch.from_numpy(__import__("numpy").array(mlx_model(mx.array(x.numpy()))))
    with torch.no_grad():
        want = model(x).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
