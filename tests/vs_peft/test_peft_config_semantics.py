"""Config fields whose meaning PEFT fixes beyond their names: what lorakit builds from them and writes
for them must be what PEFT builds and reads — the same trainable parameters, and files PEFT loads with
the same outputs."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import lorakit as lk

import models


def _peft_loads_with_the_same_outputs(model, base, directory, x, run) -> PeftModel:
    peft_model = PeftModel.from_pretrained(base, directory).eval()
    with torch.no_grad():
        torch.testing.assert_close(run(peft_model, x), run(model, x))
    return peft_model


def test_a_token_rows_only_adapter_is_written_as_peft_writes_it(tmp_path):
    """PEFT reads ``target_modules: null`` as "this architecture's defaults" (LoRA on q/v for Llama) and
    refuses ``[]`` on load; for token rows alone it writes, and reads, ``"dummy-target-modules"``."""
    base = models.llama()
    model = copy.deepcopy(base)
    lk.inject(model, lk.LoraConfig(trainable_token_indices=[1, 2, 3]))
    with torch.no_grad():
        model.model.embed_tokens.token_adapter.trainable_tokens_delta["default"].add_(0.5)
    lk.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == "dummy-target-modules"
    peft_model = _peft_loads_with_the_same_outputs(model, base, tmp_path, models.ids(),
                                                   lambda m, x: m(input_ids=x).logits)
    assert not any("lora_" in k for k in peft_model.state_dict())  # no LoRA layers added by PEFT
    assert lk.trainable_parameters(model)[0] == 3 * 32


def test_a_module_both_targeted_and_saved_is_only_saved_as_in_peft(tmp_path):
    cfg = dict(r=2, target_modules=["query", "value", "classifier"], modules_to_save=["classifier"])
    base = models.bert_cls()
    model = copy.deepcopy(base)
    lk.inject(model, lk.LoraConfig(**cfg))
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(**cfg))
    assert lk.trainable_parameters(model)[0] == peft_model.get_nb_trainable_parameters()[0]
    assert type(model.classifier).__name__ == "ModulesToSave"
    assert not hasattr(model.classifier.modules_to_save["default"], "lora_A")
    models.randomize_adapters(model)
    lk.save_adapter(model, tmp_path)
    _peft_loads_with_the_same_outputs(model, base, tmp_path, models.ids(), lambda m, x: m(input_ids=x).logits)


@pytest.mark.parametrize("task_type,heads", [("SEQ_CLS", ["classifier", "score"])])
def test_a_classification_task_type_trains_and_saves_the_head_as_peft(tmp_path, task_type, heads):
    base = models.bert_cls()
    model = copy.deepcopy(base)
    cfg = dict(r=2, target_modules=["query", "value"], task_type=task_type)
    lk.inject(model, lk.LoraConfig(**cfg))
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(**cfg))
    assert lk.trainable_parameters(model)[0] == peft_model.get_nb_trainable_parameters()[0]
    assert model.classifier.modules_to_save["default"].weight.requires_grad
    models.randomize_adapters(model)
    lk.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] == heads
    _peft_loads_with_the_same_outputs(model, base, tmp_path, models.ids(), lambda m, x: m(input_ids=x).logits)


def test_a_classification_task_type_on_a_model_without_such_a_head_is_a_clear_error():
    model = models.llama()
    snap = models.snapshot(model)
    with pytest.raises(ValueError, match="task_type='SEQ_CLS' trains the model's head"):
        lk.inject(model, lk.LoraConfig(r=2, target_modules=["q_proj"], task_type="SEQ_CLS"))
    models.assert_unchanged(model, snap)


def test_a_token_rows_only_adapter_written_by_peft_loads(tmp_path):
    base = models.llama()
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(target_modules="dummy-target-modules",
                                                                 trainable_token_indices=[4, 5]))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "trainable_tokens_delta" in n:
                p.add_(0.25)
    peft_model.save_pretrained(tmp_path)
    model = lk.load_adapter(copy.deepcopy(base), tmp_path)
    x = models.ids()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, peft_model(input_ids=x).logits)
    assert lk.trainable_parameters(lk.load_adapter(copy.deepcopy(base), tmp_path, is_trainable=True))[0] == 2 * 32


def test_a_parameters_only_adapter_is_written_with_empty_target_modules():
    cfg = lk.LoraConfig(r=2, target_parameters=["mlp.experts.down_proj"])
    assert cfg.to_peft_dict()["target_modules"] == []
