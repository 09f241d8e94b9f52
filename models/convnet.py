"""A rate-based (ReLU) ConvNet of a topology string, in NumPy, for Deep-STDP's backprop phase.

Lu & Sengupta's network is "a rate-based convolutional network that can be deployed in a
neuromorphic setting", trained by ordinary backpropagation on pseudo-labels. This is that net
for the package's topology strings (:mod:`models.topology`): ``C`` layers are valid
convolutions + ReLU, ``P`` layers are average pooling (the fixed 0.25-weight pooling of the
spiking nets, :class:`models.parameters.PoolingParameters`), hidden ``FC`` layers are ReLU, and
the last ``FC`` layer is the classifier head (softmax over the clusters). The *features* that
are clustered are the output of the last hidden layer. Why it is rate-based and not the
package's spiking trainer: docs/deep_stdp.md ("Network").
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from models.topology import ConvLayer, FCLayer, PoolLayer, TopologyError, parse_topology


class ConvNet:
    """Parameters ``params[i] = (W, b)`` per trainable layer (None for input and pooling)."""

    def __init__(self, topology: str, rng: np.random.Generator, dtype=np.float32):
        self.topology = topology
        self.layers = parse_topology(topology)
        if not isinstance(self.layers[-1], FCLayer) or len(self.layers) < 3:
            raise TopologyError(f"{topology!r}: Deep-STDP needs at least one hidden layer and a "
                                f"last FC layer (the classifier head), e.g. 28x28-16C5-2P-64FC-10FC")
        self.dtype = dtype
        self.params = [None] * len(self.layers)
        for i, layer in enumerate(self.layers):
            if isinstance(layer, (ConvLayer, FCLayer)):
                self.params[i] = self._init(layer, rng)

    def _init(self, layer, rng):
        # [choice] He (Kaiming) uniform for ReLU layers, zero biases
        if isinstance(layer, ConvLayer):
            fan_in = layer.fan_in
            shape = (layer.n_maps, layer.in_shape[0], layer.kernel, layer.kernel)
            n_out = layer.n_maps
        else:
            fan_in = int(np.prod(layer.in_shape))
            shape = (layer.n, fan_in)
            n_out = layer.n
        bound = np.sqrt(6.0 / fan_in)
        return [rng.uniform(-bound, bound, size=shape).astype(self.dtype),
                np.zeros(n_out, dtype=self.dtype)]

    @property
    def n_classes(self) -> int:
        return self.layers[-1].n

    def reset_head(self, rng: np.random.Generator) -> None:
        """A new classifier head [paper DeepCluster: re-initialised every epoch]."""
        self.params[-1] = self._init(self.layers[-1], rng)

    def feature_size(self) -> int:
        return int(np.prod(self.layers[-2].shape))

    # --- forward / backward ------------------------------------------------------------------

    def forward(self, x: np.ndarray, upto: int | None = None):
        """``x`` (B, C, H, W) in [0, 1] → list of activations per layer (input first); the last
        is the head's logits. ``upto``: stop after that layer index."""
        acts = [x.astype(self.dtype, copy=False)]
        caches = [None]
        last = len(self.layers) - 1 if upto is None else upto
        for i in range(1, last + 1):
            layer, a = self.layers[i], acts[-1]
            if isinstance(layer, ConvLayer):
                W, b = self.params[i]
                k = layer.kernel
                win = sliding_window_view(a, (k, k), axis=(2, 3))  # B, C, Ho, Wo, k, k
                B, C, Ho, Wo = win.shape[:4]
                cols = win.transpose(0, 2, 3, 1, 4, 5).reshape(B * Ho * Wo, C * k * k)
                z = cols @ W.reshape(W.shape[0], -1).T + b
                z = z.reshape(B, Ho, Wo, -1).transpose(0, 3, 1, 2)
                caches.append(cols)
                acts.append(np.maximum(z, 0))
            elif isinstance(layer, PoolLayer):
                s = layer.size
                B, C, H, Wd = a.shape
                ho, wo = H // s, Wd // s
                pooled = a[:, :, :ho * s, :wo * s].reshape(B, C, ho, s, wo, s).mean(axis=(3, 5))
                caches.append(None)
                acts.append(pooled)
            else:
                W, b = self.params[i]
                z = a.reshape(a.shape[0], -1) @ W.T + b
                caches.append(None)
                acts.append(z if i == len(self.layers) - 1 else np.maximum(z, 0))
        self._caches = caches
        return acts

    def features(self, x: np.ndarray, batch: int = 500) -> np.ndarray:
        """Output of the last hidden layer, flattened: ``(N, feature_size)`` float64."""
        out = [self.forward(x[s:s + batch], upto=len(self.layers) - 2)[-1].reshape(
            min(batch, len(x) - s), -1) for s in range(0, len(x), batch)]
        return np.concatenate(out).astype(np.float64)

    def backward(self, acts, dlogits, per_sample_sqnorm: bool = False):
        """Gradients ``[(dW, db) | None]`` of the summed loss whose logit gradient is
        ``dlogits`` (B, n); with ``per_sample_sqnorm`` also each sample's squared gradient
        norm over all parameters (for the Fisher trace)."""
        grads = [None] * len(self.layers)
        delta = dlogits.astype(self.dtype, copy=False)
        B = delta.shape[0]
        sq = np.zeros(B, dtype=np.float64) if per_sample_sqnorm else None
        for i in range(len(self.layers) - 1, 0, -1):
            layer, a_in, a_out = self.layers[i], acts[i - 1], acts[i]
            if isinstance(layer, FCLayer):
                W, b = self.params[i]
                if i != len(self.layers) - 1:
                    delta = delta * (a_out.reshape(B, -1) > 0)
                flat = a_in.reshape(B, -1)
                grads[i] = (delta.T @ flat, delta.sum(axis=0))
                if sq is not None:
                    sq += (delta.astype(np.float64) ** 2).sum(1) * (
                        1.0 + (flat.astype(np.float64) ** 2).sum(1))
                delta = (delta @ W).reshape(a_in.shape)
            elif isinstance(layer, PoolLayer):
                s = layer.size
                up = np.zeros_like(a_in)
                ho, wo = delta.shape[2], delta.shape[3]
                d = np.repeat(np.repeat(delta, s, axis=2), s, axis=3) / (s * s)
                up[:, :, :ho * s, :wo * s] = d
                delta = up
            else:
                W, b = self.params[i]
                M, C, k, _ = W.shape
                delta = delta * (a_out > 0)
                Ho, Wo = delta.shape[2], delta.shape[3]
                dflat = delta.transpose(0, 2, 3, 1).reshape(B * Ho * Wo, M)
                cols = self._caches[i]
                grads[i] = ((dflat.T @ cols).reshape(W.shape), dflat.sum(axis=0))
                if sq is not None:
                    per = np.einsum("bpm,bpk->bmk", dflat.reshape(B, Ho * Wo, M),
                                    cols.reshape(B, Ho * Wo, -1))
                    sq += (per.astype(np.float64) ** 2).sum((1, 2)) + (
                        dflat.reshape(B, Ho * Wo, M).sum(1).astype(np.float64) ** 2).sum(1)
                if i > 1:
                    dcols = (dflat @ W.reshape(M, -1)).reshape(B, Ho, Wo, C, k, k)
                    dx = np.zeros_like(a_in)
                    for dy in range(k):
                        for dx_ in range(k):
                            dx[:, :, dy:dy + Ho, dx_:dx_ + Wo] += dcols[:, :, :, :, dy, dx_].transpose(0, 3, 1, 2)
                    delta = dx
        return grads, sq


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class SGD:
    """SGD with momentum and L2 weight decay [paper DeepCluster: momentum 0.9, decay 1e-5]."""

    def __init__(self, net: ConvNet, lr: float, momentum: float, weight_decay: float):
        self.net, self.lr, self.momentum, self.wd = net, lr, momentum, weight_decay
        self.velocity = [None if p is None else [np.zeros_like(q) for q in p] for p in net.params]

    def reset_head(self) -> None:
        self.velocity[-1] = [np.zeros_like(q) for q in self.net.params[-1]]

    def step(self, grads, batch: int) -> None:
        for p, v, g in zip(self.net.params, self.velocity, grads):
            if p is None:
                continue
            for q, vq, gq in zip(p, v, g):
                vq *= self.momentum
                vq -= self.lr * (gq / batch + self.wd * q)
                q += vq


