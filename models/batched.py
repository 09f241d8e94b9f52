r"""Batched forward pass of the spiking network: the same equations as the Brian2 models.

Every trainable layer and every pooling layer is the LIF membrane of docs/method.md §2, with dt = 1 step:

.. math::
    V[t] = d\,V[t-1] + I[t], \qquad s[t] = V[t] \ge v_{th}, \qquad
    V[t] \leftarrow 0 \ (\text{reset='zero'}) \ \text{or}\ V[t] - v_{th}\ (\text{'subtract'})

with :math:`d = e^{-dt/\tau_m}` (:attr:`LIFParameters.decay`) and :math:`V[-1] = 0`. The
thresholds are frozen (after pre-training: base :math:`v_{th}` + adapted :math:`\theta`), so a
reset by subtraction removes exactly the threshold the spike crossed, as the Brian2 layers do
under homeostasis (``LIFParameters.reset``; :mod:`models.neurons`). The input
current of a layer at step t comes from the previous layer's spikes at the **same** step t (no
synaptic delay):

* convolution (correlation, stride 1, no padding), kernels ``(n_maps, C_in, k, k)``:
  :math:`I[m,y,x] = \sum_{c,dy,dx} K[m,c,dy,dx]\, s[c,y+dy,x+dx]`; thresholds per map ``(n_maps,)``;
* pooling, fixed: :math:`I[c,y,x] = w_{pool} \sum_{k\times k\ block} s`, threshold
  :attr:`PoolingParameters.v_th`;
* fully connected, weights ``(n_out, n_in)`` with inputs flattened in (C, H, W) order;
  thresholds a scalar or ``(n_out,)``.

Efficient form (docs/method.md §4.1): one layer at a time, the input currents of **all** T steps are one
matrix product over (batch × T) (im2col for convolutions), in float32 BLAS; then the recurrence
runs element-wise over T. On the CPU the recurrence is one fused, compiled loop (numba) that also
accumulates the end-of-presentation traces the backward pass needs, so the currents are read once.
The batch is processed in chunks so the currents of a chunk stay a few tens of MB.

Array layout: spike arrays at the interface are time-major ``(T, batch, C, H, W)`` bool, as
:func:`protocols.encoding.poisson_spikes` returns. Internally activity is channels-last
``(T, batch, H, W, C)`` (the im2col matrix product yields that order); the public arrays are
views with the axes moved, never copies.

The array module is a seam: ``xp=numpy`` (default) or ``xp=cupy`` runs the same code on a GPU;
the compiled CPU loop is used only for NumPy arrays (``backend='auto'``), fused CUDA kernels for
the recurrence on CuPy arrays, and ``backend='xp'`` forces the plain array-module loop, which the
tests compare both against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from models.parameters import LIFParameters, PoolingParameters
from models.topology import ConvLayer, FCLayer, InputLayer, Layer, PoolLayer

try:  # optional compiled CPU path; the plain array-module loop is the fallback
    import numba

    _HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised only where numba is absent
    numba = None
    _HAVE_NUMBA = False


# ----------------------------------------------------------------------------------------------
# Parameters of the trainable layers


@dataclass
class LayerParams:
    """Trainable parameters of one conv or FC layer.

    ``weights``: conv ``(n_maps, C_in, k, k)``, FC ``(n_out, n_in)``; ``thresholds``: conv
    ``(n_maps,)``, FC ``(n_out,)``. Thresholds are carried (from initialisation or pre-training)
    but not trained by BP.
    """

    weights: Any
    thresholds: Any


def layer_names(layers: Sequence[Layer]) -> list[str | None]:
    """Names of the trainable layers as in saved files: ``conv1``, ``conv2``, ``fc1``, ...; None
    for the input and pooling layers."""
    names: list[str | None] = []
    n_conv = n_fc = 0
    for layer in layers:
        if isinstance(layer, ConvLayer):
            n_conv += 1
            names.append(f"conv{n_conv}")
        elif isinstance(layer, FCLayer):
            n_fc += 1
            names.append(f"fc{n_fc}")
        else:
            names.append(None)
    return names


def params_to_arrays(layers: Sequence[Layer], params: Sequence[LayerParams | None]) -> dict:
    """Flat ``{name: array}`` view of the parameters (``conv1_kernels``, ``conv1_thresholds``,
    ``fc1_weights``, ``fc1_thresholds``, ...), the format of checkpoints and pre-training files."""
    out = {}
    for name, layer, p in zip(layer_names(layers), layers, params):
        if name is None:
            continue
        wname = "kernels" if isinstance(layer, ConvLayer) else "weights"
        out[f"{name}_{wname}"] = np.asarray(to_numpy(p.weights))
        out[f"{name}_thresholds"] = np.asarray(to_numpy(p.thresholds))
    return out


def params_from_arrays(layers: Sequence[Layer], arrays, dtype=np.float32, xp=np) -> list:
    """Inverse of :func:`params_to_arrays`; checks every shape against the topology."""
    params: list[LayerParams | None] = []
    for name, layer in zip(layer_names(layers), layers):
        if name is None:
            params.append(None)
            continue
        wname = "kernels" if isinstance(layer, ConvLayer) else "weights"
        w = np.asarray(arrays[f"{name}_{wname}"])
        th = np.asarray(arrays[f"{name}_thresholds"])
        params.append(LayerParams(xp.asarray(w, dtype=dtype), xp.asarray(th, dtype=dtype)))
    check_params(layers, params)
    return params


def weight_shape(layer: Layer) -> tuple[int, ...]:
    if isinstance(layer, ConvLayer):
        return (layer.n_maps, layer.in_shape[0], layer.kernel, layer.kernel)
    if isinstance(layer, FCLayer):
        return (layer.n, layer.fan_in)
    raise TypeError(f"{type(layer).__name__} has no trainable weights")


def check_params(layers: Sequence[Layer], params: Sequence[LayerParams | None]) -> None:
    """Raise ``ValueError`` naming the layer when a parameter does not fit the topology."""
    if len(params) != len(layers):
        raise ValueError(
            f"params has {len(params)} entries but the topology has {len(layers)} layers "
            f"(one entry per layer, None for the input and pooling layers)"
        )
    for i, (name, layer, p) in enumerate(zip(layer_names(layers), layers, params)):
        if name is None:
            if p is not None:
                raise ValueError(f"layer {i} ({layer.kind}) has no parameters; pass None")
            continue
        if p is None:
            raise ValueError(f"layer {i} ({name}) needs LayerParams(weights, thresholds)")
        want = weight_shape(layer)
        if tuple(p.weights.shape) != want:
            raise ValueError(f"{name} weights have shape {tuple(p.weights.shape)}, the topology "
                             f"needs {want}")
        th_shape = tuple(np.shape(p.thresholds))
        n = want[0]
        if isinstance(layer, ConvLayer):
            ok = th_shape == (n,)
        else:
            ok = th_shape in ((), (1,), (n,))
        if not ok:
            raise ValueError(f"{name} thresholds have shape {th_shape}; need ({n},)"
                             + ("" if isinstance(layer, ConvLayer) else " or a scalar"))


# ----------------------------------------------------------------------------------------------
# The forward pass


@dataclass
class Forward:
    """Result of :func:`forward`.

    Per layer ``i`` (0 = input), in the public layout:

    * ``spikes[i]``: bool ``(T, batch, C, H, W)`` (None for a hidden layer when
      ``keep_spikes=False``; the input and output layers are always kept);
    * ``count[i]``: spike count over the presentation, ``(batch, C, H, W)``;
    * ``trace_p[i]``: :math:`\\sum_k e^{-(T-1-t_k)/\\tau_p}`, the low-pass filtered spike train at
      the last step (the activation of docs/method.md §4.1), when ``tau_p`` was given;
    * ``trace_m[i]``: the same with :math:`\\tau_m` (for the ``lee2020`` derivative).

    FC layers have shape ``(batch, n, 1, 1)`` here; :meth:`flat` gives ``(batch, n)``.
    """

    layers: Sequence[Layer]
    spikes: list
    count: list
    trace_p: list
    trace_m: list
    T: int
    #: the same arrays in the internal channels-last layout ``(batch, H, W, C)`` (the public ones
    #: above are views of these), read by the backward pass
    count_cl: list = field(default_factory=list, repr=False)
    trace_p_cl: list = field(default_factory=list, repr=False)
    trace_m_cl: list = field(default_factory=list, repr=False)

    @staticmethod
    def flat(a):
        return a.reshape(a.shape[0], -1)


def to_numpy(a):
    """A NumPy array of ``a`` (copied from the GPU for a CuPy array)."""
    return a.get() if hasattr(a, "get") else a


def _chunk_size(layers: Sequence[Layer], T: int, batch: int, budget_bytes: float) -> int:
    """Images per chunk so that the largest per-layer temporary (currents + im2col) fits."""
    per_image = 0
    for layer in layers[1:]:
        c, h, w = layer.shape
        size = T * c * h * w * 4 * 2  # currents (float32) and spikes/bookkeeping
        if isinstance(layer, ConvLayer):
            size += T * h * w * layer.fan_in * 4
        per_image = max(per_image, size)
    return int(max(1, min(batch, budget_bytes // max(per_image, 1))))


def forward(
    layers: Sequence[Layer],
    params: Sequence[LayerParams | None],
    input_spikes,
    lif: LIFParameters = LIFParameters(),
    pool: PoolingParameters = PoolingParameters(),
    *,
    xp=np,
    dtype=np.float32,
    tau_p: float | None = None,
    keep_spikes: bool = True,
    record_trace_m: bool = True,
    hidden_traces: bool = True,
    backend: str = "auto",
    chunk: int | None = None,
    chunk_budget_bytes: float | None = None,
) -> Forward:
    """Simulate the network on a batch of input spike trains, all layers, all steps.

    Parameters
    ----------
    layers
        ``parse_topology(...)``.
    params
        One entry per layer: :class:`LayerParams` for conv / FC layers, None for input / pool.
    input_spikes
        bool ``(T, batch, C, H, W)`` (or ``(T, batch, H, W)`` for one channel).
    lif, pool
        Membrane (decay, reset) of every layer; fixed pooling weight and threshold.
    xp, dtype
        Array module (numpy or cupy) and float type of currents and membranes. Use ``float64``
        to compare spikes with the Brian2 model (which computes in float64); training uses
        ``float32``. The membrane update is ``V·decay`` then ``+ I`` (two roundings, no FMA).
    tau_p
        Activation time constant in steps (dt units); when given, ``trace_p`` is recorded.
        ``count`` is always recorded.
    record_trace_m
        Record ``trace_m`` (time constant tau_m; only the ``lee2020`` pseudo-derivative reads
        it). Off, ``trace_m`` is None and the compiled loop skips its update at every step.
    hidden_traces
        Record ``trace_p`` of the input and hidden layers (the backward pass reads them). Off
        (evaluation: inference only), only the output layer's ``trace_p`` is recorded, which
        the read-out and the NLL need; the others are None. Spikes and counts are unchanged.
    keep_spikes
        Keep every hidden layer's spike trains (the Brian2 comparison needs them; training
        does not, and saves the memory).
    backend
        ``'auto'`` (compiled loop for NumPy arrays when numba is installed; one fused CUDA
        kernel per layer's recurrence for CuPy arrays, :mod:`models.batched_cuda`), ``'numba'``
        or ``'xp'`` (plain array-module loop).
    chunk
        Images per chunk (default: ~16 MB of spikes per layer for the compiled loop; for the
        array-module loop, ``chunk_budget_bytes`` of currents and im2col temporaries; default
        96 MB on the CPU (cache-friendly) and 2 GB on a GPU, where every chunk costs launches).
    """
    check_params(layers, params)
    if not isinstance(layers[0], InputLayer):
        raise ValueError("layers[0] must be the input layer of parse_topology(...)")
    if backend not in ("auto", "numba", "xp"):
        raise ValueError(f"backend must be 'auto', 'numba' or 'xp', got {backend!r}")
    use_numba = backend == "numba" or (backend == "auto" and _HAVE_NUMBA and xp is np)
    if use_numba and (not _HAVE_NUMBA or xp is not np):
        raise ValueError("backend='numba' needs numba installed and xp=numpy")
    # on CuPy, 'auto' runs each layer's recurrence as one fused kernel (models.batched_cuda)
    use_cuda = backend == "auto" and getattr(xp, "__name__", "") == "cupy"
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")

    x = input_spikes
    c0, h0, w0 = layers[0].shape
    if x.ndim == 4 and c0 == 1:
        x = x[:, :, None]
    if x.ndim != 5 or tuple(x.shape[2:]) != (c0, h0, w0):
        raise ValueError(f"input_spikes must have shape (T, batch, {c0}, {h0}, {w0}), "
                         f"got {tuple(input_spikes.shape)}")
    if x.dtype != bool:
        raise ValueError(f"input_spikes must be bool, got {x.dtype}")
    T, batch = int(x.shape[0]), int(x.shape[1])
    x_cl = xp.moveaxis(x, 2, -1)  # (T, B, H, W, C) view

    decay = dtype.type(lif.decay)
    decay_m = decay
    decay_p = dtype.type(math.exp(-1.0 / tau_p)) if tau_p is not None else None
    subtract = lif.reset == "subtract"

    # per-layer prepared weights (in the internal channels-last order) and thresholds
    prepared: list = [None]
    for layer, p in zip(layers[1:], params[1:]):
        if isinstance(layer, ConvLayer):
            w = xp.asarray(p.weights, dtype=dtype)
            th = xp.ascontiguousarray(xp.asarray(p.thresholds, dtype=dtype).reshape(-1))
            th = xp.broadcast_to(th.reshape(1, 1, -1), layer.shape[1:] + (layer.n_maps,))
            th = xp.ascontiguousarray(th).reshape(-1)  # over (Ho, Wo, M)
            if use_numba:  # (k, C, k, M), dx reversed: see _conv_layer_numba
                prepared.append((np.ascontiguousarray(w.transpose(2, 1, 3, 0)[:, :, ::-1]), th))
            else:  # (C·k·k, M) im2col weight matrix
                prepared.append((xp.ascontiguousarray(w.reshape(layer.n_maps, -1).T), th))
        elif isinstance(layer, FCLayer):
            c, h, w = layer.in_shape
            wmat = xp.asarray(p.weights, dtype=dtype).reshape(layer.n, c, h, w)
            wmat = xp.ascontiguousarray(wmat.transpose(2, 3, 1, 0).reshape(-1, layer.n))
            th = xp.asarray(p.thresholds, dtype=dtype).reshape(-1)
            th = xp.ascontiguousarray(xp.broadcast_to(th, (layer.n,)))
            prepared.append((wmat, th))
        else:
            n = int(np.prod(layer.shape))
            prepared.append((dtype.type(pool.weight), xp.full(n, pool.v_th, dtype=dtype)))

    n_layers = len(layers)
    last = n_layers - 1
    spikes_cl: list = [None] * n_layers
    spikes_cl[0] = x_cl
    count_cl: list = [None] * n_layers
    trace_p_cl: list = [None] * n_layers
    trace_m_cl: list = [None] * n_layers
    for i, layer in enumerate(layers):
        c, h, w = layer.shape
        if i > 0 and (keep_spikes or i == last):
            spikes_cl[i] = xp.empty((T, batch, h, w, c), dtype=bool)
        count_cl[i] = xp.empty((batch, h, w, c), dtype=dtype)
        if record_trace_m or (i == 0 or not use_numba):
            trace_m_cl[i] = xp.empty((batch, h, w, c), dtype=dtype)
        if decay_p is not None and (hidden_traces or i == last):
            trace_p_cl[i] = xp.empty((batch, h, w, c), dtype=dtype)

    # input layer: its traces (the presynaptic activation of the first weights)
    for b0 in range(0, batch, 256):
        b1 = min(batch, b0 + 256)
        xin = x_cl[:, b0:b1].reshape(T, b1 - b0, -1)
        tp0 = None if trace_p_cl[0] is None else trace_p_cl[0][b0:b1]
        _traces_from_spikes(xin, decay_m, None if tp0 is None else decay_p, count_cl[0][b0:b1],
                            trace_m_cl[0][b0:b1], tp0, xp, use_numba, use_cuda)

    if chunk is not None:
        step = int(chunk)
    elif use_numba:
        # no large temporaries, only the spikes of one layer passed to the next: keep them
        # near cache size (16 MB; measured on the shallow net, T = 50: chunks of 8 images make
        # the pooling kernel ~1.5x faster than one chunk of 100, which streams 100 MB of spikes)
        largest = max(int(np.prod(layer.shape)) for layer in layers)
        step = max(numba.get_num_threads(), int(16e6 // max(1, T * largest)))
        step = min(batch, step)
    else:
        if chunk_budget_bytes is None:
            chunk_budget_bytes = 96e6 if xp is np else 2e9
        step = _chunk_size(layers, T, batch, chunk_budget_bytes)
    for b0 in range(0, batch, step):
        b1 = min(batch, b0 + step)
        bc = b1 - b0
        s = xp.ascontiguousarray(x_cl[:, b0:b1])  # (T, bc, H, W, C) bool
        for i in range(1, n_layers):
            layer = layers[i]
            c, h, w = layer.shape
            n = h * w * c
            # the compiled kernels store spikes as uint8 (a bool store does not vectorise)
            out = xp.empty((T, bc, n), dtype=np.uint8 if use_numba else bool)
            cnt = count_cl[i][b0:b1].reshape(bc, n)
            tm = None if trace_m_cl[i] is None else trace_m_cl[i][b0:b1].reshape(bc, n)
            tp = None if trace_p_cl[i] is None else trace_p_cl[i][b0:b1].reshape(bc, n)
            weights, th = prepared[i]
            if use_numba:
                dp = decay_p if decay_p is not None else dtype.type(0)
                flags = (tm is not None, tp is not None)
                tm_arg = tm if tm is not None else cnt  # placeholders, never written
                tp_arg = tp if tp is not None else cnt
                s = s.view(np.uint8)  # the kernels read spikes as bytes
                if isinstance(layer, ConvLayer):
                    _conv_layer_numba(s, weights, th, decay, subtract, dp, flags, out,
                                      cnt, tm_arg, tp_arg)
                elif isinstance(layer, PoolLayer):
                    _pool_layer_numba(s, layer.size, weights, th, decay, subtract, dp,
                                      flags, out, cnt, tm_arg, tp_arg)
                else:
                    _fc_layer_numba(s.reshape(T, bc, -1), weights, th, decay, subtract, dp,
                                    flags, out, cnt, tm_arg, tp_arg)
                out = out.view(bool)
            else:
                if isinstance(layer, ConvLayer):
                    current = conv_current_cl(s, weights, layer.kernel, xp=xp, dtype=dtype)
                elif isinstance(layer, PoolLayer):
                    current = pool_current_cl(s, layer.size, weights, xp=xp, dtype=dtype)
                else:
                    current = fc_current_cl(s, weights, xp=xp, dtype=dtype)
                lif_run(current.reshape(T, bc, n), th, decay, subtract, out, cnt, tm, decay_p,
                        tp, xp=xp, use_cuda=use_cuda)
                del current
            s = out.reshape(T, bc, h, w, c)
            if spikes_cl[i] is not None:
                spikes_cl[i][:, b0:b1] = s

    def public(a):  # (B, H, W, C) -> (B, C, H, W) view
        return None if a is None else xp.moveaxis(a, -1, 1)

    return Forward(
        layers=layers,
        spikes=[None if s is None else xp.moveaxis(s, -1, 2) for s in spikes_cl],
        count=[public(a) for a in count_cl],
        trace_p=[public(a) for a in trace_p_cl],
        trace_m=[public(a) for a in trace_m_cl],
        T=T,
        count_cl=count_cl,
        trace_p_cl=trace_p_cl,
        trace_m_cl=trace_m_cl,
    )


# ----------------------------------------------------------------------------------------------
# Input currents, channels-last: activity (T, B, H, W, C)


def im2col_cl(s, k: int, *, xp=np, dtype=np.float32):
    """``(T, B, H, W, C)`` activity to the im2col matrix ``(T·B·Ho·Wo, C·k·k)`` of ``dtype``;
    columns in (c, dy, dx) order, matching ``kernels.reshape(n_maps, -1)``."""
    T, B, H, W, C = s.shape
    ho, wo = H - k + 1, W - k + 1
    s = xp.ascontiguousarray(s)
    st = s.strides
    view = xp.lib.stride_tricks.as_strided(
        s, shape=(T, B, ho, wo, C, k, k),
        strides=(st[0], st[1], st[2], st[3], st[4], st[2], st[3]))
    cols = xp.empty((T, B, ho, wo, C, k, k), dtype=dtype)
    cols[...] = view
    return cols.reshape(T * B * ho * wo, C * k * k)


def conv_current_cl(s, kmat, k: int, *, xp=np, dtype=np.float32):
    """Convolution (correlation) currents ``(T, B, Ho, Wo, M)`` from ``(T, B, H, W, C)`` spikes and
    the kernel matrix ``kernels.reshape(M, -1).T``."""
    T, B, H, W, C = s.shape
    cols = im2col_cl(s, k, xp=xp, dtype=dtype)
    out = cols @ kmat
    return out.reshape(T, B, H - k + 1, W - k + 1, kmat.shape[1])


def pool_current_cl(s, size: int, weight, *, xp=np, dtype=np.float32):
    """Fixed pooling currents: ``weight`` × (number of spikes in each size×size block)."""
    T, B, H, W, C = s.shape
    blocks = s.reshape(T, B, H // size, size, W // size, size, C)
    counts = blocks.sum(axis=(3, 5), dtype=np.int8 if size * size < 128 else np.int32)
    out = counts.astype(dtype)
    out *= weight
    return out


def fc_current_cl(s, wmat, *, xp=np, dtype=np.float32):
    """Fully-connected currents ``(T, B, n)``; ``wmat`` is the weight matrix permuted to the
    channels-last flattening ``(H·W·C, n)``."""
    T, B = s.shape[:2]
    x = s.reshape(T * B, -1).astype(dtype)
    return (x @ wmat).reshape(T, B, -1)


# ----------------------------------------------------------------------------------------------
# The LIF recurrence over T (and the traces the backward pass reads)


def lif_run(current, th, decay, subtract: bool, out, count, trace_m, decay_p=None, trace_p=None,
            *, xp=np, use_numba: bool = False, use_cuda: bool = False):
    """Run the LIF recurrence on ``current`` ``(T, B, N)`` with thresholds ``th`` ``(N,)``.

    Writes spikes into ``out`` (bool ``(T, B, N)``) and, at the last step, the spike ``count``,
    ``trace_m`` (decay ``decay`` per step) and ``trace_p`` (decay ``decay_p``) into ``(B, N)``.
    """
    if use_cuda:
        from models.batched_cuda import lif_run_cuda

        lif_run_cuda(current, th, decay, subtract, out, count, trace_m, decay_p, trace_p)
        return
    if use_numba:
        dt = current.dtype.type
        _lif_numba(current, th, dt(decay), subtract, out.view(np.uint8), count, trace_m,
                   dt(decay_p if decay_p is not None else 0.0),
                   trace_p if trace_p is not None else count, (True, trace_p is not None))
        return
    T = current.shape[0]
    v = xp.zeros(current.shape[1:], dtype=current.dtype)
    count[...] = 0
    trace_m[...] = 0
    if trace_p is not None:
        trace_p[...] = 0
    for t in range(T):
        v *= decay
        v += current[t]
        st = out[t]
        xp.greater_equal(v, th, out=st)
        if subtract:
            v -= st * th
        else:
            v[st] = 0
        trace_m *= decay
        trace_m += st
        count += st
        if trace_p is not None:
            trace_p *= decay_p
            trace_p += st


def _traces_from_spikes(s, decay_m, decay_p, count, trace_m, trace_p, xp, use_numba,
                        use_cuda=False):
    """Count and traces of given spike trains ``(T, B, N)`` (the input layer)."""
    T, B = s.shape[:2]
    count = count.reshape(B, -1)
    trace_m = trace_m.reshape(B, -1)
    if trace_p is not None:
        trace_p = trace_p.reshape(B, -1)
    if use_cuda:
        from models.batched_cuda import traces_cuda

        traces_cuda(s, decay_m, decay_p, count, trace_m, trace_p)
        return
    if use_numba:
        dt = count.dtype.type
        _traces_numba(s, dt(decay_m), dt(decay_p if decay_p is not None else 0.0), count, trace_m,
                      trace_p if trace_p is not None else count, trace_p is not None)
        return
    count[...] = 0
    trace_m[...] = 0
    if trace_p is not None:
        trace_p[...] = 0
    for t in range(T):
        trace_m *= decay_m
        trace_m += s[t]
        count += s[t]
        if trace_p is not None:
            trace_p *= decay_p
            trace_p += s[t]


if _HAVE_NUMBA:
    # Fused, event-driven layer kernels: one image per work item, all T steps, state in cache.
    # At each step the presynaptic spikes are listed (_spike_indices) and each adds its row of
    # weights to the currents; the membrane update (_lif_membrane) runs over the layer; the
    # layer's own spikes are listed again and only their units' count and traces are updated
    # (_record_spikes, _finish_traces: the same float operations as the per-step recurrence, so
    # the results are bit for bit those of the array-module path). Plain float arithmetic in the
    # array's dtype (no fastmath, no FMA contraction). Measured on the trained shallow net
    # (1 thread, MNIST, T = 50, batch 100; CPU time): the forward pass went from 154 ms to
    # 107 ms per batch against kernels that updated every unit's count and traces at every step.

    @numba.njit(inline="always")
    def _store_state(b, cnt, tm, tp, count, trace_m, trace_p, flags):
        # image b's final count and traces into the (B, N) outputs; flags = (tm, tp recorded)
        count[b, :] = cnt
        if flags[0]:
            trace_m[b, :] = tm
        if flags[1]:
            trace_p[b, :] = tp

    @numba.njit(inline="always")
    def _add_row(dst, src):
        # dst += src over one contiguous row; as a separate 1-D loop LLVM vectorises it (written
        # inline with 4-D indexing the same loop ran ~3x slower, measured)
        for m in range(src.shape[0]):
            dst[m] += src[m]

    _BYTE_INDEX = np.uint64(0x0001020304050607)  # (lowest set bit · this) >> 56 = its byte
    _U56 = np.uint64(56)
    _U1 = np.uint64(1)

    @numba.njit(inline="always")
    def _spike_indices(row, idx):
        # indices of the nonzero bytes of the 0/1 uint8 row, ascending, into idx; returns how
        # many. Eight bytes are tested at once (spikes are sparse: most words are zero), and
        # the spikes of a word are taken lowest bit first: a byte holding 1 sets bit 8·i, and
        # multiplying that bit by _BYTE_INDEX puts i in the top byte (no branch per byte)
        n = row.shape[0]
        n8 = n // 8
        words = row[:n8 * 8].view(np.uint64)
        k = 0
        for i in range(n8):
            w = words[i]
            while w:
                low = w & (~w + _U1)
                idx[k] = i * 8 + np.int64((low * _BYTE_INDEX) >> _U56)
                k += 1
                w ^= low
        for j in range(n8 * 8, n):
            if row[j]:
                idx[k] = j
                k += 1
        return k

    @numba.njit(inline="always")
    def _lif_membrane(v, cur, th, decay, subtract, zero, one, out_row):
        # the membrane update of one step over the layer, branch-free so that LLVM vectorises
        # it; th is full length (one threshold per unit); out_row is uint8
        for n in range(v.shape[0]):
            x = v[n] * decay
            x = x + cur[n]
            thr = th[n]
            s = x >= thr
            if subtract:
                x = x - (one if s else zero) * thr
            else:
                x = zero if s else x
            v[n] = x
            out_row[n] = np.uint8(1) if s else np.uint8(0)

    @numba.njit(inline="always")
    def _record_spikes(t, spk, k, cnt, tm, tp, last, decay, decay_p, one, flags):
        # event-driven count and traces: a trace is brought up to step t only when its unit
        # fires (the k units in spk), by the same multiplications the per-step recurrence
        # tr = tr·decay + s does (a step without a spike multiplies and adds an exact zero), so
        # the result is bit for bit that of the recurrence; _finish_traces does the rest
        for i in range(k):
            n = spk[i]
            cnt[n] += one
            for _ in range(t - last[n]):
                if flags[0]:
                    tm[n] = tm[n] * decay
                if flags[1]:
                    tp[n] = tp[n] * decay_p
            if flags[0]:
                tm[n] = tm[n] + one
            if flags[1]:
                tp[n] = tp[n] + one
            last[n] = t

    @numba.njit(inline="always")
    def _finish_traces(T, tm, tp, last, decay, decay_p, flags):
        # decay every trace from its unit's last spike to the last step T - 1
        for n in range(last.shape[0]):
            if last[n] >= 0:
                for _ in range(T - 1 - last[n]):
                    if flags[0]:
                        tm[n] = tm[n] * decay
                    if flags[1]:
                        tp[n] = tp[n] * decay_p

    @numba.njit(inline="always")
    def _unit_state(N, like):
        # one image's state of a layer of N units: membrane, count, the two traces (dtype of
        # `like`), each unit's last spike step, and room for the list of the step's spikes
        return (np.zeros(N, like.dtype), np.zeros(N, like.dtype), np.zeros(N, like.dtype),
                np.zeros(N, like.dtype), np.full(N, -1, np.int64), np.empty(N, np.int64))

    @numba.njit(inline="always")
    def _fire(t, v, cur, th, decay, subtract, zero, one, out_row, spk, cnt, tm, tp, last,
              decay_p, flags):
        # step t of the layer, given its currents: the membrane update, then the count and
        # traces of the units that fired
        _lif_membrane(v, cur, th, decay, subtract, zero, one, out_row)
        n_out = _spike_indices(out_row, spk)
        _record_spikes(t, spk, n_out, cnt, tm, tp, last, decay, decay_p, one, flags)

    @numba.njit(inline="always")
    def _finish(b, T, cnt, tm, tp, last, decay, decay_p, flags, count, trace_m, trace_p):
        # the end of image b's presentation: traces brought to step T - 1, results stored
        _finish_traces(T, tm, tp, last, decay, decay_p, flags)
        _store_state(b, cnt, tm, tp, count, trace_m, trace_p, flags)

    @numba.njit(parallel=True, cache=True, nogil=True)
    def _conv_layer_numba(s_in, kr, th, decay, subtract, decay_p, flags, out, count, trace_m,
                          trace_p):
        # s_in (T, B, H, W, C) uint8; kr (k, C, k, M) with the dx axis reversed:
        # kr[dy, c, k-1-dx, m] = K[m, c, dy, dx]; out (T, B, Ho*Wo*M) uint8; th (Ho*Wo*M,).
        # An input spike at (y, x, c) adds, for each dy, the k·M weights kr[dy, c] to the run of
        # units (y-dy, x-dx) over dx, which is contiguous in the channels-last current: one
        # vectorised add of up to k·M floats. Each unit's current sums its inputs in the same
        # (y, x, c) order as a dense loop would
        T, B, H, W, C = s_in.shape
        k = kr.shape[0]
        M = kr.shape[3]
        ho = H - k + 1
        wo = W - k + 1
        N = ho * wo * M
        kflat = kr.reshape(k * C * k * M)
        zero = decay - decay
        one = zero + 1
        # (y, x, c) of each channels-last input index, looked up (an integer division per spike
        # cost more than the spike's additions)
        pos_y = np.empty(H * W * C, np.int64)
        pos_x = np.empty(H * W * C, np.int64)
        pos_c = np.empty(H * W * C, np.int64)
        for j in range(H * W * C):
            pos_c[j] = j % C
            pos_x[j] = (j // C) % W
            pos_y[j] = j // (C * W)
        for b in numba.prange(B):
            v, cnt, tm, tp, last, spk = _unit_state(N, kr)
            cur = np.zeros(N, kr.dtype)
            spk_in = np.empty(H * W * C, np.int64)
            for t in range(T):
                cur[:] = zero
                n_in = _spike_indices(s_in[t, b].reshape(H * W * C), spk_in)
                for i in range(n_in):
                    j = spk_in[i]
                    c = pos_c[j]
                    x = pos_x[j]
                    y = pos_y[j]
                    dx0 = max(0, x - wo + 1)
                    dx1 = min(k, x + 1)
                    length = (dx1 - dx0) * M
                    for dy in range(max(0, y - ho + 1), min(k, y + 1)):
                        dst = ((y - dy) * wo + x - dx1 + 1) * M
                        src = ((dy * C + c) * k + k - dx1) * M
                        _add_row(cur[dst:dst + length], kflat[src:src + length])
                _fire(t, v, cur, th, decay, subtract, zero, one, out[t, b], spk, cnt, tm, tp,
                      last, decay_p, flags)
            _finish(b, T, cnt, tm, tp, last, decay, decay_p, flags, count, trace_m, trace_p)

    @numba.njit(parallel=True, cache=True, nogil=True)
    def _pool_layer_numba(s_in, size, weight, th, decay, subtract, decay_p, flags, out, count,
                          trace_m, trace_p):
        # s_in (T, B, H, W, C) uint8; out (T, B, (H/size)*(W/size)*C) uint8; th (N,).
        # Event-driven: each input spike adds one to its block's count (exact in float), the
        # counts times the weight are the current
        T, B, H, W, C = s_in.shape
        ho = H // size
        wo = W // size
        N = ho * wo * C
        zero = decay - decay
        one = zero + 1
        # the pooling unit of each channels-last input index (-1: past the last full block),
        # looked up rather than divided out per spike
        target = np.empty(H * W * C, np.int64)
        for j in range(H * W * C):
            c = j % C
            oy = j // (C * W) // size
            ox = (j // C) % W // size
            target[j] = (oy * wo + ox) * C + c if oy < ho and ox < wo else -1
        for b in numba.prange(B):
            v, cnt, tm, tp, last, spk = _unit_state(N, th)
            cur = np.zeros(N, th.dtype)
            spk_in = np.empty(H * W * C, np.int64)
            for t in range(T):
                cur[:] = zero
                n_in = _spike_indices(s_in[t, b].reshape(H * W * C), spk_in)
                for i in range(n_in):
                    u = target[spk_in[i]]
                    if u >= 0:
                        cur[u] += one
                for n in range(N):
                    cur[n] *= weight
                _fire(t, v, cur, th, decay, subtract, zero, one, out[t, b], spk, cnt, tm, tp,
                      last, decay_p, flags)
            _finish(b, T, cnt, tm, tp, last, decay, decay_p, flags, count, trace_m, trace_p)

    @numba.njit(parallel=True, cache=True, nogil=True)
    def _fc_layer_numba(s_in, wt, th, decay, subtract, decay_p, flags, out, count, trace_m,
                        trace_p):
        # s_in (T, B, N_in) uint8 (channels-last flattening); wt (N_in, n); th (n,)
        T, B, n_in = s_in.shape
        N = wt.shape[1]
        zero = decay - decay
        one = zero + 1
        for b in numba.prange(B):
            v, cnt, tm, tp, last, spk = _unit_state(N, wt)
            cur = np.zeros(N, wt.dtype)
            spk_in = np.empty(n_in, np.int64)
            for t in range(T):
                cur[:] = zero
                k_in = _spike_indices(s_in[t, b], spk_in)
                for i in range(k_in):
                    _add_row(cur, wt[spk_in[i]])
                _fire(t, v, cur, th, decay, subtract, zero, one, out[t, b], spk, cnt, tm, tp,
                      last, decay_p, flags)
            _finish(b, T, cnt, tm, tp, last, decay, decay_p, flags, count, trace_m, trace_p)

    @numba.njit(parallel=True, cache=True, nogil=True)
    def _lif_numba(current, th, decay, subtract, out, count, trace_m, decay_p, trace_p, flags):
        # the recurrence alone, on precomputed currents (T, B, N); th (N,); out uint8
        T, B, N = current.shape
        zero = decay - decay
        one = zero + 1
        for b in numba.prange(B):
            v, cnt, tm, tp, last, spk = _unit_state(N, current)
            for t in range(T):
                _fire(t, v, current[t, b], th, decay, subtract, zero, one, out[t, b], spk, cnt,
                      tm, tp, last, decay_p, flags)
            _finish(b, T, cnt, tm, tp, last, decay, decay_p, flags, count, trace_m, trace_p)

    @numba.njit(parallel=True, cache=True, nogil=True)
    def _traces_numba(s, decay_m, decay_p, count, trace_m, trace_p, do_p):
        T, B, N = s.shape
        zero = decay_m - decay_m  # typed zero / one: float32 arithmetic stays float32
        one = zero + 1
        for b in numba.prange(B):
            cnt = np.zeros(N, count.dtype)
            tm = np.zeros(N, count.dtype)
            tp = np.zeros(N, count.dtype)
            for t in range(T):
                for n in range(N):
                    x = one if s[t, b, n] else zero
                    tm[n] = tm[n] * decay_m + x
                    cnt[n] += x
                    if do_p:
                        tp[n] = tp[n] * decay_p + x
            _store_state(b, cnt, tm, tp, count, trace_m, trace_p, (True, do_p))
