"""PEFT's small custom test models and its LoRA test matrix, for tests/test_peft_matrix*.py.

The models are those of huggingface/peft ``tests/test_custom_models.py`` (PEFT 0.20/0.21), same
layers, shapes and forward passes, built with ``torch.manual_seed(0)`` as PEFT's
``MockTransformerWrapper.from_pretrained`` does. The case tables are that file's LoRA rows of
``TEST_CASES``, ``MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES`` and the mixed-batch lists, under PEFT's own
test names (spaces → underscores).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


class MLP(nn.Module):
    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20, bias=bias)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.lin1 = nn.Linear(20, 2, bias=bias)
        self.sm = nn.LogSoftmax(dim=-1)
        self.dtype = torch.float

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        X = X.to(self.dtype)  # (N, 10)
        X = self.drop(self.relu(self.lin0(X)))  # (N, 20)
        return self.sm(self.lin1(X))  # (N, 2)


class MLPWithGRU(nn.Module):
    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.lin0 = nn.Linear(10, 20, bias=bias)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.gru = nn.GRU(input_size=20, hidden_size=20, num_layers=1, batch_first=True, bias=bias)
        self.fc = nn.Linear(20, 2, bias=bias)
        self.sm = nn.LogSoftmax(dim=-1)
        self.dtype = torch.float

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        X = self.drop(self.relu(self.lin0(X.to(self.dtype))))  # (N, 20)
        X, _ = self.gru(X.unsqueeze(1))  # (N, 1, 20)
        return self.sm(self.fc(X.squeeze(1)))  # (N, 2)


class Block(nn.Module):
    def __init__(self, bias: bool = True, size: int = 10) -> None:
        super().__init__()
        self.lin0 = nn.Linear(size, size, bias=bias)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.lin1 = nn.Linear(size, size, bias=bias)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return self.lin1(self.drop(self.relu(self.lin0(X.float()))))


class DeepMLP(nn.Module):
    def __init__(self, bias: bool = True, num_hidden_layers: int = 12, size: int = 10) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(bias=bias, size=size) for _ in range(num_hidden_layers)])
        self.out = nn.Linear(10, 2, bias=bias)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        X = X.float()
        for layer in self.layers:
            X = layer(X)
        return self.sm(self.out(X))


class ModelEmbConv1D(nn.Module):
    def __init__(self, emb_size: int = 100) -> None:
        super().__init__()
        self.emb = nn.Embedding(emb_size, 5)
        self.conv1d = Conv1D(1, 5)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        X = self.emb(X)  # (N, 10, 5)
        X = self.flat(self.relu(self.conv1d(X)))  # (N, 10)
        return self.sm(self.lin0(X))  # (N, 2)


class ModelConv1D(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1d = nn.Conv1d(1, 1, 2)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(9, 2)
        self.sm = nn.LogSoftmax(dim=-1)
        self.dtype = torch.float

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        X = X.to(self.dtype).reshape(-1, 1, 10)  # (N, 1, 10)
        X = self.flat(self.relu(self.conv1d(X)))  # (N, 9)
        return self.sm(self.lin0(X))


class ModelConv2D(nn.Module):
    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.conv2d = nn.Conv2d(5, 10, 3, bias=bias)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)
        self.dtype = torch.float

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        X = X.to(self.dtype).reshape(-1, 5, 3, 3)  # (N, 5, 3, 3)
        X = self.flat(self.relu(self.conv2d(X)))  # (N, 10)
        return self.sm(self.lin0(X))


class ModelConv2DGroups(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(90, 288)
        self.conv2d = nn.Conv2d(16, 16, 3, groups=8)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin1 = nn.Linear(16, 2)
        self.sm = nn.LogSoftmax(dim=-1)
        self.dtype = torch.float

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        X = self.lin0(X.to(self.dtype).flatten())  # (288,)
        X = self.flat(self.relu(self.conv2d(X.reshape(2, 16, 3, 3))))  # (2, 16)
        return self.sm(self.lin1(X))


class ModelConv2DGroups2(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv2d = nn.Conv2d(16, 32, 3, padding=1, groups=2)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(12800, 2)
        self.sm = nn.LogSoftmax(dim=-1)
        self.dtype = torch.float

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        # as PEFT's: needs another input shape, so the given input is ignored
        X = torch.arange(9 * 16 * 20 * 20).view([9, 16, 20, 20]).to(self.conv2d.weight.device, self.dtype)
        X = self.flat(self.relu(self.conv2d(X)))  # (9, 12800)
        return self.sm(self.lin0(X))


class ModelConv3D(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv3d = nn.Conv3d(5, 10, 3)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)
        self.dtype = torch.float

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        X = X.to(self.dtype)
        if X.dim() == 2:  # a 2-D input becomes a 3-D volume
            X = torch.stack([X] * 3, dim=-1)  # (N, 10, 3)
        X = X.reshape(-1, 5, 3, 3, 3)  # (N', 5, 3, 3, 3)
        X = self.flat(self.relu(self.conv3d(X)))  # (N', 10)
        return self.sm(self.lin0(X))


class ModelMha(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(10, 2)
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)
        self.dtype = torch.float

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        X = X.to(self.dtype)  # (L, 10), unbatched
        X, _ = self.mha(X, X, X)
        return self.sm(self.lin0(X))


class _LinearUsingParameter(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.randn(in_features, out_features))
        if bias:
            self.bias = nn.Parameter(torch.ones(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


class MlpUsingParameters(nn.Module):
    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.lin0 = _LinearUsingParameter(10, 20, bias=bias)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.lin1 = _LinearUsingParameter(20, 2, bias=bias)
        self.sm = nn.LogSoftmax(dim=-1)
        self.dtype = torch.float

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        X = self.drop(self.relu(self.lin0(X.to(self.dtype))))
        return self.sm(self.lin1(X))


MODELS = {
    "MLP": MLP, "EmbConv1D": ModelEmbConv1D, "Conv1d": ModelConv1D, "Conv2d": ModelConv2D,
    "Conv2dGroups": ModelConv2DGroups, "Conv2dGroups2": ModelConv2DGroups2, "Conv3d": ModelConv3D,
    "MHA": ModelMha, "MlpUsingParameters": MlpUsingParameters,
}


def build(model_id: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """PEFT's ``MockTransformerWrapper.from_pretrained``: the same weights on every call."""
    torch.manual_seed(0)
    model = MODELS[model_id]().to(dtype)
    if hasattr(model, "dtype"):
        model.dtype = dtype
    return model


