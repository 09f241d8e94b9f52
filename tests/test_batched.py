"""The batched forward pass: LIF recurrence against analytic values, pooling, convolution against
scipy's correlate2d, and the whole network against a plain-loop reference of docs/method.md §2."""

import math

import numpy as np
import pytest
from brian2 import second
from scipy.signal import correlate2d

from models import batched
from models.batched import (
    LayerParams,
    check_params,
    conv_current_cl,
    forward,
    params_from_arrays,
    params_to_arrays,
    weight_shape,
)
from models.initialisation import init_range, initialise
from models.parameters import InitParameters, LIFParameters, PoolingParameters
from models.topology import ConvLayer, FCLayer, PoolLayer, parse_topology

BACKENDS = ["xp"] + (["numba"] if batched._HAVE_NUMBA else [])


def one_unit_net(weight: float, v_th: float):
    """Input 1×1 → one FC unit: the membrane sees ``weight`` at every input spike."""
    layers = parse_topology("1x1-1FC")
    params = [None, LayerParams(np.array([[weight]]), np.array([v_th]))]
    return layers, params


@pytest.mark.parametrize("backend", BACKENDS)
def test_lif_constant_drive_matches_analytic_spike_times(backend):
    lif = LIFParameters()
    d = lif.decay
    w, th, T = 0.3, 1.0, 60
    layers, params = one_unit_net(w, th)
    x = np.ones((T, 1, 1, 1, 1), dtype=bool)
    out = forward(layers, params, x, lif, xp=np, dtype=np.float64, backend=backend)
    spikes = np.flatnonzero(out.spikes[1][:, 0, 0, 0, 0])
    # analytic: from rest, V after n inputs = w (1 - d^n) / (1 - d); first n with V >= th
    n_first = next(n for n in range(1, 100) if w * (1 - d**n) / (1 - d) >= th)
    expected = np.arange(n_first - 1, T, n_first)  # reset to 0 restarts the same sequence
    np.testing.assert_array_equal(spikes, expected)
    assert out.count[1][0, 0, 0, 0] == len(expected)
    # traces: sum over spikes of decay^(T-1-t_k)
    np.testing.assert_allclose(out.trace_m[1][0, 0, 0, 0], sum(d ** (T - 1 - t) for t in expected))


@pytest.mark.parametrize("backend", BACKENDS)
def test_lif_below_threshold_never_fires_and_leaks(backend):
    lif = LIFParameters()
    d = lif.decay
    w = 0.04  # asymptote w / (1 - d) = 0.82 < 1
    assert w / (1 - d) < 1
    layers, params = one_unit_net(w, 1.0)
    x = np.ones((200, 2, 1, 1, 1), dtype=bool)
    out = forward(layers, params, x, lif, dtype=np.float64, backend=backend)
    assert not out.spikes[1].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_reset_by_subtraction_keeps_the_excess(backend):
    """Without leak (tau_m = 1e20 s: decay 1.0 exactly) and w = 0.75 at every step, V after t
    inputs is 0.75 t minus the threshold 1 per spike: subtracting keeps the excess, so the unit
    has fired floor(0.75 t) times after t steps (15 of 20); reset to zero discards it and the
    unit fires every 2nd step (10 of 20). All values are multiples of 0.25: exact in float."""
    T, w, th = 20, 0.75, 1.0
    layers, params = one_unit_net(w, th)
    x = np.ones((T, 1, 1, 1, 1), dtype=bool)
    t = np.arange(1, T + 1)
    expected = {"subtract": np.floor(w * t / th) > np.floor(w * (t - 1) / th),
                "zero": t % 2 == 0}
    for reset, want in expected.items():
        lif = LIFParameters(tau_m=1e20 * second, reset=reset)
        assert lif.decay == 1.0
        out = forward(layers, params, x, lif, dtype=np.float64, backend=backend)
        np.testing.assert_array_equal(out.spikes[1][:, 0, 0, 0, 0], want, err_msg=reset)
        assert out.count[1].sum() == {"subtract": 15, "zero": 10}[reset]


@pytest.mark.parametrize("backend", BACKENDS)
def test_pooling_window_weights_threshold_and_leak(backend):
    # conv with a 1×1 identity kernel passes input spikes through (threshold 1, weight 1)
    layers = parse_topology("2x2-1C1-2P-1FC")
    params = [None, LayerParams(np.ones((1, 1, 1, 1)), np.array([1.0])), None,
              LayerParams(np.ones((1, 1)), np.array([1e9]))]
    x = np.zeros((6, 1, 1, 2, 2), dtype=bool)
    x[0, 0, 0, :, :] = [[1, 1], [0, 0]]  # 2 × 0.25 = 0.5 < 0.8: no spike
    x[1, 0, 0, :, :] = [[1, 1], [1, 0]]  # 0.5 d + 0.75 = 1.23 >= 0.8: spike
    x[3, 0, 0, :, :] = [[1, 1], [1, 1]]  # 1.0: spike
    x[5, 0, 0, :, :] = [[0, 0], [1, 1]]  # 0.5 (after reset at t=3 and a silent t=4): no spike
    out = forward(layers, params, x, LIFParameters(), PoolingParameters(), dtype=np.float64,
                  backend=backend)
    np.testing.assert_array_equal(out.spikes[1], x)
    np.testing.assert_array_equal(out.spikes[2][:, 0, 0, 0, 0], [0, 1, 0, 1, 0, 0])


