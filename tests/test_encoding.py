"""The Poisson encoder: empirical rates, determinism, units."""

import numpy as np
import pytest
from brian2 import Hz, mV, ms

from protocols.encoding import n_steps, poisson_spikes


def test_empirical_rate_matches_intensity_times_rate():
    images = np.array([[0, 64, 128, 255]], dtype=np.uint8)
    spikes = poisson_spikes(images, 2000 * ms, np.random.default_rng(0), max_rate=200 * Hz)
    assert spikes.shape == (2000, 1, 4) and spikes.dtype == bool
    rate = spikes.mean(axis=0)[0] / (1 * ms)  # spikes per second
    expected = images[0] / 255 * 200 * Hz
    # binomial std of the rate estimate: sqrt(p(1-p)/T)/dt, p <= 0.2, T = 2000 -> <= 9 Hz
    assert np.all(np.abs(np.asarray(rate - expected)) < 4 * 9)
    assert spikes[:, 0, 0].sum() == 0  # black pixels never spike


def test_rate_over_many_units_is_tight():
    images = np.full((50, 28, 28), 255, dtype=np.uint8)
    spikes = poisson_spikes(images, 100 * ms, np.random.default_rng(1), max_rate=300 * Hz)
    assert spikes.shape == (100, 50, 28, 28)
    assert abs(spikes.mean() - 0.3) < 0.003  # 3.9M Bernoulli(0.3) draws


def test_same_seed_same_spikes_other_seed_other_spikes():
    images = np.random.default_rng(5).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    a = poisson_spikes(images, 25 * ms, np.random.default_rng(42))
    b = poisson_spikes(images, 25 * ms, np.random.default_rng(42))
    c = poisson_spikes(images, 25 * ms, np.random.default_rng(43))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


def test_full_intensity_at_max_rate_one_over_dt_always_spikes():
    spikes = poisson_spikes(np.full((1, 2, 2), 255, np.uint8), 10 * ms,
                            np.random.default_rng(0), max_rate=1000 * Hz)
    assert spikes.all()


def test_bad_input_is_explained():
    images = np.zeros((1, 4), np.uint8)
    rng = np.random.default_rng(0)
    with pytest.raises(TypeError, match="duration needs a Brian2 unit"):
        poisson_spikes(images, 25, rng)
    with pytest.raises(TypeError, match="max_rate .* wrong unit"):
        poisson_spikes(images, 25 * ms, rng, max_rate=5 * mV)
    with pytest.raises(ValueError, match="not a probability"):
        poisson_spikes(images, 25 * ms, rng, max_rate=2000 * Hz)
    with pytest.raises(TypeError, match="numpy.random.Generator"):
        poisson_spikes(images, 25 * ms, 0)
    with pytest.raises(ValueError, match="intensities in \\[0, 1\\]"):
        poisson_spikes(np.full((1, 4), 2.0), 25 * ms, rng)
    with pytest.raises(ValueError, match="whole number of steps"):
        n_steps(2.5 * ms)
