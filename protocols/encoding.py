"""Rate coding of images as Poisson (Bernoulli-per-step) spike trains.

In each step of length dt, input unit i spikes with probability

    p_i = intensity_i × max_rate × dt,      intensity_i = pixel_i / 255 ∈ [0, 1]

independently of every other unit and step [paper: "probability of spike generation
proportional to pixel intensity"]. Spike arrays are time-major, ``(T, batch, *image_shape)``,
so that one step of a whole batch is one contiguous slice.

Two generators draw the Bernoulli trials (``TrainingSettings.input_rng``):

- ``poisson_spikes``: NumPy's PCG64 on the host, from a ``numpy.random.Generator``;
- ``poisson_spikes_counter``: SplitMix64 as a counter-based generator, uniform number k of a
  draw being ``mix(key + (k + 1)·γ)`` (Steele, Lea & Flood 2014; ``mix`` its 64-bit finaliser).
  Nothing carries state from one number to the next, so the whole draw is a few element-wise
  integer operations in the array module of the caller: on a GPU the spikes are drawn where
  the network runs, and NumPy and CuPy give the same bits.
"""

from __future__ import annotations

import numpy as np
from brian2 import Hz, Quantity, ms
from brian2.units.fundamentalunits import DimensionMismatchError, fail_for_dimension_mismatch

from models.parameters import InputParameters, LIFParameters


def _as_quantity(value, unit, name: str) -> float:
    """The value of a Brian2 quantity in ``unit``, with a clear error for a wrong unit."""
    if not isinstance(value, Quantity):
        raise TypeError(f"{name} needs a Brian2 unit, e.g. {1 * unit!r}; got {value!r}")
    try:
        fail_for_dimension_mismatch(value, unit)
    except DimensionMismatchError:
        raise TypeError(f"{name} = {value!r} has the wrong unit; give it in {unit!r}") from None
    return float(value / unit)


def intensities(images: np.ndarray) -> np.ndarray:
    """uint8 pixels (0..255) to float32 intensities in [0, 1]; float input must already be there."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images.astype(np.float32) / np.float32(255.0)
    out = images.astype(np.float32, copy=False)
    if out.size and (out.min() < 0 or out.max() > 1):
        raise ValueError("float images must hold intensities in [0, 1]; pass uint8 pixels instead")
    return out


def n_steps(duration: Quantity, dt: Quantity = LIFParameters().dt) -> int:
    """Number of whole steps of ``dt`` in ``duration`` (both with time units)."""
    steps = _as_quantity(duration, ms, "duration") / _as_quantity(dt, ms, "dt")
    if steps < 1 or abs(steps - round(steps)) > 1e-9:
        raise ValueError(f"duration {duration!r} must be a positive whole number of steps of {dt!r}")
    return int(round(steps))


def poisson_spikes(
    images: np.ndarray,
    duration: Quantity,
    rng: np.random.Generator,
    max_rate: Quantity = InputParameters().max_rate,
    dt: Quantity = LIFParameters().dt,
) -> np.ndarray:
    """Draw Bernoulli-per-step spike trains for a batch of images.

    Parameters
    ----------
    images
        ``(batch, *shape)`` uint8 pixels or float intensities in [0, 1].
    duration, dt, max_rate
        Presentation length and step (time units), maximum rate (Hz).
    rng
        The only source of randomness: same generator state, same spikes.

    Returns
    -------
    bool array ``(T, batch, *shape)`` with ``T = duration / dt``.
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError("rng must be a numpy.random.Generator, e.g. np.random.default_rng(seed)")
    steps = n_steps(duration, dt)
    p_max = _as_quantity(max_rate, Hz, "max_rate") * _as_quantity(dt, ms, "dt") * 1e-3
    if not 0 <= p_max <= 1:
        raise ValueError(
            f"max_rate × dt = {p_max:g} is not a probability; max_rate must be at most 1/dt"
        )
    p = intensities(images) * np.float32(p_max)
    draws = rng.random((steps, *p.shape), dtype=np.float32)
    return draws < p


#: SplitMix64's increment γ (the golden ratio in 64 bits) and its finaliser's multipliers
SPLITMIX_GAMMA = 0x9E3779B97F4A7C15
SPLITMIX_M1 = 0xBF58476D1CE4E5B9
SPLITMIX_M2 = 0x94D049BB133111EB


def splitmix64(key: int, n: int, xp=np):
    """Outputs 1..n of SplitMix64 seeded with ``key`` (a uint64 array of length n, in ``xp``):
    ``z = key + k·γ; z = (z ^ z>>30)·M1; z = (z ^ z>>27)·M2; z ^ z>>31`` for k = 1..n, all
    modulo 2^64. Seeded with 1234567 its first output is 6457827717110365317, as the reference
    generator's."""
    u64 = xp.uint64
    z = xp.arange(1, n + 1, dtype=u64)
    z *= u64(SPLITMIX_GAMMA)
    z += u64(int(key) % 2**64)
    z ^= z >> u64(30)
    z *= u64(SPLITMIX_M1)
    z ^= z >> u64(27)
    z *= u64(SPLITMIX_M2)
    z ^= z >> u64(31)
    return z


def counter_key(*key: int) -> int:
    """The 64-bit SplitMix64 seed of a draw, derived from integer keys such as
    ``(seed, 2, iteration)`` by NumPy's SeedSequence (as the PCG64 draws are)."""
    return int(np.random.SeedSequence(list(key)).generate_state(1, np.uint64)[0])


def poisson_spikes_counter(
    images,
    duration: Quantity,
    key: int,
    max_rate: Quantity = InputParameters().max_rate,
    dt: Quantity = LIFParameters().dt,
    xp=np,
):
    """``poisson_spikes`` with the counter-based SplitMix64 draw, computed in ``xp``.

    ``images``: ``(batch, *shape)`` uint8 pixels (NumPy or ``xp``); ``key``: the draw's 64-bit
    seed (``counter_key``). The uniform number of trial k (in C order over ``(T, batch,
    *shape)``) is the top 24 bits of SplitMix64 output k + 1, times 2^-24: exactly representable
    in float32, so the comparison with p gives the same spikes on every device. Returns a bool
    ``xp`` array ``(T, batch, *shape)``.
    """
    steps = n_steps(duration, dt)
    p_max = _as_quantity(max_rate, Hz, "max_rate") * _as_quantity(dt, ms, "dt") * 1e-3
    if not 0 <= p_max <= 1:
        raise ValueError(
            f"max_rate × dt = {p_max:g} is not a probability; max_rate must be at most 1/dt"
        )
    pixels = xp.asarray(images)
    if pixels.dtype != np.uint8:
        raise TypeError("poisson_spikes_counter takes uint8 pixels (0..255)")
    p = pixels.astype(np.float32) / np.float32(255.0) * np.float32(p_max)
    shape = (steps, *p.shape)
    bits = splitmix64(key, int(np.prod(shape)), xp) >> xp.uint64(40)
    uniform = bits.astype(np.float32).reshape(shape)
    uniform *= np.float32(2.0 ** -24)
    return uniform < p