def test_conv_current_is_scipy_correlation():
    rng = np.random.default_rng(1)
    T, B, C, H, W, M, k = 3, 2, 3, 9, 8, 4, 5
    s = rng.random((T, B, C, H, W)) < 0.3
    K = rng.standard_normal((M, C, k, k))
    kmat = K.reshape(M, -1).T
    cur = conv_current_cl(np.moveaxis(s, 2, -1), kmat, k, dtype=np.float64)  # (T,B,Ho,Wo,M)
    for t in range(T):
        for b in range(B):
            for m in range(M):
                ref = sum(correlate2d(s[t, b, c].astype(float), K[m, c], mode="valid")
                          for c in range(C))
                np.testing.assert_allclose(cur[t, b, :, :, m], ref, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_layer_spikes_follow_scipy_correlation(backend):
    # one step: a unit spikes iff its correlation current reaches its map's threshold
    rng = np.random.default_rng(2)
    layers = parse_topology("10x10x2-3C4-7FC")
    K = rng.standard_normal((3, 2, 4, 4))
    th = np.array([0.5, 1.0, -0.2])
    params = [None, LayerParams(K, th), LayerParams(np.zeros((7, 3 * 7 * 7)), np.ones(7))]
    x = rng.random((1, 5, 2, 10, 10)) < 0.4
    out = forward(layers, params, x, dtype=np.float64, backend=backend)
    for b in range(5):
        for m in range(3):
            cur = sum(correlate2d(x[0, b, c].astype(float), K[m, c], mode="valid") for c in range(2))
            assert np.min(np.abs(cur - th[m])) > 1e-9  # no tie at threshold in this draw
            np.testing.assert_array_equal(out.spikes[1][0, b, m], cur >= th[m])


def reference_forward(layers, params, x, lif, pool):
    """Plain loops over steps, units and synapses of docs/method.md §2 (float64, dict-of-lists state)."""
    T, B = x.shape[:2]
    spikes = [x.astype(bool)]
    for i, layer in enumerate(layers[1:], start=1):
        prev = spikes[-1]
        c_out, h_out, w_out = layer.shape
        out = np.zeros((T, B, c_out, h_out, w_out), dtype=bool)
        for b in range(B):
            v = np.zeros((c_out, h_out, w_out))
            for t in range(T):
                for m in range(c_out):
                    for y in range(h_out):
                        for xx in range(w_out):
                            if isinstance(layer, ConvLayer):
                                k = layer.kernel
                                cur = 0.0
                                for c in range(layer.in_shape[0]):
                                    for dy in range(k):
                                        for dx in range(k):
                                            if prev[t, b, c, y + dy, xx + dx]:
                                                cur += params[i].weights[m, c, dy, dx]
                                th = params[i].thresholds[m]
                            elif isinstance(layer, PoolLayer):
                                s = layer.size
                                n = prev[t, b, m, y * s:(y + 1) * s, xx * s:(xx + 1) * s].sum()
                                cur = pool.weight * n
                                th = pool.v_th
                            else:
                                flat = prev[t, b].reshape(-1)
                                cur = sum(params[i].weights[m, j] for j in np.flatnonzero(flat))
                                th = np.broadcast_to(params[i].thresholds, (c_out,))[m]
                            v[m, y, xx] = v[m, y, xx] * lif.decay + cur
                            if v[m, y, xx] >= th:
                                out[t, b, m, y, xx] = True
                                v[m, y, xx] = 0.0 if lif.reset == "zero" else v[m, y, xx] - th
        spikes.append(out)
    return spikes


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reset", ["zero", "subtract"])
def test_network_matches_plain_loop_reference(backend, reset):
    topo = "8x8x2-3C3-2P-2C2-5FC-4FC"
    layers = parse_topology(topo)
    rng = np.random.default_rng(3)
    params = initialise(layers, rng, init=InitParameters(alpha=0.6), dtype=np.float64)
    lif = LIFParameters(reset=reset)
    x = rng.random((12, 3, 2, 8, 8)) < 0.5
    ref = reference_forward(layers, params, x, lif, PoolingParameters())
    out = forward(layers, params, x, lif, dtype=np.float64, backend=backend, chunk=2)
    for i, (a, b) in enumerate(zip(out.spikes, ref)):
        np.testing.assert_array_equal(a, b, err_msg=f"layer {i}")
    assert all(r.any() for r in ref[1:]), "every layer should spike in this test"


def test_backends_agree_on_realistic_nets():
    if not batched._HAVE_NUMBA:
        pytest.skip("numba not installed")
    rng = np.random.default_rng(4)
    for topo in ("28x28-36C5-2P-10FC", "28x28-20C5-2P-50C5-2P-200FC-10FC"):
        layers = parse_topology(topo)
        params = initialise(layers, rng)
        x = rng.random((20, 7, 1, 28, 28)) < 0.15
        a = forward(layers, params, x, tau_p=20.0, backend="numba", dtype=np.float64)
        b = forward(layers, params, x, tau_p=20.0, backend="xp", dtype=np.float64, chunk=3)
        for i in range(len(layers)):
            # the compiled kernels update a trace only when its unit fires, by the same float
            # operations as the per-step recurrence: equal bit for bit
            np.testing.assert_array_equal(a.spikes[i], b.spikes[i])
            np.testing.assert_array_equal(a.trace_p[i], b.trace_p[i])
            np.testing.assert_array_equal(a.count[i], b.count[i])
            np.testing.assert_array_equal(a.trace_m[i], b.trace_m[i])
        # without trace_m (what training with lee2018 runs) nothing else changes
        d = forward(layers, params, x, tau_p=20.0, backend="numba", dtype=np.float64,
                    record_trace_m=False)
        assert all(t is None for t in d.trace_m[1:])
        for i in range(len(layers)):
            np.testing.assert_array_equal(d.spikes[i], a.spikes[i])
            np.testing.assert_array_equal(d.trace_p[i], a.trace_p[i])
            np.testing.assert_array_equal(d.count[i], a.count[i])
        # float32 runs the same network; spikes agree with float64 nearly everywhere
        c = forward(layers, params, x, tau_p=20.0, backend="numba", dtype=np.float32)
        assert (c.spikes[-1] == a.spikes[-1]).mean() > 0.99


def test_keep_spikes_false_drops_hidden_layers_only():
    layers = parse_topology("8x8-2C3-2P-3FC")
    params = initialise(layers, np.random.default_rng(0))
    x = np.random.default_rng(1).random((5, 2, 1, 8, 8)) < 0.5
    out = forward(layers, params, x, keep_spikes=False)
    assert out.spikes[1] is None and out.spikes[2] is None
    assert out.spikes[0].shape == (5, 2, 1, 8, 8) and out.spikes[-1].shape == (5, 2, 3, 1, 1)


def test_parameter_checks_name_the_layer():
    layers = parse_topology("8x8-2C3-2P-3FC")
    params = initialise(layers, np.random.default_rng(0))
    bad = list(params)
    bad[1] = LayerParams(np.zeros((2, 1, 5, 5)), np.zeros(2))
    with pytest.raises(ValueError, match="conv1 weights"):
        check_params(layers, bad)
    with pytest.raises(ValueError, match="bool"):
        forward(layers, params, np.zeros((3, 1, 1, 8, 8)))
    arrays = params_to_arrays(layers, params)
    assert sorted(arrays) == ["conv1_kernels", "conv1_thresholds", "fc1_thresholds",
                              "fc1_weights"]
    back = params_from_arrays(layers, arrays)
    np.testing.assert_array_equal(back[1].weights, params[1].weights)


@pytest.mark.parametrize("scheme", ["lee", "glorot"])
def test_initialisation_ranges_and_thresholds(scheme):
    layers = parse_topology("28x28-20C5-2P-50C5-2P-200FC-10FC")
    alpha = 1.7
    params = initialise(layers, np.random.default_rng(5), scheme, InitParameters(alpha=alpha))
    for layer, p in zip(layers, params):
        if p is None:
            continue
        k = init_range(layer, scheme)
        n_in = layer.fan_in
        if scheme == "lee":
            assert k == pytest.approx(math.sqrt(3 / n_in))
        else:
            n_out = layer.kernel**2 * layer.n_maps if isinstance(layer, ConvLayer) else layer.n
            assert k == pytest.approx(math.sqrt(6 / (n_in + n_out)))
        assert p.weights.shape == weight_shape(layer)
        assert np.abs(p.weights).max() <= k and np.abs(p.weights).max() > 0.9 * k
        np.testing.assert_allclose(p.thresholds, alpha * k, rtol=1e-6)
    again = initialise(layers, np.random.default_rng(5), scheme, InitParameters(alpha=alpha))
    np.testing.assert_array_equal(again[1].weights, params[1].weights)
    assert isinstance(layers[-1], FCLayer)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inference_forward_keeps_only_what_the_readout_needs(backend):
    """hidden_traces=False (evaluation) records the output layer's trace only; spikes, counts
    and that trace equal the full forward pass's."""
    rng = np.random.default_rng(7)
    layers = parse_topology("28x28-36C5-2P-10FC")
    params = initialise(layers, rng)
    for p in params[1:]:
        if p is not None:
            p.weights *= 3  # so that the output layer fires
    x = rng.random((30, 6, 1, 28, 28)) < 0.2
    full = forward(layers, params, x, tau_p=20.0, backend=backend, dtype=np.float64)
    lean = forward(layers, params, x, tau_p=20.0, backend=backend, dtype=np.float64,
                   hidden_traces=False)
    assert all(t is None for t in lean.trace_p[:-1])
    np.testing.assert_array_equal(lean.trace_p[-1], full.trace_p[-1])
    for i in range(len(layers)):
        np.testing.assert_array_equal(lean.spikes[i], full.spikes[i])
        np.testing.assert_array_equal(lean.count[i], full.count[i])
    assert full.count[-1].sum() > 0
