"""Network builder: correlation forward pass, same spikes as the discrete equations, errors."""

import numpy as np
import pytest
from brian2 import ms
from scipy.signal import correlate2d

from models.devices import DeviceError, use_device
from models.network import NetworkError, brian2_layer_spikes, build_network
from models.parameters import LIFParameters, ParameterError, STDPParameters
from models.topology import TopologyError, parse_topology


def test_conv_input_current_equals_correlate2d():
    rng = np.random.default_rng(0)
    kernels = rng.normal(size=(3, 2, 3, 3))
    spikes = rng.random((1, 2, 7, 6)) < 0.5
    sn = build_network("7x6x2-3C3-1FC", {1: kernels}, {1: 1e9}, input_spikes=spikes, up_to=1)
    sn.net.run(1 * ms)
    current = np.asarray(sn.groups[1].v[:]).reshape(3, 5, 4)
    expected = np.stack([sum(correlate2d(spikes[0, c], kernels[m, c], mode="valid")
                             for c in range(2)) for m in range(3)])
    np.testing.assert_allclose(current, expected, rtol=1e-12, atol=1e-12)


def _lif(current, v_th, decay):
    v = np.zeros(current.shape[1:])
    out = np.zeros(current.shape, bool)
    for t in range(current.shape[0]):
        v = decay * v + current[t]
        out[t] = v >= v_th
        v[out[t]] = 0.0
    return out


