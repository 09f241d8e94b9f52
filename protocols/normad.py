r"""NormAD training of single- and multi-layer spiking networks (issue 17), vectorised over seeds.

The rule (Anwani & Rajendran, IJCNN 2015 [paper]) for the weights :math:`w_{oj}` of output neuron o:

.. math::
    \Delta w_o = r \int e_o(t)\, \frac{\hat d(t)}{\lVert \hat d(t) \rVert}\, dt
              = r \Big[\sum_{t \in \text{desired}} \frac{\hat d(t)}{\lVert\hat d(t)\rVert}
                      - \sum_{t \in \text{observed}} \frac{\hat d(t)}{\lVert\hat d(t)\rVert}\Big]

with :math:`e_o = S_{desired} - S_{observed}` (spike trains, so the integral is a sum over error
spikes) and :math:`\hat d_j = \hat h * c_j` the linearised sensitivity of :math:`V_o` to
:math:`w_{oj}` (:mod:`models.normad`).

Multi-layer form [recon]: "spatio-temporal error backpropagation" (the paper's abstract; its
equations could not be recovered). For one error spike of output o at time :math:`t_e` the
approximate descent direction for *every* weight is the gradient of the linearised
:math:`V_o(t_e)`, obtained by propagating an adjoint signal backwards through time and layers:

.. math::
    \lambda^{(L)}_o(s) = \delta(s - t_e), \qquad
    \lambda^{(l-1)}_k(s) = \sigma'(V_k(s)) \sum_n w^{(l)}_{nk}
        \int_{u \ge s} \kappa(u - s)\, \lambda^{(l)}_n(u)\, du, \qquad
    g^{(l)}_{nj} = \int \lambda^{(l)}_n(s)\, \hat d^{(l)}_j(s)\, ds

i.e. :math:`\partial V_o(t_e)/\partial w_{kj} = w_{ok}\,\int \kappa(t_e - s)\,\sigma'(V_k(s))\,
\hat d_j(s)\,ds` for a hidden neuron k: the hidden neuron's spike train is linearised around its
membrane potential with the pseudo-derivative :math:`\sigma'` (the output kernel κ carries the
hidden spike's effect to :math:`V_o`). For layer l the update sums the normalised directions of
all error spikes: :math:`\Delta W^{(l)} = r_l \sum_e \pm g^{(l)}_e / \lVert g^{(l)}_e \rVert`
(norm over all weights of the layer), which for the output layer is exactly NormAD. Why this
form: (i) it reduces to the single-layer rule at the output; (ii) normalising per error spike and
layer removes the unknown scale of the linearisation (σ' scale, 1/C), as NormAD does for the
output; (iii) σ' is defined for silent hidden neurons too, so they can be recruited (a
spike-time derivative -1/V̇ at existing spikes is not, and diverges for grazing spikes).

Updates are summed over the patterns of an epoch and applied once per epoch [choice:
vectorising over patterns and seeds; every error spike still moves the weights by at most r].

Run::

    python -m protocols.normad --config configs/normad_xor.toml --seeds 0-9 --out results/normad_xor

Outputs (``--out``, every file atomic): per seed ``seed<k>/config.json`` (config, seed,
versions), ``seed<k>/metrics.csv`` (one row per epoch; epoch 0 = before training),
``seed<k>/weights.npz`` (final weights, amperes) and ``seed<k>/final_spikes.npz``; then
``summary.csv`` (one row per seed), ``summary.md`` (the table with 95 % CIs) and ``run.json``.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
from brian2 import Hz, Quantity, amp, ms, nA, second

from models.normad import (NormADParameters, dhat_kernel, dhat_kernel_derivative, dhat_traces,
                           kappa_filter, simulate, spike_timing_gate, surrogate)
from models.parameters import unit_default
from protocols.config import config_to_dict, load_config
from protocols.records import atomic_savez, atomic_write_bytes, atomic_write_json, versions

#: random streams: np.random.SeedSequence([seed, key])
STREAM_WEIGHTS, STREAM_INPUTS, STREAM_TARGETS = 1, 2, 3


@dataclass(frozen=True)
class TaskConfig:
    """What is to be learnt."""

    #: "single": one neuron, one input pattern, one target train; "xor": the spike-based XOR;
    #: "mapping": random input patterns -> random target trains
    kind: Literal["single", "xor", "mapping"] = "xor"
    #: length of one presentation
    duration: Quantity = unit_default(30 * ms)
    # --- single / mapping: Poisson inputs and dead-time Poisson targets (drawn per seed)
    n_inputs: int = 100
    input_rate: Quantity = unit_default(10 * Hz)
    n_patterns: int = 1
    n_outputs: int = 1
    target_rate: Quantity = unit_default(20 * Hz)
    #: minimal interval between target spikes (dead time of the target process)
    target_min_isi: Quantity = unit_default(10 * ms)
    #: no target spike before this time (the inputs need some time to drive the net)
    target_start: Quantity = unit_default(10 * ms)
    # --- xor: bits as early/late spikes on `afferents_per_input` afferents each, plus bias
    afferents_per_input: int = 2
    #: afferent k of a bit fires at t_bit + k * afferent_spread
    afferent_spread: Quantity = unit_default(1 * ms)
    bias_afferents: int = 1
    t_early: Quantity = unit_default(0 * ms)
    t_late: Quantity = unit_default(6 * ms)
    #: the output's target spike for XOR = 1 and for XOR = 0
    target_true: Quantity = unit_default(14 * ms)
    target_false: Quantity = unit_default(20 * ms)


@dataclass(frozen=True)
class TrainConfig:
    """How it is learnt."""

    #: hidden layer sizes ([] = the single-layer rule)
    hidden: tuple[int, ...] = ()
    epochs: int = 200
    #: learning rate (weight step per error spike) of each layer, input side first, in nA
    rate_nA: tuple[float, ...] = (0.1,)
    #: initial weights ~ N(mean, std), per layer, in nA
    init_mean_nA: tuple[float, ...] = (0.5,)
    init_std_nA: tuple[float, ...] = (1.0,)
    #: stop updating a seed once its convergence criterion holds (epoch of first success)
    stop_at_convergence: bool = True
    #: a target spike counts as matched by an output spike within this tolerance
    tolerance: Quantity = unit_default(1 * ms)
    #: time constant of the van Rossum distance
    vr_tau: Quantity = unit_default(5 * ms)
    #: hidden-layer linearisation [recon]: "timing" (a hidden spike moves by -dV/V' and moves
    #: its kappa with it: the backward kernel is kappa', the gate 1/V' at its spikes) or
    #: "surrogate" (spike density sigma'(V): kernel kappa, gate sigma'(V(t))) or "hybrid" (the
    #: sum of both: existing spikes move, silent neurons can be recruited)
    hidden_gradient: Literal["timing", "surrogate", "hybrid"] = "hybrid"
    #: events processed together in the backward pass (memory)
    chunk: int = 128
    #: [choice] rate-calibrated initialisation, one rate per hidden layer in Hz, optionally one
    #: more for the output layer (empty = off: plain N(mean, std)): per seed, every weight of
    #: layer l is shifted by one constant (bisection, input side first) so that the layer's
    #: neurons fire at this mean rate over the task's patterns before training (an output rate =
    #: the target rate makes "before training" a net that fires as often as it should, at
    #: random times, instead of a silent or bursting one). Why: with a fixed N(mean, std)
    #: the last hidden layer's activity depended on the seed's inputs (0.25-4 spikes per neuron
    #: and pattern in the mapping task; the near-silent seeds did not learn with the old 12 -> 12
    #: net) and the output started anywhere from silent to bursting (docs/normad.md, "Mapping:
    #: diagnosis").
    init_rate_Hz: tuple[float, ...] = ()
    #: [choice] step-size schedule: the rate of every layer at epoch e (0-based update index) is
    #: rate_nA / (1 + e / rate_decay_epochs); 0 = constant (the default, and what every
    #: committed config uses). Why offered: NormAD moves a weight vector by exactly r per error
    #: spike, so with a constant r the output can flicker around a target; in the mapping task a
    #: 1/(1 + e/100) schedule ended worse than a constant step (docs/normad.md), so it is off.
    rate_decay_epochs: float = 0.0
    #: "falls" (summary): the mean van Rossum distance over the last `fall_window` epochs is
    #: below the distance before training (robust to the epoch-to-epoch flicker of one spike)
    fall_window: int = 5


@dataclass(frozen=True)
class NormADRunConfig:
    name: str = "normad"
    task: TaskConfig = field(default_factory=TaskConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    neuron: NormADParameters = field(default_factory=NormADParameters)

    def __post_init__(self):
        n_layers = len(self.train.hidden) + 1
        for key in ("rate_nA", "init_mean_nA", "init_std_nA"):
            if len(getattr(self.train, key)) != n_layers:
                raise ValueError(f"train.{key} needs one value per layer ({n_layers})")
        if self.task.kind == "xor" and self.task.n_outputs != 1:
            raise ValueError("xor has one output neuron")
        if self.train.init_rate_Hz and len(self.train.init_rate_Hz) not in (n_layers - 1, n_layers):
            raise ValueError("train.init_rate_Hz needs one rate per hidden layer, optionally "
                             "followed by one for the output layer (or none)")
        if self.train.rate_decay_epochs < 0 or self.train.fall_window < 1:
            raise ValueError("train.rate_decay_epochs must be >= 0 and train.fall_window >= 1")


# --------------------------------------------------------------------------- tasks
def rng_for(seed: int, key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, key]))


def n_steps(cfg: NormADRunConfig) -> int:
    return int(round(float(cfg.task.duration / cfg.neuron.dt)))


def n_inputs(task: TaskConfig) -> int:
    if task.kind == "xor":
        return task.bias_afferents + 2 * task.afferents_per_input
    return task.n_inputs


XOR_PATTERNS = np.array([[0, 0], [0, 1], [1, 0], [1, 1]])


def xor_inputs(task: TaskConfig, dt) -> np.ndarray:
    """(T, 4, N0) 0/1 input spikes of the four XOR patterns (same for every seed).

    Afferents 0..bias-1 fire at 0 ms (bias); afferent k of bit j fires at
    ``t_early`` (bit 0) or ``t_late`` (bit 1) plus ``k * afferent_spread``."""
    T = int(round(float(task.duration / dt)))
    x = np.zeros((T, 4, n_inputs(task)))
    x[0, :, : task.bias_afferents] = 1
    for p, bits in enumerate(XOR_PATTERNS):
        for j, bit in enumerate(bits):
            t0 = task.t_late if bit else task.t_early
            for k in range(task.afferents_per_input):
                step = int(round(float((t0 + k * task.afferent_spread) / dt)))
                x[step, p, task.bias_afferents + j * task.afferents_per_input + k] = 1
    return x


def xor_targets(task: TaskConfig, dt) -> np.ndarray:
    """(T, 4, 1) target spikes: one at ``target_true`` for XOR = 1, ``target_false`` for 0."""
    T = int(round(float(task.duration / dt)))
    y = np.zeros((T, 4, 1))
    for p, bits in enumerate(XOR_PATTERNS):
        t = task.target_true if bits[0] ^ bits[1] else task.target_false
        y[int(round(float(t / dt))), p, 0] = 1
    return y


def dead_time_poisson(rng, rate_hz, t_start, t_end, min_isi, dt) -> np.ndarray:
    """Step indices of a Poisson process with dead time ``min_isi`` on [t_start, t_end) (s);
    at least one spike (redrawn when empty)."""
    while True:
        times, t = [], t_start + rng.exponential(1 / rate_hz)
        while t < t_end:
            times.append(t)
            t += min_isi + rng.exponential(1 / rate_hz)
        if times:
            return np.unique(np.round(np.array(times) / dt).astype(int))


def make_task(cfg: NormADRunConfig, seeds: list[int]):
    """Inputs (T, S, P, N0) and targets (T, S, P, O), 0/1 float, for every seed."""
    task, dt = cfg.task, float(cfg.neuron.dt / second)
    T, S = n_steps(cfg), len(seeds)
    if task.kind == "xor":
        x = np.broadcast_to(xor_inputs(task, cfg.neuron.dt)[:, None], (T, S, 4, n_inputs(task)))
        y = np.broadcast_to(xor_targets(task, cfg.neuron.dt)[:, None], (T, S, 4, 1))
        return np.ascontiguousarray(x), np.ascontiguousarray(y)
    P, N0, O = task.n_patterns, task.n_inputs, task.n_outputs
    x = np.zeros((T, S, P, N0))
    y = np.zeros((T, S, P, O))
    prob = float(task.input_rate / Hz) * dt
    for si, seed in enumerate(seeds):
        x[:, si] = rng_for(seed, STREAM_INPUTS).random((T, P, N0)) < prob
        rng = rng_for(seed, STREAM_TARGETS)
        for p in range(P):
            for o in range(O):
                steps = dead_time_poisson(rng, float(task.target_rate / Hz),
                                          float(task.target_start / second),
                                          float(task.duration / second) - 2e-3,
                                          float(task.target_min_isi / second), dt)
                y[steps, si, p, o] = 1
    return x, y


def init_weights(cfg: NormADRunConfig, seeds: list[int]) -> list[np.ndarray]:
    """Per layer (S, N_l, N_{l-1}) in amperes, N(mean, std) from each seed's weight stream."""
    sizes = [n_inputs(cfg.task), *cfg.train.hidden,
             1 if cfg.task.kind == "xor" else cfg.task.n_outputs]
    out = [np.empty((len(seeds), sizes[l + 1], sizes[l])) for l in range(len(sizes) - 1)]
    for si, seed in enumerate(seeds):
        rng = rng_for(seed, STREAM_WEIGHTS)
        for l, W in enumerate(out):
            W[si] = rng.normal(cfg.train.init_mean_nA[l], cfg.train.init_std_nA[l],
                               W.shape[1:]) * 1e-9
    return out


