"""The backward pass of :mod:`protocols.bp` for a population (R networks of one topology, R
mini-batches), on the member-major rows of :func:`models.batched_population.forward_population`.

Element-wise work (pseudo-derivatives, pooling, the scatter of conv errors) runs over all R·B
rows; the weight gradients and the errors sent through each member's own weights are batched
matrix products over a leading member axis. Each member's products have the shapes and layout
of its single run's, so on NumPy its gradients equal :func:`protocols.bp.backward`'s bit for bit.
The options that shape the backward pass (derivative, silent units, activation norm, conv
reduction, τ_p) are shared by the population; η and weight decay act in each member's own
:func:`protocols.bp.sgd_step`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from models.batched import Forward, LayerParams
from models.parameters import BPParameters, LIFParameters, PoolingParameters
from models.topology import ConvLayer, FCLayer, Layer, PoolLayer
from protocols.bp import (BatchStats, _col_view, activation_max, conv_gradient_scale,
                          conv_input_error, output_error, pool_input_error, predict,
                          pseudo_derivative, tau_steps)


def backward_population(
    layers: Sequence[Layer],
    params: Sequence[Sequence[LayerParams | None]],
    fwd: Forward,
    labels: Sequence,
    bp: BPParameters = BPParameters(),
    lif: LIFParameters = LIFParameters(),
    pool: PoolingParameters = PoolingParameters(),
    *,
    xp=np,
) -> tuple[list, list]:
    """Per member: its weight gradients (as :func:`protocols.bp.backward` returns them) and its
    :class:`BatchStats`; ``labels[r]`` are member r's labels."""
    R = len(params)
    tau_p = tau_steps(bp.tau_p, lif.dt)
    if fwd.trace_p_cl[0] is None:
        raise ValueError("forward_population(...) was run without tau_p; pass tau_p=bp.tau_p/dt")
    dtype = fwd.trace_p_cl[-1].dtype
    norm = activation_max(fwd.T, tau_p) if bp.activation_norm == "max" else float(fwd.T)
    B = fwd.trace_p_cl[-1].shape[0] // R
    a_out = fwd.trace_p_cl[-1].reshape(R * B, -1)
    count_out = fwd.count_cl[-1].reshape(R * B, -1)
    errors, stats = [], []
    for r in range(R):
        rows = slice(r * B, (r + 1) * B)
        e, p, loss, nll = output_error(a_out[rows], labels[r], xp)
        errors.append(e)
        stats.append(BatchStats(loss=loss, nll=nll, probabilities=p,
                                predictions=predict(count_out[rows], a_out[rows], xp)))
    a_hat = [t * dtype.type(1.0 / norm) for t in fwd.trace_p_cl[:-1]]
    derivs = _derivatives(layers, params, fwd, bp, lif, pool, xp)
    grads = _backpropagate(layers, params, a_hat, derivs, xp.concatenate(errors), bp, pool, xp)
    return [[None if g is None else g[r] for g in grads] for r in range(R)], stats


def _derivatives(layers, params, fwd: Forward, bp, lif, pool, xp) -> list:
    """:func:`protocols.bp.layer_derivatives` with each member's own thresholds."""
    R = len(params)
    tau_p = tau_steps(bp.tau_p, lif.dt)
    tau_m = tau_steps(lif.tau_m, lif.dt)
    dtype = fwd.trace_p_cl[-1].dtype
    out: list = [None]
    for i in range(1, len(layers)):
        shape = fwd.count_cl[i].shape

        def members(a):  # (R·B, H, W, C) -> (R, B, H, W, C)
            return None if a is None else a.reshape((R, -1) + shape[1:])

        if isinstance(layers[i], PoolLayer):
            v_th = dtype.type(pool.v_th)
        else:  # one row of thresholds (maps / units) per member
            n = shape[-1]
            v_th = xp.stack([xp.broadcast_to(xp.asarray(p[i].thresholds, dtype=dtype)
                                              .reshape(-1), (n,)) for p in params])
            v_th = v_th.reshape(R, 1, 1, 1, n)
        d = pseudo_derivative(bp.derivative, members(fwd.trace_p_cl[i]),
                              members(fwd.trace_m_cl[i]), members(fwd.count_cl[i]), v_th,
                              tau_p, tau_m, xp, T=fwd.T).reshape(shape)
        if bp.silent_units == "zero" and i < len(layers) - 1:
            d = xp.where(fwd.count_cl[i] > 0, d, dtype.type(0))
        out.append(d)
    return out


def _backpropagate(layers, params, a_hat, derivs, e, bp, pool, xp) -> list:
    """:func:`protocols.bp.backpropagate` over R members: gradients stacked (R, ...)."""
    R = len(params)
    n_layers = len(layers)
    B = e.shape[0] // R
    dtype = e.dtype
    grads: list = [None] * n_layers
    delta = e.reshape(derivs[-1].shape) * derivs[-1]  # (R·B, 1, 1, n)
    inv_b = dtype.type(1.0 / B)
    for i in range(n_layers - 1, 0, -1):
        layer = layers[i]
        if isinstance(layer, FCLayer):
            c, h, w = layer.in_shape
            d2 = delta.reshape(R, B, layer.n)
            g = xp.matmul(d2.transpose(0, 2, 1), a_hat[i - 1].reshape(R, B, -1))
            g = g.reshape(R, layer.n, h, w, c).transpose(0, 1, 4, 2, 3).reshape(R, layer.n, -1)
            grads[i] = g * inv_b
            if i > 1:
                wmat = xp.stack([xp.asarray(p[i].weights, dtype=dtype)
                                 .reshape(layer.n, c, h, w).transpose(0, 2, 3, 1)
                                 .reshape(layer.n, -1) for p in params])
                back = xp.matmul(d2, wmat).reshape(R * B, h, w, c)
        elif isinstance(layer, ConvLayer):
            k, m = layer.kernel, layer.n_maps
            _, ho, wo = layer.shape
            cin = layer.in_shape[0]
            cols = _col_view(a_hat[i - 1], k, xp).reshape(R, B * ho * wo, cin * k * k)
            d2 = delta.reshape(R, B * ho * wo, m)
            g = xp.matmul(d2.transpose(0, 2, 1), cols).reshape(R, m, cin, k, k)
            grads[i] = g * conv_gradient_scale(bp, B, layer, dtype)
            if i > 1:
                kmat = xp.stack([xp.asarray(p[i].weights, dtype=dtype).reshape(m, -1)
                                 for p in params])
                back = conv_input_error(xp.matmul(d2, kmat).reshape(R * B, ho, wo, cin, k, k),
                                        layer, dtype, xp)
        else:
            back = pool_input_error(delta, layer, pool, dtype, xp)
        if i > 1:
            delta = back * derivs[i - 1]
    return grads
