"""The loss curve: an exponential moving average with bias correction over the raw per-step series."""

from __future__ import annotations

import json

import pytest

from lorakit.train.plots import plot_history, smooth


def test_smooth_is_a_bias_corrected_moving_average():
    assert smooth([3.0] * 50) == pytest.approx([3.0] * 50)  # no pull towards 0 at the start
    xs = [1.0, 2.0, 3.0]
    w = 0.5
    m1 = (1 - w) * 1.0
    m2 = w * m1 + (1 - w) * 2.0
    m3 = w * m2 + (1 - w) * 3.0
    assert smooth(xs, w) == pytest.approx([m1 / (1 - w), m2 / (1 - w**2), m3 / (1 - w**3)])
    noisy = [1.0 + (0.5 if i % 2 else -0.5) for i in range(400)]  # a band 1 wide around 1
    tail = smooth(noisy)[100:]
    assert max(tail) - min(tail) < 0.1


def test_plot_keeps_the_raw_series_and_draws_both(tmp_path):
    import matplotlib.image as mpimg

    history = {"train": [{"step": i, "loss": 2.0 / i + (0.3 if i % 2 else -0.3), "lr": 1e-3} for i in range(1, 200)],
               "eval": [{"step": 100, "eval_loss": 0.5, "eval_accuracy": 0.8},
                        {"step": 199, "eval_loss": 0.4, "eval_accuracy": 0.9}]}
    before = json.dumps(history)
    plot_history(history, str(tmp_path / "c.png"))
    assert json.dumps(history) == before  # the raw numbers are untouched (history.json keeps them)
    assert mpimg.imread(tmp_path / "c.png").std() > 0.01
