"""The WTA clustering network (models/wta.py) against analytic expectations, and the compiled
twin against Brian2 (the model of record) spike for spike."""

import math

import numpy as np
import pytest
from brian2 import Hz, ms

from models.parameters import ParameterError
from models.wta import (WTAParameters, brian2_wta_run, encode, expected_drive, gain_for_drive,
                        initial_weights, normalise, run_wta, winners)

#: no learning, no threshold adaptation: the membrane alone
FROZEN = dict(eta=0.0, delta_theta=0.0, normalise=False, presentation=20 * ms)


def _tonic(n_input: int, steps: int, active) -> np.ndarray:
    """One image whose ``active`` inputs spike in every step."""
    spikes = np.zeros((1, steps, n_input), dtype=bool)
    spikes[0, :, list(active)] = True
    return spikes


def first_crossing(w: float, decay: float, v_th: float) -> int:
    """Step index of the first spike of a LIF fed ``w`` every step: v[n] = w Σ_{m<=n} d^m."""
    v, n = 0.0, 0
    while True:
        v = v * decay + w
        if v >= v_th:
            return n
        n += 1


@pytest.mark.parametrize("compiled", [True, False])
def test_single_neuron_fires_when_the_analytic_membrane_crosses_threshold(compiled):
    p = WTAParameters(n_neurons=2, w_inh=0.0, **FROZEN)
    w = np.array([[0.3, 0.0]])
    res = run_wta(_tonic(1, p.steps, [0]), w, np.zeros(2), p, learn=False, compiled=compiled)
    decay = math.exp(-1 / 100)
    n1 = first_crossing(0.3, decay, 1.0)
    assert n1 == 3  # 0.3 (1 + d + d^2 + d^3) = 1.18 >= 1; three steps give 0.89
    assert res.first_spike[0, 0] == n1
    # after a reset to 0 the same climb repeats: a spike every n1 + 1 steps
    assert res.counts[0, 0] == p.steps // (n1 + 1)
    assert res.counts[0, 1] == 0 and res.first_spike[0, 1] == -1


def test_adaptive_threshold_rises_by_delta_per_spike_and_decays():
    p = WTAParameters(n_neurons=2, w_inh=0.0, eta=0.0, delta_theta=0.1, normalise=False,
                      tau_theta=50 * ms, presentation=20 * ms)
    w = np.array([[0.6, 0.0]])
    res = run_wta(_tonic(1, p.steps, [0]), w, np.zeros(2), p, learn=True)
    # replay the analytic recursion: theta decays every step, +0.1 at each spike
    d_m, d_th = math.exp(-1 / 100), math.exp(-1 / 50)
    v = theta = 0.0
    spikes = 0
    for _ in range(p.steps):
        v, theta = v * d_m + 0.6, theta * d_th
        if v >= 1.0 + theta:
            v, theta, spikes = 0.0, theta + 0.1, spikes + 1
    assert res.counts[0, 0] == spikes > 2
    assert res.theta[0] == pytest.approx(theta, rel=1e-12)
    assert res.theta[1] == 0.0


@pytest.mark.parametrize("inhibition", ["direct", "population"])
def test_inhibition_silences_the_loser(inhibition):
    # neuron 0 gets 0.55 per step, neuron 1 gets 0.45: alone, both would fire
    w = np.array([[0.55, 0.45]])
    spikes = _tonic(1, 20, [0])
    free = run_wta(spikes, w, np.zeros(2), WTAParameters(
        n_neurons=2, w_inh=0.0, w_ie=0.0, inhibition=inhibition, **FROZEN), learn=False)
    assert free.counts[0, 0] > 0 and free.counts[0, 1] > 0
    p = WTAParameters(n_neurons=2, inhibition=inhibition, **FROZEN)
    res = run_wta(spikes, w, np.zeros(2), p, learn=False)
    assert res.counts[0, 0] == free.counts[0, 0]
    if inhibition == "direct":
        # the winner fires first (step 1: 0.55 (1 + d) = 1.09 >= 1) and knocks the loser back
        # by w_inh = 20
        assert res.first_spike[0, 0] == 1
        assert res.counts[0, 1] == 0
    else:
        # the inhibitory partner fires one step later, so the loser is pushed down from step 2
        # on; it had 0.45 (1 + d) = 0.895 < 1 at step 1, so it never fires either
        assert res.counts[0, 1] == 0
    assert winners(res.counts)[0] == 0


