"""Parameter sets reject wrong units and types with a message that names the field."""

import math
from dataclasses import replace

import numpy as np
import pytest
from brian2 import kHz, mV, ms, second, usecond

from models.parameters import InputParameters, LIFParameters, ParameterError, PoolingParameters
from protocols.encoding import poisson_spikes


def test_defaults_and_decay():
    lif = LIFParameters()
    assert lif.decay == pytest.approx(math.exp(-1 / 20))
    assert replace(lif, tau_m=50 * ms).decay == pytest.approx(math.exp(-1 / 50))
    assert PoolingParameters().weight == 0.25 and PoolingParameters().v_th == 0.8


@pytest.mark.parametrize("make, message", [
    (lambda: LIFParameters(tau_m=20 * mV), "LIFParameters.tau_m .* wrong unit"),
    (lambda: LIFParameters(tau_m=20), "LIFParameters.tau_m .* wrong unit"),
    (lambda: LIFParameters(reset="hold"), "reset = 'hold' is not one of zero, subtract"),
    (lambda: LIFParameters(tau_m=-1 * ms), "must be positive"),
    (lambda: InputParameters(max_rate=5 * ms), "InputParameters.max_rate .* wrong unit"),
    (lambda: PoolingParameters(v_th="0.8"), "PoolingParameters.v_th must be a number"),
])
def test_bad_values_are_named(make, message):
    with pytest.raises(ParameterError, match=message):
        make()


def test_units_are_converted_not_just_checked():
    """Values in other units than their defaults' act as those values where the code uses them:
    the membrane decay per step and the input's spike probability per step, max_rate × dt."""
    lif = LIFParameters(dt=500 * usecond, tau_m=0.02 * second)
    assert lif.decay == pytest.approx(math.exp(-0.5 / 20), rel=1e-12)
    full = np.full((200, 4, 4), 255, dtype=np.uint8)
    rng = np.random.default_rng(0)
    # 2 kHz × 0.5 ms = 1: every step spikes; 0.5 kHz × 0.5 ms = 0.25
    always = poisson_spikes(full, 10 * ms, rng,
                            max_rate=InputParameters(max_rate=2 * kHz).max_rate, dt=lif.dt)
    assert always.shape == (20, 200, 4, 4) and always.all()
    quarter = poisson_spikes(full, 10 * ms, rng,
                             max_rate=InputParameters(max_rate=0.5 * kHz).max_rate, dt=lif.dt)
    assert abs(quarter.mean() - 0.25) < 0.006  # 64,000 Bernoulli(0.25) draws: std 0.0017
