r"""Fused GPU loops of the batched forward pass (CuPy): the LIF recurrence over all T steps in one
kernel launch per layer, and the input layer's traces likewise.

The equations are those of :mod:`models.batched` (one thread per unit and image)::

    V ← V·d;  V ← V + I[t];  s[t] = V ≥ v_th;  V ← 0 or V − v_th on a spike (the tested v_th)
    count += s;  trace_m ← trace_m·d + s;  trace_p ← trace_p·d_p + s

The array-module loop runs the same recurrence as ~10 element-wise kernels per step, so on a
GPU its time is kernel launches (T × layers × ~10). Here the state stays in registers for all
T steps. Kernels are compiled with ``--fmad=false``: a multiply and the following add are
rounded separately, as NumPy does, so spikes and traces equal the NumPy loop's bit for bit.
"""

from __future__ import annotations

import functools

import numpy as np

_LIF_SOURCE = r"""
extern "C" __global__ void lif_{name}(
    const {T}* __restrict__ current, const {T}* __restrict__ th, const {T} decay,
    const {T} decay_p, const int steps, const long long units_per_step, const int n,
    const bool subtract, const bool do_m, const bool do_p,
    bool* __restrict__ spikes, {T}* __restrict__ count, {T}* __restrict__ trace_m,
    {T}* __restrict__ trace_p)
{{
    // one thread per (image, unit): index i of the (B, N) state; steps are units_per_step apart
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= units_per_step) return;
    const {T} theta = th[i % n];
    {T} v = 0, c = 0, tm = 0, tp = 0;
    for (int t = 0; t < steps; ++t) {{
        const long long k = (long long)t * units_per_step + i;
        v = v * decay;
        v = v + current[k];
        const bool s = v >= theta;
        const {T} add = s ? ({T})1 : ({T})0;
        if (subtract) v = v - add * theta;
        else if (s) v = 0;
        spikes[k] = s;
        c = c + add;
        if (do_m) tm = tm * decay + add;
        if (do_p) tp = tp * decay_p + add;
    }}
    count[i] = c;
    if (do_m) trace_m[i] = tm;
    if (do_p) trace_p[i] = tp;
}}

extern "C" __global__ void traces_{name}(
    const bool* __restrict__ spikes, const {T} decay_m, const {T} decay_p, const int steps,
    const long long units_per_step, const bool do_p,
    {T}* __restrict__ count, {T}* __restrict__ trace_m, {T}* __restrict__ trace_p)
{{
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= units_per_step) return;
    {T} c = 0, tm = 0, tp = 0;
    for (int t = 0; t < steps; ++t) {{
        const {T} add = spikes[(long long)t * units_per_step + i] ? ({T})1 : ({T})0;
        tm = tm * decay_m + add;
        c = c + add;
        if (do_p) tp = tp * decay_p + add;
    }}
    count[i] = c;
    trace_m[i] = tm;
    if (do_p) trace_p[i] = tp;
}}
"""

_THREADS = 256


@functools.lru_cache(maxsize=None)
def _module(ctype: str):
    import cupy

    source = _LIF_SOURCE.format(T=ctype, name=ctype)
    return cupy.RawModule(code=source, options=("--fmad=false",))


def _ctype(dtype) -> str:
    dtype = np.dtype(dtype)
    if dtype == np.float32:
        return "float"
    if dtype == np.float64:
        return "double"
    raise ValueError(f"the GPU kernels take float32 or float64, got {dtype}")


def _contiguous(*arrays):
    for a in arrays:
        if a is not None and not a.flags.c_contiguous:
            raise ValueError("the GPU kernels need C-contiguous arrays")


def lif_run_cuda(current, th, decay, subtract: bool, out, count, trace_m, decay_p=None,
                 trace_p=None) -> None:
    """:func:`models.batched.lif_run` in one kernel: ``current`` ``(T, B, N)``, ``th`` ``(N,)``;
    writes ``out`` (bool ``(T, B, N)``), ``count``, ``trace_m`` (may be None), ``trace_p``."""
    T, B, N = current.shape
    ctype = _ctype(current.dtype)
    dt = current.dtype.type
    _contiguous(current, th, out, count, trace_m, trace_p)
    units = B * N
    kernel = _module(ctype).get_function(f"lif_{ctype}")
    blocks = (units + _THREADS - 1) // _THREADS
    kernel((blocks,), (_THREADS,),
           (current, th, dt(decay), dt(decay_p if decay_p is not None else 0.0), np.int32(T),
            np.int64(units), np.int32(N), np.bool_(subtract), np.bool_(trace_m is not None),
            np.bool_(trace_p is not None),
            out, count, trace_m if trace_m is not None else count,
            trace_p if trace_p is not None else count))


def traces_cuda(spikes, decay_m, decay_p, count, trace_m, trace_p) -> None:
    """Count and traces of given bool spike trains ``(T, B, N)`` into ``(B, N)`` arrays."""
    import cupy

    T = spikes.shape[0]
    units = int(count.size)
    ctype = _ctype(count.dtype)
    dt = count.dtype.type
    spikes = cupy.ascontiguousarray(spikes)
    _contiguous(count, trace_m, trace_p)
    kernel = _module(ctype).get_function(f"traces_{ctype}")
    blocks = (units + _THREADS - 1) // _THREADS
    kernel((blocks,), (_THREADS,),
           (spikes, dt(decay_m), dt(decay_p if decay_p is not None else 0.0), np.int32(T),
            np.int64(units), np.bool_(trace_p is not None), count, trace_m,
            trace_p if trace_p is not None else count))
