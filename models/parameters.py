"""Parameter sets of the study: the one source of truth for the Brian2 models and the trainer.

Every value is marked as in ``SPEC.md``: **[paper]** stated by Lee et al. (2018), **[recon]**
reconstructed from the paper's words, **[choice]** picked by this project, with the reason next
to it. Times and rates carry Brian2 units; membrane potentials, weights and thresholds are
dimensionless (in units of one synaptic weight), as in the paper's discrete model.

Override any value with :func:`dataclasses.replace`, e.g.
``replace(LIFParameters(), tau_m=50 * ms)``; a value with the wrong unit raises
:class:`ParameterError` at construction.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields

from brian2 import Hz, Quantity, ms
from brian2.units.fundamentalunits import DimensionMismatchError, fail_for_dimension_mismatch


class ParameterError(ValueError):
    """A parameter with the wrong unit, type or range."""


def unit_default(value: Quantity):
    """A dataclass field defaulting to a Brian2 quantity (quantities are unhashable arrays)."""
    return field(default_factory=lambda: value)


def _check(obj) -> None:
    """Check every field against the unit or type its default carries."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        default = f.default if f.default is not MISSING else f.default_factory()
        where = f"{type(obj).__name__}.{f.name}"
        if isinstance(default, Quantity):
            try:
                fail_for_dimension_mismatch(value, default)
            except DimensionMismatchError:
                raise ParameterError(
                    f"{where} = {value!r} has the wrong unit; give it in units like {default!r}"
                ) from None
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise ParameterError(f"{where} must be True or False, got {value!r}")
        elif isinstance(default, (int, float)):
            if isinstance(value, Quantity) and not value.is_dimensionless:
                raise ParameterError(f"{where} is dimensionless, got {value!r}")
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ParameterError(f"{where} must be a number, got {value!r}")
        elif isinstance(default, str) and not isinstance(value, str):
            raise ParameterError(f"{where} must be a string, got {value!r}")


def _check_choice(obj, name: str, allowed: tuple[str, ...]) -> None:
    value = getattr(obj, name)
    if value not in allowed:
        raise ParameterError(
            f"{type(obj).__name__}.{name} = {value!r} is not one of {', '.join(allowed)}"
        )


@dataclass(frozen=True)
class LIFParameters:
    r"""Leaky integrate-and-fire membrane of every trainable layer (SPEC §2).

    .. math::
        \tau_m \frac{dV}{dt} = -V + \sum_i w_i \sum_k \delta(t - t_k^i)

    discrete with step dt: :math:`V[t] = e^{-dt/\tau_m} V[t-1] + \sum_i w_i s_i[t]`;
    a spike when :math:`V[t] \ge v_{th}`, then reset.
    """

    #: [paper] simulation step
    dt: Quantity = unit_default(1 * ms)
    #: [choice] 20 ms: the textbook cortical membrane constant of the paper's LIF reference
    #: (Dayan & Abbott 2001); 20 steps of memory integrate a rate code within a 25-100 ms window.
    tau_m: Quantity = unit_default(20 * ms)
    #: [recon] "zero" (reset to 0, the default) or "subtract" (reset by subtracting v_th)
    reset: str = "zero"

    def __post_init__(self):
        _check(self)
        _check_choice(self, "reset", ("zero", "subtract"))
        if self.dt <= 0 * ms or self.tau_m <= 0 * ms:
            raise ParameterError("LIFParameters: dt and tau_m must be positive")

    @property
    def decay(self) -> float:
        """Membrane decay per step, :math:`e^{-dt/\\tau_m}`."""
        import math

        return math.exp(-float(self.dt / self.tau_m))


@dataclass(frozen=True)
class PoolingParameters:
    """Fixed spatial pooling (SPEC §1): a k×k window of weights 0.25 fires above 0.8 [paper].

    The pooling unit is the same LIF membrane as the trainable layers (leak tau_m, reset) [recon]:
    the paper calls every layer's unit a spiking neuron and gives no separate pooling dynamics.
    """

    #: [paper] weight of each synapse of the 2×2 window
    weight: float = 0.25
    #: [paper] "fires ... if the summed spikes of the 4 input pixels ... exceeds a threshold of 0.8"
    v_th: float = 0.8

    def __post_init__(self):
        _check(self)


@dataclass(frozen=True)
class InputParameters:
    """Poisson (Bernoulli per step) input: P(spike in a step) = intensity × max_rate × dt [paper]."""

    #: [choice] 1000 Hz: with dt = 1 ms the spike probability per step equals the pixel
    #: intensity, the plainest reading of "probability proportional to pixel intensity" and the
    #: most input spikes (information) per presentation.
    max_rate: Quantity = unit_default(1000 * Hz)

    def __post_init__(self):
        _check(self)
        if self.max_rate < 0 * Hz:
            raise ParameterError("InputParameters.max_rate must be non-negative")