def test_population_inhibition_acts_one_step_late():
    # equal drives: both cross at step 1 together; direct inhibition arrives after both tested,
    # population inhibition one step later: each neuron fires the same at step 1
    w = np.array([[0.55, 0.55]])
    spikes = _tonic(1, 20, [0])
    for inh in ("direct", "population"):
        res = run_wta(spikes, w, np.zeros(2), WTAParameters(n_neurons=2, inhibition=inh, **FROZEN),
                      learn=False)
        assert list(res.first_spike[0]) == [1, 1]


@pytest.mark.parametrize("rule", ["dc", "soft_bound"])
def test_stdp_update_equals_its_formula_at_one_post_spike(rule):
    # inputs: 0 spikes at steps 0 and 1 (trace 1 at the post spike), 1 at step 0 only
    # (trace e^{-1/20}), 2 never (trace 0). One neuron driven to fire at step 1 only.
    p = WTAParameters(n_neurons=2, w_inh=10.0, delta_theta=10.0, normalise=False, eta=0.05,
                      x_tar=0.4, presentation=3 * ms, stdp_rule=rule)
    spikes = np.zeros((1, 3, 3), dtype=bool)
    spikes[0, 0, [0, 1]] = True
    spikes[0, 1, 0] = True
    w = np.array([[0.45, 0.0], [0.2, 0.0], [0.7, 0.0]])
    res = run_wta(spikes, w, np.zeros(2), p, learn=True)
    assert list(res.first_spike[0]) == [1, -1] and res.counts[0, 0] == 1
    x = np.array([1.0, math.exp(-1 / 20), 0.0])
    if rule == "dc":  # clipped at w_min = 0: input 2 would go to 0.7 - 0.05 * 0.4 * 0.3
        expected = np.clip(w[:, 0] + 0.05 * (x - 0.4) * (1.0 - w[:, 0]), 0.0, 1.0)
    else:
        expected = w[:, 0] + 0.05 * (x - 0.4) * (1.0 - w[:, 0]) * (w[:, 0] - 0.0)
    np.testing.assert_allclose(res.weights[:, 0], expected, rtol=1e-14)
    np.testing.assert_array_equal(res.weights[:, 1], 0.0)


def test_dc_rule_clips_at_the_bounds():
    p = WTAParameters(n_neurons=2, w_inh=10.0, delta_theta=10.0, normalise=False, eta=1.0,
                      x_tar=0.4, presentation=3 * ms)
    spikes = np.zeros((1, 3, 2), dtype=bool)
    spikes[0, :2, 0] = True
    res = run_wta(spikes, np.array([[0.9, 0.0], [0.3, 0.0]]), np.zeros(2), p)
    # input 1 silent: 0.3 + 1.0 * (0 - 0.4) * 0.7 = 0.02, then input-1 stays >= 0
    assert res.counts[0, 0] == 1
    np.testing.assert_allclose(res.weights[:, 0], [0.9 + 0.6 * 0.1, 0.3 - 0.4 * 0.7])


