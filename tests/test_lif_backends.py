"""One grid for the LIF membrane of every backend against Brian2 (issue #14).

The LIF update of docs/method.md §2 (:math:`V \\leftarrow dV + I;\\ s = V \\ge v_{th};` reset to 0
or by subtracting :math:`v_{th}`) is written out by hand four times:

* Brian2: the equation, threshold and reset strings of :mod:`models.neurons` (``method='exact'``,
  so :math:`d = e^{-dt/\\tau_m}` is computed by Brian2 from dt and tau_m), scheduled by
  :mod:`models.network` — the reference here;
* NumPy: the array-module loop :func:`models.batched.lif_run` (``backend='xp'``);
* numba: ``_lif_membrane`` of :mod:`models.batched`, inlined into the event-driven conv, pooling
  and FC kernels and the bare recurrence ``_lif_numba`` (``backend='numba'``);
* CUDA: the fused kernel of :mod:`models.batched_cuda` (CuPy, ``backend='auto'``); the same
  NumPy loop also runs on CuPy arrays (``backend='xp'``).

None of them has a refractory period (:func:`models.neurons.lif_group` sets none; a unit may
fire in every step), so the options are the reset mode, tau_m and dt (which the trainer's
backends see only through ``LIFParameters.decay``) and the float type. Every case of
reset x tau_m x dt x dtype drives the same fixed random input raster through the same fixed
weight matrix (one FC layer of 200 units with spread-out thresholds and drives, so that some
units are silent, some fire in most steps) in Brian2 and in each backend, and compares
spike for spike and membrane for membrane:

* float64: the rasters must be identical and the membranes equal to 1e-12 (Brian2 adds the
  synaptic weights one by one, the trainer as one matrix product: round-off of ~1e-16);
* float32 against Brian2's float64 (Brian2 has no float32): a unit may legitimately part from
  Brian2 where its float64 membrane is within float32 round-off of its threshold; see
  :func:`_check_float32`.

Brian2 runs once per (reset, tau_m, dt) with the ``numpy`` code generation target (no
compilation). The CuPy cases skip without CuPy or a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import gc

import numpy as np
import pytest
from brian2 import StateMonitor, ms, prefs

from models import batched
from models.batched import LayerParams, fc_current_cl, forward, lif_run
from models.parameters import LIFParameters
from models.topology import parse_topology
from test_cupy import require_cupy  # CuPy with a usable GPU, else skip

RESETS = ("zero", "subtract")
TAU_M_MS = (5.0, 20.0, 100.0)
DT_MS = (0.1, 1.0, 2.5)
DTYPES = (np.float32, np.float64)
BACKENDS = (
    "numpy",
    "numba",
    pytest.param("cuda", marks=pytest.mark.gpu),  # fused kernel of models.batched_cuda
    pytest.param("cupy-xp", marks=pytest.mark.gpu),  # the array-module loop on CuPy arrays
)

T = 50  # steps, whatever dt is
N_IN, N = 64, 200
TOPOLOGY = f"{N_IN}x1-{N}FC"

#: float32 against float64: a unit may part from Brian2 only at a step where Brian2's membrane
#: is within this distance of the threshold. Float32 rounds the weights, the decay and every
#: product and sum to 6e-8 relative; over T = 50 steps the float32 membrane stays within
#: 3.4e-6 x (1 + |V|) of the float64 one (measured over this grid), i.e. < 1e-5 near a threshold
#: (v_th <= 1.5). 1e-4 leaves a 10x margin and is far below the typical |V - v_th| (~0.1).
NEAR_TIE_32 = 1e-4
#: membranes before a unit parts: |V32 - V64| <= MEMBRANE_32 * (1 + |V64|)
MEMBRANE_32 = 2e-5
#: ... and at most this fraction of the units may part at all (measured: none in this grid)
MAX_PARTED_32 = 0.02


@functools.lru_cache(maxsize=None)
def _drive():
    """Input raster (T, N_IN) bool, weights (N, N_IN) and thresholds (N,), float64."""
    rng = np.random.default_rng(14)
    spikes = rng.random((T, N_IN)) < 0.2
    # per-unit mean weight from inhibitory to excitatory: about a third of the units never
    # fire, ~1 % fire at every step
    mean = np.linspace(-0.03, 0.05, N)[:, None]
    weights = mean + rng.normal(0.0, 0.12, (N, N_IN))
    thresholds = rng.uniform(0.3, 1.5, N)
    return spikes, weights, thresholds


def _lif(reset: str, tau_m_ms: float, dt_ms: float) -> LIFParameters:
    return LIFParameters(dt=dt_ms * ms, tau_m=tau_m_ms * ms, reset=reset)


@contextlib.contextmanager
def _brian2_numpy_target():
    """Brian2's runtime device, ``numpy`` target: no Cython compilation per parameter set."""
    from brian2 import set_device

    set_device("runtime")
    target = prefs.codegen.target
    prefs.codegen.target = "numpy"
    # Network.run calls gc.collect(), which walks every object of the test process (~0.5 s per
    # run on 2 busy cores); objects older than this run are frozen out of that walk
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
        prefs.codegen.target = target


