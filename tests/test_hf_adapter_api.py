"""transformers' own adapter API on a lorakit model: save_pretrained writes PEFT's files (so Trainer and TRL
checkpoint, resume and save), the other adapter methods act on lorakit's adapters or refuse, and a
``peft.LoraConfig`` is accepted by ``lk.inject``. PEFT is the reference."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

import lorakit as lk
from lorakit.models import tiny_llama

peft = pytest.importorskip("peft")

IDS = torch.tensor([[1, 40, 41, 42, 43, 44]])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def base(seed: int = 0):
    return tiny_llama(hidden_size=32, num_layers=2, seed=seed)[0].eval()


def adapted():
    model = base()
    torch.manual_seed(1)
    lk.inject(model, lk.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                   init_lora_weights="gaussian"))
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["o_proj"], init_lora_weights="gaussian"), adapter_name="other")
    with torch.no_grad():  # B ≠ 0: the adapters change the outputs
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    return model.eval()


def test_save_pretrained_writes_peft_files_that_peft_loads(tmp_path):
    model = adapted()
    model.save_pretrained(tmp_path / "hf")
    lk.save_adapter(model, tmp_path / "lk")
    lk.save_adapter(model, tmp_path / "lk", "other")
    for sub in ("", "other"):  # PEFT's layout: the default adapter at the top, others in sub-directories
        got, want = load_file(tmp_path / "hf" / sub / "adapter_model.safetensors"), \
            load_file(tmp_path / "lk" / sub / "adapter_model.safetensors")
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
        assert json.loads((tmp_path / "hf" / sub / "adapter_config.json").read_text()) == \
            json.loads((tmp_path / "lk" / sub / "adapter_config.json").read_text())
    assert not any("base_layer" in k for k in load_file(tmp_path / "hf" / "model.safetensors"))
    reference = peft.PeftModel.from_pretrained(base(), tmp_path / "hf").eval()
    assert torch.allclose(logits(reference), logits(model), atol=1e-6)
    # a sub-model refuses, naming where to call it; after merge_and_unload transformers' own method is back
    with pytest.raises(ValueError, match="call it on the model that lorakit.inject was given"):
        model.model.save_pretrained(tmp_path / "sub")
    merged = lk.merge_and_unload(model)
    merged.save_pretrained(tmp_path / "merged")
    assert "model.embed_tokens.weight" in load_file(tmp_path / "merged" / "model.safetensors")


def test_transformers_adapter_methods_act_on_lorakit_adapters(tmp_path):
    model = adapted()
    start, plain = logits(model), logits(base())
    assert model.active_adapters() == ["default"]
    model.set_adapter("other")
    assert lk.active_adapters(model) == ["other"]
    model.set_adapter("default")
    model.disable_adapters()
    assert torch.allclose(logits(model), plain, atol=1e-6)
    model.enable_adapters()
    assert torch.equal(logits(model), start)
    # load_adapter: a file written by PEFT loads with its weights (nothing nested, nothing "missing")
    pm = peft.get_peft_model(base(), peft.LoraConfig(r=4, target_modules=["k_proj"], init_lora_weights=False))
    pm.save_pretrained(tmp_path / "peft")
    model.load_adapter(str(tmp_path / "peft"), adapter_name="k")
    model.set_adapter("k")
    assert torch.allclose(logits(model), logits(pm.eval()), atol=1e-6)
    assert not any("lora_A.k.lora" in n or "base_layer.base_layer" in n for n, _ in model.named_modules())
    # into an existing adapter: the same parameters, the file's values (what Trainer's resume needs)
    param = model.get_submodule("model.layers.0.self_attn.k_proj").lora_A["k"].weight
    with torch.no_grad():
        param.zero_()
    model.load_adapter(str(tmp_path / "peft"), adapter_name="k")
    assert model.get_submodule("model.layers.0.self_attn.k_proj").lora_A["k"].weight is param
    assert torch.allclose(logits(model), logits(pm), atol=1e-6)
    # add_adapter takes PEFT's config; get_adapter_state_dict gives PEFT's keys; delete_adapter deletes
    model.add_adapter(peft.LoraConfig(r=2, target_modules=["up_proj"]), adapter_name="u")
    assert lk.adapter_names(model) == ["default", "other", "k", "u"]
    keys = set(model.get_adapter_state_dict("k"))
    assert keys == {k.removeprefix("base_model.model.") for k in load_file(tmp_path / "peft" /
                                                                           "adapter_model.safetensors")}
    model.delete_adapter(["u", "other"])
    assert lk.adapter_names(model) == ["default", "k"]
    with pytest.raises(ValueError, match="lorakit.hotswap_adapter"):
        model.enable_peft_hotswap()
    with pytest.raises(FileNotFoundError, match="not a local directory"):
        model.load_adapter("org/some-adapter", adapter_name="hub")
    with pytest.raises(ValueError, match="call it on the model"):
        model.model.load_adapter(str(tmp_path / "peft"))


def test_inject_accepts_a_peft_lora_config():
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.1,
                             task_type="CAUSAL_LM")
    ours = lk.inject(base(), config)
    theirs = peft.get_peft_model(base(), config)
    from peft.tuners.lora import LoraLayer as PeftLoraLayer

    from lorakit.layers import LoraLayer

    assert [n for n, m in ours.named_modules() if isinstance(m, LoraLayer)] == \
        [n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if isinstance(m, PeftLoraLayer)]
    assert lk.trainable_parameters(ours)[0] == theirs.get_nb_trainable_parameters()[0]
    with pytest.raises(TypeError, match="lorakit.LoraConfig or a peft.LoraConfig"):
        lk.inject(base(), {"r": 4})


@pytest.mark.slow
def test_trl_sft_trainer_checkpoints_resumes_and_saves_an_adapter_peft_loads(tmp_path):
    """TRL's SFTTrainer on a lorakit-injected model: checkpoints, resume_from_checkpoint (ending at the
    uninterrupted run's weights), save_model, and PEFT loading the result."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    words = ["ab", "abc", "cab", "bca", "aab", "cc", "bb", "abcd"]
    data = Dataset.from_list([{"prompt": f"{w}=", "completion": w[::-1]} for w in words])
    args = SFTConfig(output_dir=str(tmp_path / "out"), max_steps=4, save_steps=2, per_device_train_batch_size=2,
                     learning_rate=1e-2, report_to=[], use_cpu=True, logging_steps=1, seed=0,
                     disable_tqdm=True, bf16=False)  # fp32: accelerate would leave forward under autocast

    def trainer():
        model, tok = tiny_llama(hidden_size=32, num_layers=2)
        lk.inject(model, lk.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        return SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok)

    first = trainer()
    first.train()
    assert {"checkpoint-2", "checkpoint-4"} <= set(os.listdir(tmp_path / "out"))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path / "out" / "checkpoint-2"))
    first.save_model(str(tmp_path / "final"))
    resumed = trainer()
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    a, b = first.model.state_dict(), resumed.model.state_dict()
    trained = [n for n, p in first.model.named_parameters() if p.requires_grad]
    assert trained and all(torch.equal(a[n], b[n]) for n in trained)
    assert not all(torch.equal(a[n], trainer().model.state_dict()[n]) for n in trained)  # it did train
    reference = peft.PeftModel.from_pretrained(base(), tmp_path / "final").eval()
    assert torch.allclose(logits(reference), logits(first.model.eval()), atol=1e-6)


def test_trainer_accepts_a_quantized_base_with_lorakit_adapters():
    """transformers refuses to train a quantized model without adapters; lorakit's adapters count as such."""
    pytest.importorskip("bitsandbytes")
    from transformers.trainer_utils import validate_quantization_for_training

    from lorakit.models.quantized import load_quantized, prepare_for_kbit_training

    model, _ = load_quantized("tiny-llama", "causal-lm", "nf4")
    prepare_for_kbit_training(model)
    with pytest.raises(ValueError):
        validate_quantization_for_training(model)  # a bare 4-bit model: refused, as it should be
    lk.inject(model, lk.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    validate_quantization_for_training(model)
    merged = lk.merge_and_unload(model)
    assert not getattr(merged, "_hf_peft_config_loaded", False)  # plain transformers again