def calibrate_init(cfg: NormADRunConfig, weights: list[np.ndarray], x: np.ndarray,
                   iterations: int = 30, span_nA: float = 4.0) -> list[np.ndarray]:
    """Rate-calibrated initialisation (``train.init_rate_Hz``): per seed and layer, input side
    first, add one constant to all the layer's weights, found by bisection on
    [-span, +span] nA, so that the layer's mean rate over neurons and patterns is the target.

    The mean rate grows with the shift (more drive, more spikes), so bisection converges to the
    shift where the rate crosses the target (to 2 span / 2^iterations; the rate itself then
    lies within the jump of the layer's spike count at that shift), or to the end of the
    bracket when the target is out of reach. Returns new arrays; ``weights`` is unchanged."""
    rates = cfg.train.init_rate_Hz
    W = [w.copy() for w in weights]
    if not rates:
        return W
    p = cfg.neuron
    T_s = float(cfg.task.duration / second)
    S = W[0].shape[0]
    for l, rate in enumerate(rates):
        lo, hi = np.full(S, -span_nA * 1e-9), np.full(S, span_nA * 1e-9)
        base = weights[l].copy()
        for _ in range(iterations):
            mid = 0.5 * (lo + hi)
            W[l] = base + mid[:, None, None]
            spikes = simulate(W[: l + 1], x, p)[l]["spikes"]  # (T, S, P, N)
            r = spikes.sum(0).mean(axis=(1, 2)) / T_s  # mean rate per seed, Hz
            low = r < rate
            lo = np.where(low, mid, lo)
            hi = np.where(low, hi, mid)
        W[l] = base + (0.5 * (lo + hi))[:, None, None]
    return W


