"""Per-layer diagnostics of fine-tuning: does each layer learn, and how does it fire?

Written into every evaluation row of ``metrics.csv`` (columns prefixed by the layer name,
``conv1``, ``pool1``, ``fc1``, ...):

* ``{layer}_rel_step``: ‖η ΔW‖ / ‖W‖ of the SGD steps since the previous row (their mean); the
  step balance between layers (trainable layers only);
* ``{layer}_spikes``: spikes per image of the layer over one evaluation presentation;
* ``{layer}_silent``: fraction of (image, unit) pairs without a spike in the presentation;
* ``{layer}_saturated``: fraction of (image, unit) pairs firing in at least
  :data:`SATURATED_FRACTION` of the steps (where ``lee2018``'s a' ≈ 0);
* ``{layer}_wnorm``: ‖W‖ (trainable layers);
* ``{layer}_step_factor`` (conv layers of a pre-trained run with
  ``bp.pretrained_conv_step_balance`` > 0): the balanced factor on η applied over the interval
  that ends at the row (protocols/bp.py, ``balanced_step_factors``);
* ``{layer}_map_mean`` and ``{layer}_map_mean_sd`` (conv layers): the mean over maps, and the
  spread over maps, of each map's mean kernel entry: the per-map gain mode of the kernels.

The activity columns come from the fixed training-evaluation images (the same input at every
row), so their changes are the network's.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from models.batched import to_numpy
from models.topology import ConvLayer, FCLayer, Layer, PoolLayer

#: [choice] a unit counts as saturated when it fires in ≥ 90 % of the presentation's steps
SATURATED_FRACTION = 0.9


def layer_labels(layers: Sequence[Layer]) -> list[str | None]:
    """``conv1``, ``pool1``, ``fc1``, ... per layer; None for the input."""
    labels: list[str | None] = []
    counts = {"conv": 0, "pool": 0, "fc": 0}
    for layer in layers:
        kind = ("conv" if isinstance(layer, ConvLayer) else "pool" if isinstance(layer, PoolLayer)
                else "fc" if isinstance(layer, FCLayer) else None)
        if kind is None:
            labels.append(None)
            continue
        counts[kind] += 1
        labels.append(f"{kind}{counts[kind]}")
    return labels


class ActivityTally:
    """Sums of spikes, silent and saturated units over the batches of one evaluation."""

    def __init__(self, layers: Sequence[Layer]):
        self.labels = layer_labels(layers)
        self.images = 0
        self.spikes = np.zeros(len(layers))
        self.silent = np.zeros(len(layers))
        self.saturated = np.zeros(len(layers))
        self.units = np.zeros(len(layers))

    def add(self, count_cl: Sequence, T: int) -> None:
        """Add one batch: ``count_cl[i]`` the spike counts ``(batch, ...)`` of layer i."""
        self.images += int(count_cl[-1].shape[0])
        for i, label in enumerate(self.labels):
            if label is None:
                continue
            c = to_numpy(count_cl[i])
            self.spikes[i] += float(c.sum())
            self.silent[i] += float((c == 0).sum())
            self.saturated[i] += float((c >= SATURATED_FRACTION * T).sum())
            self.units[i] += c.size

    def columns(self) -> dict:
        out = {}
        for i, label in enumerate(self.labels):
            if label is None or self.units[i] == 0:
                continue
            out[f"{label}_spikes"] = self.spikes[i] / self.images
            out[f"{label}_silent"] = self.silent[i] / self.units[i]
            out[f"{label}_saturated"] = self.saturated[i] / self.units[i]
        return out


def weight_columns(layers: Sequence[Layer], params: Sequence, thresholds: bool = False) -> dict:
    """‖W‖ of every trainable layer, and the per-map kernel means of conv layers; with
    ``thresholds`` (threshold homeostasis on), also each conv layer's mean threshold."""
    out = {}
    for label, layer, p in zip(layer_labels(layers), layers, params):
        if p is None:
            continue
        w = to_numpy(p.weights).astype(np.float64)
        out[f"{label}_wnorm"] = float(np.sqrt((w * w).sum()))
        if isinstance(layer, ConvLayer):
            per_map = w.reshape(w.shape[0], -1).mean(axis=1)
            out[f"{label}_map_mean"] = float(per_map.mean())
            out[f"{label}_map_mean_sd"] = float(per_map.std())
            if thresholds:
                out[f"{label}_th_mean"] = float(to_numpy(p.thresholds).astype(np.float64).mean())
    return out


class StepTally:
    """Mean relative SGD step ‖ηΔW‖/‖W‖ per layer since the last :meth:`columns`."""

    def __init__(self, layers: Sequence[Layer]):
        self.labels = layer_labels(layers)
        self.sums = np.zeros(len(layers))
        self.n = 0

    def add(self, rel_steps: Sequence) -> None:
        for i, r in enumerate(rel_steps):
            if r is not None:
                self.sums[i] += r
        self.n += 1

    def columns(self) -> dict:
        out = {}
        if self.n:
            for i, label in enumerate(self.labels):
                if self.sums[i]:
                    out[f"{label}_rel_step"] = self.sums[i] / self.n
        self.sums[:] = 0
        self.n = 0
        return out


def diagnostic_columns(columns: Sequence[str]) -> list[str]:
    """The diagnostic columns among ``columns``, in a stable order (layer, then quantity)."""
    suffixes = ("_rel_step", "_spikes", "_silent", "_saturated", "_wnorm", "_map_mean",
                "_map_mean_sd", "_th_mean", "_step_factor")
    return [c for c in columns if any(c.endswith(s) for s in suffixes)]