@functools.lru_cache(maxsize=None)
def _brian2(reset: str, tau_m_ms: float, dt_ms: float):
    """Brian2's spikes (T, N) and membranes (T, N) before and after the reset of each step."""
    from models.network import build_network

    spikes, weights, thresholds = _drive()
    lif = _lif(reset, tau_m_ms, dt_ms)
    with _brian2_numpy_target():
        sn = build_network(TOPOLOGY, {1: weights}, {1: thresholds},
                           input_spikes=spikes.reshape(T, 1, N_IN, 1), lif=lif)
        group = sn.groups[1]
        # after the threshold test (thresholds slot), before the reset (resets slot)
        pre = StateMonitor(group, "v", record=True, when="resets", order=-1)
        post = StateMonitor(group, "v", record=True, when="end")
        sn.net.add(pre, post)
        sn.net.run(T * lif.dt, namespace={})
        out = (sn.spike_arrays(T)[1].reshape(T, N), np.asarray(pre.v).T.copy(),
               np.asarray(post.v).T.copy())
    assert out[1].shape == (T, N)
    return out


class _PreResetRecorder:
    """An array module for :func:`lif_run` that records the membrane at each threshold test.

    The loop calls ``xp.greater_equal(v, th, out=...)`` once per step, after the leak and the
    input and before the reset; everything else is the wrapped module's.
    """

    def __init__(self, xp):
        self._xp = xp
        self.v = []

    def __getattr__(self, name):
        return getattr(self._xp, name)

    def greater_equal(self, v, th, out=None):
        self.v.append(v.copy())
        return self._xp.greater_equal(v, th, out=out)


if batched._HAVE_NUMBA:
    import numba

    # not cache=True: numba's cache would not notice a change of _lif_membrane in models/batched.py
    # and keep testing the old one
    @numba.njit
    def _numba_membrane(current, th, decay, subtract):
        # the production _lif_membrane over (T, N) currents of one image; returns the membrane
        # after each step's reset and the spikes
        steps, n = current.shape
        zero = decay - decay
        one = zero + 1
        v = np.zeros(n, current.dtype)
        spikes = np.zeros((steps, n), np.uint8)
        v_post = np.zeros((steps, n), current.dtype)
        for t in range(steps):
            batched._lif_membrane(v, current[t], th, decay, subtract, zero, one, spikes[t])
            v_post[t] = v
        return v_post, spikes