def test_normalisation_and_inputs():
    p = WTAParameters(n_neurons=3)
    w = initial_weights(50, p, np.random.default_rng(0))
    np.testing.assert_allclose(w.sum(axis=0), p.w_mean * 50)
    np.testing.assert_allclose(normalise(w * 3, p), w)
    s = encode(np.full((2, 50), 0.5), p, np.random.default_rng(1))
    assert s.shape == (2, p.steps, 50) and abs(s.mean() - 0.5 * 0.2) < 0.01
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        encode(np.full((1, 5), 2.0), p, np.random.default_rng(1))
    with pytest.raises(ParameterError, match="inhibition"):
        WTAParameters(inhibition="lateral")
    with pytest.raises(ValueError, match="weights must be"):
        run_wta(s, w[:10], np.zeros(3), p)


def test_winner_ties_and_silent_images_go_to_the_strongest_drive():
    counts = np.array([[0, 3, 3], [0, 0, 0], [1, 0, 0]])
    drive = np.array([[9.0, 1.0, 2.0], [0.1, 0.5, 0.2], [0.0, 5.0, 5.0]])
    assert list(winners(counts, drive)) == [2, 1, 0]
    assert list(winners(counts)) == [1, 0, 0]
    p = WTAParameters(n_neurons=2)
    d = expected_drive(np.ones((1, 2)), np.array([[0.1, 0.2], [0.1, 0.2]]), np.array([0.0, 1.0]), p)
    np.testing.assert_allclose(d, [[0.2 * 0.2 / 1.0, 0.2 * 0.4 / 2.0]])
    # the gain that makes a mean-weight neuron's expected input 0.05 per step
    g = gain_for_drive(np.full((3, 10), 0.5), 0.05, p)
    assert g * p.w_mean * 10 * 0.5 * 0.2 == pytest.approx(0.05)


def _brian2_case(inhibition: str):
    p = WTAParameters(n_neurons=4, inhibition=inhibition, presentation=30 * ms, max_rate=300 * Hz,
                      input_gain=0.7, w_inh=2.0, w_ie=2.0)
    rng = np.random.default_rng(5)
    x = rng.random((3, 40))
    return p, encode(x, p, rng), initial_weights(40, p, rng)


@pytest.mark.slow
@pytest.mark.parametrize("inhibition", ["direct", "population"])
def test_twin_equals_brian2_runtime_spike_for_spike(inhibition):
    p, spikes, w = _brian2_case(inhibition)
    theta = np.full(4, 0.1)
    ours = run_wta(spikes, w, theta, p, learn=True)
    ref = brian2_wta_run(spikes, w, theta, p, learn=True)
    assert ours.counts.sum() > 10 and (ours.counts > 0).sum() > 3
    np.testing.assert_array_equal(ours.counts, ref.counts)
    np.testing.assert_array_equal(ours.first_spike, ref.first_spike)
    np.testing.assert_allclose(ours.weights, ref.weights, rtol=0, atol=1e-12)
    np.testing.assert_allclose(ours.theta, ref.theta, rtol=0, atol=1e-12)
    frozen = brian2_wta_run(spikes, ours.weights, ours.theta, p, learn=False)
    np.testing.assert_array_equal(frozen.counts, run_wta(spikes, ours.weights, ours.theta, p,
                                                         learn=False).counts)


@pytest.mark.slow
@pytest.mark.standalone
def test_twin_equals_brian2_cpp_standalone_built_once_run_twice(tmp_path):
    from models.wta import WTAProgram

    p, spikes, w = _brian2_case("direct")
    prog = WTAProgram(40, 3, p, learn=True, device="cpp_standalone", directory=str(tmp_path))
    try:
        for seed in (0, 1):  # new inputs, same program: no rebuild
            sp = encode(np.random.default_rng(seed).random((3, 40)), p, np.random.default_rng(seed))
            ref = prog.run(sp, w, np.zeros(4))
            ours = run_wta(sp, w, np.zeros(4), p)
            np.testing.assert_array_equal(ours.counts, ref.counts)
            np.testing.assert_allclose(ours.weights, ref.weights, atol=1e-12)
    finally:
        from brian2 import device, set_device

        device.reinit()
        device.activate()
        set_device("runtime")
