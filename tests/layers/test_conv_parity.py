"""LoRA on Conv1d/2d/3d against a hand-computed reference, for the convolution options where
PEFT 0.21.2 and lorakit part ways: dilation, reflect/circular/replicate padding, ``padding="same"``,
stride, and Conv3d kernels with 1×1 leading dims.

The reference is the base convolution with its weight replaced by ``W0 + ΔW``,

    ΔW[o, i, k] = s · Σ_r B[o, r] · A[r, i, k]        (s = lora_alpha / r)

with the input padded explicitly by ``F.pad`` (zeros or the layer's padding_mode, "same" split as
``left = d·(k-1) // 2``, the rest on the right, as PyTorch does) and then ``F.conv{1,2,3}d`` with
``padding=0`` — no lorakit code and no nn.Conv padding logic. lorakit's unmerged, merged, unloaded
and mixed-batch outputs must all equal it.

PEFT 0.21.2 builds its lora_A convolution with the base layer's kernel, stride and padding but
not its dilation or padding_mode (peft/tuners/lora/layer.py ``_ConvNd.update_layer``), so its
*unmerged* forward raises for dilation with explicit padding (A's output has another size) and
is wrong for reflect/circular/replicate padding and for "same" padding with dilation. Its merge
(ΔW folded into the base conv) is right there, but fails on Conv3d kernels of shape (1, 1, k):
``get_delta_weight`` takes its 1×1-Conv2d shortcut on ``weight.size()[2:4] == (1, 1)``. PEFT is
right for stride, zero padding and "same" without dilation. ``test_peft_0_21_2_behaviour`` pins
each of these observations.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit as lk

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")

CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
IN, OUT, R, ALPHA, SIZE = 4, 6, 2, 4, 7

# name: (Conv kwargs, dims it applies to, PEFT 0.21.2 unmerged, PEFT 0.21.2 merged) — "ok" (equals the
# reference), "wrong" (finite, differs) or "raises"
CONFIGS = {
    "dilation2": (dict(kernel_size=3, dilation=2, padding=2), (1, 2, 3), "raises", "ok"),
    "dilation2_unpadded": (dict(kernel_size=3, dilation=2), (1, 2, 3), "raises", "ok"),
    "stride2": (dict(kernel_size=3, stride=2, padding=1), (1, 2, 3), "ok", "ok"),
    "reflect": (dict(kernel_size=3, padding=1, padding_mode="reflect"), (1, 2, 3), "wrong", "ok"),
    "circular": (dict(kernel_size=3, padding=1, padding_mode="circular"), (1, 2, 3), "wrong", "ok"),
    "replicate": (dict(kernel_size=3, padding=1, padding_mode="replicate"), (1, 2, 3), "wrong", "ok"),
    "same": (dict(kernel_size=3, padding="same"), (1, 2, 3), "ok", "ok"),
    "same_even_kernel": (dict(kernel_size=4, padding="same"), (1, 2, 3), "ok", "ok"),
    "same_dilation2": (dict(kernel_size=3, padding="same", dilation=2), (1, 2, 3), "wrong", "ok"),
    "reflect_same_dilation2": (dict(kernel_size=3, padding="same", dilation=2, padding_mode="reflect"), (1, 2, 3),
                               "wrong", "ok"),
    "circular_stride2_dilation2": (dict(kernel_size=3, stride=2, dilation=2, padding=2, padding_mode="circular"),
                                   (1, 2, 3), "raises", "ok"),
    "kernel_1x1x3": (dict(kernel_size=(1, 1, 3), padding=(0, 0, 1)), (3,), "ok", "raises"),
    "kernel_1x1x1": (dict(kernel_size=1), (3,), "ok", "raises"),
}
PARAMS = [pytest.param(dim, name, id=f"conv{dim}d-{name}") for name, (_, dims, *_) in CONFIGS.items()
          for dim in dims]


def _base(dim: int, name: str) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(CONVS[dim](IN, OUT, **CONFIGS[name][0]))


def _x(dim: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, IN, *([SIZE] * dim), generator=torch.Generator().manual_seed(1))


def reference(conv: nn.Module, A: torch.Tensor, B: torch.Tensor, s: float, x: torch.Tensor) -> torch.Tensor:
    """``conv`` with weight ``W0 + s·B·A``, its padding done by hand with ``F.pad``.

    A: (r, in, *k), B: (out, r, 1, ...), x: (N, in, *spatial) -> (N, out, *spatial').
    """
    W0 = conv.weight.detach()  # (out, in, *k)
    delta = s * (B.detach().flatten(1) @ A.detach().flatten(1)).view_as(W0)  # (out, r) @ (r, in·∏k)
    if conv.padding == "same":
        total = [d * (k - 1) for k, d in zip(conv.kernel_size, conv.dilation)]
        pads = [(t // 2, t - t // 2) for t in total]
    else:
        pads = [(p, p) for p in conv.padding]
    flat = [v for pair in reversed(pads) for v in pair]  # F.pad: last dim first
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    xp = F.pad(x, flat, mode=mode)
    return CONV_FN[W0.dim() - 2](xp, W0 + delta, conv.bias, conv.stride, 0, conv.dilation)


def _factors(model: nn.Module, name: str = "default") -> tuple[torch.Tensor, torch.Tensor, float]:
    layer = model[0]
    return layer.lora_A[name].weight, layer.lora_B[name].weight, ALPHA / R


def _lorakit(dim: int, name: str) -> tuple[nn.Module, nn.Module]:
    base = _base(dim, name)
    cfg = lk.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["0"], init_lora_weights=False)
    return base, lk.inject(copy.deepcopy(base), cfg).eval()


@pytest.mark.parametrize("dim, name", PARAMS)
def test_lorakit_matches_reference(dim, name):
    """Unmerged, merged and unloaded outputs equal the hand-computed conv with W0 + ΔW; unmerge restores W0."""
    base, model = _lorakit(dim, name)
    x = _x(dim)
    expected = reference(base[0], *_factors(model), x)
    assert not torch.allclose(expected, base(x), atol=1e-3)  # the adapter is not a no-op
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    lk.merge(model)
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    lk.unmerge(model)
    torch.testing.assert_close(model[0].base_layer.weight, base[0].weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    expected = reference(base[0], *_factors(model), x)
    torch.testing.assert_close(lk.merge_and_unload(model)(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dim, name", PARAMS)
def test_lorakit_mixed_batch_matches_reference(dim, name):
    """Rows through two adapters and the base in one batch: each row equals its own reference."""
    base, model = _lorakit(dim, name)
    cfg = lk.LoraConfig(r=R + 1, lora_alpha=ALPHA, target_modules=["0"], init_lora_weights=False)
    lk.inject(model, cfg, "other")
    model.eval()
    x = _x(dim, batch=3)
    rows = ["default", "__base__", "other"]
    with lk.mixed_batch(model, rows):
        out = model(x)
    A2, B2, _ = _factors(model, "other")
    expected = [reference(base[0], *_factors(model), x[:1]),
                base(x[1:2]),
                reference(base[0], A2, B2, ALPHA / (R + 1), x[2:])]
    torch.testing.assert_close(out, torch.cat(expected), atol=1e-5, rtol=1e-5)


def _peft_outcome(fn, expected: torch.Tensor) -> str:
    try:
        out = fn()
    except RuntimeError:
        return "raises"
    ok = out.shape == expected.shape and torch.allclose(out, expected, atol=1e-5, rtol=1e-5)
    return "ok" if ok else "wrong"


@pytest.mark.parametrize("dim, name", PARAMS)
def test_peft_0_21_2_behaviour(dim, name):
    """What PEFT 0.21.2 gives on the same weights, unmerged and merged (see the module docstring)."""
    peft = pytest.importorskip("peft")
    if peft.__version__ != "0.21.2":
        pytest.skip(f"pins PEFT 0.21.2's behaviour; installed {peft.__version__}")
    base, model = _lorakit(dim, name)
    x = _x(dim)
    A, B, s = _factors(model)
    expected = reference(base[0], A, B, s, x)
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["0"]))
    with torch.no_grad():
        ref.base_model.model[0].lora_A["default"].weight.copy_(A)
        ref.base_model.model[0].lora_B["default"].weight.copy_(B)
    ref.eval()
    _, _, unmerged, merged = CONFIGS[name]

    def merge_and_run():
        ref.merge_adapter()
        return ref(x)

    assert _peft_outcome(lambda: ref(x), expected) == unmerged
    assert _peft_outcome(merge_and_run, expected) == merged