def _run_backend(backend: str, lif: LIFParameters, dtype):
    """Spikes (T, N) bool, spike count (N,) and membranes of ``backend``: a dict with 'pre'
    (before the reset) and/or 'post' (after it), (T, N), where the backend exposes them."""
    spikes, weights, thresholds = _drive()
    layers = parse_topology(TOPOLOGY)
    x = spikes.reshape(T, 1, 1, N_IN, 1)
    membranes = {}
    if backend in ("numpy", "numba"):
        if backend == "numba" and not batched._HAVE_NUMBA:
            pytest.skip("numba is not installed: no compiled backend to compare")
        xp = np
        params = [None, LayerParams(weights, thresholds)]
        result = forward(layers, params, x, lif, dtype=dtype, backend="xp" if backend == "numpy"
                         else "numba")
    else:
        xp = require_cupy()
        params = [None, LayerParams(xp.asarray(weights), xp.asarray(thresholds))]
        result = forward(layers, params, xp.asarray(x), lif, xp=xp, dtype=dtype,
                         backend="auto" if backend == "cuda" else "xp")
    out = np.asarray(batched.to_numpy(result.spikes[1])).reshape(T, N)
    count = np.asarray(batched.to_numpy(result.count[1])).reshape(N)

    # membranes: the backend's own update code on the currents its forward pass computes, so
    # that its spikes here must equal the forward pass's bit for bit
    decay = np.dtype(dtype).type(lif.decay)
    subtract = lif.reset == "subtract"
    if backend in ("numpy", "cupy-xp"):
        th = xp.asarray(thresholds, dtype=dtype)
        wmat = xp.ascontiguousarray(xp.asarray(weights, dtype=dtype).T)  # (N_IN, N)
        current = fc_current_cl(xp.asarray(x).reshape(T, 1, N_IN), wmat, xp=xp, dtype=dtype)
        rec = _PreResetRecorder(xp)
        buffers = (xp.empty((T, 1, N), bool), xp.empty((1, N), dtype), xp.empty((1, N), dtype))
        lif_run(current, th, decay, subtract, *buffers, xp=rec)
        membranes["pre"] = np.stack([batched.to_numpy(v)[0] for v in rec.v])
        np.testing.assert_array_equal(batched.to_numpy(buffers[0]).reshape(T, N), out,
                                      err_msg="lif_run on the recorded currents")
    elif backend == "numba":
        # _fc_layer_numba's currents: the weight rows of this step's input spikes added one by
        # one in input order (not a matrix product: float32 sums would round differently)
        wt = np.ascontiguousarray(weights.T.astype(dtype))
        current = np.zeros((T, N), dtype)
        for t in range(T):
            for j in np.flatnonzero(spikes[t]):
                current[t] += wt[j]
        v_post, sp = _numba_membrane(current, thresholds.astype(dtype), decay, subtract)
        membranes["post"] = v_post
        np.testing.assert_array_equal(sp.astype(bool), out, err_msg="_lif_membrane harness")
    # the fused CUDA kernel keeps V in registers and never writes it: spikes and counts only
    return out, count, membranes


def _first_parting(a, b):
    """Per unit, the first step where the rasters (T, N) differ, or T where they never do."""
    differ = a != b
    return np.where(differ.any(axis=0), differ.argmax(axis=0), T)


def _check_float32(case, ours, membranes, ref_spikes, ref_pre, ref_post, thresholds):
    """Float32 against Brian2's float64.

    Float32 rounds the weights, the decay and each step's arithmetic, so a membrane that lies
    within round-off of its threshold may cross it in one precision and not the other; from that
    step on the unit's two trajectories differ (a reset in one only). So, per unit, up to the first
    step where its spikes differ from Brian2's the membranes must agree to float32 accuracy, that
    step must be a near-tie in Brian2's float64 membrane (|V - v_th| <= NEAR_TIE_32), and at most
    MAX_PARTED_32 of the units may part at all. A wrong reset or leak makes units part at steps
    far from threshold, which fails.
    """
    first = _first_parting(ours, ref_spikes)
    parted = np.flatnonzero(first < T)
    for unit in parted:
        t = first[unit]
        gap = abs(ref_pre[t, unit] - thresholds[unit])
        assert gap <= NEAR_TIE_32, (
            f"{case}: unit {unit} parts from Brian2 at step {t} with V = {ref_pre[t, unit]:.6f}, "
            f"v_th = {thresholds[unit]:.6f}: not a float32 near-tie")
    assert len(parted) <= MAX_PARTED_32 * N, f"{case}: {len(parted)} of {N} units part"
    before = np.arange(T)[:, None] < first[None, :]  # steps before each unit parts
    for name, ref in (("pre", ref_pre), ("post", ref_post)):
        if name in membranes:
            # relative to 1 + |V|: V ranges over +-50 here (measured: <= 3.4e-6)
            err = (np.abs(membranes[name] - ref) / (1.0 + np.abs(ref)))[before]
            assert err.max(initial=0.0) <= MEMBRANE_32, (
                f"{case}: {name}-reset membrane off by {err.max():.2e} x (1 + |V|)")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("dt_ms", DT_MS, ids=lambda v: f"dt{v}ms")