def inputs() -> torch.Tensor:
    """PEFT's ``prepare_inputs_for_testing``: ``arange(90)`` as (9, 10) int64."""
    return torch.arange(90).view(9, 10)


# PEFT's own warnings on these cases (it sets fan_in_fan_out itself, warns about grouped convs and
# about lora_bias tensors being 1-D): expected, not lorakit's.
PEFT_WARNINGS = ["ignore:fan_in_fan_out is set to False", "ignore:LoRA adapter added to ConvNd layer with groups",
                 "ignore:.*LoRA tensor\\(s\\) have invalid shape"]


def _slug(name: str) -> str:
    return name.replace(" ", "_").replace("+", "plus").replace(".", "")


# ------------------------------------------------------------------ TEST_CASES, LoRA rows
# (PEFT test name, model id, LoraConfig kwargs) — the rows lorakit implements
_SUPPORTED = [
    ("Vanilla MLP 1 LoRA", "MLP", {"target_modules": "lin0"}),
    ("Vanilla MLP 2 LoRA", "MLP", {"target_modules": ["lin0"]}),
    ("Vanilla MLP 3 LoRA", "MLP", {"target_modules": ["lin1"]}),
    ("Vanilla MLP 4 LoRA", "MLP", {"target_modules": ["lin0", "lin1"]}),
    ("Vanilla MLP 5 LoRA", "MLP", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    ("Vanilla MLP 6 LoRA", "MLP", {"target_modules": ["lin0"], "lora_alpha": 4, "lora_dropout": 0.1}),
    ("Vanilla MLP 7 LoRA with DoRA", "MLP", {"target_modules": ["lin0"], "use_dora": True}),
    ("Vanilla MLP 8 LoRA with DoRA", "MLP", {"target_modules": ["lin0", "lin1"], "use_dora": True}),
    ("Vanilla MLP 9 LoRA with DoRA", "MLP", {"target_modules": "lin1", "use_dora": True, "lora_alpha": 32}),
    ("Embedding + transformers Conv1D 1 LoRA", "EmbConv1D", {"target_modules": ["conv1d"]}),
    ("Embedding + transformers Conv1D 2 LoRA", "EmbConv1D", {"target_modules": ["emb"]}),
    ("Embedding + transformers Conv1D 3 LoRA", "EmbConv1D", {"target_modules": ["emb", "conv1d"]}),
    ("Embedding + transformers Conv1D 1 DoRA", "EmbConv1D", {"target_modules": ["conv1d"], "use_dora": True}),
    ("Conv1d LoRA", "Conv1d", {"target_modules": ["conv1d"]}),
    ("Conv2d 1 LoRA", "Conv2d", {"target_modules": ["conv2d"]}),
    ("Conv2d 2 LoRA", "Conv2d", {"target_modules": ["conv2d", "lin0"]}),
    ("Conv3d 1 LoRA", "Conv3d", {"target_modules": ["conv3d"]}),
    ("Conv3d 2 LoRA", "Conv3d", {"target_modules": ["conv3d", "lin0"]}),
    ("MHA 1 LoRA", "MHA", {"target_modules": ["mha"]}),
    ("MHA 2 LoRA", "MHA", {"target_modules": ["mha", "lin0"]}),
    # issue 16: DoRA on embeddings and convolutions, grouped convolutions, lora_bias
    ("Embedding + transformers Conv1D 2 DoRA", "EmbConv1D", {"target_modules": ["emb"], "use_dora": True}),
    ("Embedding + transformers Conv1D 3 DoRA", "EmbConv1D", {"target_modules": ["emb", "conv1d"], "use_dora": True}),
    ("Conv1d LoRA with DoRA", "Conv1d", {"target_modules": ["conv1d"], "use_dora": True}),
    ("Conv2d 1 LoRA with DoRA", "Conv2d", {"target_modules": ["conv2d"], "use_dora": True}),
    ("Conv2d 2 LoRA with DoRA", "Conv2d", {"target_modules": ["conv2d", "lin0"], "use_dora": True}),
    ("Conv2d Groups LoRA", "Conv2dGroups", {"target_modules": ["conv2d"]}),
    ("Conv2d Groups2 LoRA", "Conv2dGroups2", {"target_modules": ["conv2d"]}),
    ("Conv2d Groups LoRA with DoRA", "Conv2dGroups", {"target_modules": ["conv2d"], "use_dora": True}),
    ("Conv2d Groups2 LoRA with DoRA", "Conv2dGroups2", {"target_modules": ["conv2d"], "use_dora": True}),
    ("Conv3d 1 LoRA with DoRA", "Conv3d", {"target_modules": ["conv3d"], "use_dora": True}),
    ("Conv3d 2 LoRA with DoRA", "Conv3d", {"target_modules": ["conv3d", "lin0"], "use_dora": True}),
    ("Vanilla MLP 1 LoRA with lora_b bias", "MLP", {"target_modules": ["lin0", "lin1"], "lora_bias": True,
                                                    "lora_alpha": 32}),
    ("Conv2d 1 LoRA with lora_b bias", "Conv2d", {"target_modules": ["conv2d"], "lora_bias": True, "lora_alpha": 32}),
    ("Conv3d 1 LoRA with lora_b bias", "Conv3d", {"target_modules": ["conv3d"], "lora_bias": True, "lora_alpha": 32}),
    ("Embedding + transformers Conv1D 1 LoRA trainable_tokens", "EmbConv1D",
     {"target_modules": ["conv1d"], "trainable_token_indices": {"emb": [0, 10]}}),
    ("MLP 1 using nn.Parameter LoRA", "MlpUsingParameters", {"target_parameters": ["lin0.weight"]}),
    ("MLP 2 using nn.Parameter LoRA", "MLP", {"target_modules": ["lin0"], "target_parameters": ["lin1.weight"]}),
]
SUPPORTED = {_slug(n): (m, kw) for n, m, kw in _SUPPORTED}
# rows whose adapters cannot be merged: the update of a grouped convolution is a dense kernel that
# the grouped weight cannot hold (PEFT refuses the merge too); their merge checks assert the refusal
MERGE_REFUSED = {cid for cid, (m, _) in SUPPORTED.items() if m.startswith("Conv2dGroups")}


def assert_merge_refused(model: nn.Module) -> None:
    """merge, safe merge and merge_and_unload each raise a ValueError naming the groups, and
    change nothing: not a weight, not a wrapper."""
    import pytest

    import lorakit as lk

    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = module_types(model)
    for attempt in (lambda: lk.merge(model), lambda: lk.merge(model, safe_merge=True),
                    lambda: lk.merge_and_unload(model), lambda: lk.merge_and_unload(model, safe_merge=True)):
        with pytest.raises(ValueError, match="groups=.*cannot hold"):
            attempt()
        after = model.state_dict()
        assert after.keys() == before.keys() and all(torch.equal(v, after[k]) for k, v in before.items())
        assert module_types(model) == types


def _peft_extra(name: str) -> dict[str, Any]:
    """PEFT config objects for the unsupported rows (built lazily: PEFT is a test dependency only)."""
    import peft
    from peft.tuners.lora.config import BdLoraConfig

    return {
        "kasa": {"kasa_config": peft.KasaConfig()},
        "velora_random": {"velora_config": peft.VeloraConfig(num_groups=2, init_type="random")},
        "velora_avg": {"velora_config": peft.VeloraConfig(num_groups=2, init_type="batch_average")},
        "velora_once": {"velora_config": peft.VeloraConfig(num_groups=2, init_type="batch_average_once")},
        "monteclora": {"monteclora_config": peft.MontecloraConfig(num_samples=2)},
        "bd_a": {"use_bdlora": BdLoraConfig(target_modules_bd_a=["lin0"], match_strict=False)},
        "bd_b": {"use_bdlora": BdLoraConfig(target_modules_bd_b=["lin1"], nblocks=2, match_strict=False)},
        "bd_ab": {"use_bdlora": BdLoraConfig(target_modules_bd_a=["lin0"], target_modules_bd_b=["lin1"], nblocks=2)},
    }[name]


# (PEFT test name, model id, kwargs, PEFT-object kwargs key or None, the feature lorakit lacks,
#  a word the refusal must name)
_UNSUPPORTED = [
    ("Vanilla MLP 1 LoRA with KaSA", "MLP", {"target_modules": ["lin0"], "r": 4}, "kasa", "KaSA", "kasa_config"),
    ("Vanilla MLP 1 LoRA with MiCA", "MLP", {"target_modules": ["lin0"], "init_lora_weights": "mica", "r": 4}, None,
     "MiCA initialisation", "mica"),
    ("Vanilla MLP 10 LoRA with VeLoRA random", "MLP", {"target_modules": ["lin0"]}, "velora_random", "VeLoRA",
     "velora_config"),
    ("Vanilla MLP 11 LoRA with VeLoRA batch_average", "MLP", {"target_modules": ["lin0", "lin1"]}, "velora_avg",
     "VeLoRA", "velora_config"),
    ("Vanilla MLP 12 LoRA with VeLoRA batch_average_once", "MLP", {"target_modules": ["lin0"]}, "velora_once",
     "VeLoRA", "velora_config"),
    ("Vanilla MLP 1 LoRA with Monteclora", "MLP", {"target_modules": ["lin0"]}, "monteclora", "MonteCLoRA",
     "monteclora_config"),
    ("BD-LoRA A only", "MLP", {"target_modules": ["lin0", "lin1"]}, "bd_a", "BD-LoRA (block-diagonal factors)",
     "use_bdlora"),
    ("BD-LoRA B only", "MLP", {"target_modules": ["lin0", "lin1"]}, "bd_b", "BD-LoRA (block-diagonal factors)",
     "use_bdlora"),
    ("BD-LoRA both A and B", "MLP", {"target_modules": ["lin0", "lin1"]}, "bd_ab", "BD-LoRA (block-diagonal factors)",
     "use_bdlora"),
]
# case id -> (model id, kwargs, PEFT-object key, missing feature, word the error must contain)
UNSUPPORTED = {_slug(n): (m, kw, extra, feature, word) for n, m, kw, extra, feature, word in _UNSUPPORTED}


def peft_config(kwargs: dict[str, Any], extra: str | None = None, **over: Any):
    """A ``peft.LoraConfig`` for a row (``extra``: the PEFT-only config objects of that row).

    An older PEFT without the row's feature skips the test (the rows come from PEFT 0.20/0.21).
    """
    import peft
    import pytest

    try:
        return peft.LoraConfig(**{**kwargs, **(_peft_extra(extra) if extra else {}), **over})
    except (ImportError, AttributeError, TypeError, ValueError) as e:
        pytest.skip(f"PEFT {peft.__version__} cannot build this row: {type(e).__name__}: {e}")


# ------------------------------------------------------------------ MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES (LoRA)
_TOKENS_1 = {"target_modules": ["lin0"], "init_lora_weights": False, "trainable_token_indices": {"emb": [0, 1, 2]}}
# id -> (model id, kwargs of adapter 1, kwargs of adapter 2)
MULTI = {
    "LoRA_Same": ("MLP", {"target_modules": ["lin0"], "init_lora_weights": False},
                  {"target_modules": ["lin0"], "init_lora_weights": False}),
    "LoRA_Different": ("MLP", {"target_modules": ["lin0"], "init_lora_weights": False},
                       {"target_modules": ["lin1"], "init_lora_weights": False}),
    "LoRA_plus_trainable_tokens_Same": (
        "EmbConv1D", _TOKENS_1,
        {"target_modules": ["lin0"], "init_lora_weights": False, "trainable_token_indices": {"emb": [3, 4, 5, 6]}}),
    "LoRA_plus_trainable_tokens_Different": (
        "EmbConv1D", _TOKENS_1,
        {"target_modules": ["conv1d"], "init_lora_weights": False, "trainable_token_indices": {"emb": [3, 4, 5, 6]}}),
    "LoRA_targeting_nnParameter_Same": ("MLP", {"target_parameters": ["lin0.weight"], "init_lora_weights": False},
                                        {"target_parameters": ["lin0.weight"], "init_lora_weights": False}),
    "LoRA_targeting_nnParameter_Different": ("MLP", {"target_parameters": ["lin0.weight"], "init_lora_weights": False},
                                             {"target_parameters": ["lin1.weight"], "init_lora_weights": False}),
}
# the rows lorakit lacks a feature for: id -> (model id, kwargs 1, kwargs 2, feature, word) — none left
MULTI_UNSUPPORTED: dict[str, tuple] = {}


def randomize_tokens(model: nn.Module, seed: int = 0) -> None:
    """Trained rows differ from the embedding's (PEFT's tests do the same: ``rand_like``, since
    ``init_lora_weights`` does not apply to token rows)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".trainable_tokens_delta." in n:
                p.copy_(torch.rand(p.shape, generator=g))


# ------------------------------------------------------------------ lorakit side
def lk_config(kwargs: dict[str, Any], **over: Any):
    """The same row as a ``lorakit.LoraConfig`` (lorakit uses PEFT's field names)."""
    import lorakit as lk

    return lk.LoraConfig(**{**kwargs, **over})


def make(case: str, dtype: torch.dtype = torch.float32, adapter_name: str = "default", **over: Any) -> nn.Module:
    """PEFT's model for ``case`` with lorakit's adapter injected (``over`` overrides config fields)."""
    import lorakit as lk

    model_id, kwargs = SUPPORTED[case]
    return lk.inject(build(model_id, dtype), lk_config(kwargs, **over), adapter_name)


def module_types(model: nn.Module) -> list[type]:
    return [type(m) for m in model.modules()]


# ------------------------------------------------------------------ known failures
# {check: {case id: reason}}: checks that fail on today's lorakit; the lead removes rows as the
# core is fixed (strict xfail: a row that starts passing fails the suite until it is removed).
XFAIL: dict[str, dict[str, str]] = {}


def cases(check: str, table: dict | None = None) -> list:
    """``pytest.param`` per case id of ``table`` (default: the supported rows), xfail where listed."""
    import pytest

    known = XFAIL.get(check, {})
    return [pytest.param(cid, id=cid, marks=[pytest.mark.xfail(strict=True, reason=f"issue 11: {known[cid]}")]
                         if cid in known else []) for cid in (SUPPORTED if table is None else table)]
