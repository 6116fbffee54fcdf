"""The one matching rule (``lorakit.matching``), checked against PEFT's own functions where PEFT has one."""

from __future__ import annotations

import pytest

from lorakit.matching import inside, layer_index, matches, matches_spec, pattern_key, unmatched


@pytest.mark.parametrize("name,entry,hit", [
    ("model.layers.3.self_attn.q_proj", "q_proj", True),
    ("model.layers.3.self_attn.q_proj", "self_attn.q_proj", True),
    ("q_proj", "q_proj", True),
    ("model.layers.3.self_attn.qq_proj", "q_proj", False),  # a suffix only at a dot, never a substring
    ("model.layers.3.self_attn.q_proj_x", "q_proj", False),
])
def test_an_entry_is_the_name_or_a_dotted_suffix(name, entry, hit):
    assert matches(name, entry) is hit


def test_a_string_spec_is_a_full_regex_and_none_matches_nothing():
    assert matches_spec("model.layers.0.mlp.up_proj", r".*\.(up|down)_proj")
    assert not matches_spec("model.layers.0.mlp.up_proj", r"up_proj")
    assert not matches_spec("anything", None)


def test_inside_a_saved_module_and_unmatched_entries():
    assert inside("classifier.dense", ["classifier"]) and inside("classifier", ["classifier"])
    assert not inside("pre_classifier", ["classifier"])
    assert unmatched(["q_proj", "nope"], ["a.q_proj", "a.k_proj"]) == ["nope"]


@pytest.mark.parametrize("name,pattern,index", [("model.layers.12.mlp.up_proj", "layers", 12),
                                                ("h.3.attn.c_attn", "h", 3),  # a top-level module list
                                                ("model.layers.7.self_attn.q_proj", None, 7),
                                                ("model.blocks.2.attn", "layers", None)])
def test_layer_index(name, pattern, index):
    assert layer_index(name, pattern) == index


def test_pattern_keys_as_peft():
    from peft.utils.other import get_pattern_key

    patterns = {"q_proj": 4, r"layers\.1\..*": 8, "v_proj": 2}
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "model.layers.0.mlp.up_proj"):
        theirs = get_pattern_key(patterns.keys(), name)
        assert pattern_key(patterns, name) == (theirs if theirs in patterns else None)