# --------------------------------------------------------------------------- the rule
def normad_update(weights, layers, x, y, p: NormADParameters, active=None, chunk: int = 128,
                  hidden_gradient: str = "hybrid", dhat_input=None, output_only: bool = False):
    """Normalised directions summed over error spikes, per layer: list of (S, N_l, N_{l-1}).

    ``layers``: output of :func:`models.normad.simulate`; ``x`` (T, S, P, N0) inputs, ``y``
    (T, S, P, O) targets; ``active`` (S,) bool: seeds to update (others get 0). Multiply layer
    l's direction by its rate r_l to get the weight change. ``dhat_input``: the d^ traces of
    ``x`` if already computed (they do not depend on the weights); ``output_only``: skip the
    hidden layers (their directions stay 0).
    """
    L = len(weights)
    T = x.shape[0]
    pres = [x] + [layers[l]["spikes"] for l in range(L - 1)]
    dirs = [np.zeros_like(W) for W in weights]
    err = y.astype(np.int8) - layers[-1]["spikes"].astype(np.int8)
    if active is not None:
        err = err * np.asarray(active, dtype=np.int8)[None, :, None, None]
    te, se, pe, oe = np.nonzero(err)
    if te.size == 0:
        return dirs
    sign = err[te, se, pe, oe].astype(float)
    dhat = [None] * L
    dhat[0] = dhat_traces(x, p) if dhat_input is None else dhat_input
    if L > 1:
        dhat[L - 1] = dhat_traces(pres[L - 1], p)
    # output layer: NormAD itself, direction d^(t_e)/|d^(t_e)| in row o
    g = dhat[L - 1][te, se, pe, :]
    norm = np.linalg.norm(g, axis=1)
    ok = norm > 0
    np.add.at(dirs[L - 1], (se[ok], oe[ok]), (sign[ok] / norm[ok])[:, None] * g[ok])
    if L == 1 or output_only:
        return dirs
    for l in range(1, L - 1):
        dhat[l] = dhat_traces(pres[l], p)
    # time-major (T, S, P, .) -> (S, P, T, .) so that gathering events gives (E, T, .) rows
    tm = lambda a: np.ascontiguousarray(np.moveaxis(a, 0, 2))  # noqa: E731
    dhat = [tm(d) for d in dhat]
    paths = []  # (gate per hidden layer, kernel, derivative flag) of each linearisation
    if hidden_gradient in ("timing", "hybrid"):
        paths.append(([tm(spike_timing_gate(layers[l]["spikes"], layers[l]["v"], p))
                       for l in range(L - 1)], dhat_kernel_derivative, True))
    if hidden_gradient in ("surrogate", "hybrid"):
        paths.append(([tm(surrogate(layers[l]["v"], layers[l]["nr"], p)) for l in range(L - 1)],
                      dhat_kernel, False))
    n0 = max(pres[l].shape[-1] for l in range(L))
    chunk = max(1, min(chunk, int(2e7 // (T * n0))))
    dt = float(p.dt / second)
    order = np.argsort(te, kind="stable")  # chunks of similar t_e: the adjoint is 0 after t_e
    te, se, pe, oe, sign = te[order], se[order], pe[order], oe[order], sign[order]
    for c0 in range(0, te.size, chunk):
        sl = slice(c0, c0 + chunk)
        t_c, s_c, p_c, o_c, sg = te[sl], se[sl], pe[sl], oe[sl], sign[sl]
        Tc = int(t_c.max()) + 1
        # adjoint of V_o(t_e) one layer down: gate_k(s) w_ok kernel(t_e - s), s <= t_e
        lag = t_c[:, None] - np.arange(Tc)[None, :]  # (E, Tc)
        wout = weights[L - 1][s_c, o_c, :]  # (E, N_{L-1})
        lam = 0.0
        for gates, kernel, _ in paths:
            kap = kernel(lag * dt, p) * (lag >= 0)
            lam = lam + gates[L - 2][s_c, p_c, :Tc] * kap[:, :, None] * wout[:, None, :]
        for l in range(L - 2, -1, -1):
            D = dhat[l][s_c, p_c, :Tc]  # (E, Tc, J)
            g = np.einsum("etk,etj->ekj", lam, D, optimize=True)  # (E, K, J)
            norm = np.sqrt(np.einsum("ekj,ekj->e", g, g))
            ok = norm > 0
            np.add.at(dirs[l], s_c[ok], (sg[ok] / norm[ok])[:, None, None] * g[ok])
            if l > 0:
                # the reverse kappa filter (time) and the weights (neurons) commute: project
                # onto the N_{l-1} neurons below first, then filter the smaller array
                proj = np.einsum("etk,ekj->etj", lam, weights[l][s_c], optimize=True)
                new = 0.0
                for gates, _, deriv in paths:
                    back = kappa_filter(proj, p, reverse=True, derivative=deriv, axis=1)
                    new = new + gates[l - 1][s_c, p_c, :Tc] * back
                lam = new
    return dirs


# --------------------------------------------------------------------------- metrics
def van_rossum2(a: np.ndarray, b: np.ndarray, tau: float) -> float:
    r"""Squared van Rossum distance :math:`\frac{1}{\tau}\int (f_a - f_b)^2 dt` with exponential
    filters of time constant tau (closed form over an infinite horizon; one lone spike = 1/2)."""

    def k(u, v):
        if len(u) == 0 or len(v) == 0:
            return 0.0
        return float(np.exp(-np.abs(u[:, None] - v[None, :]) / tau).sum())

    return 0.5 * (k(a, a) + k(b, b) - 2 * k(a, b))


def matched(target: np.ndarray, out: np.ndarray, tol: float) -> int:
    """Target spikes matched one-to-one (greedy in time) by output spikes within ``tol``."""
    used = np.zeros(len(out), dtype=bool)
    n = 0
    for t in target:
        d = np.abs(out - t)
        d[used] = np.inf
        if d.size and d.min() <= tol:
            used[int(np.argmin(d))] = True
            n += 1
    return n


def epoch_metrics(cfg: NormADRunConfig, out_spikes: np.ndarray, y: np.ndarray) -> dict:
    """Per seed: mean van Rossum distance, fraction of target spikes matched, spike counts,
    XOR correctness; arrays of shape (S,)."""
    dt = float(cfg.neuron.dt / second)
    T, S, P, O = y.shape
    tau = float(cfg.train.vr_tau / second)
    tol = float(cfg.train.tolerance / second) + 1e-12
    vr = np.zeros(S)
    nmatch = np.zeros(S)
    ntarget = np.zeros(S)
    nout = np.zeros(S)
    exact = np.ones(S, dtype=bool)
    correct = np.zeros(S)
    for s in range(S):
        for p in range(P):
            for o in range(O):
                a = np.nonzero(out_spikes[:, s, p, o])[0] * dt
                b = np.nonzero(y[:, s, p, o])[0] * dt
                vr[s] += math.sqrt(max(van_rossum2(a, b, tau), 0.0)) / (P * O)
                m = matched(b, a, tol)
                nmatch[s] += m
                ntarget[s] += len(b)
                nout[s] += len(a)
                exact[s] &= (m == len(b)) and (len(a) == len(b))
                if cfg.task.kind == "xor" and len(a):
                    t_true = float(cfg.task.target_true / second)
                    t_false = float(cfg.task.target_false / second)
                    want = t_true if abs(b[0] - t_true) < abs(b[0] - t_false) else t_false
                    other = t_false if want == t_true else t_true
                    correct[s] += abs(a[0] - want) < abs(a[0] - other)
    m = {"vr_distance": vr, "frac_matched": nmatch / ntarget, "out_spikes": nout / (P * O),
         "exact": exact.astype(float)}
    if cfg.task.kind == "xor":
        m["xor_correct"] = correct / P
    return m


def hidden_metrics(layers) -> dict:
    """Per hidden layer l (1-based) and seed: ``hidden<l>_spikes`` (mean spikes per neuron and
    pattern) and ``hidden<l>_silent`` (fraction of neurons silent for every pattern)."""
    m = {}
    for l, layer in enumerate(layers[:-1], start=1):
        counts = layer["spikes"].sum(0)  # (S, P, N)
        m[f"hidden{l}_spikes"] = counts.mean(axis=(1, 2)).astype(float)
        m[f"hidden{l}_silent"] = (counts.sum(1) == 0).mean(1).astype(float)
    return m


def converged(cfg: NormADRunConfig, m: dict) -> np.ndarray:
    """XOR: all four patterns classified right; single: every target spike matched within the
    tolerance and no extra spike; mapping: the same as single (all patterns, all outputs)."""
    if cfg.task.kind == "xor":
        return m["xor_correct"] >= 1.0
    return m["exact"] >= 1.0


# --------------------------------------------------------------------------- training
def train(cfg: NormADRunConfig, seeds: list[int], progress=None):
    """Train every seed at once. Returns (history: list of per-epoch metric dicts, weights,
    converged_epoch (S,) with -1 for never, final output spikes, x, y)."""
    x, y = make_task(cfg, seeds)
    W = calibrate_init(cfg, init_weights(cfg, seeds), x)
    p = cfg.neuron
    rates = [r * 1e-9 for r in cfg.train.rate_nA]
    S = len(seeds)
    dhat_x = dhat_traces(x, p)
    active = np.ones(S, dtype=bool)
    conv_epoch = np.full(S, -1)
    history = []
    for epoch in range(cfg.train.epochs + 1):
        layers = simulate(W, x, p)
        m = epoch_metrics(cfg, layers[-1]["spikes"], y)
        m.update(hidden_metrics(layers))
        ok = converged(cfg, m)
        newly = ok & (conv_epoch < 0)
        conv_epoch[newly] = epoch
        m["converged"] = ok.astype(float)
        m["active"] = active.astype(float)
        history.append(m)
        if cfg.train.stop_at_convergence:
            active &= conv_epoch < 0
        if progress and (epoch % 10 == 0 or epoch == cfg.train.epochs):
            progress(epoch, m, conv_epoch)
        if epoch == cfg.train.epochs or not active.any():
            break
        dirs = normad_update(W, layers, x, y, p, active, cfg.train.chunk,
                             cfg.train.hidden_gradient, dhat_x,
                             output_only=not any(rates[:-1]))
        tau = cfg.train.rate_decay_epochs
        decay = 1.0 / (1.0 + epoch / tau) if tau else 1.0
        for l in range(len(W)):
            W[l] += decay * rates[l] * dirs[l]
    return history, W, conv_epoch, layers[-1]["spikes"], x, y


# --------------------------------------------------------------------------- statistics
def mean_ci(values, level: float = 0.95):
    """Mean, standard deviation and the t-interval of the mean (nan where undefined)."""
    from scipy import stats

    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return math.nan, math.nan, (math.nan, math.nan)
    mean = float(v.mean())
    if v.size < 2:
        return mean, math.nan, (math.nan, math.nan)
    sd = float(v.std(ddof=1))
    h = float(stats.t.ppf(0.5 + level / 2, v.size - 1)) * sd / math.sqrt(v.size)
    return mean, sd, (mean - h, mean + h)


def wilson(k: int, n: int, z: float = 1.959964):
    """Wilson score interval of a proportion k/n."""
    if n == 0:
        return math.nan, math.nan
    ph = k / n
    den = 1 + z * z / n
    c = (ph + z * z / (2 * n)) / den
    h = z * math.sqrt(ph * (1 - ph) / n + z * z / (4 * n * n)) / den
    return max(0.0, c - h), min(1.0, c + h)


def parse_seeds(text: str) -> list[int]:
    """``"0-9"`` or ``"0,3,5"`` or ``"0-4,8"`` -> list of ints."""
    out = []
    for part in text.split(","):
        part = part.strip()
        if "-" in part:
            a, b = part.split("-")
            out.extend(range(int(a), int(b) + 1))
        elif part:
            out.append(int(part))
    return out


def _csv_bytes(rows: list[dict]) -> bytes:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue().encode()


def fell_mask(vr, window: int = 5):
    """Did the distance fall? ``vr`` (epochs, ...) from epoch 0 (before training): the mean over
    the last ``window`` epochs is below epoch 0's value (a single last epoch flickers with one
    spike more or less; a fixed window does not)."""
    vr = np.asarray(vr, dtype=float)
    return vr[-window:].mean(axis=0) < vr[0]


def silent_distance(cfg: NormADRunConfig, y: np.ndarray) -> np.ndarray:
    """(S,) van Rossum distance of a *silent* output to the targets, averaged like
    :func:`epoch_metrics` (sqrt(n/2) for n target spikes far apart): the reference a net that
    learnt nothing but silence would reach."""
    return epoch_metrics(cfg, np.zeros_like(y), y)["vr_distance"]


def summarise(cfg: NormADRunConfig, seeds, history, conv_epoch, y=None) -> tuple[list[dict], str]:
    """Per-seed rows and the markdown summary with 95 % CIs (``y``: the targets, for the
    silent-output reference distance)."""
    S = len(seeds)
    win = cfg.train.fall_window
    silent = silent_distance(cfg, y) if y is not None else None
    rows = []
    for s, seed in enumerate(seeds):
        final = history[-1]
        vr_all = np.array([h["vr_distance"][s] for h in history])
        fm_all = np.array([h["frac_matched"][s] for h in history])
        row = {"seed": seed, "converged": int(conv_epoch[s] >= 0),
               "epochs_to_convergence": int(conv_epoch[s]) if conv_epoch[s] >= 0 else "",
               "vr_initial": round(float(vr_all[0]), 6), "vr_final": round(float(final["vr_distance"][s]), 6),
               "vr_min": round(float(vr_all.min()), 6),
               "vr_last10": round(float(vr_all[-10:].mean()), 6),
               "vr_last_window": round(float(vr_all[-win:].mean()), 6),
               "fell": int(fell_mask(vr_all, win)),
               "frac_matched_initial": round(float(history[0]["frac_matched"][s]), 6),
               "frac_matched_final": round(float(final["frac_matched"][s]), 6),
               "frac_matched_last_window": round(float(fm_all[-win:].mean()), 6),
               "out_spikes_final": round(float(final["out_spikes"][s]), 4)}
        if silent is not None:
            row["vr_silent_output"] = round(float(silent[s]), 6)
        for key in [k for k in history[0] if k.startswith("hidden")]:
            row[f"{key}_initial"] = round(float(history[0][key][s]), 4)
            row[f"{key}_final"] = round(float(final[key][s]), 4)
        if cfg.task.kind == "xor":
            row["xor_correct_final"] = float(final["xor_correct"][s])
        rows.append(row)
    k = int((conv_epoch >= 0).sum())
    lo, hi = wilson(k, S)
    ep = conv_epoch[conv_epoch >= 0]
    mean, sd, (clo, chi) = mean_ci(ep)
    crit = {"xor": "all 4 patterns classified right (first output spike nearer its own target)",
            "single": "every target spike matched within the tolerance and no extra spike",
            "mapping": "every target spike of every pattern matched, no extra spike"}[cfg.task.kind]
    lines = [f"# {cfg.name}: NormAD, {S} seeds ({seeds[0]}-{seeds[-1]})", "",
             f"Convergence: {crit}. Epochs counted from 0 (= before training); "
             f"at most {cfg.train.epochs}.", "",
             "| quantity | value |", "| --- | --- |",
             f"| seeds converged | {k}/{S} (95 % Wilson CI {lo:.2f}-{hi:.2f}) |"]
    if ep.size:
        lines.append(f"| epochs to convergence | mean {mean:.1f}, sd {sd:.1f}, 95 % CI "
                     f"{clo:.1f}-{chi:.1f}; median {np.median(ep):.0f}, range {ep.min()}-{ep.max()} |")
    for key, label in (("vr_initial", "van Rossum distance, before"),
                       ("vr_final", "van Rossum distance, final"),
                       ("vr_last_window", f"van Rossum distance, mean of the last {win} epochs"),
                       ("frac_matched_initial", "target spikes matched within tolerance, before"),
                       ("frac_matched_final", "target spikes matched within tolerance, final"),
                       ("frac_matched_last_window",
                        f"target spikes matched within tolerance, mean of the last {win} epochs")):
        vals = [r[key] for r in rows]
        mu, sdv, (a, b) = mean_ci(vals)
        lines.append(f"| {label} | {mu:.3f} (sd {sdv:.3f}, 95 % CI {a:.3f}-{b:.3f}) |")
    drop = [r["vr_initial"] - r["vr_last_window"] for r in rows]
    mu, sdv, (a, b) = mean_ci(drop)
    lines.append(f"| fall of the distance (before - mean of the last {win} epochs) | {mu:.3f} "
                 f"(sd {sdv:.3f}, 95 % CI {a:.3f}-{b:.3f}) |")
    fell = sum(r["fell"] for r in rows)
    flo, fhi = wilson(fell, S)
    lines.append(f"| seeds whose distance fell (mean of the last {win} epochs < before) | "
                 f"**{fell}/{S}** (95 % Wilson CI {flo:.2f}-{fhi:.2f}) |")
    if silent is not None:
        mu, sdv, (a, b) = mean_ci([r["vr_silent_output"] for r in rows])
        below = sum(r["vr_last_window"] < r["vr_silent_output"] for r in rows)
        lines.append(f"| reference: distance of a silent output | {mu:.3f} (sd {sdv:.3f}, 95 % CI "
                     f"{a:.3f}-{b:.3f}); seeds whose last-{win} mean is below it: {below}/{S} |")
    fell1 = sum(r["vr_final"] < r["vr_initial"] for r in rows)
    lines.append(f"| seeds whose distance fell (final epoch alone < before) | {fell1}/{S} |")
    for key in [k for k in history[0] if k.startswith("hidden")]:
        what = ("mean spikes per neuron and pattern" if key.endswith("spikes")
                else "fraction of neurons silent for every pattern")
        l_ = key[len("hidden"):].split("_")[0]
        a0 = mean_ci([r[f"{key}_initial"] for r in rows])[0]
        a1 = mean_ci([r[f"{key}_final"] for r in rows])[0]
        lines.append(f"| hidden layer {l_}: {what}, before -> final (mean over seeds) | "
                     f"{a0:.2f} -> {a1:.2f} |")
    if cfg.task.kind == "xor":
        lines.append(f"| XOR accuracy, final (mean over seeds) | "
                     f"{np.mean([r['xor_correct_final'] for r in rows]):.3f} |")
    lines += ["", "Final = the epoch training stopped at (convergence, or the last epoch). "
              f"van Rossum: tau = {cfg.train.vr_tau}, sqrt of (1/tau) int (f-g)^2 dt, averaged "
              f"over patterns and outputs (one lone spike = 0.707). Tolerance {cfg.train.tolerance}. "
              f"Fell: the mean distance over the last {win} epochs (train.fall_window) is below "
              "the distance before training (epoch 0). vR silent: the distance a silent output "
              "would have.",
              "", f"| seed | converged | epochs | vR before | vR final | vR last {win} | fell | "
              f"vR silent | matched before | matched final | matched last {win} |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        ref = f"{r['vr_silent_output']:.3f}" if "vr_silent_output" in r else ""
        lines.append(f"| {r['seed']} | {r['converged']} | {r['epochs_to_convergence']} | "
                     f"{r['vr_initial']:.3f} | {r['vr_final']:.3f} | {r['vr_last_window']:.3f} | "
                     f"{'yes' if r['fell'] else 'no'} | {ref} | "
                     f"{r['frac_matched_initial']:.3f} | {r['frac_matched_final']:.3f} | "
                     f"{r['frac_matched_last_window']:.3f} |")
    return rows, "\n".join(lines) + "\n"


def write_records(cfg, seeds, history, W, conv_epoch, out_spikes, y, out: Path, wall: float,
                  command: str, cpu: float = math.nan) -> str:
    ver = versions()
    cdict = config_to_dict(cfg)
    keys = [k for k in history[0] if k not in ("active",)]
    for s, seed in enumerate(seeds):
        d = out / f"seed{seed}"
        atomic_write_json(d / "config.json", {"config": cdict, "seed": seed, "versions": ver,
                                              "converged_epoch": int(conv_epoch[s])})
        rows = [{"epoch": e, **{k: round(float(h[k][s]), 6) for k in keys}}
                for e, h in enumerate(history)]
        atomic_write_bytes(d / "metrics.csv", _csv_bytes(rows))
        atomic_savez(d / "weights.npz", {f"W{l + 1}_amp": W[l][s] for l in range(len(W))})
        atomic_savez(d / "final_spikes.npz", {
            "output_steps_pattern_neuron": np.argwhere(out_spikes[:, s]),
            "target_steps_pattern_neuron": np.argwhere(y[:, s]),
            "dt_s": np.array(float(cfg.neuron.dt / second))})
    rows, md = summarise(cfg, seeds, history, conv_epoch, y)
    md += (f"\nCommand: `{command}`; wall time {wall:.0f} s, CPU time {cpu:.0f} s (all seeds at "
           f"once, one process; wall time on a shared machine).\n")
    atomic_write_bytes(out / "summary.csv", _csv_bytes(rows))
    atomic_write_bytes(out / "summary.md", md.encode())
    atomic_write_json(out / "run.json", {"config": cdict, "seeds": seeds, "versions": ver,
                                         "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
                                         "command": command,
                                         "converged_epoch": [int(c) for c in conv_epoch]})
    return md


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m protocols.normad", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--seeds", default="0-9", help="e.g. 0-9 or 0,3,5")
    ap.add_argument("--out", required=True)
    ap.add_argument("--epochs", type=int, default=None, help="override train.epochs")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, NormADRunConfig)
    if args.epochs is not None:
        cfg = replace(cfg, train=replace(cfg.train, epochs=args.epochs))
    seeds = parse_seeds(args.seeds)
    t0, c0 = time.time(), time.process_time()

    def progress(epoch, m, conv):
        print(f"epoch {epoch:4d}  vR {m['vr_distance'].mean():.3f}  matched "
              f"{m['frac_matched'].mean():.3f}  converged {(conv >= 0).sum()}/{len(conv)}  "
              f"{time.time() - t0:.0f} s", flush=True)

    history, W, conv, out_spikes, x, y = train(cfg, seeds, progress)
    wall, cpu = time.time() - t0, time.process_time() - c0
    command = "python -m protocols.normad " + " ".join(argv if argv is not None else sys.argv[1:])
    md = write_records(cfg, seeds, history, W, conv, out_spikes, y, Path(args.out), wall, command,
                       cpu)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