def cross_entropy_step(net: ConvNet, opt: SGD, x: np.ndarray, y: np.ndarray) -> float:
    """One SGD step on softmax cross-entropy; returns the batch's mean loss."""
    acts = net.forward(x)
    p = softmax(acts[-1].astype(np.float64))
    loss = -np.log(p[np.arange(len(y)), y] + 1e-12).mean()
    d = p
    d[np.arange(len(y)), y] -= 1.0
    grads, _ = net.backward(acts, d)
    opt.step(grads, len(y))
    return float(loss)


def fisher_trace(net: ConvNet, x: np.ndarray, rng: np.random.Generator, batch: int = 100) -> float:
    r"""Trace of the Fisher information of the network's predictive distribution [recon]:

    .. math:: \mathrm{tr}\,F = \mathbb{E}_x\,\mathbb{E}_{y \sim p_\theta(y|x)}
              \lVert \nabla_\theta \log p_\theta(y|x) \rVert^2

    estimated with one sampled label per image (Achille et al. 2019's measure of how much
    information the weights hold, which the Deep-STDP paper's Fig. 4 names).
    """
    total = 0.0
    for s in range(0, len(x), batch):
        xb = x[s:s + batch]
        acts = net.forward(xb)
        p = softmax(acts[-1].astype(np.float64))
        u = rng.random(len(xb))[:, None]
        y = np.minimum((np.cumsum(p, axis=1) < u).sum(axis=1), p.shape[1] - 1)
        d = p.copy()
        d[np.arange(len(y)), y] -= 1.0  # gradient of -log p(y|x) wrt logits
        _, sq = net.backward(acts, d, per_sample_sqnorm=True)
        total += float(sq.sum())
    return total / len(x)
