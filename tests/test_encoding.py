"""The Poisson encoder: empirical rates, determinism, units."""

import numpy as np
import pytest
from brian2 import Hz, mV, ms

from protocols.encoding import (counter_key, n_steps, poisson_spikes, poisson_spikes_counter,
                                splitmix64)


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


# ----------------------------------------------------------------------------------------------
# The counter-based draw (SplitMix64)


def test_splitmix64_gives_the_reference_generators_outputs():
    """First five outputs of the reference SplitMix64 (Vigna's splitmix64.c) seeded with
    1234567, as published (e.g. Rosetta Code, "Pseudo-random numbers/Splitmix64")."""
    np.testing.assert_array_equal(
        splitmix64(1234567, 5),
        np.array([6457827717110365317, 3203168211198807973, 9817491932198370423,
                  4593380528125082431, 16408922859458223821], dtype=np.uint64))
    assert splitmix64(2**64 + 1234567, 1)[0] == np.uint64(6457827717110365317)  # modulo 2^64


def test_counter_draw_has_the_encoders_rates():
    images = np.array([[0, 64, 128, 255]], dtype=np.uint8)
    spikes = poisson_spikes_counter(images, 2000 * ms, counter_key(0, 2, 0), max_rate=200 * Hz)
    assert spikes.shape == (2000, 1, 4) and spikes.dtype == bool
    rate = spikes.mean(axis=0)[0] / (1 * ms)
    expected = images[0] / 255 * 200 * Hz
    assert np.all(np.abs(np.asarray(rate - expected)) < 4 * 9)  # binomial std <= 9 Hz
    assert spikes[:, 0, 0].sum() == 0
    full = poisson_spikes_counter(np.full((50, 28, 28), 255, np.uint8), 100 * ms,
                                  counter_key(0, 2, 1), max_rate=300 * Hz)
    assert abs(full.mean() - 0.3) < 0.003  # 3.9M Bernoulli(0.3) trials
    assert poisson_spikes_counter(np.full((1, 2, 2), 255, np.uint8), 10 * ms, 7,
                                  max_rate=1000 * Hz).all()


def test_counter_draw_trials_are_independent():
    """Neighbouring trials in time and in space are uncorrelated, and each unit's spike count
    over the presentation has the binomial variance T p (1 - p)."""
    images = np.full((40, 28, 28), 255, np.uint8)
    x = poisson_spikes_counter(images, 100 * ms, counter_key(3, 2, 9), max_rate=500 * Hz)
    x = x.astype(np.float64)
    for a, b in ((x[1:], x[:-1]), (x[:, :, 1:], x[:, :, :-1]), (x[:, 1:], x[:, :-1])):
        r = np.corrcoef(a.ravel(), b.ravel())[0, 1]
        assert abs(r) < 4 / np.sqrt(a.size), r
    counts = x.sum(axis=0).ravel()  # 31,360 units, Binomial(100, 0.5)
    assert abs(counts.var() / 25.0 - 1) < 0.05


def test_counter_draw_is_a_function_of_its_key():
    images = np.random.default_rng(5).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    a = poisson_spikes_counter(images, 25 * ms, counter_key(1, 2, 7))
    b = poisson_spikes_counter(images, 25 * ms, counter_key(1, 2, 7))
    np.testing.assert_array_equal(a, b)
    for other in (counter_key(1, 2, 8), counter_key(2, 2, 7), counter_key(1, 3, 7)):
        assert (a != poisson_spikes_counter(images, 25 * ms, other)).mean() > 0.2
    # the first trials of a draw are the leading ones of a longer draw (C order, time-major)
    longer = poisson_spikes_counter(images, 50 * ms, counter_key(1, 2, 7))
    np.testing.assert_array_equal(longer[:25], a)
    with pytest.raises(TypeError, match="uint8 pixels"):
        poisson_spikes_counter(images / 255.0, 25 * ms, 0)
    with pytest.raises(ValueError, match="not a probability"):
        poisson_spikes_counter(images, 25 * ms, 0, max_rate=2000 * Hz)
