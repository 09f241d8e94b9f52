"""The rate-based backward pass against an independent plain-loop reference of the same formulas
(docs/method.md §4, protocols/bp.py docstring), on tiny nets covering conv → pool → conv → FC → FC."""

import math

import numpy as np
import pytest
from brian2 import ms

from models.batched import forward
from models.initialisation import initialise
from models.parameters import BPParameters, InitParameters, LIFParameters, PoolingParameters
from protocols.bp import (activation_max, backward, output_probabilities, pseudo_derivative,
                         sgd_step)
from models.topology import ConvLayer, FCLayer, PoolLayer, parse_topology


def reference_gradients(layers, params, fwd, labels, bp, lif, pool):
    """Per-image, per-unit, per-synapse loops; float64; only reads the forward's traces."""
    T = fwd.T
    tau_p = float(bp.tau_p / lif.dt)
    tau_m = float(lif.tau_m / lif.dt)
    d = math.exp(-1 / tau_p)
    norm = sum(d**t for t in range(T)) if bp.activation_norm == "max" else T
    B = len(labels)
    n_layers = len(layers)
    a = [np.asarray(x, dtype=float) for x in fwd.trace_p]  # (B, C, H, W)
    am = [np.asarray(x, dtype=float) for x in fwd.trace_m]
    cnt = [np.asarray(x, dtype=float) for x in fwd.count]

    def deriv(i, b, c, y, x):
        if bp.derivative == "straight_through":
            return 1.0
        if bp.derivative == "lee2018":
            return max(0.0, 1.0 - a[i][b, c, y, x] / tau_p)
        layer = layers[i]
        th = pool.v_th if isinstance(layer, PoolLayer) else float(
            np.broadcast_to(params[i].thresholds, (layer.shape[0],))[c])
        g = cnt[i][b, c, y, x]
        leak = am[i][b, c, y, x] / (g * tau_m) if g > 0 else 0.0
        return (1.0 - leak) / th

    grads = [None if p is None else np.zeros(p.weights.shape) for p in params]
    for b in range(B):
        out = a[-1][b].reshape(-1)
        p = out / out.sum() if out.sum() > 0 else np.zeros_like(out)
        e = p.copy()
        e[labels[b]] -= 1
        delta = np.zeros(layers[-1].shape)
        for j in range(len(out)):
            delta[j, 0, 0] = e[j] * deriv(n_layers - 1, b, j, 0, 0)
        for i in range(n_layers - 1, 0, -1):
            layer = layers[i]
            a_hat = a[i - 1][b] / norm  # (C, H, W)
            back = np.zeros(layer.in_shape)
            if isinstance(layer, FCLayer):
                flat = a_hat.reshape(-1)
                w = params[i].weights
                for j in range(layer.n):
                    for q in range(len(flat)):
                        grads[i][j, q] += delta[j, 0, 0] * flat[q] / B
                        c, y, x = np.unravel_index(q, layer.in_shape)
                        back[c, y, x] += w[j, q] * delta[j, 0, 0]
            elif isinstance(layer, ConvLayer):
                k = layer.kernel
                m_n, ho, wo = layer.shape
                for m in range(m_n):
                    for y in range(ho):
                        for x in range(wo):
                            for c in range(layer.in_shape[0]):
                                for dy in range(k):
                                    for dx in range(k):
                                        grads[i][m, c, dy, dx] += (
                                            delta[m, y, x] * a_hat[c, y + dy, x + dx]
                                            / (B * ho * wo))
                                        back[c, y + dy, x + dx] += (
                                            params[i].weights[m, c, dy, dx] * delta[m, y, x])
            else:
                s = layer.size
                c_n, ho, wo = layer.shape
                for c in range(c_n):
                    for y in range(ho):
                        for x in range(wo):
                            for dy in range(s):
                                for dx in range(s):
                                    back[c, y * s + dy, x * s + dx] += pool.weight * delta[c, y, x]
            if i > 1:
                delta = np.zeros(layer.in_shape)
                for c, y, x in np.ndindex(*layer.in_shape):
                    delta[c, y, x] = back[c, y, x] * deriv(i - 1, b, c, y, x)
    return grads


