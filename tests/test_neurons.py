"""LIF membrane and feature-map-wise homeostasis of the Brian2 models (runtime device)."""

import math

import numpy as np
import pytest
from brian2 import ms

from models.network import build_network, brian2_layer_spikes
from models.parameters import (HomeostasisParameters, LIFParameters, ParameterError,
                               STDPParameters)


def test_lif_membrane_follows_discrete_recurrence_and_resets():
    """V[t] = d V[t-1] + I[t]; spike at V >= v_th, reset to 0 (one unit, one input)."""
    lif = LIFParameters()
    d = lif.decay
    w, v_th = 0.4, 1.0
    spikes = np.zeros((12, 1, 1, 1), bool)
    spikes[[1, 2, 3, 6, 7, 8, 9], 0, 0, 0] = True
    out = brian2_layer_spikes("1x1-1FC", {1: np.array([[w]])}, {1: v_th}, spikes)[1][:, 0, 0, 0]
    v, expected = 0.0, []
    for t in range(12):
        v = d * v + w * spikes[t, 0, 0, 0]
        expected.append(v >= v_th)
        if v >= v_th:
            v = 0.0
    assert out.tolist() == expected
    assert out.sum() >= 1  # the crafted train makes it fire


def test_reset_by_subtraction_option():
    lif = LIFParameters(reset="subtract")
    spikes = np.ones((6, 1, 1, 1), bool)
    out = brian2_layer_spikes("1x1-1FC", {1: np.array([[0.7]])}, {1: 1.0}, spikes,
                              lif=lif)[1][:, 0, 0, 0]
    v, expected = 0.0, []
    for t in range(6):
        v = lif.decay * v + 0.7
        expected.append(v >= 1.0)
        if v >= 1.0:
            v -= 1.0
    assert out.tolist() == expected


def _homeostatic_unit(w, v_th, d, d_theta, delta_theta, steps, subtract):
    """One LIF unit with its own homeostatic offset, input w at every step (docs/method.md §2-3):
    returns its spikes when a spike subtracts ``subtract(tested, raised)``."""
    v = theta = 0.0
    out = []
    for _ in range(steps):
        v = d * v + w
        theta = d_theta * theta
        tested = v_th + theta
        fired = v >= tested
        if fired:
            v -= subtract(tested, tested + delta_theta)
            theta += delta_theta
        out.append(fired)
    return out


def test_reset_by_subtraction_under_homeostasis_removes_the_tested_threshold():
    """A plastic unit with homeostasis: a spike subtracts v_th + theta as tested, before this
    step's increment of theta (LIFParameters.reset). The input w = 0.7 at every step makes the
    three readings give three different spike trains, so only the tested threshold passes."""
    lif = LIFParameters(reset="subtract")
    homeo = HomeostasisParameters(delta_theta=0.3, tau_theta=7 * ms)
    steps, w, v_th = 30, 0.7, 1.0
    sn = build_network("1x1-1C1-1FC", {1: np.full((1, 1, 1, 1), w)}, {1: v_th},
                       input_mode="stimulus", stimulus_steps=steps, plastic_layer=1, up_to=1,
                       lif=lif, stdp=STDPParameters(eta=0.0), homeostasis=homeo)
    sn.stimulus.values[:] = 1.0
    sn.net.run(steps * ms)
    got = sn.spike_arrays(steps)[1][:, 0, 0, 0].tolist()
    args = (w, v_th, lif.decay, math.exp(-1 / 7), 0.3, steps)
    tested = _homeostatic_unit(*args, lambda tested, raised: tested)
    raised = _homeostatic_unit(*args, lambda tested, raised: raised)
    base = _homeostatic_unit(*args, lambda tested, raised: v_th)
    assert sum(tested) == 12 and len({tuple(tested), tuple(raised), tuple(base)}) == 3
    assert got == tested
    assert sn.kernel_array(1)[0, 0, 0, 0] == w  # eta = 0: the drive stayed w


def test_map_threshold_rises_on_spike_in_that_map_only_and_decays_exponentially():
    """Map 0 fires once at step 3 (two positions of the map can't fire: 1 position per map)."""
    homeo = HomeostasisParameters(delta_theta=0.3, tau_theta=7 * ms)
    # 2x1 input, 2 maps of 1x1 kernels -> each map has 2 positions
    kernels = np.array([[[[1.0]]], [[[0.2]]]])  # map 0 strong, map 1 weak (never fires)
    steps = 12
    sn = build_network("2x1-2C1-1FC", {1: kernels}, {1: 0.9}, input_mode="stimulus",
                       stimulus_steps=steps, plastic_layer=1, up_to=1,
                       homeostasis=homeo)
    sn.stimulus.values[3, 0] = 1.0  # input unit 0 (position 0) spikes at step 3
    sn.net.run(steps * ms)
    spikes = sn.spike_arrays(steps)[1]
    assert spikes.sum() == 1 and spikes[3, 0, 0, 0]
    theta = sn.theta_array()
    expected = 0.3 * math.exp(-(steps - 1 - 3) / 7.0)
    assert theta[0] == pytest.approx(expected, rel=1e-12)
    assert theta[1] == 0.0
    # every unit of map 0 reads the raised threshold, no unit of map 1 does
    assert np.allclose(sn.groups[1].theta[:], [theta[0], theta[0], 0.0, 0.0])


def test_theta_raises_threshold_and_blocks_a_second_spike():
    """After a spike of map 0 at position 0, the same drive at position 1 no longer fires."""
    homeo = HomeostasisParameters(delta_theta=0.5, tau_theta=1000 * ms)
    kernels = np.array([[[[1.0]]]])
    sn = build_network("2x1-1C1-1FC", {1: kernels}, {1: 0.9}, input_mode="stimulus",
                       stimulus_steps=10, plastic_layer=1, up_to=1, homeostasis=homeo)
    sn.stimulus.values[2, 0] = 1.0
    sn.stimulus.values[6, 1] = 1.0
    sn.net.run(10 * ms)
    spikes = sn.spike_arrays(10)[1][:, 0, :, 0]
    assert spikes[2, 0] and not spikes[6, 1] and spikes.sum() == 1


def test_parameters_reject_wrong_units_and_values():
    with pytest.raises(ParameterError, match="tau_theta"):
        HomeostasisParameters(tau_theta=5.0)
    with pytest.raises(ParameterError, match="delta_theta"):
        HomeostasisParameters(delta_theta=1 * ms)
    from models.parameters import STDPParameters
    with pytest.raises(ParameterError, match="tau_pre"):
        STDPParameters(tau_pre=10)
    with pytest.raises(ParameterError, match="w_min"):
        STDPParameters(w_min=1.0, w_max=0.5)
    with pytest.raises(ParameterError, match="averaging"):
        STDPParameters(averaging="median")
