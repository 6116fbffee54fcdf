"""Saves are all or nothing: a writer failing midway leaves the previous files byte for byte."""

from __future__ import annotations

import os

import pytest
import safetensors.torch
import torch

import lorakit as lk
from io_models import base_model, perturb_adapters
from lorakit.io import safe_write


def _adapted(seed=0):
    model = lk.inject(base_model("llama"), lk.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    perturb_adapters(model, seed=seed)
    return model


def _snapshot(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _failing_save_file(tensors, filename, metadata=None):
    """Writes half a file, then fails, as a full disk or a crash would."""
    with open(filename, "wb") as f:
        f.write(b"\x00" * 100)
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("form", ["adapter", "full", "merged_plain"])
def test_failed_weights_write_keeps_previous_files(form, tmp_path, monkeypatch):
    save = {"adapter": lk.save_adapter, "full": lk.save_full, "merged_plain": lk.save_merged}[form]
    first = _adapted(seed=0)
    if form == "merged_plain":
        first = lk.inject(_Tiny(), lk.LoraConfig(r=2, target_modules=["fc"]))
    save(first, tmp_path)
    before = _snapshot(tmp_path)
    monkeypatch.setattr(safetensors.torch, "save_file", _failing_save_file)
    second = _adapted(seed=1) if form != "merged_plain" else first
    with pytest.raises(OSError, match="No space left"):
        save(second, tmp_path)
    assert _snapshot(tmp_path) == before  # same names (no temporaries left), same bytes


def test_failed_config_write_keeps_previous_weights(tmp_path, monkeypatch):
    """The weights are written first; the config failing afterwards must not leave new weights
    beside an old config."""
    lk.save_adapter(_adapted(seed=0), tmp_path)
    before = _snapshot(tmp_path)

    def failing_text(path, text):
        raise RuntimeError("serialiser crashed")

    monkeypatch.setattr(safe_write, "write_text_file", failing_text)
    monkeypatch.setattr("lorakit.io.adapter.write_text_file", failing_text)
    with pytest.raises(RuntimeError, match="serialiser crashed"):
        lk.save_adapter(_adapted(seed=1), tmp_path)
    assert _snapshot(tmp_path) == before


def test_failed_save_pretrained_keeps_previous_merged_model(tmp_path, monkeypatch):
    model = _adapted()
    lk.save_merged(model, tmp_path)
    before = _snapshot(tmp_path)
    cls = type(model)
    original = cls.save_pretrained

    def crash_after_config(self, directory, **kw):
        self.config.save_pretrained(directory)
        raise OSError("disk went away")

    monkeypatch.setattr(cls, "save_pretrained", crash_after_config)
    with pytest.raises(OSError, match="disk went away"):
        lk.save_merged(model, tmp_path)
    monkeypatch.setattr(cls, "save_pretrained", original)
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("save", [lk.save_adapter, lk.save_full, lk.save_merged])
def test_existing_file_where_a_directory_is_expected(save, tmp_path):
    target = tmp_path / "out"
    target.write_text("precious")
    with pytest.raises(NotADirectoryError, match="is an existing file, not a directory"):
        save(_adapted(), target)
    assert target.read_text() == "precious"


def test_directory_where_a_file_would_go(tmp_path):
    (tmp_path / "adapter_model.safetensors").mkdir()
    with pytest.raises(IsADirectoryError, match="is an existing directory"):
        lk.save_adapter(_adapted(), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_model.safetensors"]


def test_unwritable_target_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(PermissionError, match="is not writable"):
        lk.save_adapter(_adapted(), tmp_path / "out")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory_reported(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match="permission denied"):
            lk.save_adapter(_adapted(), ro / "sub")
    finally:
        ro.chmod(0o700)


def test_non_default_adapter_goes_in_its_subdirectory(tmp_path):
    model = _adapted()
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["o_proj"]), "second")
    assert lk.save_adapter(model, tmp_path) == tmp_path
    assert lk.save_adapter(model, tmp_path, "second") == tmp_path / "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "second"]
    with pytest.raises(ValueError, match=r"no adapter named 'third'; this model has \['default', 'second'\]"):
        lk.save_adapter(model, tmp_path, "third")


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x)
