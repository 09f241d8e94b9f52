"""The backward pass checked against things that do not share its reconstruction.

1. A differentiable rate surrogate of the same network: every spiking unit is replaced by a
   smooth rate a = softplus(net − θ) of its drive (conv, pooling with its fixed weights, FC),
   written here directly with NumPy einsum/reshape, not through the package. The package's chain
   rule (:func:`protocols.bp.backpropagate`) run on the surrogate's activations and derivatives
   must equal central finite differences of a loss through the surrogate; with
   ``conv_reduction = "mean"`` the conv gradients must be those divided by the number of output
   positions, as the option says.
2. Each pseudo-derivative option on units whose spike trains are known exactly (driven by the
   real forward pass): a silent unit, a unit firing once at a known step, a unit firing at every
   step, against the closed-form traces.
"""

import math

import numpy as np
import pytest
from brian2 import ms

from models.batched import LayerParams, forward
from models.parameters import BPParameters, LIFParameters, PoolingParameters
from models.topology import ConvLayer, FCLayer, PoolLayer, parse_topology
from protocols.bp import backpropagate, layer_derivatives, sgd_step

TOPOLOGY = "8x8-3C3-2P-2C2-4FC-3FC"  # conv -> pool -> conv -> FC -> FC: every kind of step


def softplus(u):
    return np.logaddexp(0.0, u)


def sigmoid(u):
    return 1.0 / (1.0 + np.exp(-u))


