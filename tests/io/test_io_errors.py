"""Bad adapter files get a clear error from lorakit, and leave the model as it was."""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file

import lorakit as lk
from io_models import base_model, logits, perturb_trainable
from lorakit.layers import LoraLayer


@pytest.fixture(scope="module")
def peft_dir(tmp_path_factory):
    """A real PEFT LoRA adapter for the tiny Llama."""
    d = tmp_path_factory.mktemp("peft_lora")
    pm = peft.get_peft_model(base_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                  init_lora_weights=False))
    perturb_trainable(pm)
    pm.save_pretrained(d)
    return d


def _copy(src, dst):
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file():
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _untouched(model) -> bool:
    return lk.adapter_names(model) == [] and not any(isinstance(m, LoraLayer) for m in model.modules())


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        lk.load_adapter(base_model("llama"), tmp_path / "nope")


def test_directory_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        lk.load_adapter(base_model("llama"), tmp_path / "f")


def test_directory_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no adapter_config.json"):
        lk.load_adapter(base_model("llama"), tmp_path)


def test_malformed_json(peft_dir, tmp_path):
    d = _copy(peft_dir, tmp_path / "a")
    (d / "adapter_config.json").write_text('{"r": 4, "target_modules": ["q_proj",}')
    model = base_model("llama")
    with pytest.raises(ValueError, match=r"adapter_config.json' is not valid JSON: .* line 1 column"):
        lk.load_adapter(model, d)
    assert _untouched(model)


def test_truncated_safetensors(peft_dir, tmp_path):
    d = _copy(peft_dir, tmp_path / "a")
    f = d / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    model = base_model("llama")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        lk.load_adapter(model, d)
    assert _untouched(model)


def test_missing_weights_file(peft_dir, tmp_path):
    d = _copy(peft_dir, tmp_path / "a")
    (d / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="neither adapter_model.safetensors nor adapter_model.bin"):
        lk.load_adapter(base_model("llama"), d)


def test_shapes_that_do_not_fit_the_base(peft_dir):
    wider = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=48,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match=r"lora_A.weight' has shape \(4, 32\) but this model expects \(4, 48\)"):
        lk.load_adapter(wider, peft_dir)
    assert _untouched(wider)  # the injection was undone


def test_config_naming_modules_the_model_lacks(peft_dir):
    gpt2 = base_model("gpt2")
    with pytest.raises(ValueError, match=r"cannot apply the adapter in .* to this GPT2LMHeadModel: target_modules="
                                         r"\['(q|v)_proj', '(q|v)_proj'\] matched no module of this GPT2LMHeadModel. "
                                         r"Adaptable modules include: \[.*c_attn"):
        lk.load_adapter(gpt2, peft_dir)
    assert _untouched(gpt2)


def test_missing_and_unexpected_tensors(peft_dir, tmp_path):
    tensors = load_file(peft_dir / "adapter_model.safetensors")
    d = _copy(peft_dir, tmp_path / "missing")
    gone = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    save_file({k: v for k, v in tensors.items() if k != gone}, d / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"1 tensor\(s\) the config's adapter needs are missing, e.g. \['" + gone):
        lk.load_adapter(base_model("llama"), d)
    d = _copy(peft_dir, tmp_path / "extra")
    save_file({**tensors, "base_model.model.model.layers.0.mlp.nope.lora_A.weight": torch.zeros(4, 32)},
              d / "adapter_model.safetensors")
    model = base_model("llama")
    with pytest.raises(ValueError, match=r"match nothing in this LlamaForCausalLM, e.g. \['.*mlp.nope.lora_A"):
        lk.load_adapter(model, d)
    assert _untouched(model)


@pytest.mark.parametrize("method", ["IA3", "LOHA"])
def test_other_peft_methods_are_refused(method, tmp_path):
    cfg = (peft.IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"])
           if method == "IA3" else peft.LoHaConfig(r=4, target_modules=["q_proj"]))
    peft.get_peft_model(base_model("llama"), cfg).save_pretrained(tmp_path)
    model = base_model("llama")
    with pytest.raises(ValueError, match=f"peft_type is '{method}'; lorakit reads LoRA adapters only"):
        lk.load_adapter(model, tmp_path)
    assert _untouched(model)


def test_unimplemented_lora_feature_is_refused_unknown_key_warns(peft_dir, tmp_path):
    d = _copy(peft_dir, tmp_path / "a")
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "layer_replication": [[0, 2], [1, 2]]}))
    with pytest.raises(ValueError, match=r"does not implement layer_replication=\[\[0, 2\], \[1, 2\]\]"):
        lk.load_adapter(base_model("llama"), d)
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "some_future_option": None}))
    with pytest.warns(UserWarning, match=r"ignoring config keys lorakit does not know: \['some_future_option'\]"):
        model = lk.load_adapter(base_model("llama"), d)
    reference = lk.load_adapter(base_model("llama"), peft_dir)
    torch.testing.assert_close(logits(model, "llama"), logits(reference, "llama"), atol=0, rtol=0)


def test_adapter_name_already_taken(peft_dir):
    model = lk.load_adapter(base_model("llama"), peft_dir)
    with pytest.raises(ValueError, match="adapter 'default' already exists"):
        lk.load_adapter(model, peft_dir)
    lk.load_adapter(model, peft_dir, adapter_name="again")
    assert lk.adapter_names(model) == ["default", "again"]


def test_legacy_bin_written_by_peft_loads(tmp_path):
    pm = peft.get_peft_model(base_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj"],
                                                                  init_lora_weights=False))
    perturb_trainable(pm)
    pm.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").is_file()
    model = lk.load_adapter(base_model("llama"), tmp_path)
    torch.testing.assert_close(logits(model, "llama"), logits(pm.eval(), "llama"), atol=1e-5, rtol=0)


class _Payload:
    """Unpickling this would create a marker file: the check that nothing is unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_legacy_bin_with_a_pickle_payload_is_not_run(peft_dir, tmp_path):
    d = tmp_path / "evil"
    d.mkdir()
    (d / "adapter_config.json").write_text((peft_dir / "adapter_config.json").read_text())
    marker = tmp_path / "PWNED"
    tensors = load_file(peft_dir / "adapter_model.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save({**tensors, "payload": _Payload(marker)}, d / "adapter_model.bin")
    model = base_model("llama")
    with pytest.raises(ValueError, match=r"torch.load\(weights_only=True\); lorakit does not unpickle arbitrary"):
        lk.load_adapter(model, d)
    assert not marker.exists()
    assert _untouched(model)