@pytest.mark.parametrize("tau_m_ms", TAU_M_MS, ids=lambda v: f"tau{v:g}ms")
@pytest.mark.parametrize("reset", RESETS)
def test_backend_lif_equals_brian2(reset, tau_m_ms, dt_ms, dtype, backend):
    lif = _lif(reset, tau_m_ms, dt_ms)
    case = f"{backend} {np.dtype(dtype).name} reset={reset} tau_m={tau_m_ms} ms dt={dt_ms} ms"
    ours, count, membranes = _run_backend(backend, lif, dtype)
    ref_spikes, ref_pre, ref_post = _brian2(reset, tau_m_ms, dt_ms)
    # the drive must exercise the reset (measured: 17-28 % of unit-steps spike)
    assert 0.1 < ref_spikes.mean() < 0.4, f"{case}: Brian2 rate {ref_spikes.mean():.3f}"
    np.testing.assert_array_equal(count, ours.sum(axis=0), err_msg=f"{case}: count")
    if np.dtype(dtype) == np.float64:
        np.testing.assert_array_equal(ours, ref_spikes, err_msg=f"{case}: spikes")
        for name, ref in (("pre", ref_pre), ("post", ref_post)):
            if name in membranes:
                np.testing.assert_allclose(membranes[name], ref, rtol=1e-12, atol=1e-12,
                                           err_msg=f"{case}: {name}-reset membrane")
    else:
        _check_float32(case, ours, membranes, ref_spikes, ref_pre, ref_post, _drive()[2])


def test_grid_tells_reset_and_leak_apart():
    """The cases differ from each other: a backend that ignored the reset mode, tau_m or dt
    would fail some of them."""
    rasters = {(reset, tau, dt): _brian2(reset, tau, dt)[0]
               for reset in RESETS for tau in TAU_M_MS for dt in DT_MS}
    keys = list(rasters)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            assert (rasters[a] != rasters[b]).any(), f"{a} and {b} give the same spikes"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reset", RESETS)
def test_conv_pool_fc_chain_equals_brian2(reset, backend):
    """The grid drives one FC layer; the numba backend inlines the same update into separate
    conv and pooling kernels, and the pooling layer has its own weight and threshold. One
    strongly leaky case (tau_m = 5 ms, dt = 2.5 ms) through conv -> pool -> FC, float64."""
    from models.initialisation import initialise
    from models.network import build_network
    from models.parameters import InitParameters

    topology = "8x8x2-3C3-2P-5FC"
    layers = parse_topology(topology)
    rng = np.random.default_rng(15)
    params = initialise(layers, rng, init=InitParameters(alpha=0.5), dtype=np.float64)
    steps = 30
    x = rng.random((steps, 1, 2, 8, 8)) < 0.4
    lif = _lif(reset, 5.0, 2.5)
    if backend in ("numpy", "numba"):
        if backend == "numba" and not batched._HAVE_NUMBA:
            pytest.skip("numba is not installed: no compiled backend to compare")
        result = forward(layers, params, x, lif, dtype=np.float64,
                         backend="xp" if backend == "numpy" else "numba")
    else:
        xp = require_cupy()
        gpu_params = [None if p is None else LayerParams(xp.asarray(p.weights),
                                                         xp.asarray(p.thresholds))
                      for p in params]
        result = forward(layers, gpu_params, xp.asarray(x), lif, xp=xp, dtype=np.float64,
                         backend="auto" if backend == "cuda" else "xp")
    with _brian2_numpy_target():
        sn = build_network(topology, [None if p is None else p.weights for p in params],
                           [None if p is None else p.thresholds for p in params],
                           input_spikes=x[:, 0], lif=lif)
        sn.net.run(steps * lif.dt, namespace={})
        reference = sn.spike_arrays(steps)
    for index, layer in enumerate(layers[1:], start=1):
        ours = np.asarray(batched.to_numpy(result.spikes[index]))[:, 0]
        assert reference[index].any(), f"layer {index} ({layer.kind}) is silent"
        np.testing.assert_array_equal(ours, reference[index], err_msg=f"{backend} reset={reset}: "
                                      f"layer {index} ({layer.kind})")


def test_float32_check_rejects_a_parting_away_from_threshold():
    """The float32 rule of the grid can fail: a spike moved to a step where Brian2's membrane
    is far from threshold (what a wrong reset or leak does) is not excused as round-off."""
    spikes, pre, post = _brian2("subtract", 20.0, 1.0)
    thresholds = _drive()[2]
    gap = np.abs(pre - thresholds)
    t, unit = np.argwhere(~spikes & (gap > 0.1))[0]  # silent, far below threshold
    moved = spikes.copy()
    moved[t, unit] = True
    _check_float32("intact", spikes, {"pre": pre, "post": post}, spikes, pre, post, thresholds)
    with pytest.raises(AssertionError, match="not a float32 near-tie"):
        _check_float32("moved", moved, {"pre": pre, "post": post}, spikes, pre, post, thresholds)
