r"""NormAD neuron and synapse model (Anwani & Rajendran, IJCNN 2015; Neurocomputing 2020), in Brian2.

Leaky integrate-and-fire neuron with a difference-of-exponentials synaptic current [issue 17, from
the IJCNN 2015 rule and the authors' public CUDA code]:

.. math::
    C \frac{dV}{dt} = -g_L (V - E_L) + I_{syn}(t), \qquad
    I_{syn}(t) = \sum_i w_i\, c_i(t), \qquad
    c_i(t) = \sum_k \left(e^{-(t - t_i^k)/\tau_1} - e^{-(t - t_i^k)/\tau_2}\right) H(t - t_i^k)

a spike when :math:`V > V_T`, then :math:`V \leftarrow E_L` and :math:`V` is held for
:math:`t_{ref}`. In Brian2 the kernel is the difference of two exponentially decaying currents
``I1 - I2`` that both jump by ``w`` at a presynaptic spike (:data:`NORMAD_NEURON_EQS`,
:data:`NORMAD_SYNAPSE_ON_PRE`); the linear system (V, I1, I2) is integrated with the ``exact``
method.

NormAD's linearised sensitivity of V to the weight of input i is

.. math::
    \hat d_i(t) = (\hat h * c_i)(t), \qquad \hat h(t) = \frac{1}{C} e^{-t/\tau'_L} H(t)

which for one input spike at 0 is the closed-form convolution (:func:`dhat_kernel`)

.. math::
    \kappa(t) = \frac{1}{C}\left[\frac{\tau_1\tau'_L}{\tau_1 - \tau'_L}
        \left(e^{-t/\tau_1} - e^{-t/\tau'_L}\right)
      - \frac{\tau_2\tau'_L}{\tau_2 - \tau'_L}\left(e^{-t/\tau_2} - e^{-t/\tau'_L}\right)\right]

With :math:`\tau'_L = \tau_L = C/g_L` (the default), :math:`w \cdot \hat d(t)` is exactly the
membrane deviation :math:`V - E_L` of the neuron without threshold (tested against Brian2).

The batched NumPy/numba twin (:func:`simulate`) integrates the same equations with the same
exact propagator and the same order within a step as Brian2's default schedule (state update,
threshold, synaptic delivery of this step's spikes, reset); it is tested spike for spike against
:func:`brian2_forward`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from brian2 import Quantity, amp, farad, mV, ms, nA, nS, pF, second, siemens, volt

from models.parameters import ParameterError, _check, unit_default

try:  # fused per-layer loop; a plain NumPy loop of the same arithmetic without it
    import numba

    _HAVE_NUMBA = True
except ImportError:  # pragma: no cover
    numba = None
    _HAVE_NUMBA = False


@dataclass(frozen=True)
class NormADParameters:
    """Neuron, synapse and sensitivity constants of NormAD. Every value with its origin."""

    #: [paper] membrane capacitance (IJCNN 2015 / authors' code)
    C: Quantity = unit_default(300 * pF)
    #: [paper] leak conductance; tau_L = C/g_L = 10 ms
    g_L: Quantity = unit_default(30 * nS)
    #: [paper] resting and reset potential
    E_L: Quantity = unit_default(-70 * mV)
    #: [paper] threshold 20 mV above rest
    V_T: Quantity = unit_default(-50 * mV)
    #: [paper] absolute refractory period (V held at E_L)
    t_ref: Quantity = unit_default(3 * ms)
    #: [paper] slow time constant of the synaptic kernel c(t)
    tau1: Quantity = unit_default(5 * ms)
    #: [paper] fast time constant of the synaptic kernel c(t) (tau1/4)
    tau2: Quantity = unit_default(1.25 * ms)
    #: [recon] time constant of the linearised impulse response h^(t): the membrane's own
    #: tau_L = C/g_L = 10 ms, i.e. the exact subthreshold response with the reset ignored (the
    #: issue gives the form, not the value); then w . d^ is the thresholdless membrane exactly.
    tau_L_prime: Quantity = unit_default(10 * ms)
    #: [paper] simulation step
    dt: Quantity = unit_default(0.1 * ms)
    #: [recon] width of the hidden neurons' pseudo-derivative of the spike train w.r.t. V,
    #: :math:`\sigma'(V) = 1/(1 + |V - V_T|/\delta)^2` (fast sigmoid): 2 mV = a tenth of the rest-to-
    #: threshold gap, so neurons within a few mV of V_T carry the back-propagated error while
    #: silent ones still get a (smaller) share; its overall scale cancels in NormAD's
    #: normalisation (see protocols/normad.py).
    surrogate_width: Quantity = unit_default(2 * mV)
    #: [recon] floor of dV/dt at a hidden spike in the spike-timing derivative
    #: dt_k/dw = -d^(t_k)/V'(t_k): 1 V/s = 1 mV/ms, a twentieth of a typical crossing slope
    #: here (20 mV in a few ms); keeps grazing threshold crossings from dominating.
    min_slope: Quantity = unit_default(1 * volt / second)
    #: [recon] time scale of the spike-density term of the "hybrid" hidden linearisation:
    #: a neuron at V adds sigma'(V)/(delta * density_time) spikes per second per volt
    #: (see surrogate()); large, so that the spike-timing term leads wherever a neuron fires and
    #: the density term mainly recruits neurons that are silent (and revives a dead layer).
    density_time: Quantity = unit_default(100 * ms)

    def __post_init__(self):
        _check(self)
        for name in ("C", "g_L", "t_ref", "tau1", "tau2", "tau_L_prime", "dt", "surrogate_width",
                     "min_slope", "density_time"):
            if getattr(self, name) < 0 * getattr(self, name) or (
                name != "t_ref" and float(getattr(self, name)) == 0
            ):
                raise ParameterError(f"NormADParameters.{name} must be positive")
        if not self.V_T > self.E_L:
            raise ParameterError("NormADParameters: V_T must lie above E_L")
        if not self.tau1 > self.tau2:
            raise ParameterError("NormADParameters: tau1 must be larger than tau2")
        for tau in (self.tau1, self.tau2):
            if abs(float(tau / self.tau_L_prime) - 1) < 1e-9:
                raise ParameterError("NormADParameters: tau_L_prime must differ from tau1, tau2")

    @property
    def tau_L(self) -> Quantity:
        """Membrane time constant C/g_L."""
        return self.C / self.g_L

    @property
    def refractory_steps(self) -> int:
        return int(round(float(self.t_ref / self.dt)))


#: neuron: membrane (held during the refractory period) and the two synaptic currents
NORMAD_NEURON_EQS = """
dv/dt = (g_L * (E_L - v) + I1 - I2) / C : volt (unless refractory)
dI1/dt = -I1 / tau1 : amp
dI2/dt = -I2 / tau2 : amp
"""
#: synapse: one weight in amperes
NORMAD_SYNAPSE_EQS = "w : amp"
#: a presynaptic spike starts w * (exp(-t/tau1) - exp(-t/tau2)) in the postsynaptic current
NORMAD_SYNAPSE_ON_PRE = "I1_post += w\nI2_post += w"


def _namespace(p: NormADParameters) -> dict:
    return {"g_L": p.g_L, "E_L": p.E_L, "C": p.C, "tau1": p.tau1, "tau2": p.tau2,
            "V_T": p.V_T}


# --------------------------------------------------------------------------- closed forms
def synaptic_kernel(t, p: NormADParameters) -> np.ndarray:
    """c(t) of one presynaptic spike at 0, t in seconds (float array)."""
    t = np.asarray(t, dtype=float)
    t1, t2 = float(p.tau1 / second), float(p.tau2 / second)
    return np.where(t >= 0, np.exp(-np.clip(t, 0, None) / t1) - np.exp(-np.clip(t, 0, None) / t2), 0.0)


def _dhat_coefficients(p: NormADParameters):
    """kappa(t) = sum_c a_c exp(-t/tau_c), tau_c in (tau1, tau2, tau_L'), in 1/F * s = V/(A)."""
    t1, t2 = float(p.tau1 / second), float(p.tau2 / second)
    tl = float(p.tau_L_prime / second)
    c = float(p.C / farad)
    k1 = t1 * tl / (t1 - tl) / c
    k2 = t2 * tl / (t2 - tl) / c
    return (t1, t2, tl), (k1, -k2, -k1 + k2)


def dhat_kernel(t, p: NormADParameters) -> np.ndarray:
    """kappa(t) = (h^ * c)(t) of one input spike at 0, t in s; in V/A (so w * kappa is volts)."""
    t = np.asarray(t, dtype=float)
    taus, coefs = _dhat_coefficients(p)
    tt = np.clip(t, 0, None)
    out = sum(a * np.exp(-tt / tau) for a, tau in zip(coefs, taus))
    return np.where(t >= 0, out, 0.0)


def dhat_kernel_derivative(t, p: NormADParameters) -> np.ndarray:
    """d kappa / dt (1/s units of :func:`dhat_kernel`)."""
    t = np.asarray(t, dtype=float)
    taus, coefs = _dhat_coefficients(p)
    tt = np.clip(t, 0, None)
    out = sum(-a / tau * np.exp(-tt / tau) for a, tau in zip(coefs, taus))
    return np.where(t >= 0, out, 0.0)


# --------------------------------------------------------------------------- d^ traces (filters)
def _exp_filter(x: np.ndarray, decay: float, reverse: bool = False) -> np.ndarray:
    """y[m] = decay * y[m-1] + x[m] along axis 0 (or from the end when ``reverse``)."""
    from scipy.signal import lfilter

    xt = np.ascontiguousarray(np.moveaxis(x, 0, -1))  # time last: contiguous rows for lfilter
    if reverse:
        xt = xt[..., ::-1]
    y = lfilter([1.0], [1.0, -decay], xt, axis=-1)
    if reverse:
        y = y[..., ::-1]
    return np.moveaxis(y, -1, 0)


if _HAVE_NUMBA:

    @numba.njit(cache=True)
    def _sum_exp_filter_numba(x, decays, coefs, reverse):  # pragma: no cover - compiled
        # x (A, T, M): y[a, m] = sum_c coefs[c] * (decays[c] * y_c[a, m-1] + x[a, m]) along T
        A, T, M = x.shape
        C = decays.shape[0]
        y = np.zeros_like(x)
        state = np.zeros((C, M))
        for a in range(A):
            state[:] = 0.0
            for i in range(T):
                t = T - 1 - i if reverse else i
                for m in range(M):
                    acc = 0.0
                    for c in range(C):
                        state[c, m] = decays[c] * state[c, m] + x[a, t, m]
                        acc += coefs[c] * state[c, m]
                    y[a, t, m] = acc
        return y


def kappa_filter(x: np.ndarray, p: NormADParameters, reverse: bool = False,
                 derivative: bool = False, axis: int = 0) -> np.ndarray:
    r"""Discrete convolution with kappa along ``axis`` (time, steps of dt; default 0).

    Causal: :math:`y[m] = \sum_{s \le m} \kappa((m - s)\,dt)\, x[s]`; ``reverse`` (adjoint):
    :math:`y[s] = \sum_{u \ge s} \kappa((u - s)\,dt)\, x[u]`; ``derivative``: with
    :math:`\kappa'` instead of κ. Exact for the sampled kernel (a sum of three first-order
    recursions).
    """
    taus, coefs = _dhat_coefficients(p)
    if derivative:
        coefs = tuple(-a / tau for a, tau in zip(coefs, taus))
    dt = float(p.dt / second)
    xm = np.moveaxis(np.asarray(x, dtype=float), axis, 0)  # time first
    decays = np.array([math.exp(-dt / tau) for tau in taus])
    if _HAVE_NUMBA:
        flat = np.ascontiguousarray(xm.reshape(1, xm.shape[0], -1))
        y = _sum_exp_filter_numba(flat, decays, np.array(coefs), reverse).reshape(xm.shape)
    else:
        y = sum(a * _exp_filter(xm, d, reverse) for a, d in zip(coefs, decays))
    return np.moveaxis(y, 0, axis)


def dhat_traces(spikes: np.ndarray, p: NormADParameters) -> np.ndarray:
    r""":math:`\hat d_i` sampled at every step: spikes ``(T, ...)`` of the inputs (0/1), same shape
    out, in V/A. An input spike at step n contributes :math:`\kappa((m - n)\,dt)` at step m >= n
    (0 at m = n: the current starts after that step's membrane update, as in the simulation)."""
    return kappa_filter(np.asarray(spikes, dtype=float), p)


def spike_timing_gate(spikes: np.ndarray, v: np.ndarray, p: NormADParameters) -> np.ndarray:
    r"""1/V'(t_k) at every spike of a neuron (0 elsewhere), along axis 0 (time), in s/V.

    :math:`V'` is the backward difference of the recorded membrane over the step that crossed
    the threshold, floored at ``min_slope``: with it a spike moves by
    :math:`\delta t_k = -\delta V(t_k) / V'(t_k)` (the linearised threshold crossing)."""
    dt = float(p.dt / second)
    slope = np.empty_like(v)
    slope[1:] = (v[1:] - v[:-1]) / dt
    slope[0] = np.inf
    slope = np.maximum(slope, float(p.min_slope / (volt / second)))
    return np.where(spikes, 1.0 / slope, 0.0)


def surrogate(v: np.ndarray, not_refractory: np.ndarray, p: NormADParameters) -> np.ndarray:
    r"""Spike-density gate per step, in 1/V: :math:`\sigma'(V)\,dt / (\delta\,\tau_\sigma)` with
    :math:`\sigma'(V) = 1/(1 + |V - V_T|/\delta)^2`, 0 while refractory (V in volts;
    :math:`\tau_\sigma` = ``density_time``): the change of the expected number of spikes in
    the step per volt of membrane potential."""
    delta = float(p.surrogate_width / volt)
    vt = float(p.V_T / volt)
    scale = float(p.dt / p.density_time) / delta
    return scale * not_refractory / (1.0 + np.abs(v - vt) / delta) ** 2


# --------------------------------------------------------------------------- batched twin
def propagator(p: NormADParameters) -> tuple[float, float, float, float, float]:
    """Exact one-step propagator of (V - E_L, I1, I2): returns (A, B1, B2, D1, D2) with
    V' - E_L = A (V - E_L) + B1 I1 + B2 I2, I1' = D1 I1, I2' = D2 I2."""
    dt = float(p.dt / second)
    tl = float(p.tau_L / second)
    t1, t2 = float(p.tau1 / second), float(p.tau2 / second)
    c = float(p.C / farad)
    A = math.exp(-dt / tl)
    D1, D2 = math.exp(-dt / t1), math.exp(-dt / t2)
    B1 = (D1 - A) / (c * (1 / tl - 1 / t1))
    B2 = -(D2 - A) / (c * (1 / tl - 1 / t2))
    return A, B1, B2, D1, D2


def _layer_numpy(X, A, B1, B2, D1, D2, EL, VT, R):
    T, B, N = X.shape
    v = np.full((B, N), EL)
    i1 = np.zeros((B, N))
    i2 = np.zeros((B, N))
    last = np.full((B, N), -(10 ** 9), dtype=np.int64)
    spikes = np.zeros((T, B, N), dtype=np.bool_)
    vrec = np.empty((T, B, N))
    nrrec = np.zeros((T, B, N), dtype=np.bool_)
    for m in range(T):
        nr = (m - last) >= R
        vnew = EL + A * (v - EL) + B1 * i1 + B2 * i2
        v = np.where(nr, vnew, v)
        i1 = D1 * i1
        i2 = D2 * i2
        s = (v > VT) & nr
        vrec[m] = v
        nrrec[m] = nr
        spikes[m] = s
        last[s] = m
        i1 = i1 + X[m]
        i2 = i2 + X[m]
        v = np.where(s, EL, v)
    return spikes, vrec, nrrec


if _HAVE_NUMBA:

    @numba.njit(cache=True)
    def _layer_numba(X, A, B1, B2, D1, D2, EL, VT, R):  # pragma: no cover - compiled
        T, B, N = X.shape
        spikes = np.zeros((T, B, N), dtype=np.bool_)
        vrec = np.empty((T, B, N))
        nrrec = np.zeros((T, B, N), dtype=np.bool_)
        for b in range(B):
            for n in range(N):
                v = EL
                i1 = 0.0
                i2 = 0.0
                last = -(10 ** 9)
                for m in range(T):
                    nr = (m - last) >= R
                    if nr:
                        v = EL + A * (v - EL) + B1 * i1 + B2 * i2
                    i1 = D1 * i1
                    i2 = D2 * i2
                    s = nr and v > VT
                    vrec[m, b, n] = v
                    nrrec[m, b, n] = nr
                    spikes[m, b, n] = s
                    i1 += X[m, b, n]
                    i2 += X[m, b, n]
                    if s:
                        last = m
                        v = EL
        return spikes, vrec, nrrec


def lif_layer(X: np.ndarray, p: NormADParameters, backend: str = "auto"):
    """Simulate one layer driven by the synaptic jumps ``X`` (T, B, N) in amperes (the summed
    weights of the presynaptic spikes of each step). Returns spikes (T, B, N) bool, the membrane
    after the state update and before reset (volts), and the not-refractory flags."""
    A, B1, B2, D1, D2 = propagator(p)
    args = (np.ascontiguousarray(X, dtype=float), A, B1, B2, D1, D2,
            float(p.E_L / volt), float(p.V_T / volt), p.refractory_steps)
    if backend == "numba" or (backend == "auto" and _HAVE_NUMBA):
        return _layer_numba(*args)
    return _layer_numpy(*args)


def simulate(weights: list[np.ndarray], input_spikes: np.ndarray, p: NormADParameters,
             backend: str = "auto"):
    """Batched forward pass of a feed-forward NormAD network.

    ``weights[l]``: (S, N_l, N_{l-1}) in amperes, one weight set per seed s; ``input_spikes``:
    (T, S, P, N_0) 0/1 (P patterns per seed). Returns per layer l = 1..L a dict with
    ``spikes``/``v``/``nr`` of shape (T, S, P, N_l).
    """
    T, S, P, _ = input_spikes.shape
    pre = np.asarray(input_spikes, dtype=float)
    out = []
    for W in weights:
        X = np.einsum("tspi,sni->tspn", pre, W, optimize=True)
        N = W.shape[1]
        spikes, v, nr = lif_layer(X.reshape(T, S * P, N), p, backend)
        layer = {"spikes": spikes.reshape(T, S, P, N), "v": v.reshape(T, S, P, N),
                 "nr": nr.reshape(T, S, P, N)}
        out.append(layer)
        pre = layer["spikes"].astype(float)
    return out


# --------------------------------------------------------------------------- Brian2
def brian2_forward(weights: list[np.ndarray], input_spikes: np.ndarray, p: NormADParameters,
                   threshold: bool = True, record_v: bool = False):
    """The same network in Brian2 (runtime device), one weight set and one pattern.

    ``weights[l]``: (N_l, N_{l-1}) in amperes; ``input_spikes``: (T, N_0) 0/1. Returns per layer
    a dict with ``spikes`` (T, N_l) bool and, with ``record_v``, ``v`` (T, N_l) volts as
    recorded at the end of each step (after reset). ``threshold=False`` removes the threshold
    (the linear membrane, for the d^ test).
    """
    from brian2 import (Network, NeuronGroup, SpikeGeneratorGroup, SpikeMonitor, StateMonitor,
                        Synapses)

    T, n0 = input_spikes.shape
    steps, idx = np.nonzero(np.asarray(input_spikes))
    dt = p.dt
    src = SpikeGeneratorGroup(n0, idx, steps * dt, dt=dt, name="normad_input")
    net = Network(src)
    prev, layers = src, []
    for l, W in enumerate(weights):
        n = W.shape[0]
        grp = NeuronGroup(n, NORMAD_NEURON_EQS, threshold="v > V_T" if threshold else "False",
                          reset="v = E_L", refractory=p.t_ref, method="exact",
                          namespace=_namespace(p), dt=dt, name=f"normad_layer{l + 1}")
        grp.v = p.E_L
        syn = Synapses(prev, grp, NORMAD_SYNAPSE_EQS, on_pre=NORMAD_SYNAPSE_ON_PRE, dt=dt,
                       name=f"normad_syn{l + 1}")
        syn.connect()  # all to all; Brian2 orders synapses by (i pre, j post)
        syn.w = np.asarray(W, dtype=float).T.ravel() * amp
        mon = SpikeMonitor(grp, name=f"normad_spikes{l + 1}")
        net.add(grp, syn, mon)
        vmon = None
        if record_v:
            vmon = StateMonitor(grp, "v", record=True, when="end", name=f"normad_v{l + 1}")
            net.add(vmon)
        layers.append((grp, mon, vmon))
        prev = grp
    net.run(T * dt)
    out = []
    for grp, mon, vmon in layers:
        spk = np.zeros((T, len(grp)), dtype=bool)
        st = np.round(np.asarray(mon.t / dt)).astype(int)
        spk[st, np.asarray(mon.i)] = True
        layer = {"spikes": spk}
        if vmon is not None:
            layer["v"] = np.asarray(vmon.v / volt).T
        out.append(layer)
    return out
