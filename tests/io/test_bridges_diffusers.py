"""diffusers and kohya LoRA files on tiny diffusers models: what lorakit writes, diffusers' own loaders
(``load_lora_adapter``, a pipeline's ``load_lora_weights``) load to the same outputs as lorakit's
model; what lorakit reads (through diffusers' converters) gives the outputs diffusers' loading gives."""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit as lk

pytest.importorskip("diffusers")
pytest.importorskip("peft")  # diffusers loads LoRA through PEFT
from diffusers import SD3Transformer2DModel, UNet2DConditionModel  # noqa: E402
from diffusers.loaders.lora_pipeline import SD3LoraLoaderMixin, StableDiffusionLoraLoaderMixin  # noqa: E402

from lorakit.io.bridges.kohya import read_diffusers, read_kohya, write_diffusers, write_kohya  # noqa: E402

import models  # noqa: E402

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "conv2", "ff.net.2"]
# rsLoRA and per-module ranks / alphas: what a file without the right alpha gets wrong
SCALED = dict(r=4, lora_alpha=8, use_rslora=True, rank_pattern={"to_v": 2}, alpha_pattern={"conv1": 3.0})


def _unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4).eval()


def _unet_out(unet) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        return unet(torch.randn(2, 4, 8, 8, generator=g), 10, torch.randn(2, 3, 16, generator=g)).sample


def _adapted_unet(**cfg):
    unet = _unet()
    lk.inject(unet, lk.LoraConfig(target_modules=UNET_TARGETS, **(cfg or SCALED)))
    models.randomize_adapters(unet, seed=4)
    return unet


class _Pipe(StableDiffusionLoraLoaderMixin):
    """The part of a StableDiffusionPipeline that load_lora_weights uses: its unet (no text encoder LoRA here)."""

    hf_device_map = None

    def __init__(self, unet) -> None:
        self.unet, self.text_encoder = unet, None

    @property
    def components(self):
        return {"unet": self.unet}


def test_diffusers_file_loads_in_diffusers_with_the_right_alpha(tmp_path):
    ours = _adapted_unet()
    want = _unet_out(ours)
    path = write_diffusers(ours, tmp_path)
    theirs = _unet()
    theirs.load_lora_adapter(str(tmp_path), weight_name=path.name, prefix="unet")
    torch.testing.assert_close(_unet_out(theirs), want, atol=1e-5, rtol=1e-5)
    pipe = _Pipe(_unet())
    pipe.load_lora_weights(str(tmp_path))  # a pipeline's loader: the directory, pytorch_lora_weights.safetensors
    torch.testing.assert_close(_unet_out(pipe.unet), want, atol=1e-5, rtol=1e-5)
    fresh = _unet()
    read_diffusers(path).load_into(fresh)  # and back
    torch.testing.assert_close(_unet_out(fresh), want, atol=1e-5, rtol=1e-5)


def test_kohya_file_round_trips(tmp_path):
    ours = _adapted_unet()
    want = _unet_out(ours)
    path = write_kohya(ours, tmp_path / "lora.safetensors")
    fresh = _unet()
    read_kohya(path).load_into(fresh)  # through diffusers' kohya converter, each module's .alpha applied
    torch.testing.assert_close(_unet_out(fresh), want, atol=1e-5, rtol=1e-5)


def test_kohya_file_loads_in_a_diffusers_pipeline(tmp_path):
    # per-module ranks and a resnet alpha_pattern; the attention projections keep one alpha, because diffusers 0.42
    # keys a kohya attention module's own alpha as '...attn1.processor.to_v_lora.down.weight', which matches no
    # module, and falls back to the common alpha (lorakit's reader applies it: see the test above)
    ours = _adapted_unet(r=4, lora_alpha=8, rank_pattern={"to_v": 2}, alpha_pattern={"conv1": 3.0})
    want = _unet_out(ours)
    path = write_kohya(ours, tmp_path / "lora.safetensors")
    pipe = _Pipe(_unet())
    pipe.load_lora_weights(str(path))
    torch.testing.assert_close(_unet_out(pipe.unet), want, atol=1e-5, rtol=1e-5)
    fresh = _unet()
    read_kohya(path).load_into(fresh)
    torch.testing.assert_close(_unet_out(fresh), _unet_out(pipe.unet), atol=1e-5, rtol=1e-5)


