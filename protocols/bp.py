r"""Spike-based BP fine-tuning: the rate-based backward pass and the SGD step (docs/method.md §4).

The forward pass is spiking (:func:`models.batched.forward`). Once per presentation of T steps
the backward pass reads, for every layer, the activation at the last step [paper]

.. math::
    a[t] = e^{-dt/\tau_p}\, a[t-1] + s[t]

and computes

.. math::
    p = a^L / \textstyle\sum a^L, \quad e = p - \text{label}, \quad
    E = \tfrac12 \textstyle\sum e^2, \quad \text{NLL} = -\textstyle\sum \text{label}\,\log p

    \delta^L = e \odot a'(net^L), \qquad
    \delta^h = \big((W^h)^\top \delta^{h+1}\big) \odot a'(net^h), \qquad
    \Delta W^l = \delta^{l+1}\, (\hat a^l)^\top, \qquad W \leftarrow W - \eta_{BP}\,\Delta W

Reading of the parts the paper's surviving text leaves open (all [recon], options in
:class:`models.parameters.BPParameters`):

* ``p`` when the output layer is silent (Σa = 0): p = 0, so e = −label (drives the label unit
  up); the NLL uses max(p, 1e-12) (guard of log 0).
* The error is not multiplied by the Jacobian of the normalisation p = a/Σa (the paper's
  δ^L = e ⊙ a').
* Pseudo-derivative ``a'`` (option ``derivative``):
  ``lee2018`` :math:`\max(0,\ 1 + da/dt) \approx \max(0,\ 1 - a/\tau_p)` (the delta at each
  spike dropped, "adding a unity value to the time derivative of the activation"), clipped at 0
  because the derivative of a rate with respect to its drive is never negative;
  ``lee2018_window`` the same leak over the whole presentation,
  :math:`1 - a/\max(\tau_p, T)`: at least :math:`1 - a_{max}/T` (0.62 at T = 50), so it does
  not saturate, as the paper says of its derivative;
  ``lee2020`` :math:`\frac{1}{v_{th}}\big(1 - \frac{1}{\gamma\,\tau_m}\sum_k e^{-(T-1-t_k)/\tau_m}\big)`
  with γ the unit's spike count and the sum over its own spikes (1/v_th for a silent unit);
  ``straight_through``: 1.
  Why the clip: unclipped (shallow net, full MNIST, η = 10, T = 100, seed 0) an output unit
  driven to fire at every step has a = a_max ≈ τ_p + 0.4 > τ_p, so a' < 0 flips the sign of its
  gradient, which pushes it further up, and the test error stayed near 80 % for 300 iterations.
  At T = 50, a_max ≈ 0.94 τ_p and the clip never acts. ``lee2020``
  does not vanish at saturation (1 − a_m/(γ τ_m) ≈ 1 for γ ≈ T).
* Silent hidden units (option ``silent_units``): ``pass`` keeps each derivative's own value for
  a unit that did not fire in the presentation (1 for ``lee2018``, 1/v_th for ``lee2020``);
  ``zero`` gives them a' = 0, as the public code of Lee et al. (2020) does (its gradient is
  gated by "the unit's leaky trace > 0"); ``lee2020`` with ``zero`` is that code's derivative.
  Output units are never gated, so that a silent label unit still receives its error.
* Normalised activation ``â`` (option ``activation_norm``): ``max``: a / a_max with
  a_max = Σ_{t<T} e^{-t/τ_p}, the activation of a unit that fires at every step, so â ∈ [0, 1]
  whatever τ_p and T (default); ``T``: a / T.
* Every spiking layer is a hidden layer of the recursion, pooling included: its fixed weights
  w_pool pass δ down (each input unit of a window receives w_pool · δ of its pooling unit) and
  its own a' multiplies, as for any LIF unit.
* Batch: ΔW is the mean over the images of the mini-batch. Convolutions (option
  ``conv_reduction``): ``mean`` divides ΔK in addition by the number of output positions sharing
  the kernel entry [paper: "we average the partial derivatives over the output map connections
  sharing the particular weight"]; ``sum`` adds them, the convention of the MATLAB CNN code of
  the time (DeepLearnToolbox ``cnnbp.m``), which is the exact gradient of the batch-mean loss.
  ``conv_eta_scale`` multiplies η for conv layers, and ``pretrained_conv_eta_scale`` in addition
  for conv layers that start from STDP pre-training (arm "pretrained"). With
  ``pretrained_conv_step_balance`` c > 0 those layers' η takes a further factor f, re-set at
  every evaluation row from the mean relative steps of the interval just ended,
  :math:`f \leftarrow \mathrm{clip}(f\, c\, \bar r_{FC} / \bar r_{conv},\ 1,\ 100)`
  (:func:`balanced_step_factors`; f = 1 until the first row after iteration 0).
* Weight decay (option ``weight_decay`` λ): ΔW ← ΔW + λ W before the step (L2 penalty ½λ‖W‖²).
* Thresholds are not trained: the paper fine-tunes the synaptic weights only ("fine-tuning the
  synaptic weights with spike-based supervised gradient descent"); thresholds stay at their
  initialised or pre-trained values, unless option ``threshold_homeostasis`` γ > 0 [choice]:
  after each step every conv map's threshold follows its firing rate,
  :math:`v_{th,m} \leftarrow v_{th,m}\, e^{\gamma\, \mathrm{clip}((r_m - r^*_m)/r^*_m,\,-1,\,1)}`,
  with :math:`r_m` the map's spikes per unit and step in the batch and :math:`r^*_m` the same in
  the run's first batch (maps silent there are left alone). It bounds the per-map gain: a map
  whose kernel is pushed negative, towards silence, lowers its threshold until it fires at its
  first rate again, as homeostasis does during STDP pre-training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from models.batched import Forward, LayerParams
from models.parameters import BPParameters, LIFParameters, PoolingParameters
from models.topology import ConvLayer, FCLayer, Layer, PoolLayer
from protocols.diagnostics import layer_labels

DERIVATIVES = ("lee2018", "lee2018_window", "lee2020", "straight_through")
NLL_FLOOR = 1e-12


def tau_steps(tau, dt) -> float:
    """A time constant in steps of dt (both Brian2 quantities)."""
    return float(tau / dt)


def activation_max(T: int, tau_p_steps: float) -> float:
    """Activation at the last step of a unit that fires at every one of T steps."""
    d = math.exp(-1.0 / tau_p_steps)
    return (1.0 - d**T) / (1.0 - d)


def predict(count, trace_p, xp=np):
    """Predicted class per image from the output layer ``(batch, n)``: the unit with most spikes,
    a tie broken by the larger activation (the more recent spikes); -1 (always wrong) when the
    output layer is silent. With ~1-3 output spikes per presentation ties are frequent, and
    argmax alone would hand every tie to the lowest class index."""
    norm = trace_p.max(axis=1, keepdims=True) + 1
    score = count + trace_p / norm  # trace_p / norm < 1: never outweighs one spike
    pred = xp.argmax(score, axis=1)
    return xp.where(count.sum(axis=1) > 0, pred, -1)


def output_probabilities(a_out, xp=np):
    """p = a / Σa per image ``(batch, n)``; a silent output layer gives p = 0."""
    total = a_out.sum(axis=1, keepdims=True)
    safe = xp.where(total > 0, total, 1)
    return xp.where(total > 0, a_out / safe, 0)


@dataclass
class BatchStats:
    """Per-batch outputs of :func:`backward`: means over the batch, and per-image predictions."""

    loss: float  # ½ Σ e², mean over images
    nll: float  # −Σ label log p, mean over images
    predictions: object  # (batch,) int, see predict(); -1 for a silent output layer
    probabilities: object  # (batch, n)


def pseudo_derivative(kind: str, trace_p, trace_m, count, v_th, tau_p_steps: float,
                      tau_m_steps: float, xp=np, *, T: int | None = None):
    """a'(net) of one layer's units, arrays ``(batch, ...)``; v_th broadcastable. ``T`` (steps of
    the presentation) is needed by ``lee2018_window``."""
    if kind == "lee2018":
        return xp.maximum(1.0 - trace_p / trace_p.dtype.type(tau_p_steps), 0)
    if kind == "lee2018_window":
        if T is None:
            raise ValueError("the lee2018_window derivative needs the presentation length T")
        return xp.maximum(1.0 - trace_p / trace_p.dtype.type(max(tau_p_steps, T)), 0)
    if kind == "lee2020":
        dtype = trace_m.dtype.type
        safe = xp.where(count > 0, count, 1)
        leak = xp.where(count > 0, trace_m / (safe * dtype(tau_m_steps)), 0)
        return (1.0 - leak) / v_th
    if kind == "straight_through":
        return xp.ones_like(trace_p)
    raise ValueError(f"derivative must be one of {', '.join(DERIVATIVES)}, got {kind!r}")


def _col_view(a, k: int, xp):
    """(B, H, W, C) -> strided view (B, Ho, Wo, C, k, k) of every k×k patch."""
    B, H, W, C = a.shape
    a = xp.ascontiguousarray(a)
    st = a.strides
    return xp.lib.stride_tricks.as_strided(
        a, shape=(B, H - k + 1, W - k + 1, C, k, k),
        strides=(st[0], st[1], st[2], st[3], st[1], st[2]))


def output_error(a_out, labels, xp=np):
    """(e, p, loss, nll) of the output activations ``(batch, n)``: p = a/Σa, e = p − label,
    loss = ½Σe² and NLL = −log p_label, both means over the batch."""
    batch, n_out = a_out.shape
    labels = xp.asarray(labels)
    target = xp.zeros((batch, n_out), dtype=a_out.dtype)
    target[xp.arange(batch), labels] = 1
    p = output_probabilities(a_out, xp).astype(a_out.dtype, copy=False)
    e = p - target
    loss = 0.5 * (e * e).sum(axis=1).mean()
    nll = -xp.log(xp.maximum(p[xp.arange(batch), labels], NLL_FLOOR)).mean()
    return e, p, float(loss), float(nll)


def layer_derivatives(layers, params, fwd: Forward, bp: BPParameters, lif: LIFParameters,
                      pool: PoolingParameters, xp=np) -> list:
    """a' of every spiking layer (channels-last, like ``fwd.trace_p_cl``; None for the input),
    with silent hidden units gated by ``bp.silent_units``."""
    tau_p = tau_steps(bp.tau_p, lif.dt)
    tau_m = tau_steps(lif.tau_m, lif.dt)
    dtype = fwd.trace_p_cl[-1].dtype
    out: list = [None]
    for i in range(1, len(layers)):
        if isinstance(layers[i], PoolLayer):
            v_th = dtype.type(pool.v_th)
        else:  # last axis: maps / units
            v_th = xp.asarray(params[i].thresholds, dtype=dtype).reshape(-1)
        d = pseudo_derivative(bp.derivative, fwd.trace_p_cl[i], fwd.trace_m_cl[i],
                              fwd.count_cl[i], v_th, tau_p, tau_m, xp, T=fwd.T)
        if bp.silent_units == "zero" and i < len(layers) - 1:
            d = xp.where(fwd.count_cl[i] > 0, d, dtype.type(0))
        out.append(d)
    return out


def backpropagate(layers: Sequence[Layer], params: Sequence[LayerParams | None], a_hat: Sequence,
                  derivs: Sequence, e, bp: BPParameters = BPParameters(),
                  pool: PoolingParameters = PoolingParameters(), *, xp=np) -> list:
    """The chain rule of the method, given what the forward pass measured.

    ``a_hat[i]``: the presynaptic factor of layer i+1's weight gradient (normalised activation of
    layer i, channels-last ``(B, H, W, C)``); ``derivs[i]``: a' of layer i (same layout; index 0
    unused); ``e``: the output error ``(B, n)``. δ^L = e ⊙ a'^L; δ flows down through each
    layer's weights (pooling: its fixed w_pool) and is multiplied by a' of the layer below.
    Returns ΔW per layer (None for the input and pooling layers), batch mean and the conv
    reduction of ``bp.conv_reduction``. Independent of how a and a' were obtained, so a
    differentiable surrogate network can check it against finite differences.
    """
    n_layers = len(layers)
    batch = e.shape[0]
    dtype = e.dtype
    grads: list = [None] * n_layers
    delta = e.reshape(derivs[-1].shape) * derivs[-1]  # (B, 1, 1, n)
    inv_b = dtype.type(1.0 / batch)
    for i in range(n_layers - 1, 0, -1):
        layer = layers[i]
        if isinstance(layer, FCLayer):
            c, h, w = layer.in_shape
            d2 = delta.reshape(batch, layer.n)
            g = d2.T @ a_hat[i - 1].reshape(batch, -1)  # (n, H·W·C), channels-last order
            g = g.reshape(layer.n, h, w, c).transpose(0, 3, 1, 2).reshape(layer.n, -1)
            grads[i] = g * inv_b
            if i > 1:
                wmat = xp.asarray(params[i].weights, dtype=dtype).reshape(layer.n, c, h, w)
                wmat = wmat.transpose(0, 2, 3, 1).reshape(layer.n, -1)
                back = (d2 @ wmat).reshape(batch, h, w, c)
        elif isinstance(layer, ConvLayer):
            k, m = layer.kernel, layer.n_maps
            _, ho, wo = layer.shape
            cin = layer.in_shape[0]
            cols = _col_view(a_hat[i - 1], k, xp).reshape(batch * ho * wo, cin * k * k)
            d2 = delta.reshape(batch * ho * wo, m)
            g = (d2.T @ cols).reshape(m, cin, k, k)  # sum over images and positions
            grads[i] = g * conv_gradient_scale(bp, batch, layer, dtype)
            if i > 1:
                kmat = xp.asarray(params[i].weights, dtype=dtype).reshape(m, -1)
                back = conv_input_error((d2 @ kmat).reshape(batch, ho, wo, cin, k, k), layer,
                                        dtype, xp)
        else:
            back = pool_input_error(delta, layer, pool, dtype, xp)
        if i > 1:
            delta = back * derivs[i - 1]
    return grads


def conv_gradient_scale(bp: BPParameters, batch: int, layer: ConvLayer, dtype):
    """The factor on a conv kernel's summed gradient: 1/batch, and 1/positions as well with
    ``bp.conv_reduction = 'mean'``."""
    _, ho, wo = layer.shape
    positions = ho * wo if bp.conv_reduction == "mean" else 1
    return dtype.type(1.0 / (batch * positions))


def conv_input_error(contrib, layer: ConvLayer, dtype, xp=np):
    """The error a conv layer sends down, ``(rows, H, W, C_in)``, from each output position's
    contribution to its window, ``contrib`` ``(rows, Ho, Wo, C_in, k, k)``."""
    k = layer.kernel
    _, ho, wo = layer.shape
    back = xp.zeros((contrib.shape[0],) + layer.in_shape[1:] + (layer.in_shape[0],), dtype=dtype)
    for dy in range(k):
        for dx in range(k):
            back[:, dy:dy + ho, dx:dx + wo, :] += contrib[..., dy, dx]
    return back


def pool_input_error(delta, layer, pool: PoolingParameters, dtype, xp=np):
    """The error a pooling layer sends down: its fixed weight w_pool from each window unit."""
    s = layer.size
    return xp.repeat(xp.repeat(delta, s, axis=1), s, axis=2) * dtype.type(pool.weight)


def backward(
    layers: Sequence[Layer],
    params: Sequence[LayerParams | None],
    fwd: Forward,
    labels,
    bp: BPParameters = BPParameters(),
    lif: LIFParameters = LIFParameters(),
    pool: PoolingParameters = PoolingParameters(),
    *,
    xp=np,
) -> tuple[list, BatchStats]:
    """Weight gradients ΔW (one array per conv / FC layer, None elsewhere; in the parameters'
    own layouts) and the batch's loss, NLL and predictions.

    ``fwd`` must come from :func:`models.batched.forward` with ``tau_p`` = ``bp.tau_p`` in steps.
    """
    tau_p = tau_steps(bp.tau_p, lif.dt)
    if fwd.trace_p_cl[0] is None:
        raise ValueError("forward(...) was run without tau_p; pass tau_p=bp.tau_p / dt")
    if bp.derivative == "lee2020" and any(t is None for t in fwd.trace_m_cl):
        raise ValueError("the lee2020 derivative reads trace_m: run forward(..., "
                         "record_trace_m=True)")
    dtype = fwd.trace_p_cl[-1].dtype
    norm = activation_max(fwd.T, tau_p) if bp.activation_norm == "max" else float(fwd.T)
    batch = fwd.trace_p_cl[-1].shape[0]
    a_out = fwd.trace_p_cl[-1].reshape(batch, -1)
    e, p, loss, nll = output_error(a_out, labels, xp)
    predictions = predict(fwd.count_cl[-1].reshape(batch, -1), a_out, xp)
    a_hat = [t * dtype.type(1.0 / norm) for t in fwd.trace_p_cl[:-1]]
    derivs = layer_derivatives(layers, params, fwd, bp, lif, pool, xp)
    grads = backpropagate(layers, params, a_hat, derivs, e, bp, pool, xp=xp)
    return grads, BatchStats(loss=loss, nll=nll, predictions=predictions, probabilities=p)


def layer_learning_rates(layers: Sequence[Layer], bp: BPParameters,
                         pretrained_conv: bool = False) -> list:
    """η of every layer: ``bp.eta``, times ``bp.conv_eta_scale`` for conv layers, times
    ``bp.pretrained_conv_eta_scale`` as well when the conv layers start from STDP pre-training
    (``pretrained_conv``: the arm "pretrained", whose every conv layer is pre-trained)."""
    conv = bp.conv_eta_scale * (bp.pretrained_conv_eta_scale if pretrained_conv else 1.0)
    return [bp.eta * (conv if isinstance(layer, ConvLayer) else 1.0) for layer in layers]


#: [choice] bounds of the balanced step factor (``pretrained_conv_step_balance``): never below
#: the paper's one η, and at most 100×, so that a layer whose gradient nearly vanishes (gated
#: units) cannot be handed a step that overshoots when its gradient returns
STEP_FACTOR_BOUNDS = (1.0, 100.0)


def balanced_step_factors(layers: Sequence[Layer], factors: Sequence[float], rel_steps: dict,
                          balance: float) -> list:
    """New step factors of the conv layers: each f ← clip(f · c · r_fc / r_conv) with
    ``rel_steps`` the mean relative steps of the interval just ended, by layer label (the
    ``{label}_rel_step`` diagnostics, taken with the factors ``factors``), r_fc their mean over
    the FC layers and c = ``balance``. Layers without a step in the interval keep their factor;
    non-conv layers keep 1."""
    labels = layer_labels(layers)
    fc = [rel_steps.get(f"{label}_rel_step") for label, layer in zip(labels, layers)
          if isinstance(layer, FCLayer)]
    fc = [r for r in fc if r is not None and math.isfinite(r) and r > 0]
    out = list(factors)
    if not fc:
        return out
    r_fc = sum(fc) / len(fc)
    low, high = STEP_FACTOR_BOUNDS
    for i, (label, layer) in enumerate(zip(labels, layers)):
        r_conv = rel_steps.get(f"{label}_rel_step") if isinstance(layer, ConvLayer) else None
        if r_conv is not None and math.isfinite(r_conv) and r_conv > 0:
            out[i] = min(high, max(low, factors[i] * balance * r_fc / r_conv))
    return out


def sgd_step(params: Sequence[LayerParams | None], grads: Sequence, eta,
             weight_decay: float = 0.0) -> list:
    """W ← W − η (ΔW + λW) in place, for every layer with a gradient (thresholds untouched).
    ``eta``: one value, or one per layer (:func:`layer_learning_rates`). Returns the relative
    step ‖W_new − W_old‖ / ‖W_old‖ of each layer (None where no gradient)."""
    etas = eta if isinstance(eta, (list, tuple)) else [eta] * len(params)
    rel: list = [None] * len(params)
    for i, (p, g, lr) in enumerate(zip(params, grads, etas)):
        if g is None:
            continue
        g = g.astype(p.weights.dtype, copy=False)
        if weight_decay:
            g = g + p.weights.dtype.type(weight_decay) * p.weights
        step = p.weights.dtype.type(lr) * g
        norm = float((p.weights * p.weights).sum()) ** 0.5
        rel[i] = float((step * step).sum()) ** 0.5 / norm if norm > 0 else float("inf")
        p.weights -= step
    return rel


def map_rates(layers: Sequence[Layer], fwd: Forward, xp=np) -> list:
    """Spikes per unit and step of every conv map in the batch of ``fwd``: one ``(n_maps,)``
    array per conv layer, None for the other layers."""
    rates: list = [None] * len(layers)
    for i, layer in enumerate(layers):
        if isinstance(layer, ConvLayer):
            count = fwd.count_cl[i]  # (batch, H, W, maps)
            rates[i] = count.reshape(-1, count.shape[-1]).mean(axis=0) / fwd.T
    return rates


def adapt_thresholds(params: Sequence[LayerParams | None], rates: Sequence, targets: Sequence,
                     gamma: float, xp=np) -> None:
    """Per-map threshold homeostasis (option ``threshold_homeostasis``), in place:
    v_th ← v_th · exp(γ · clip((r − r*) / r*, −1, 1)) for every map with a target r* > 0."""
    for p, r, target in zip(params, rates, targets):
        if r is None or target is None:
            continue
        alive = target > 0
        rel = xp.where(alive, (r - target) / xp.where(alive, target, 1), 0)
        factor = xp.exp(gamma * xp.clip(rel, -1.0, 1.0)).astype(p.thresholds.dtype)
        p.thresholds *= factor