def surrogate_forward(layers, weights, thresholds, x, pool: PoolingParameters):
    """Rates of the surrogate net, channels-last ``(B, H, W, C)`` per layer; and each layer's
    f'(net) (index 0: None)."""
    acts, derivs = [x], [None]
    for i, layer in enumerate(layers[1:], start=1):
        a = acts[-1]
        if isinstance(layer, ConvLayer):
            k = layer.kernel
            _, ho, wo = layer.shape
            patches = np.stack([a[:, dy:dy + ho, dx:dx + wo, :]
                                for dy in range(k) for dx in range(k)], axis=-1)
            patches = patches.reshape(a.shape[0], ho, wo, a.shape[3], k, k)
            net = np.einsum("byxcuv,mcuv->byxm", patches, weights[i])
        elif isinstance(layer, PoolLayer):
            s = layer.size
            b, h, w, c = a.shape
            net = pool.weight * a.reshape(b, h // s, s, w // s, s, c).sum(axis=(2, 4))
        else:
            flat = a.transpose(0, 3, 1, 2).reshape(a.shape[0], -1)  # the weights' (C, H, W) order
            net = (flat @ weights[i].T).reshape(a.shape[0], 1, 1, -1)
        u = net - thresholds[i]
        acts.append(softplus(u))
        derivs.append(sigmoid(u))
    return acts, derivs


@pytest.fixture(scope="module")
def surrogate_case():
    layers = parse_topology(TOPOLOGY)
    rng = np.random.default_rng(7)
    pool = PoolingParameters()
    weights, thresholds, params = {}, {}, []
    for i, layer in enumerate(layers):
        if isinstance(layer, ConvLayer):
            weights[i] = rng.normal(0, 0.5, (layer.n_maps, layer.in_shape[0], layer.kernel,
                                             layer.kernel))
            thresholds[i] = rng.normal(0, 0.3, layer.n_maps)
        elif isinstance(layer, FCLayer):
            weights[i] = rng.normal(0, 0.5, (layer.n, layer.fan_in))
            thresholds[i] = rng.normal(0, 0.3, layer.n)
        elif isinstance(layer, PoolLayer):
            thresholds[i] = pool.v_th
        params.append(LayerParams(weights[i], thresholds[i]) if i in weights else None)
    x = rng.uniform(0, 1, (4, 8, 8, 1))
    g = rng.normal(0, 1, (4, layers[-1].n))  # the loss L = (1/B) Σ g · a^L, so ∂L/∂a^L = g/B

    def loss(w):
        acts, _ = surrogate_forward(layers, w, thresholds, x, pool)
        return float((g * acts[-1].reshape(len(x), -1)).sum() / len(x))

    def finite_differences(i, eps=1e-6):
        out = np.zeros_like(weights[i])
        for idx in np.ndindex(*weights[i].shape):
            plus = {**weights, i: weights[i].copy()}
            minus = {**weights, i: weights[i].copy()}
            plus[i][idx] += eps
            minus[i][idx] -= eps
            out[idx] = (loss(plus) - loss(minus)) / (2 * eps)
        return out

    acts, derivs = surrogate_forward(layers, weights, thresholds, x, pool)
    fd = {i: finite_differences(i) for i in weights}
    return layers, params, acts, derivs, g, pool, fd


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_chain_rule_equals_finite_differences_of_rate_surrogate(surrogate_case, reduction):
    layers, params, acts, derivs, g, pool, fd = surrogate_case
    assert all(np.abs(a).max() > 0.05 for a in acts[1:]), "a layer of the surrogate is dead"
    grads = backpropagate(layers, params, acts[:-1], derivs, g, BPParameters(
        conv_reduction=reduction), pool)
    for i, layer in enumerate(layers):
        if i not in fd:
            assert grads[i] is None
            continue
        want = fd[i]
        if isinstance(layer, ConvLayer) and reduction == "mean":
            want = want / (layer.shape[1] * layer.shape[2])
        assert np.abs(want).max() > 1e-4, f"layer {i}: finite differences all ~0"
        np.testing.assert_allclose(grads[i], want, rtol=1e-6, atol=1e-9,
                                   err_msg=f"layer {i} ({layer.kind}), reduction {reduction}")


def test_weight_decay_and_per_layer_eta_in_the_step():
    """W ← W − η_l (ΔW + λW), with the relative step it reports."""
    w0 = np.array([[1.0, -2.0], [0.5, 0.0]])
    g = np.array([[0.1, 0.2], [-0.3, 0.4]])
    params = [None, LayerParams(w0.copy(), np.zeros(2)), LayerParams(w0.copy(), np.zeros(2))]
    rel = sgd_step(params, [None, g, g], [None, 2.0, 0.5], weight_decay=0.1)
    for p, eta, r in zip(params[1:], (2.0, 0.5), rel[1:]):
        step = eta * (g + 0.1 * w0)
        np.testing.assert_allclose(p.weights, w0 - step)
        assert r == pytest.approx(np.linalg.norm(step) / np.linalg.norm(w0))
    assert rel[0] is None


# ---------------------------------------------------------------------------------------------
# Pseudo-derivatives on units with known spike trains


T = 50
T_SPIKE = 30  # the single-spike unit fires at step 30 of 0..49


@pytest.fixture(scope="module")
def known_units():
    """Hidden FC layer of 3 units driven one-to-one by 3 input pixels (weight 1 > threshold 0.5,
    reset to zero): unit 0 silent, unit 1 fires once at T_SPIKE, unit 2 fires at every step."""
    layers = parse_topology("1x3-3FC-2FC")
    x = np.zeros((T, 1, 1, 1, 3), dtype=bool)
    x[T_SPIKE, 0, 0, 0, 1] = True
    x[:, 0, 0, 0, 2] = True
    lif = LIFParameters()
    params = [None, LayerParams(np.eye(3), np.full(3, 0.5)),
              LayerParams(np.ones((2, 3)), np.full(2, 0.5))]
    tau_p = 20.0
    fwd = forward(layers, params, x, lif, xp=np, dtype=np.float64, tau_p=tau_p,
                  record_trace_m=True)
    np.testing.assert_array_equal(fwd.count[1].reshape(3), [0, 1, T])
    return layers, params, fwd, lif, tau_p


def _hidden(kind, silent, known_units):
    layers, params, fwd, lif, _ = known_units
    bp = BPParameters(derivative=kind, silent_units=silent, tau_p=20 * ms)
    d = layer_derivatives(layers, params, fwd, bp, lif, PoolingParameters())
    return d[1].reshape(3)


def _a_max(tau):
    d = math.exp(-1 / tau)
    return (1 - d**T) / (1 - d)


def test_lee2018_derivative_closed_form(known_units):
    tau = 20.0
    single = math.exp(-(T - 1 - T_SPIKE) / tau)
    np.testing.assert_allclose(_hidden("lee2018", "pass", known_units),
                               [1.0, 1 - single / tau, 1 - _a_max(tau) / tau], rtol=1e-12)
    np.testing.assert_allclose(_hidden("lee2018", "zero", known_units),
                               [0.0, 1 - single / tau, 1 - _a_max(tau) / tau], rtol=1e-12)


def test_lee2018_window_does_not_saturate(known_units):
    tau_p, window = 20.0, float(T)  # max(τ_p, T) = T
    single = math.exp(-(T - 1 - T_SPIKE) / tau_p)
    d = _hidden("lee2018_window", "pass", known_units)
    np.testing.assert_allclose(d, [1.0, 1 - single / window, 1 - _a_max(tau_p) / window],
                               rtol=1e-12)
    assert d[2] > 0.6  # a unit firing at every step keeps more than 60 % of its gradient


def test_lee2020_derivative_closed_form(known_units):
    tau_m, v_th = 20.0, 0.5  # τ_m = 20 ms at dt = 1 ms
    single = math.exp(-(T - 1 - T_SPIKE) / tau_m)  # γ = 1
    every = _a_max(tau_m) / T  # Σ_k e^{-(T-1-t_k)/τ_m} over every step, γ = T
    want = np.array([1.0, 1 - single / tau_m, 1 - every / tau_m]) / v_th
    np.testing.assert_allclose(_hidden("lee2020", "pass", known_units), want, rtol=1e-12)
    want[0] = 0.0  # Lee et al. 2020's code: no gradient through a unit without spikes
    np.testing.assert_allclose(_hidden("lee2020", "zero", known_units), want, rtol=1e-12)


def test_output_units_are_never_gated(known_units):
    """A silent output unit keeps its a' under silent_units = 'zero' (its label must be
    reachable)."""
    layers, params, fwd, lif, _ = known_units
    params_silent_out = [None, params[1], LayerParams(np.zeros((2, 3)), np.full(2, 0.5))]
    out = forward(layers, params_silent_out,
                  np.zeros((T, 1, 1, 1, 3), dtype=bool), lif, xp=np, dtype=np.float64,
                  tau_p=20.0, record_trace_m=True)
    bp = BPParameters(derivative="lee2018", silent_units="zero", tau_p=20 * ms)
    d = layer_derivatives(layers, params_silent_out, out, bp, lif, PoolingParameters())
    np.testing.assert_array_equal(d[-1].reshape(2), [1.0, 1.0])
    np.testing.assert_array_equal(d[1].reshape(3), [0.0, 0.0, 0.0])
