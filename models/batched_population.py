"""The batched forward pass of :mod:`models.batched` for a population: R networks of the same
topology, each with its own weights and thresholds, on R batches of B images at once.

The population is folded into the batch axis (member-major rows: member r's images are rows
``r·B .. r·B + B - 1``) everywhere except where a member's own weights are applied: the conv and
FC input currents are one batched matrix product over a leading member axis,
``(R, T·B·Ho·Wo, C·k·k) @ (R, C·k·k, M)`` (im2col) and ``(R, T·B, N_in) @ (R, N_in, n)``, one
kernel on a GPU instead of R. The LIF recurrence, pooling and the traces run over all R·B rows
with per-member thresholds. Array-module path only (NumPy or CuPy; on CuPy the recurrence runs
in the fused kernel of :mod:`models.batched_cuda`).

Each member's matrix products have the shapes and memory layout of its single run (same
images per chunk on NumPy), and everything else is element-wise, so on NumPy a member's spikes,
counts and traces equal :func:`models.batched.forward` with ``backend='xp'`` bit for bit.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from models.batched import (Forward, LayerParams, _chunk_size, _traces_from_spikes,
                            check_params, lif_run, pool_current_cl)
from models.parameters import LIFParameters, PoolingParameters
from models.topology import ConvLayer, FCLayer, InputLayer, Layer

#: images per chunk on a GPU: this many bytes of currents and im2col over the whole population
GPU_POPULATION_BUDGET = 8e9


def forward_population(
    layers: Sequence[Layer],
    params: Sequence[Sequence[LayerParams | None]],
    input_spikes,
    lif: LIFParameters = LIFParameters(),
    pool: PoolingParameters = PoolingParameters(),
    *,
    xp=np,
    dtype=np.float32,
    tau_p: float | None = None,
    record_trace_m: bool = True,
    hidden_traces: bool = True,
    use_cuda: bool | None = None,
    chunk: int | None = None,
) -> Forward:
    """Simulate R networks (``params[r]``, one list per member, as :func:`forward` takes) on
    ``input_spikes`` bool ``(T, R, B, C, H, W)`` (``(T, R, B, H, W)`` for one channel): member
    r sees ``input_spikes[:, r]``.

    Returns one :class:`Forward` over R·B member-major rows with the internal (channels-last)
    counts and traces only; spikes are not kept. :func:`member` cuts out one member.
    ``use_cuda`` (default: on CuPy) runs the recurrence in the fused kernel. ``chunk``: images
    per member per chunk (default: the single run's on NumPy, which keeps results bit for bit
    those of a single run; on a GPU, :data:`GPU_POPULATION_BUDGET` over the population).
    """
    R = len(params)
    if R < 1:
        raise ValueError("a population needs at least one member")
    for p in params:
        check_params(layers, p)
    if not isinstance(layers[0], InputLayer):
        raise ValueError("layers[0] must be the input layer of parse_topology(...)")
    dtype = np.dtype(dtype)
    if use_cuda is None:
        use_cuda = getattr(xp, "__name__", "") == "cupy"
    x = input_spikes
    c0, h0, w0 = layers[0].shape
    if x.ndim == 5 and c0 == 1:
        x = x[:, :, :, None]
    if x.ndim != 6 or tuple(x.shape[1:2] + x.shape[3:]) != (R, c0, h0, w0) or x.dtype != bool:
        raise ValueError(f"input_spikes must be bool (T, {R}, batch, {c0}, {h0}, {w0}), got "
                         f"{x.dtype} {tuple(x.shape)}")
    T, B = int(x.shape[0]), int(x.shape[2])
    x_cl = xp.moveaxis(x, 3, -1)  # (T, R, B, H, W, C) view

    decay = dtype.type(lif.decay)
    decay_p = dtype.type(math.exp(-1.0 / tau_p)) if tau_p is not None else None
    subtract = lif.reset == "subtract"

    # per layer: stacked weight matrices (R, K, M) as forward's xp path prepares them, and the
    # thresholds of every unit (R, N)
    prepared: list = [None]
    for i, layer in enumerate(layers[1:], start=1):
        if isinstance(layer, ConvLayer):
            n_pos = layer.shape[1] * layer.shape[2]
            w = xp.stack([xp.asarray(p[i].weights, dtype=dtype).reshape(layer.n_maps, -1).T
                          for p in params])
            th = xp.stack([xp.tile(xp.asarray(p[i].thresholds, dtype=dtype).reshape(-1), n_pos)
                           for p in params])
            prepared.append((xp.ascontiguousarray(w), th))
        elif isinstance(layer, FCLayer):
            c, h, w_ = layer.in_shape
            w = xp.stack([xp.asarray(p[i].weights, dtype=dtype).reshape(layer.n, c, h, w_)
                          .transpose(2, 3, 1, 0).reshape(-1, layer.n) for p in params])
            th = xp.stack([xp.broadcast_to(xp.asarray(p[i].thresholds, dtype=dtype).reshape(-1),
                                           (layer.n,)) for p in params])
            prepared.append((xp.ascontiguousarray(w), xp.ascontiguousarray(th)))
        else:
            n = int(np.prod(layer.shape))
            prepared.append((dtype.type(pool.weight), xp.full((R, n), pool.v_th, dtype=dtype)))

    n_layers = len(layers)
    last = n_layers - 1
    count_cl: list = [None] * n_layers
    trace_p_cl: list = [None] * n_layers
    trace_m_cl: list = [None] * n_layers
    for i, layer in enumerate(layers):
        c, h, w = layer.shape
        count_cl[i] = xp.empty((R, B, h, w, c), dtype=dtype)
        trace_m_cl[i] = xp.empty((R, B, h, w, c), dtype=dtype)
        if decay_p is not None and (hidden_traces or i == last):
            trace_p_cl[i] = xp.empty((R, B, h, w, c), dtype=dtype)

    # input layer, member by member in forward's chunks of 256 images (element-wise)
    for r in range(R):
        for b0 in range(0, B, 256):
            b1 = min(B, b0 + 256)
            tp0 = None if trace_p_cl[0] is None else trace_p_cl[0][r, b0:b1]
            _traces_from_spikes(x_cl[:, r, b0:b1].reshape(T, b1 - b0, -1), decay,
                                None if tp0 is None else decay_p, count_cl[0][r, b0:b1],
                                trace_m_cl[0][r, b0:b1], tp0, xp, False, use_cuda)

    if chunk is not None:
        step = int(chunk)
    elif xp is np:
        step = _chunk_size(layers, T, B, 96e6)  # forward's default: the same products
    else:
        step = _chunk_size(layers, T, B, GPU_POPULATION_BUDGET / R)
    for b0 in range(0, B, step):
        b1 = min(B, b0 + step)
        bc = b1 - b0
        s = xp.ascontiguousarray(x_cl[:, :, b0:b1])  # (T, R, bc, H, W, C) bool
        for i in range(1, n_layers):
            layer = layers[i]
            c, h, w = layer.shape
            n = h * w * c
            weights, th = prepared[i]
            if isinstance(layer, ConvLayer):
                current = _member_major(_conv_current(s, weights, layer.kernel, xp, dtype),
                                        T, bc, xp)
            elif isinstance(layer, FCLayer):
                current = _member_major(_fc_current(s, weights, xp, dtype), T, bc, xp)
            else:
                H, W, C = s.shape[3:]
                current = pool_current_cl(s.reshape(T, R * bc, H, W, C), layer.size, weights,
                                          xp=xp, dtype=dtype).reshape(T, R, bc, n)
            out = xp.empty((T, R, bc, n), dtype=bool)
            states = [None if a is None else a[:, b0:b1].reshape(R, bc, n)
                      for a in (count_cl[i], trace_m_cl[i], trace_p_cl[i])]
            _lif(current, th, decay, subtract, out, *states, decay_p, xp, use_cuda)
            del current
            s = out.reshape(T, R, bc, h, w, c)

    def rows(a):
        return None if a is None else a.reshape((R * B,) + a.shape[2:])

    return Forward(layers=layers, spikes=[None] * n_layers, count=[], trace_p=[], trace_m=[],
                   T=T, count_cl=[rows(a) for a in count_cl],
                   trace_p_cl=[rows(a) for a in trace_p_cl],
                   trace_m_cl=[rows(a) for a in trace_m_cl])


def member(fwd: Forward, r: int, n_members: int) -> Forward:
    """Member r's part of a population's :class:`Forward` (internal arrays only, views)."""
    B = fwd.count_cl[-1].shape[0] // n_members

    def cut(a):
        return None if a is None else a[r * B:(r + 1) * B]

    return Forward(layers=fwd.layers, spikes=[None] * len(fwd.layers), count=[], trace_p=[],
                   trace_m=[], T=fwd.T, count_cl=[cut(a) for a in fwd.count_cl],
                   trace_p_cl=[cut(a) for a in fwd.trace_p_cl],
                   trace_m_cl=[cut(a) for a in fwd.trace_m_cl])


def _conv_current(s, kmats, k: int, xp, dtype):
    """(R, T·bc·Ho·Wo, M) currents of (T, R, bc, H, W, C) spikes: member r's im2col matrix, laid
    out as :func:`models.batched.im2col_cl` lays out a single run's, times its kernel matrix."""
    T, R, bc, H, W, C = s.shape
    ho, wo = H - k + 1, W - k + 1
    st = s.strides
    view = xp.lib.stride_tricks.as_strided(
        s, shape=(R, T, bc, ho, wo, C, k, k),
        strides=(st[1], st[0], st[2], st[3], st[4], st[5], st[3], st[4]))
    cols = xp.empty((R, T, bc, ho, wo, C, k, k), dtype=dtype)
    cols[...] = view
    return xp.matmul(cols.reshape(R, T * bc * ho * wo, C * k * k), kmats)