@pytest.mark.parametrize("derivative", ["lee2018", "lee2020", "straight_through"])
@pytest.mark.parametrize("norm", ["max", "T"])
def test_backward_matches_plain_loop_reference(derivative, norm):
    layers = parse_topology("9x9x2-3C2-2P-2C2-6FC-3FC")
    rng = np.random.default_rng(11)
    params = initialise(layers, rng, init=InitParameters(alpha=0.5), dtype=np.float64)
    # the options the loop reference implements: positions averaged, silent units passed
    bp = BPParameters(tau_p=7 * ms, derivative=derivative, activation_norm=norm,
                      conv_reduction="mean", silent_units="pass")
    lif, pool = LIFParameters(), PoolingParameters()
    x = rng.random((15, 4, 2, 9, 9)) < 0.5
    labels = np.array([0, 2, 1, 2])
    fwd = forward(layers, params, x, lif, pool, dtype=np.float64, tau_p=7.0)
    assert all(float(c.sum()) > 0 for c in fwd.count[1:]), "every layer should fire"
    grads, stats = backward(layers, params, fwd, labels, bp, lif, pool)
    ref = reference_gradients(layers, params, fwd, labels, bp, lif, pool)
    for i, (g, r) in enumerate(zip(grads, ref)):
        if r is None:
            assert g is None
            continue
        assert np.abs(r).max() > 0, f"layer {i}: reference gradient is all zero"
        np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-14, err_msg=f"layer {i}")
    # loss and NLL from their definitions
    a = fwd.trace_p[-1].reshape(4, -1)
    total = a.sum(axis=1, keepdims=True)
    p = np.divide(a, total, out=np.zeros_like(a), where=total > 0)  # silent output: p = 0
    onehot = np.eye(3)[labels]
    assert stats.loss == pytest.approx(np.mean(0.5 * ((p - onehot) ** 2).sum(axis=1)))
    assert stats.nll == pytest.approx(np.mean(-np.log(np.maximum(p[np.arange(4), labels],
                                                                 1e-12))))


def test_silent_output_gives_zero_probabilities_and_finite_nll():
    a = np.array([[0.0, 0.0, 0.0], [1.0, 3.0, 0.0]])
    p = output_probabilities(a)
    np.testing.assert_array_equal(p, [[0, 0, 0], [0.25, 0.75, 0]])
    layers = parse_topology("4x4-3FC")
    params = initialise(layers, np.random.default_rng(0), dtype=np.float64)
    params[1].thresholds[:] = 1e9  # never fires
    x = np.ones((5, 2, 1, 4, 4), dtype=bool)
    fwd = forward(layers, params, x, dtype=np.float64, tau_p=20.0)
    grads, stats = backward(layers, params, fwd, np.array([1, 2]), BPParameters())
    assert np.isfinite(stats.nll) and stats.nll == pytest.approx(-math.log(1e-12))
    # e = -label: the label unit's weights grow along the (positive) input activation
    assert (grads[1][1] < 0).all() and (grads[1][0] == 0).all()


def test_sgd_step_moves_against_the_gradient_and_keeps_thresholds():
    layers = parse_topology("4x4-2C3-3FC")
    params = initialise(layers, np.random.default_rng(0))
    before = [None if p is None else (p.weights.copy(), p.thresholds.copy()) for p in params]
    grads = [None if p is None else np.ones_like(p.weights) for p in params]
    sgd_step(params, grads, 0.5)
    for p, b in zip(params, before):
        if p is None:
            continue
        np.testing.assert_allclose(p.weights, b[0] - 0.5, rtol=1e-6)
        np.testing.assert_array_equal(p.thresholds, b[1])


def test_training_on_a_separable_toy_task_lowers_the_loss():
    # two classes: left half bright vs right half bright; a few SGD steps must learn it
    layers = parse_topology("6x6-4C3-2P-2FC")
    rng = np.random.default_rng(7)
    # alpha = 1: the output fires from the start. At the default alpha = 20 it is silent, the
    # error (-1 at the label) of the first step drives conv1 silent, and under the gated
    # gradient (bp.silent_units = "zero", the default) a silent layer never learns again
    params = initialise(layers, rng, init=InitParameters(alpha=1.0))
    bp = BPParameters(eta=3.0)
    images = np.zeros((40, 6, 6), dtype=np.uint8)
    labels = np.arange(40) % 2
    images[labels == 0, :, :3] = 255
    images[labels == 1, :, 3:] = 255
    from protocols.encoding import poisson_spikes

    losses = []
    for it in range(60):
        x = poisson_spikes(images, 30 * ms, rng)
        fwd = forward(layers, params, x, tau_p=20.0)
        grads, stats = backward(layers, params, fwd, labels, bp)
        sgd_step(params, grads, bp.eta)
        losses.append(stats.loss)
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:5])
    assert (stats.predictions == labels).mean() >= 0.9


def test_predict_breaks_ties_by_activation_and_rejects_silence():
    from protocols.bp import predict

    count = np.array([[2.0, 2.0, 1.0], [0.0, 0.0, 0.0], [0.0, 1.0, 3.0]])
    trace = np.array([[0.3, 0.9, 5.0], [0.0, 0.0, 0.0], [0.0, 0.9, 0.1]])
    np.testing.assert_array_equal(predict(count, trace), [1, -1, 2])


def test_lee2018_derivative_is_clipped_at_zero_for_saturated_units():
    """A unit firing at every one of T = 100 steps has a > tau_p: 1 - a/tau_p < 0 unclipped."""
    a_sat = activation_max(100, 20.0)
    assert a_sat > 20.0
    trace = np.array([0.0, 5.0, 20.0, a_sat], dtype=np.float32)
    d = pseudo_derivative("lee2018", trace, trace, trace, 1.0, 20.0, 20.0)
    np.testing.assert_allclose(d, [1.0, 0.75, 0.0, 0.0], atol=1e-7)
