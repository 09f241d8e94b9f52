"""analysis.activity: spikes per image per layer of a pre-trained network, and kernel statistics."""

import numpy as np
import pytest

from analysis.activity import layer_activity, main, trace_steps, window_trace_at_spikes
from protocols.datasets import load_dataset
from protocols.encoding import intensities
from protocols.records import atomic_savez

TOPOLOGY = "28x28-2C5-2P-3C3-2P-10FC"


def _pretrained(tmp_path, conv2_sign: float):
    k1 = np.zeros((2, 1, 5, 5), np.float32)
    k1[:, :, 1:4, 1:4] = 1.0  # fire on ink: 9 bright pixels give 9 per step
    k2 = np.full((3, 2, 3, 3), conv2_sign, np.float32)
    path = tmp_path / "pretrained.npz"
    atomic_savez(path, {"conv1_kernels": k1, "conv1_thresholds": np.full(2, 2.0, np.float32),
                        "conv2_kernels": k2, "conv2_thresholds": np.full(3, 0.5, np.float32)})
    return path


def test_input_spikes_follow_the_rate_and_a_negative_layer_stays_silent(tmp_path):
    rows, kernels = layer_activity(TOPOLOGY, _pretrained(tmp_path, -0.5), [250.0, 1000.0],
                                   [20.0], dataset="mnist-5k", n_images=50)
    images = load_dataset("mnist-5k").train_images[:50]
    expected = intensities(images).sum(axis=(1, 2)).mean()  # spikes per step at 1 kHz, dt 1 ms
    for row in rows:
        assert row["input"] == pytest.approx(expected * row["rate_hz"] / 1000 * 20, rel=0.05)
        assert row["conv1"] > 0 and row["pool1"] > 0
        assert row["conv2"] == 0 and row["fc1"] == 0  # all-negative kernels never reach threshold
    assert rows[1]["conv1"] > rows[0]["conv1"]  # 4x the input rate
    conv2 = next(k for k in kernels if k["layer"] == "conv2")
    assert conv2["positive"] == 0 and conv2["kernel_mean"] == pytest.approx(-0.5)
    assert conv2["kernel_rms"] == pytest.approx(0.5) and conv2["threshold_mean"] == pytest.approx(0.5)
    conv1 = next(k for k in kernels if k["layer"] == "conv1")
    assert conv1["at_bound"] == pytest.approx(9 / 25) and conv1["positive"] == pytest.approx(9 / 25)
    assert all(np.isnan(row["conv2 <x_pre>"]) for row in rows)  # silent: no spike to average
    assert all(0 < row["conv1 <x_pre>"] <= 1 for row in rows)
    rows, _ = layer_activity(TOPOLOGY, _pretrained(tmp_path, 0.5), [1000.0], [20.0],
                             dataset="mnist-5k", n_images=50)
    assert rows[0]["conv2"] > 0 and 0 < rows[0]["conv2 <x_pre>"] <= 1


def test_window_trace_at_spikes_on_a_hand_made_pair():
    """3x3 input, one 3x3 window: pixel 0 fires at step 2, pixel 4 at step 5; the unit fires at
    step 5 in two maps (counted twice) and at step 1, before any input (window trace 0)."""
    pre = np.zeros((7, 1, 1, 3, 3), bool)
    pre[2, 0, 0, 0, 0] = pre[5, 0, 0, 1, 1] = True
    post = np.zeros((7, 1, 2, 1, 1), bool)
    post[5, 0, :, 0, 0] = True
    at5 = (np.exp(-3 / 10) + 1.0) / 9  # the <x_pre> of the Brian2 window_mean test
    assert window_trace_at_spikes(pre, post, 3, 10.0) == pytest.approx(at5, rel=1e-12)
    post[1, 0, 0, 0, 0] = True
    assert window_trace_at_spikes(pre, post, 3, 10.0) == pytest.approx(2 * at5 / 3, rel=1e-12)
    assert np.isnan(window_trace_at_spikes(pre, np.zeros_like(post), 3, 10.0))


def test_a_missing_file_is_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "none.npz"), "--topology", TOPOLOGY, "--dataset", "mnist-5k"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_the_trace_time_constant_is_the_pre_training_runs_own(tmp_path):
    """<x_pre> uses the tau_pre (in steps of dt) the pre-training record holds, not a default."""
    import json

    npz = _pretrained(tmp_path, 0.5)
    assert trace_steps(npz) == pytest.approx(10.0)  # no record beside it: the defaults
    (tmp_path / "pretrained.json").write_text(json.dumps(
        {"config": {"stdp": {"tau_pre": "6. ms"}, "lif": {"dt": "0.5 ms"}}}))
    assert trace_steps(npz) == pytest.approx(12.0)
    assert trace_steps(npz, tau_pre_ms=3.0) == pytest.approx(6.0)  # --tau-pre wins
