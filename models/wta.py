r"""Winner-take-all STDP clustering network (Diehl & Cook 2015 style) for Deep-STDP (docs/deep_stdp.md).

One layer of ``k`` excitatory LIF neurons receives Poisson spike trains of an input vector
through plastic all-to-all synapses ``W`` (n_input × k). Each excitatory neuron's weight column
is a cluster centroid; the neuron that fires most for an input is that input's cluster (its
pseudo-label in Deep-STDP). Variables are dimensionless (units of the base threshold), as in
the rest of the package (:mod:`models.neurons`); times and rates carry Brian2 units.

Discrete step ``t`` (step dt, exact integration), the same in Brian2 (:func:`brian2_wta_run`)
and in the compiled twin (:func:`run_wta`):

1. decay [paper D&C, LIF]: :math:`v_e \leftarrow e^{-dt/\tau_m} v_e`, :math:`v_i` likewise,
   :math:`\theta \leftarrow e^{-dt/\tau_\theta}\theta`, pre-synaptic traces
   :math:`x \leftarrow e^{-dt/\tau_{pre}} x`;
2. input spikes :math:`s_{in}[t]` (Bernoulli, P = intensity × max_rate × dt);
3. :math:`v_e \mathrel{+}= g\,W^T s_{in}` (``input_gain`` g), :math:`x_i = 1` for every input that spiked [recon:
   nearest-spike trace, as :mod:`models.synapses`];
4. ``inhibition = "population"`` only: inhibitory neurons test :math:`v_i \ge v_{th,i}`, and each
   spiking inhibitory neuron j lowers every excitatory neuron except its partner j by
   ``w_ie`` (one-step delay through the inhibitory population) [paper D&C];
5. excitatory test :math:`s_e = [v_e \ge v_{th} + \theta]` (adaptive threshold) [paper D&C];
6. STDP at a post-synaptic spike of neuron j, for every input i, ``stdp_rule = "dc"``
   [paper D&C, weight-dependent post-synaptic rule with mu = 1]:

   .. math:: W_{ij} \leftarrow \mathrm{clip}\big(W_{ij} + \eta\,(x_i - x_{tar})\,(w_{max} - W_{ij}),
             \; w_{min}, w_{max}\big)

   or ``"soft_bound"`` [recon, the package's rule, :class:`models.parameters.STDPParameters`]:
   :math:`\Delta W_{ij} = \eta\,(x_i - x_{tar})\,(w_{max} - W_{ij})\,(W_{ij} - w_{min})`

7. ``inhibition = "direct"``: each excitatory spike lowers every *other* excitatory neuron by
   ``w_inh`` at once [choice: the cheaper variant]; ``"population"``: it raises its inhibitory
   partner by ``w_ei``;
8. resets: :math:`v_e = 0`, :math:`\theta \mathrel{+}= \Delta\theta` for excitatory spikes;
   :math:`v_i = 0` for inhibitory spikes.

Per image (presentation of ``presentation`` ms): membranes and traces start at 0 [choice: the
exact form of D&C's 150 ms rest, which lets them relax]; with ``normalise = True`` each column
of ``W`` is rescaled to sum ``w_mean × n_input`` before the image [paper D&C: weight
normalisation after each image]. Thresholds persist across images; in inference (``learn =
False``) W and θ are frozen.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from brian2 import Hz, Quantity, ms

from models.parameters import ParameterError, _check, _check_choice, unit_default

try:
    import numba
except ImportError:  # pragma: no cover - numba is a dependency; plain loops otherwise
    numba = None


@dataclass(frozen=True)
class WTAParameters:
    """Every parameter of the WTA clustering network, with its reason."""

    #: [choice] 10 clusters: the number of classes of the data, as the paper's 10-class subset
    #: (Diehl & Cook use 100-6,400 neurons, then vote; Deep-STDP needs one neuron per cluster)
    n_neurons: int = 10
    #: [paper D&C] simulation step
    dt: Quantity = unit_default(1 * ms)
    #: [paper D&C] 100 ms excitatory membrane constant
    tau_m: Quantity = unit_default(100 * ms)
    #: [choice] base threshold 1: potentials are in units of it, as in models.neurons
    v_th: float = 1.0
    #: [choice] 100 ms per input (D&C: 350 ms + 150 ms rest): ~10-30 output spikes, 3.5x cheaper
    presentation: Quantity = unit_default(100 * ms)
    #: [choice] 200 Hz at intensity 1: a few input spikes per step for 30-800 inputs
    max_rate: Quantity = unit_default(200 * Hz)
    #: [paper D&C] "direct" (exc -> exc, no delay) or "population" (exc -> own inh -> other exc)
    inhibition: str = "direct"
    #: [choice] 4 thresholds: one spike puts every other neuron far below firing (hard WTA)
    w_inh: float = 20.0
    #: [choice] exc -> inh weight 2: the partner fires in the next step (2 e^{-dt/tau_m} > 1)
    w_ei: float = 2.0
    #: [choice] inh -> other exc weight, as w_inh
    w_ie: float = 20.0
    #: [choice] inhibitory threshold 1
    v_th_inh: float = 1.0
    #: [paper D&C] adaptive threshold increment per spike [choice: value in units of v_th]
    delta_theta: float = 0.01
    #: [paper D&C] 10^7 ms: theta practically does not decay within a run
    tau_theta: Quantity = unit_default(1e7 * ms)
    #: [paper D&C] pre-synaptic trace constant 20 ms
    tau_pre: Quantity = unit_default(20 * ms)
    #: [choice] STDP rate: centroids move ~1 % per post spike
    eta: float = 0.05
    #: [paper D&C] target trace 0.4: inputs without a recent spike are depressed
    x_tar: float = 0.4
    #: [paper D&C] "dc": Delta w = eta (x - x_tar)(w_max - w), clipped to [w_min, w_max]
    #: (D&C's post-synaptic rule, mu = 1); [recon] "soft_bound": the package's rule
    #: eta (x - x_tar)(w_max - w)(w - w_min) (models.parameters.STDPParameters)
    stdp_rule: str = "dc"
    #: [choice] weights in [0, 1] (excitatory only)
    w_min: float = 0.0
    w_max: float = 1.0
    #: [paper D&C] normalise every neuron's incoming weights before each image
    normalise: bool = True
    #: [choice] mean weight after normalisation (D&C: 78 / 784 = 0.1)
    w_mean: float = 0.1
    #: [choice] each input spike adds input_gain × w to the membrane: sets the drive while the
    #: weights keep D&C's scale (protocols set it from the data: docs/deep_stdp.md)
    input_gain: float = 1.0

    def __post_init__(self):
        _check(self)
        _check_choice(self, "inhibition", ("direct", "population"))
        _check_choice(self, "stdp_rule", ("dc", "soft_bound"))
        if not isinstance(self.n_neurons, int) or self.n_neurons < 2:
            raise ParameterError("WTAParameters.n_neurons must be an integer >= 2")
        for name in ("dt", "tau_m", "presentation", "tau_theta", "tau_pre"):
            if getattr(self, name) <= 0 * ms:
                raise ParameterError(f"WTAParameters.{name} must be positive")
        steps = float(self.presentation / self.dt)
        if abs(steps - round(steps)) > 1e-9:
            raise ParameterError("WTAParameters.presentation must be a whole number of steps dt")
        if not 0 <= float(self.max_rate * self.dt) <= 1:
            raise ParameterError("WTAParameters.max_rate x dt must be a probability (<= 1)")
        if not self.w_min < self.w_max:
            raise ParameterError("WTAParameters: w_min must be smaller than w_max")
        for name in ("eta", "delta_theta", "w_inh", "w_ei", "w_ie", "w_mean", "input_gain"):
            if getattr(self, name) < 0:
                raise ParameterError(f"WTAParameters.{name} must be non-negative")

    @property
    def steps(self) -> int:
        return int(round(float(self.presentation / self.dt)))

    def decays(self) -> tuple[float, float, float]:
        """Per-step decay factors of membrane, threshold and trace."""
        f = lambda tau: float(np.exp(-float(self.dt / tau)))  # noqa: E731
        return f(self.tau_m), f(self.tau_theta), f(self.tau_pre)


def initial_weights(n_input: int, params: WTAParameters, rng: np.random.Generator) -> np.ndarray:
    """W ~ U[0, 0.3] (D&C) then normalised: float64 ``(n_input, k)``."""
    w = rng.uniform(0.0, 0.3, size=(n_input, params.n_neurons))
    return normalise(w, params) if params.normalise else w


def normalise(w: np.ndarray, params: WTAParameters) -> np.ndarray:
    """Every column rescaled to sum ``w_mean × n_input`` (a zero column stays zero)."""
    total = w.sum(axis=0, keepdims=True)
    target = params.w_mean * w.shape[0]
    return np.where(total > 0, w * (target / np.where(total > 0, total, 1.0)), w)


def encode(intensities: np.ndarray, params: WTAParameters, rng: np.random.Generator) -> np.ndarray:
    """Bernoulli spikes ``(n_images, T, n_input)`` of intensities in [0, 1] ``(n_images, n_input)``."""
    x = np.asarray(intensities, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"intensities must be (n_images, n_input), got shape {x.shape}")
    if x.size and (x.min() < 0 or x.max() > 1):
        raise ValueError("intensities must lie in [0, 1]; scale the inputs first")
    p = x * float(params.max_rate * params.dt)
    draws = rng.random((x.shape[0], params.steps, x.shape[1]), dtype=np.float32)
    return draws < p[:, None, :].astype(np.float32)


def _run_loop(spikes, w, theta, learn, normalise_on, target, dm, dth, dpre, v_th, dtheta,
              eta, x_tar, w_min, w_max, population, w_inh, w_ei, w_ie, v_th_inh, gain, dc_rule):
    n_img, steps, n_in = spikes.shape
    k = w.shape[1]
    counts = np.zeros((n_img, k), dtype=np.int32)
    first = np.full((n_img, k), -1, dtype=np.int32)
    v = np.zeros(k)
    vi = np.zeros(k)
    x = np.zeros(n_in)
    s_e = np.zeros(k, dtype=np.bool_)
    s_i = np.zeros(k, dtype=np.bool_)
    for img in range(n_img):
        if learn and normalise_on:
            for j in range(k):
                tot = 0.0
                for i in range(n_in):
                    tot += w[i, j]
                if tot > 0:
                    f = target / tot
                    for i in range(n_in):
                        w[i, j] *= f
        v[:] = 0.0
        vi[:] = 0.0
        x[:] = 0.0
        for t in range(steps):
            for j in range(k):
                v[j] *= dm
                vi[j] *= dm
                theta[j] *= dth
            for i in range(n_in):
                x[i] *= dpre
            for i in range(n_in):
                if spikes[img, t, i]:
                    x[i] = 1.0
                    for j in range(k):
                        v[j] += gain * w[i, j]
            n_i = 0
            if population:
                for j in range(k):
                    s_i[j] = vi[j] >= v_th_inh
                    if s_i[j]:
                        n_i += 1
                if n_i:
                    for j in range(k):
                        v[j] -= w_ie * (n_i - (1 if s_i[j] else 0))
            n_e = 0
            for j in range(k):
                s_e[j] = v[j] >= v_th + theta[j]
                if s_e[j]:
                    n_e += 1
                    counts[img, j] += 1
                    if first[img, j] < 0:
                        first[img, j] = t
            if n_e:
                if learn:
                    for j in range(k):
                        if s_e[j]:
                            for i in range(n_in):
                                wij = w[i, j]
                                if dc_rule:
                                    wij = wij + eta * (x[i] - x_tar) * (w_max - wij)
                                    w[i, j] = min(max(wij, w_min), w_max)
                                else:
                                    w[i, j] = wij + eta * (x[i] - x_tar) * (w_max - wij) * (wij - w_min)
                if population:
                    for j in range(k):
                        if s_e[j]:
                            vi[j] += w_ei
                else:
                    for j in range(k):
                        v[j] -= w_inh * (n_e - (1 if s_e[j] else 0))
                for j in range(k):
                    if s_e[j]:
                        v[j] = 0.0
                        if learn:
                            theta[j] += dtheta
            if population and n_i:
                for j in range(k):
                    if s_i[j]:
                        vi[j] = 0.0
    return counts, first


_run_compiled = numba.njit(cache=True)(_run_loop) if numba is not None else _run_loop


@dataclass
class WTAResult:
    """Spike counts ``(n_images, k)``, first spike step (-1: none), weights and thresholds after."""

    counts: np.ndarray
    first_spike: np.ndarray
    weights: np.ndarray
    theta: np.ndarray


def run_wta(spikes: np.ndarray, weights: np.ndarray, theta: np.ndarray, params: WTAParameters,
            learn: bool = True, compiled: bool = True) -> WTAResult:
    """The compiled twin of :func:`brian2_wta_run`: images one after another, same steps.

    ``spikes``: bool ``(n_images, T, n_input)``; ``weights`` ``(n_input, k)`` and ``theta``
    ``(k,)`` are copied, never changed in place. With ``learn``: STDP, threshold adaptation and
    normalisation (before each image, and once after the last, so the returned weights are
    normalised); without: both frozen (inference).
    """
    spikes = np.ascontiguousarray(spikes, dtype=np.bool_)
    w = np.array(weights, dtype=np.float64, order="C", copy=True)
    th = np.array(theta, dtype=np.float64, copy=True)
    _check_shapes(spikes, w, th, params)
    dm, dth, dpre = params.decays()
    if not learn:
        dth = 1.0  # frozen thresholds in inference, as in Brian2
    loop = _run_compiled if compiled else _run_loop
    counts, first = loop(
        spikes, w, th, learn, params.normalise, params.w_mean * w.shape[0], dm, dth, dpre,
        params.v_th, params.delta_theta, params.eta, params.x_tar, params.w_min, params.w_max,
        params.inhibition == "population", params.w_inh, params.w_ei, params.w_ie,
        params.v_th_inh, params.input_gain, params.stdp_rule == "dc")
    if learn and params.normalise:
        w = normalise(w, params)
    return WTAResult(counts, first, w, th)


def _check_shapes(spikes, w, theta, params):
    if spikes.ndim != 3 or spikes.shape[1] != params.steps:
        raise ValueError(f"spikes must be (n_images, {params.steps}, n_input) for a "
                         f"{params.presentation} presentation, got {spikes.shape}")
    if w.shape != (spikes.shape[2], params.n_neurons):
        raise ValueError(f"weights must be ({spikes.shape[2]}, {params.n_neurons}), got {w.shape}")
    if theta.shape != (params.n_neurons,):
        raise ValueError(f"theta must be ({params.n_neurons},), got {theta.shape}")


def respond(intensities: np.ndarray, weights: np.ndarray, theta: np.ndarray,
            params: WTAParameters, rng: np.random.Generator, retries: int = 4,
            chunk: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """Frozen-network spike counts ``(n_images, k)`` and winners of a set of inputs.

    [paper D&C] an image that leaves every neuron silent is presented again with more input,
    up to ``retries`` times; [recon] each retry doubles ``input_gain`` (D&C add 32 Hz to the
    rates; a gain keeps P(spike) <= 1 per step). Returns the counts of the last presentation
    of each image and its winner (:func:`winners` with the drive of that presentation).
    """
    x = np.asarray(intensities, dtype=np.float64)
    counts = np.zeros((len(x), params.n_neurons), dtype=np.int32)
    gains = np.full(len(x), params.input_gain)
    todo = np.arange(len(x))
    for attempt in range(retries + 1):
        p = dataclasses.replace(params, input_gain=params.input_gain * 2.0 ** attempt)
        for s in range(0, len(todo), chunk):
            idx = todo[s:s + chunk]
            counts[idx] = run_wta(encode(x[idx], p, rng), weights, theta, p, learn=False).counts
            gains[idx] = p.input_gain
        todo = todo[counts[todo].sum(axis=1) == 0]
        if len(todo) == 0:
            break
    drive = expected_drive(x, weights, theta, params) * (gains / params.input_gain)[:, None]
    return counts, winners(counts, drive)


def winners(counts: np.ndarray, drive: np.ndarray | None = None) -> np.ndarray:
    """The cluster of each image: the neuron with most spikes [paper].

    [choice] ties and silent images go to the neuron with the largest ``drive`` (e.g. the
    expected input current relative to threshold, :func:`expected_drive`) among the tied ones,
    then the lowest index; a deterministic rule instead of D&C's re-presentation at a higher rate.
    """
    counts = np.asarray(counts)
    best = counts.max(axis=1, keepdims=True)
    tied = counts == best
    if drive is None:
        return np.argmax(tied, axis=1)
    score = np.where(tied, drive, -np.inf)
    return np.argmax(score, axis=1)


def gain_for_drive(intensities: np.ndarray, drive: float, params: WTAParameters) -> float:
    """The ``input_gain`` that gives a neuron of mean weight ``w_mean`` an expected input of
    ``drive`` per step for the mean input vector (``drive × tau_m/dt`` is its steady state)."""
    p = float(params.max_rate * params.dt)
    total = float(np.asarray(intensities, dtype=np.float64).sum(axis=1).mean()) * p
    if total <= 0:
        raise ValueError("the inputs are all zero: the WTA network would never fire")
    return drive / (params.w_mean * total)


def expected_drive(intensities: np.ndarray, weights: np.ndarray, theta: np.ndarray,
                   params: WTAParameters) -> np.ndarray:
    """Mean input per step relative to each neuron's threshold, ``(n_images, k)``."""
    p = np.asarray(intensities, dtype=np.float64) * float(params.max_rate * params.dt)
    return params.input_gain * (p @ weights) / (params.v_th + theta)