def _reference(layers, weights, thresholds, spikes, decay):
    """The discrete equations of docs/method.md §2 in plain NumPy (float64)."""
    out = [spikes]
    for index, layer in enumerate(layers[1:], start=1):
        s = out[-1]
        if layer.kind == "conv":
            k = weights[index]
            cur = np.zeros((s.shape[0], *layer.shape))
            for t in range(s.shape[0]):
                for m in range(layer.n_maps):
                    cur[t, m] = sum(correlate2d(s[t, c], k[m, c], mode="valid")
                                    for c in range(layer.in_shape[0]))
            th = np.asarray(thresholds[index])[:, None, None]
        elif layer.kind == "pool":
            c, h, w = layer.in_shape
            z = layer.size
            cur = 0.25 * s.reshape(s.shape[0], c, h // z, z, w // z, z).sum(axis=(3, 5))
            th = 0.8
        else:
            cur = (s.reshape(s.shape[0], -1) @ weights[index].T)[:, :, None, None]
            th = np.asarray(thresholds[index]).reshape(-1, 1, 1)
        out.append(_lif(cur, th, decay))
    return out


@pytest.mark.parametrize("topology", [
    pytest.param("10x10-4C3-2P-3C2-1P-5FC-3FC", marks=pytest.mark.slow),  # ~5 min on 2 cores
    "8x8-2C5-2P-3FC"])
def test_brian2_spikes_equal_the_discrete_equations_layer_by_layer(topology):
    rng = np.random.default_rng(1)
    layers = parse_topology(topology)
    weights, thresholds = {}, {}
    for i, layer in enumerate(layers):
        if layer.kind == "conv":
            weights[i] = rng.uniform(-0.3, 1.0, (layer.n_maps, layer.in_shape[0], layer.kernel,
                                                layer.kernel))
            thresholds[i] = rng.uniform(0.8, 1.5, layer.n_maps)
        elif layer.kind == "fc":
            weights[i] = rng.uniform(-0.2, 0.8, (layer.n, layer.fan_in))
            thresholds[i] = rng.uniform(0.5, 1.0, layer.n)
    spikes = rng.random((30, *layers[0].shape)) < 0.4
    got = brian2_layer_spikes(topology, weights, thresholds, spikes)
    want = _reference(layers, weights, thresholds, spikes, LIFParameters().decay)
    assert len(got) == len(layers)
    for index, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape == (30, *layers[index].shape)
        np.testing.assert_array_equal(g, w, err_msg=f"layer {index}")
    assert got[-1].any() and got[-2].any()  # the test drives every layer
    # the stimulus input path (used for standalone re-runs) gives the same spikes
    got2 = brian2_layer_spikes(topology, weights, thresholds, spikes, input_mode="stimulus")
    for g, g2 in zip(got, got2):
        np.testing.assert_array_equal(g, g2)


def test_trainer_equals_brian2_under_reset_by_subtraction():
    """reset = "subtract": the batched trainer (both backends) and Brian2 remove the same
    threshold and give the same spikes in every layer, which differ from reset to zero."""
    from models.batched import LayerParams, forward

    topology = "8x8-2C5-2P-3FC"
    rng = np.random.default_rng(3)
    layers = parse_topology(topology)
    # moderate drive: membranes cross their thresholds by a fraction, so the excess matters
    weights = {1: rng.uniform(-0.2, 0.3, (2, 1, 5, 5)),
               3: rng.uniform(-0.2, 0.8, (3, layers[3].fan_in))}
    thresholds = {1: rng.uniform(1.0, 1.6, 2), 3: rng.uniform(0.5, 1.0, 3)}
    params = [LayerParams(weights[i], thresholds[i]) if i in weights else None
              for i in range(len(layers))]
    spikes = rng.random((30, 1, *layers[0].shape)) < 0.3
    lif = LIFParameters(reset="subtract")
    want = brian2_layer_spikes(topology, weights, thresholds, spikes[:, 0], lif=lif)
    assert all(w.any() for w in want), "every layer must fire for the test to mean anything"
    zero = forward(layers, params, spikes, LIFParameters(), dtype=np.float64, backend="xp")
    for backend in ("xp", "auto"):
        got = forward(layers, params, spikes, lif, dtype=np.float64, backend=backend)
        for index in range(1, len(layers)):
            np.testing.assert_array_equal(got.spikes[index][:, 0].reshape(want[index].shape),
                                          want[index], err_msg=f"{backend}, layer {index}")
    assert all(got.count[i].sum() != zero.count[i].sum() for i in range(1, len(layers)))


def test_unknown_device_is_a_clear_error():
    with pytest.raises(DeviceError, match="unknown device 'gpu'.*runtime, cpp_standalone"):
        use_device("gpu")


def test_missing_backend_package_is_a_clear_error():
    try:
        import brian2genn  # noqa: F401
    except ImportError:
        with pytest.raises(DeviceError, match="brian2genn"):
            use_device("genn")
    else:  # pragma: no cover - only in the GeNN environment
        pytest.skip("brian2genn is installed here")


@pytest.mark.parametrize("topology, message", [
    ("28x28-36C5-2P", "must end with a fully-connected"),
    ("4x4-2C5-3FC", "larger than its input"),
    ("28x28-36X5-10FC", "not a layer"),
])
def test_bad_topology_is_a_clear_error(topology, message):
    with pytest.raises(TopologyError, match=message):
        build_network(topology, input_spikes=np.zeros((2, 1, 28, 28), bool))


def test_wrong_shapes_and_units_are_clear_errors():
    k = np.zeros((2, 1, 3, 3))
    spikes = np.zeros((3, 1, 6, 6), bool)
    with pytest.raises(ValueError, match=r"kernels must have shape \(2, 1, 3, 3\)"):
        build_network("6x6-2C3-1FC", {1: np.zeros((2, 3, 3))}, {1: 1.0}, input_spikes=spikes,
                      up_to=1)
    with pytest.raises(NetworkError, match="needs weights"):
        build_network("6x6-2C3-1FC", {}, {1: 1.0}, input_spikes=spikes, up_to=1)
    with pytest.raises(NetworkError, match=r"thresholds must be a scalar or \(2,\)"):
        build_network("6x6-2C3-1FC", {1: k}, {1: [1.0, 2.0, 3.0]}, input_spikes=spikes, up_to=1)
    with pytest.raises(NetworkError, match=r"input_spikes must have shape \(T, 1, 6, 6\)"):
        build_network("6x6-2C3-1FC", {1: k}, {1: 1.0}, input_spikes=np.zeros((3, 1, 5, 5)),
                      up_to=1)
    with pytest.raises(ValueError, match=r"weights must have shape \(1, 32\)"):
        build_network("6x6-2C3-1FC", {1: k, 2: np.zeros((1, 3))}, {1: 1.0, 2: 1.0},
                      input_spikes=spikes)
    with pytest.raises(NetworkError, match="plastic_layer = 2 is not a conv layer"):
        build_network("6x6-2C3-1FC", {1: k, 2: np.zeros((1, 32))}, {1: 1.0, 2: 1.0},
                      input_mode="stimulus", stimulus_steps=3, plastic_layer=2)
    with pytest.raises(ParameterError, match="presentation needs a time unit"):
        build_network("6x6-2C3-1FC", {1: k}, {1: 1.0}, input_spikes=spikes, up_to=1,
                      presentation=25)
    with pytest.raises(ParameterError, match="tau_pre"):
        STDPParameters(tau_pre=10 * ms * ms / ms / ms)
