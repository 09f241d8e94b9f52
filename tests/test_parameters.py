"""Parameter sets reject wrong units and types with a message that names the field."""

import math
from dataclasses import replace

import pytest
from brian2 import Hz, mV, ms

from models.parameters import InputParameters, LIFParameters, ParameterError, PoolingParameters


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
    assert InputParameters(max_rate=0.5 * 1000 * Hz).max_rate == 500 * Hz