def _fc_current(s, wmats, xp, dtype):
    """(R, T·bc, n) currents of (T, R, bc, ...) spikes."""
    T, R, bc = s.shape[:3]
    x = xp.empty((R, T, bc, int(np.prod(s.shape[3:]))), dtype=dtype)
    x[...] = xp.moveaxis(s.reshape(T, R, bc, -1), 1, 0)
    return xp.matmul(x.reshape(R, T * bc, -1), wmats)


def _member_major(current, T: int, bc: int, xp):
    """(R, T·bc·..., m) currents as a (T, R, bc, N) view."""
    return xp.moveaxis(current.reshape(current.shape[0], T, bc, -1), 0, 1)


def _lif(current, th, decay, subtract, out, count, trace_m, trace_p, decay_p, xp, use_cuda):
    """The recurrence over (T, R, bc, N) currents with per-member thresholds th (R, N)."""
    T, R, bc, N = current.shape
    if not use_cuda:
        # bc·N is contiguous per member; the views need no copy of the currents
        lif_run(current, th[:, None, :], decay, subtract, out, count, trace_m, decay_p,
                trace_p, xp=xp)
        return
    # the fused kernel takes flat (T, units) arrays and one threshold per unit
    flat = xp.ascontiguousarray(current).reshape(T, 1, R * bc * N)
    th_full = xp.ascontiguousarray(xp.broadcast_to(th[:, None, :], (R, bc, N))).reshape(-1)
    tmp = [None if a is None else xp.empty((1, R * bc * N), dtype=current.dtype)
           for a in (count, trace_m, trace_p)]
    lif_run(flat, th_full, decay, subtract, out.reshape(T, 1, -1), tmp[0], tmp[1], decay_p,
            tmp[2], xp=xp, use_cuda=True)
    for dst, src in zip((count, trace_m, trace_p), tmp):
        if dst is not None:
            dst[...] = src.reshape(R, bc, N)