# ----------------------------------------------------------------------------------------------
# Brian2: the model of record


def build_wta(n_input: int, n_images: int, params: WTAParameters, learn: bool = True):
    """Brian2 objects of the WTA network for ``n_images`` presentations of a stimulus table.

    Returns ``(Network, objects dict)``; the stimulus is the TimedArray ``wta_stimulus``
    ``(n_images × T, n_input)`` (0/1), replaceable through ``device.run(run_args=...)`` in
    cpp_standalone, as are ``syn.w`` and ``exc.theta``.
    """
    from brian2 import Network, NeuronGroup, SpikeMonitor, Synapses, TimedArray

    from models.neurons import stimulus_input_group

    dt = params.dt
    steps = params.steps
    stimulus = TimedArray(np.zeros((n_images * steps, n_input)), dt=dt, name="wta_stimulus")
    inp = stimulus_input_group(n_input, "wta_stimulus", dt, "wta_input")
    inp.namespace["wta_stimulus"] = stimulus
    inp.thresholder["spike"].when, inp.thresholder["spike"].order = "thresholds", 0

    exc_eqs = """
    dv/dt = -v / tau_m : 1
    dtheta/dt = -theta / tau_theta : 1
    wsum : 1
    """
    reset = "v = 0" + ("\ntheta += delta_theta" if learn else "")
    exc = NeuronGroup(params.n_neurons, exc_eqs, threshold="v >= v_th + theta", reset=reset,
                      method="exact", dt=dt, name="wta_exc",
                      namespace={"tau_m": params.tau_m, "v_th": params.v_th,
                                 "tau_theta": params.tau_theta if learn else 1e30 * ms,
                                 "delta_theta": params.delta_theta})
    exc.thresholder["spike"].when, exc.thresholder["spike"].order = "thresholds", 4

    syn_eqs = """
    w : 1
    dxpre/dt = -xpre / tau_pre : 1 (event-driven)
    """ + ("wsum_post = w : 1 (summed)\n" if learn and params.normalise else "")
    if params.stdp_rule == "dc":
        on_post = "w = clip(w + eta * (xpre - x_tar) * (w_max - w), w_min, w_max)"
    else:
        on_post = "w += eta * (xpre - x_tar) * (w_max - w) * (w - w_min)"
    syn = Synapses(inp, exc, syn_eqs, on_pre="v_post += gain * w\nxpre = 1",
                   on_post=on_post if learn else None, dt=dt, name="wta_in",
                   namespace={"tau_pre": params.tau_pre, "eta": params.eta, "x_tar": params.x_tar,
                              "w_max": params.w_max, "w_min": params.w_min,
                              "w_target": params.w_mean * n_input, "gain": params.input_gain})
    syn.connect()
    syn.pre.when, syn.pre.order = "thresholds", 1
    if learn:
        syn.post.when, syn.post.order = "thresholds", 5
    objects = {"input": inp, "exc": exc, "syn": syn, "stimulus": stimulus}
    present = params.presentation
    resets = [exc.run_regularly("v = 0", dt=present, when="start", name="wta_exc_present"),
              syn.run_regularly("xpre = 0", dt=present, when="start", name="wta_in_present")]
    if learn and params.normalise:
        # after the summed variable (groups slot, order exc.order - 1), before any threshold
        resets.append(syn.run_regularly("w = w * w_target / wsum_post", dt=present,
                                        when="groups", order=exc.order + 1,
                                        name="wta_in_normalise"))
    if params.inhibition == "direct":
        lat = Synapses(exc, exc, on_pre="v_post -= w_inh", dt=dt, name="wta_lateral",
                       namespace={"w_inh": params.w_inh})
        lat.connect(condition="i != j")
        lat.pre.when, lat.pre.order = "thresholds", 6
        objects["lateral"] = lat
    else:
        inh = NeuronGroup(params.n_neurons, "dv/dt = -v / tau_m : 1", threshold="v >= v_th_inh",
                          reset="v = 0", method="exact", dt=dt, name="wta_inh",
                          namespace={"tau_m": params.tau_m, "v_th_inh": params.v_th_inh})
        inh.thresholder["spike"].when, inh.thresholder["spike"].order = "thresholds", 2
        ei = Synapses(exc, inh, on_pre="v_post += w_ei", dt=dt, name="wta_ei",
                      namespace={"w_ei": params.w_ei})
        ei.connect(j="i")
        ei.pre.when, ei.pre.order = "thresholds", 6
        ie = Synapses(inh, exc, on_pre="v_post -= w_ie", dt=dt, name="wta_ie",
                      namespace={"w_ie": params.w_ie})
        ie.connect(condition="i != j")
        ie.pre.when, ie.pre.order = "thresholds", 3
        resets.append(inh.run_regularly("v = 0", dt=present, when="start", name="wta_inh_present"))
        objects.update(inh=inh, ei=ei, ie=ie)
    monitor = SpikeMonitor(exc, name="wta_exc_spikes")
    objects["monitor"] = monitor
    net = Network(*[o for o in objects.values() if o is not stimulus], *resets)
    return net, objects


