"""Rescaling pre-trained conv layers (InitParameters.pretrained_scale = "init_rms") changes the
scale of the kernels and thresholds, never a spike: checked by simulating both networks."""

import dataclasses
import math

import numpy as np
import pytest
from brian2 import ms

from models.batched import forward
from models.initialisation import init_range
from models.parameters import InitParameters, ParameterError
from models.topology import parse_topology
from protocols.encoding import poisson_spikes
from protocols.study import StudyConfig, initial_parameters

TOPOLOGY = "16x16-6C5-2P-8C3-10FC"  # two conv layers, so both are rescaled


def _pretrained(layers, rng):
    """STDP-like kernels: near the bound ±1, thresholds at their own scale."""
    out = {}
    for name, layer in (("conv1", layers[1]), ("conv2", layers[3])):
        shape = (layer.n_maps, layer.in_shape[0], layer.kernel, layer.kernel)
        out[f"{name}_kernels"] = np.clip(rng.normal(0.3, 0.8, shape), -1, 1).astype(np.float32)
        out[f"{name}_thresholds"] = rng.uniform(2.0, 6.0, layer.n_maps).astype(np.float32)
    return out


def test_init_rms_rescales_kernels_and_thresholds_and_keeps_every_spike():
    layers = parse_topology(TOPOLOGY)
    pre = _pretrained(layers, np.random.default_rng(3))
    base = StudyConfig(topology=TOPOLOGY, arm="pretrained", seed=2)
    scaled_cfg = dataclasses.replace(
        base, initialisation=InitParameters(pretrained_scale="init_rms"))
    as_trained = initial_parameters(base, pre, np.float64)
    scaled = initial_parameters(scaled_cfg, pre, np.float64)
    for i in (1, 3):
        target = init_range(layers[i], "lee") / math.sqrt(3.0)
        assert np.sqrt(np.mean(scaled[i].weights ** 2)) == pytest.approx(target, rel=1e-12)
        factor = scaled[i].weights / as_trained[i].weights
        assert np.allclose(factor, factor.flat[0], rtol=1e-12)  # one factor per layer ...
        assert np.allclose(scaled[i].thresholds / as_trained[i].thresholds, factor.flat[0],
                           rtol=1e-12)  # ... on kernels and thresholds alike
        assert abs(factor.flat[0] - 1) > 0.5  # the test data are far from the init scale
    np.testing.assert_array_equal(scaled[-1].weights, as_trained[-1].weights)  # FC untouched

    images = np.random.default_rng(0).integers(0, 256, (8, 16, 16), dtype=np.uint8)
    x = poisson_spikes(images, 40 * ms, np.random.default_rng(1))
    runs = [forward(layers, p, x, dtype=np.float64, tau_p=20.0) for p in (as_trained, scaled)]
    for a, b in zip(runs[0].spikes[1:], runs[1].spikes[1:]):
        np.testing.assert_array_equal(a, b)
    assert runs[0].count[1].sum() > 0 and runs[0].count[3].sum() > 0  # both conv layers fire


def test_default_keeps_the_pretrained_values_bit_for_bit():
    layers = parse_topology(TOPOLOGY)
    pre = _pretrained(layers, np.random.default_rng(4))
    params = initial_parameters(StudyConfig(topology=TOPOLOGY, arm="pretrained"), pre)
    np.testing.assert_array_equal(params[1].weights, pre["conv1_kernels"])
    np.testing.assert_array_equal(params[3].thresholds, pre["conv2_thresholds"])


def test_unknown_scale_is_refused():
    with pytest.raises(ParameterError, match="pretrained_scale"):
        InitParameters(pretrained_scale="unit")
