"""Parameter sets of the study: the one source of truth for the Brian2 models and the trainer.

Every value is marked as in ``docs/method.md``: **[paper]** stated by Lee et al. (2018), **[recon]**
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
    r"""Leaky integrate-and-fire membrane of every trainable layer (docs/method.md §2).

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
    #: [recon] "zero" (reset to 0, the default) or "subtract": V minus the threshold that was
    #: tested, v_th + theta with theta as it was before this step's homeostatic increment.
    #: [choice] that threshold, not v_th alone nor v_th + the raised theta: the unit gives up
    #: exactly the potential that made it fire (a rate-preserving reset, as in ANN-to-SNN
    #: conversion), and it is the one value every backend has at the test (the trainer's frozen
    #: thresholds; Brian2 raises theta in the ``end`` slot, after the reset; models/network.py).
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
    """Fixed spatial pooling (docs/method.md §1.3): a k×k window of weights 0.25 fires above 0.8 [paper].

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


@dataclass(frozen=True)
class STDPParameters:
    r"""Weight-dependent positive STDP of the conv kernels (docs/method.md §3.1-3.2) [paper + recon].

    At a post-synaptic spike, for every synapse of the firing unit

    .. math::
        \Delta w = \eta\,(x_{pre} - \chi)\,(w_{max} - w)\,(w - w_{min}),
        \qquad x_{pre} = e^{-(t - t_{pre})/\tau_{pre}}

    (the trace is reset to 1 at each pre-synaptic spike and decays with tau_pre [paper]), with
    :math:`\chi = \chi_{offset}` (``offset = "constant"``) or
    :math:`\chi = \lambda\,\langle x_{pre}\rangle` over the firing unit's C·k·k inputs
    (``"window_mean"``, :math:`\lambda` = ``window_scale``), per conv layer.
    Kernel entries are shared by all positions of a map; the updates of the positions of a map
    that fire in the same step are averaged [paper] (``averaging = "spiking"``) or, as a simpler
    variant, summed and divided by the number of positions of the map (``"all"``).
    """

    #: [choice] 10 ms: a pre-spike within ~5 steps of the post-spike potentiates for chi = 0.5
    #: (e^{-5/10} = 0.61 > 0.5); pixels silent for longer are depressed. Chosen in
    #: docs/pretraining.md (kernels become stroke detectors, not blobs).
    tau_pre: Quantity = unit_default(10 * ms)
    #: [choice] 0.002: larger rates (0.005-0.05) drive every weight to a bound within 300 images
    #: (binary half-plane kernels); 0.002 at 250 Hz input gives graded bar/stroke kernels
    #: (sweep in docs/pretraining.md).
    eta: float = 0.002
    #: [choice] 0.5: the midpoint of the trace's range, so that a recent (x > 0.5) pre-spike
    #: potentiates and an absent one depresses with comparable strength.
    chi_offset: float = 0.5
    #: [choice] -1: weights may be negative [paper]; symmetric bounds around 0 of the order of
    #: the Lee-initialised weights' scale (sqrt(3/25) = 0.35), so the soft bound acts early.
    w_min: float = -1.0
    #: [choice] +1: symmetric to w_min.
    w_max: float = 1.0
    #: [recon] "spiking": average over the positions of a map that fired in this step [paper];
    #: "all": divide the summed update by the number of positions (constant factor)
    averaging: str = "spiking"
    #: [recon] the offset subtracted from x_pre, one entry per conv layer (the last one serves
    #: every deeper layer): "constant" (chi_offset) or "window_mean" (lambda times the mean x_pre
    #: over the firing unit's C·k·k inputs at that spike, ``window_scale``). [choice]
    #: "window_mean" for every layer: with the constant offset the deep net's conv 2, fed sparse
    #: pooled spikes, learned itself silent (6-42 spikes per image, kernels 97-99 % negative), and
    #: conv 1 on Fashion-MNIST's dense images stayed dense and mostly positive, so its pre-trained
    #: arm lagged the supervised one (docs/pretraining.md, docs/finetuning.md). The constant
    #: offset, the paper's form and the default until 2026-11-30, is ("constant", "window_mean").
    offset: tuple[str, ...] = ("window_mean",)
    #: [recon] the factor lambda of a "window_mean" offset, chi = lambda <x_pre>, one entry per
    #: conv layer (the last serves deeper ones). 1: zero-sum updates per spike. lambda > 1 biases
    #: every spike's update toward depression by the same *fraction* of the window's activity on
    #: any input density, where a constant chi is depression-biased on sparse input and
    #: potentiation-biased on dense input (at conv 1's spikes <x_pre> is 0.27 on MNIST and 0.68
    #: on Fashion-MNIST: chi = 0.5 acts as lambda = 1.8 on one and 0.7 on the other).
    #: [choice] 1.8 for conv 1, 1 for deeper layers, measured on 3 seeds per dataset to 3,000
    #: iterations of fine-tuning (docs/finetuning.md, "The confirmation of lambda = 1.8"):
    #: Fashion-MNIST's pre-trained arm 13.72 ± 0.33 % over the last 1,000 iterations (constant
    #: offset 14.20 ± 0.43 %, lambda = 1 13.79 ± 0.02 %, supervised 13.64 ± 0.22 %); MNIST
    #: 1.91 ± 0.10 % (constant 1.83 ± 0.04 %, lambda = 1 2.12 ± 0.22 %). With it the deep net's
    #: conv 2 fires on both datasets (9,020 / 8,016 spikes per image) without saturating.
    window_scale: tuple[float, ...] = (1.8, 1.0)

    def __post_init__(self):
        _check(self)
        _check_choice(self, "averaging", ("spiking", "all"))
        if isinstance(self.offset, str) or not self.offset or any(
                o not in ("constant", "window_mean") for o in self.offset):
            raise ParameterError("STDPParameters.offset must be a non-empty list of "
                                 "'constant' / 'window_mean', one per conv layer (the last "
                                 f"serves deeper layers); got {self.offset!r}")
        if isinstance(self.window_scale, (str, int, float)) or not self.window_scale or any(
                isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0
                for v in self.window_scale):
            raise ParameterError("STDPParameters.window_scale must be a non-empty list of "
                                 "non-negative numbers, one per conv layer (the last serves "
                                 f"deeper layers); got {self.window_scale!r}")
        if self.tau_pre <= 0 * ms:
            raise ParameterError("STDPParameters.tau_pre must be positive")
        if not self.w_min < self.w_max:
            raise ParameterError("STDPParameters: w_min must be smaller than w_max")
        if self.eta < 0:
            raise ParameterError("STDPParameters.eta must be non-negative")


@dataclass(frozen=True)
class HomeostasisParameters:
    r"""Feature-map-wise adaptive threshold during pre-training (docs/method.md §3.3) [paper + recon].

    :math:`\theta_m[t] = e^{-dt/\tau_\theta}\theta_m[t-1] + \Delta\theta\, n_m[t]`, unit threshold
    :math:`v_{th} + \theta_m`; theta is frozen (not updated) outside pre-training.
    """

    #: [choice] 0.01 per spike: in the sweep (docs/pretraining.md) it holds the shallow conv
    #: layer to ~700-800 spikes per image (0.15 % of unit-steps) with every map active.
    delta_theta: float = 0.01
    #: [choice] 1 s = 40 images of 25 ms: slower than one presentation, so the threshold
    #: reflects a map's recent average activity rather than the current image only.
    tau_theta: Quantity = unit_default(1000 * ms)

    def __post_init__(self):
        _check(self)
        if self.delta_theta < 0:
            raise ParameterError("HomeostasisParameters.delta_theta must be non-negative")
        if self.tau_theta <= 0 * ms:
            raise ParameterError("HomeostasisParameters.tau_theta must be positive")


@dataclass(frozen=True)
class PretrainingParameters:
    """Greedy layer-wise STDP pre-training protocol (docs/method.md §3.4)."""

    #: [paper] each image is presented for 25 ms (dt = 1 ms)
    presentation: Quantity = unit_default(25 * ms)
    #: [choice] 1000 images per conv layer (~5-10 s of compute). Measured (docs/pretraining.md):
    #: graded stroke kernels after 300 images saturate to binary patches by 1000, whose features
    #: still beat rate-matched random kernels (+1.1 points, 3 seeds); which count serves
    #: fine-tuning best is not yet measured.
    n_images: int = 1000
    #: [choice] 250 Hz during pre-training: at 1000 Hz bright pixels spike in every step, the
    #: trace carries no timing and kernels saturate into large half-planes; at 250 Hz they
    #: become strokes and the run is 2x faster (docs/pretraining.md).
    max_rate: Quantity = unit_default(250 * Hz)
    #: [choice] 1.0: initial base threshold of a pre-trained conv layer = alpha * k with
    #: k = sqrt(3/fan_in), the Lee initialisation rule (docs/method.md §5); homeostasis then adapts it.
    v_th_alpha: float = 1.0
    #: [choice] 100 images per Brian2 run: one standalone run per batch amortises the program
    #: start (~10 ms) and keeps the stimulus table small (100 × 25 × 784 values).
    batch_images: int = 100

    def __post_init__(self):
        _check(self)
        for name in ("n_images", "batch_images"):
            if not isinstance(getattr(self, name), int):
                raise ParameterError(f"PretrainingParameters.{name} must be a whole number")
        if self.n_images < 1 or self.batch_images < 1:
            raise ParameterError("PretrainingParameters: n_images and batch_images must be >= 1")
        if self.presentation <= 0 * ms:
            raise ParameterError("PretrainingParameters.presentation must be positive")
        if self.v_th_alpha <= 0:
            raise ParameterError("PretrainingParameters.v_th_alpha must be positive")


@dataclass(frozen=True)
class InitParameters:
    """Random initialisation of conv and FC layers (docs/method.md §5): w ~ U[-k, k], v_th = alpha · k."""

    #: [choice] 20: v_th = 20·k. Shallow net, supervised, η = 10, 150 iterations at T = 50,
    #: seed 0, test error on 1,000 test images: α = 1 → 15 % (at 200), 3 → 17 %, 10 → 10 %,
    #: 20 → 7 %, and with η = 30: α = 10 → 6 %, 20 → 6 %, 40 → 11 %. Small α makes every
    #: unit fire at most steps (the FC unit sums ~750 inputs of ±k), where a' = 1 − a/τ_p ≈ 0
    #: stalls learning; α = 40 starts with a silent output layer.
    alpha: float = 20.0
    #: [choice] scale of STDP pre-trained conv layers when fine-tuning starts: "as_trained"
    #: (STDP's own scale: kernel entries near the bound w_max = 1) or "init_rms" (kernels and thresholds
    #: of each such layer times one factor, so that the kernels' RMS is the random
    #: initialisation's, k/√3). A common factor on a layer's weights and thresholds leaves
    #: every spike unchanged (V starts at 0, resets to 0 or by θ, and is linear in the input);
    #: it only changes how far one η moves the kernels relative to their size — at STDP's
    #: scale about 5× less than a randomly initialised layer's (docs/finetuning.md).
    pretrained_scale: str = "as_trained"

    def __post_init__(self):
        _check(self)
        if self.alpha <= 0:
            raise ParameterError("InitParameters.alpha must be positive")
        _check_choice(self, "pretrained_scale", ("as_trained", "init_rms"))


@dataclass(frozen=True)
class BPParameters:
    """Spike-based BP fine-tuning (docs/method.md §4); the equations are in protocols/bp.py."""

    #: [choice] 20 ms. Same experiment as InitParameters.alpha (α = 10, η = 10): τ_p = 10 ms
    #: stalls at 94 % error (saturated output units have a' = 1 − a/τ_p ≈ 0), 20 ms → 10 %,
    #: 50 ms → 11 % after 150 iterations.
    tau_p: Quantity = unit_default(20 * ms)
    #: [choice] 2 (constant [paper]), with conv_reduction "sum" and silent_units "zero". Screen
    #: (2 seeds per arm, 600 iterations) of η = 1, 2, 3 on MNIST and Fashion-MNIST: η = 2 best
    #: for the supervised arm on both and no collapse; η = 3 collapsed 1 of 2 supervised
    #: Fashion-MNIST seeds (conv1 moved 22 % per step at the start). Confirmed on 3 seeds per arm
    #: to 3,000 iterations on both datasets (docs/finetuning.md). Runs before this default
    #: used 30 (the paper's reading, averaged conv gradients) or 3 (the first studies).
    eta: float = 2.0
    #: [recon] pseudo-derivative a'(net): "lee2018" (max(0, 1 - a/tau_p)), "lee2018_window"
    #: (1 - a/max(tau_p, T): the same leak over the presentation, non-saturating as the paper
    #: says of its derivative), "lee2020" (leak-aware, Lee et al. 2020), "straight_through" (1)
    derivative: str = "lee2018"
    #: [recon] a' of hidden units that did not fire in the presentation: "pass" (each
    #: derivative's own value: 1 for lee2018; the paper's reading) or "zero" (Lee et al. 2020's
    #: public code gates the gradient by the unit's trace > 0). Output units are never gated.
    #: Default "zero": with "pass" silent units carried 55-73 % of the conv gradient, and only
    #: "sum" with "zero" let the conv layer learn (ablation, docs/finetuning.md). A layer silent
    #: at the start then cannot learn: the trainer stops such a run (lower the init's alpha)
    silent_units: str = "zero"
    #: [recon] conv kernel gradient over the positions sharing an entry: "mean" (the paper's
    #: words, "we average the partial derivatives over the output map connections") or "sum"
    #: (the MATLAB CNN code of the time, DeepLearnToolbox cnnbp.m: the exact gradient).
    #: Default "sum": with "mean" conv1's relative step was 70-950x smaller than fc1's and the
    #: supervised conv kernels stayed their random start (docs/finetuning.md)
    conv_reduction: str = "sum"
    #: [choice] 1: factor on eta for conv layers (a per-layer step balance; 1 = the paper's one eta)
    conv_eta_scale: float = 1.0
    #: [choice] 1: a further factor on eta for conv layers that start from STDP pre-training
    #: (arm "pretrained"; randomly initialised conv layers keep conv_eta_scale alone), so that
    #: one config serves both arms. STDP leaves the kernels at 5x the random initialisation's
    #: norm, so one eta moves them ~8x less, relative to their size, than a random layer
    #: (docs/finetuning.md, "The pre-trained conv layer's step size"); 1 = the paper's one eta
    pretrained_conv_eta_scale: float = 1.0
    #: [choice] step balance c of the pre-trained arm's conv layers (0 = off, the paper's one η).
    #: c > 0: at every evaluation row each such layer's step factor f is re-set so that its mean
    #: relative step ‖ηΔW‖/‖W‖ over the interval just ended would have been c times the mean
    #: over the FC layers (f ← clip(f·c·r_fc/r_conv, 1, 100); the first interval runs at f = 1).
    #: Unlike a fixed factor it adapts to the dataset and the layer: randomly initialised nets
    #: trained with one η keep c ≈ 0.6 on MNIST and Fashion-MNIST, shallow and deep, where STDP
    #: kernels take 2-17x less (docs/finetuning.md, "A balanced step for the pre-trained conv
    #: layers"). Default 0.6 since 2026-12-01 (0 before), measured on the pre-trained arm, 3
    #: seeds to 3,000 on each dataset, over 2,200-3,000: MNIST 1.73 ± 0.10 % (c = 0: 1.91 ± 0.10,
    #: supervised 1.86 ± 0.05; median 1,200 iterations to 2 %), Fashion-MNIST 13.55 ± 0.13 %
    #: (c = 0: 13.72 ± 0.33, supervised 13.64 ± 0.22); deep net, 2 seeds, over 2,000-2,400:
    #: 1.21 / 1.37 % (c = 0: 1.65 / 1.72, supervised 1.39 / 1.34). No effect on the supervised arm
    pretrained_conv_step_balance: float = 0.6
    #: [choice] 0: L2 weight decay lambda (dW += lambda W); Lee et al. 2020's code uses 5e-4.
    #: Off by default: the paper does not mention one
    weight_decay: float = 0.0
    #: [choice] 0: rate γ of per-map threshold homeostasis during fine-tuning (0 = off, the
    #: paper's frozen thresholds). γ > 0: after each step, each conv map's threshold is
    #: multiplied by exp(γ·clip((r − r*)/r*, −1, 1)), r the map's firing rate in the batch and
    #: r* its rate in the run's first batch, so a map pushed towards silence lowers its
    #: threshold until it fires again (a bound on the per-map gain; protocols/bp.py)
    threshold_homeostasis: float = 0.0
    #: [recon] normalised activation a-hat: "max" (a / activation of a unit firing every step,
    #: in [0, 1]) or "T" (a / T)
    activation_norm: str = "max"
    #: [paper] mini-batch of 100 images (600 iterations per epoch of 60k)
    batch_size: int = 100
    #: [paper] presentation length in the first epoch
    t_first_epoch: Quantity = unit_default(100 * ms)
    #: [paper] presentation length in later epochs
    t_later_epochs: Quantity = unit_default(50 * ms)

    def __post_init__(self):
        _check(self)
        _check_choice(self, "derivative",
                      ("lee2018", "lee2018_window", "lee2020", "straight_through"))
        _check_choice(self, "silent_units", ("pass", "zero"))
        _check_choice(self, "conv_reduction", ("mean", "sum"))
        if (self.conv_eta_scale <= 0 or self.pretrained_conv_eta_scale <= 0
                or self.weight_decay < 0 or self.threshold_homeostasis < 0
                or self.pretrained_conv_step_balance < 0):
            raise ParameterError("BPParameters: conv_eta_scale and pretrained_conv_eta_scale "
                                 "must be positive, weight_decay, threshold_homeostasis and "
                                 "pretrained_conv_step_balance non-negative")
        _check_choice(self, "activation_norm", ("max", "T"))
        if self.tau_p <= 0 * ms or self.t_first_epoch <= 0 * ms or self.t_later_epochs <= 0 * ms:
            raise ParameterError("BPParameters: tau_p and presentation lengths must be positive")
        if self.eta <= 0:
            raise ParameterError("BPParameters.eta must be positive")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ParameterError("BPParameters.batch_size must be a positive integer")
