"""Rate coding of images as Poisson (Bernoulli-per-step) spike trains.

In each step of length dt, input unit i spikes with probability

    p_i = intensity_i × max_rate × dt,      intensity_i = pixel_i / 255 ∈ [0, 1]

independently of every other unit and step [paper: "probability of spike generation
proportional to pixel intensity"]. Spike arrays are time-major, ``(T, batch, *image_shape)``,
so that one step of a whole batch is one contiguous slice.
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