def brian2_wta_run(spikes: np.ndarray, weights: np.ndarray, theta: np.ndarray,
                   params: WTAParameters, learn: bool = True, device: str = "runtime",
                   directory: str | None = None) -> WTAResult:
    """Run the Brian2 WTA network on ``spikes`` ``(n_images, T, n_input)``: the model of record.

    ``device``: ``runtime`` or ``cpp_standalone`` (built once per call; for repeated runs on new
    inputs use :class:`WTAProgram`). Returns the same :class:`WTAResult` as :func:`run_wta`.
    """
    program = WTAProgram(spikes.shape[2], spikes.shape[0], params, learn, device, directory)
    return program.run(spikes, weights, theta)


class WTAProgram:
    """A Brian2 WTA network for ``n_images`` presentations, built once and re-run on new
    stimulus tables, weights and thresholds (cpp_standalone: ``device.run(run_args=...)``,
    no recompilation; runtime: the network is restored and re-run)."""

    def __init__(self, n_input: int, n_images: int, params: WTAParameters, learn: bool = True,
                 device: str = "runtime", directory: str | None = None):
        from brian2 import device as b2device
        from brian2 import start_scope

        from models.devices import StandaloneProgram, check_device, use_device

        if check_device(device) not in ("runtime", "cpp_standalone"):
            raise ValueError(f"the WTA network runs on 'runtime' or 'cpp_standalone', not {device!r}")
        if device == "cpp_standalone":
            b2device.reinit()
            b2device.activate()
        use_device(device, directory)
        start_scope()
        self.params, self.learn, self.device = params, learn, device
        self.n_input, self.n_images = n_input, n_images
        self.net, self.objects = build_wta(n_input, n_images, params, learn)
        self.duration = n_images * params.presentation
        if device == "cpp_standalone":
            self.program = StandaloneProgram(self.net, self.duration)
            self.program.build()
        else:
            self.net.store("initial")

    def run(self, spikes, weights, theta) -> WTAResult:
        p = self.params
        spikes = np.asarray(spikes, dtype=bool)
        w = np.asarray(weights, dtype=np.float64)
        th = np.asarray(theta, dtype=np.float64)
        _check_shapes(spikes, w, th, p)
        if spikes.shape[0] != self.n_images or spikes.shape[2] != self.n_input:
            raise ValueError(f"this program was built for {self.n_images} images of "
                             f"{self.n_input} inputs, got {spikes.shape}")
        table = spikes.reshape(-1, self.n_input).astype(np.float64)
        syn, exc, stim = self.objects["syn"], self.objects["exc"], self.objects["stimulus"]
        w_flat = w[syn.i[:], syn.j[:]] if self.device == "runtime" else None
        if self.device == "runtime":
            self.net.restore("initial")
            stim.values[:] = table
            syn.w[:] = w_flat
            exc.theta[:] = th
            self.net.run(self.duration)
            i, t = np.asarray(self.objects["monitor"].i[:]), self.objects["monitor"].t[:]
            w_after = np.zeros_like(w)
            w_after[syn.i[:], syn.j[:]] = syn.w[:]
            theta_after = np.asarray(exc.theta[:])
        else:
            # all-to-all connect() numbers synapses pre-major: index = i * k + j
            self.program.run({stim: table, syn.w: w.ravel(), exc.theta: th})
            i, t = np.asarray(self.objects["monitor"].i[:]), self.objects["monitor"].t[:]
            w_after = np.asarray(syn.w[:]).reshape(w.shape)
            theta_after = np.asarray(exc.theta[:])
        step = np.round(np.asarray(t / p.dt)).astype(np.int64)
        image, local = step // p.steps, step % p.steps
        counts = np.zeros((self.n_images, p.n_neurons), dtype=np.int32)
        np.add.at(counts, (image, i), 1)
        first = np.full((self.n_images, p.n_neurons), -1, dtype=np.int32)
        for img, neuron, s in sorted(zip(image, i, local), key=lambda r: -r[2]):
            first[img, neuron] = s
        if not self.learn:
            w_after, theta_after = w.copy(), th.copy()
        elif p.normalise:
            w_after = normalise(w_after, p)
        return WTAResult(counts, first, w_after, theta_after)