def test_kohya_per_module_alpha_is_exact_against_kohyas_formula(tmp_path):
    """Each module's W + (alpha / r)·up·down, computed from the file by hand, is lorakit's merged weight."""
    from safetensors.torch import load_file

    ours = _adapted_unet()
    path = write_kohya(ours, tmp_path / "lora.safetensors")
    f = load_file(str(path))
    base, merged = _unet().state_dict(), lk.merge_and_unload(copy.deepcopy(ours)).state_dict()
    module = "down_blocks.0.resnets.0.conv1"  # alpha_pattern 3, rsLoRA: scale 3/√4
    stem = "lora_unet_" + module.replace(".", "_")
    down, up, alpha = f[stem + ".lora_down.weight"], f[stem + ".lora_up.weight"], f[stem + ".alpha"].item()
    delta = (up.flatten(1) @ down.flatten(1)).view(base[module + ".weight"].shape)
    torch.testing.assert_close(base[module + ".weight"] + alpha / down.shape[0] * delta, merged[module + ".weight"])
    assert alpha / down.shape[0] == pytest.approx(3 / 2)


def test_a_dit_adapter_loads_in_diffusers_and_back(tmp_path):
    def dit():
        torch.manual_seed(0)
        return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                     num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                     pooled_projection_dim=16, out_channels=4).eval()

    def out(m):
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            return m(hidden_states=torch.randn(1, 4, 8, 8, generator=g),
                     encoder_hidden_states=torch.randn(1, 3, 16, generator=g),
                     pooled_projections=torch.randn(1, 16, generator=g), timestep=torch.tensor([10])).sample

    ours = dit()
    lk.inject(ours, lk.LoraConfig(r=4, lora_alpha=2, use_rslora=True, target_modules=["to_q", "to_k", "add_q_proj"]))
    models.randomize_adapters(ours, seed=6)
    want = out(ours)
    path = write_diffusers(ours, tmp_path / "dit.safetensors", component="transformer")
    theirs = dit()
    theirs.load_lora_adapter(str(path), use_safetensors=True, prefix="transformer")
    torch.testing.assert_close(out(theirs), want, atol=1e-5, rtol=1e-5)

    class Pipe(SD3LoraLoaderMixin):
        hf_device_map = None

        def __init__(self, transformer) -> None:
            self.transformer, self.text_encoder, self.text_encoder_2 = transformer, None, None

        @property
        def components(self):
            return {"transformer": self.transformer}

    pipe = Pipe(dit())
    pipe.load_lora_weights(str(path))
    torch.testing.assert_close(out(pipe.transformer), want, atol=1e-5, rtol=1e-5)
    fresh = dit()
    read_diffusers(path).load_into(fresh)
    torch.testing.assert_close(out(fresh), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="write --to diffusers"):
        write_kohya(ours, tmp_path / "k.safetensors", component="transformer")


def test_kohya_keys_that_match_nothing_are_refused_and_change_nothing(tmp_path):
    from safetensors.torch import save_file

    save_file({"lora_unet_no_such_block_proj.lora_down.weight": torch.randn(2, 8),
               "lora_unet_no_such_block_proj.lora_up.weight": torch.randn(8, 2),
               "lora_unet_no_such_block_proj.alpha": torch.tensor(2.0)}, str(tmp_path / "bad.safetensors"))
    unet = _unet()
    snap = models.snapshot(unet)
    with pytest.raises(ValueError, match="bad.safetensors.*matched no module"):
        read_kohya(tmp_path / "bad.safetensors").load_into(unet)
    models.assert_unchanged(unet, snap)
    save_file({"foo": torch.zeros(2)}, str(tmp_path / "foo.safetensors"))
    with pytest.raises(ValueError, match="no model component|not a kohya"):
        read_kohya(tmp_path / "foo.safetensors")


def test_kohya_refuses_dora_and_writes_nothing(tmp_path):
    unet = _unet()
    lk.inject(unet, lk.LoraConfig(r=2, target_modules=["to_q"], use_dora=True))
    with pytest.raises(ValueError, match="kohya.*DoRA"):
        write_kohya(unet, tmp_path / "lora.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_kohya_text_encoder_part_round_trips_by_module_names(tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel

    def te():
        torch.manual_seed(0)
        return CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                            num_hidden_layers=2, vocab_size=99, max_position_embeddings=16,
                                            bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()

    ours = te()
    lk.inject(ours, lk.LoraConfig(r=4, lora_alpha=8, alpha_pattern={"fc1": 2.0}, target_modules=["q_proj", "fc1"]))
    models.randomize_adapters(ours, seed=7)
    x = torch.randint(0, 99, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ours(x).last_hidden_state
    path = write_kohya(ours, tmp_path / "te.safetensors", component="text_encoder")
    assert all(k.startswith("lora_te_") for k in __import__("safetensors.torch").torch.load_file(str(path)))
    fresh = te()
    read_kohya(path, component="text_encoder", model=te()).load_into(fresh)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).last_hidden_state, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="exact names: give the text_encoder model"):
        read_kohya(path, component="text_encoder")
