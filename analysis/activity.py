"""Does every layer of a pre-trained network fire? Spikes per image, layer by layer.

Loads the conv layers of a ``pretrained.npz`` (protocols/pretrain.py), fills the FC layers with
the study's seeded initialisation, and simulates images of the training set with the batched
trainer's forward pass (the same equations as the Brian2 model, tested spike for spike) at each
input rate × presentation length asked for. Prints, per condition, the mean spikes per image of
every layer and, per conv layer, ``<x_pre>`` at its spikes: the STDP input trace (the
pre-training run's tau_pre, or ``--tau-pre``; reset to 1 at a spike) averaged over the firing unit's C·k·k inputs, the quantity a
``window_mean`` offset subtracts and against which a constant offset is balanced or not
(docs/pretraining.md); then per conv layer the kernel statistics (RMS, fraction at a bound,
fraction positive, mean threshold).

Run::

    MNIST_DIR=... python -m analysis.activity runs/pre_deep/pretrained.npz \\
        --topology 28x28-20C5-2P-50C5-2P-200FC-10FC --rates 250 1000 --durations 25 50
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def window_trace_at_spikes(pre, post, kernel: int, tau_pre_steps: float) -> float:
    """Mean over the spikes of ``post`` (bool ``(T, batch, M, Ho, Wo)``) of the STDP trace of
    ``pre`` (bool ``(T, batch, C, H, W)``; 1 in a spike's step, times e^{-1/tau_pre} per step
    after) averaged over the firing unit's C·k·k input window, at the spike's step (NaN when
    ``post`` never fires)."""
    from numpy.lib.stride_tricks import sliding_window_view

    decay = float(np.exp(-1.0 / tau_pre_steps))
    x = np.zeros(pre.shape[1:], dtype=np.float64)
    total, count = 0.0, 0
    for t in range(pre.shape[0]):
        x = np.where(pre[t], 1.0, x * decay)
        fired = post[t].sum(axis=1)  # spikes per position, summed over maps
        if fired.any():
            window = sliding_window_view(x, (kernel, kernel), axis=(2, 3)).mean(axis=(1, 4, 5))
            total += float((window * fired).sum())
            count += int(fired.sum())
    return total / count if count else float("nan")


def trace_steps(pretrained_file: str, tau_pre_ms: float | None = None) -> float:
    """The STDP trace time constant in steps: ``tau_pre_ms`` if given, else the pre-training
    run's own (``pretrained.json`` beside the file: its ``stdp.tau_pre`` and ``lif.dt``), else
    the parameter defaults."""
    import json

    from brian2 import ms

    from models.parameters import LIFParameters, STDPParameters
    from protocols.config import load_config
    from protocols.pretrain import PretrainConfig

    record = Path(pretrained_file).with_name("pretrained.json")
    if record.is_file():
        cfg = load_config(json.loads(record.read_text())["config"], PretrainConfig)
        stdp, lif = cfg.stdp, cfg.lif
    else:
        stdp, lif = STDPParameters(), LIFParameters()
    tau = tau_pre_ms * ms if tau_pre_ms is not None else stdp.tau_pre
    return float(tau / lif.dt)


def layer_activity(topology: str, pretrained_file: str, rates_hz, durations_ms,
                   dataset: str = "mnist", n_images: int = 200, seed: int = 0,
                   data_dir: str | None = None, tau_pre_ms: float | None = None
                   ) -> tuple[list[dict], list[dict]]:
    """(one row per rate × duration with spikes per image per layer and ``<x_pre>`` per conv
    layer, one row per conv layer with its kernel statistics)."""
    from brian2 import Hz, ms

    from models.batched import forward, layer_names
    from models.topology import ConvLayer, parse_topology
    from protocols.datasets import load_dataset
    from protocols.diagnostics import layer_labels
    from protocols.encoding import poisson_spikes
    from protocols.study import StudyConfig, initial_parameters, load_pretrained_conv

    layers = parse_topology(topology)
    pretrained, _ = load_pretrained_conv(pretrained_file, topology)
    tau_steps = trace_steps(pretrained_file, tau_pre_ms)
    # the study's own start of a pre-trained run: seeded FC layers, the pre-trained conv layers
    params = initial_parameters(StudyConfig(topology=topology, arm="pretrained", seed=seed),
                                pretrained)
    kernels = []
    for name, p in zip(layer_names(layers), params):
        if name and name.startswith("conv"):
            w = p.weights.astype(float)
            kernels.append({"layer": name, "kernel_rms": float(np.sqrt(np.mean(w ** 2))),
                            "at_bound": float(np.mean(np.abs(w) > 0.9)),
                            "positive": float(np.mean(w > 0)), "kernel_mean": float(w.mean()),
                            "threshold_mean": float(p.thresholds.mean())})
    data = load_dataset(dataset, data_dir)
    images = data.train_images[:n_images]
    labels = ["input"] + layer_labels(layers)[1:]
    rows = []
    for rate in rates_hz:
        for duration in durations_ms:
            x = poisson_spikes(images, duration * ms, np.random.default_rng(seed), rate * Hz)
            out = forward(layers, params, x, tau_p=20.0, keep_spikes=True,
                          record_trace_m=False)
            row = {"rate_hz": rate, "duration_ms": duration}
            row.update({label: float(c.sum()) / len(images) for label, c in zip(labels, out.count)})
            for index, (label, layer) in enumerate(zip(labels, layers)):
                if isinstance(layer, ConvLayer):
                    pre = out.spikes[index - 1]
                    pre = pre[:, :, None] if pre.ndim == 4 else pre
                    row[f"{label} <x_pre>"] = window_trace_at_spikes(
                        pre, out.spikes[index], layer.kernel, tau_steps)
            rows.append(row)
    return rows, kernels


def main(argv=None) -> int:
    import pandas as pd

    parser = argparse.ArgumentParser(prog="python -m analysis.activity",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("pretrained", help="pretrained.npz of protocols.pretrain")
    parser.add_argument("--topology", required=True)
    parser.add_argument("--rates", type=float, nargs="+", default=[250.0, 1000.0],
                        help="input max rates in Hz (pre-training uses 250, fine-tuning 1000)")
    parser.add_argument("--durations", type=float, nargs="+", default=[25.0, 50.0],
                        help="presentation lengths in ms")
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--images", type=int, default=200, help="first n training images")
    parser.add_argument("--data-dir")
    parser.add_argument("--tau-pre", type=float,
                        help="STDP trace time constant in ms for <x_pre> (default: the "
                             "pre-training run's own, from pretrained.json beside the file)")
    args = parser.parse_args(argv)
    from protocols.config import ConfigError
    from protocols.datasets import DatasetError
    from protocols.records import NpzError

    try:
        rows, kernels = layer_activity(args.topology, args.pretrained, args.rates,
                                       args.durations, args.dataset, args.images,
                                       data_dir=args.data_dir, tau_pre_ms=args.tau_pre)
    except (ConfigError, DatasetError, NpzError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("spikes per image, by layer")
    table = pd.DataFrame(rows)
    print(table.to_markdown(index=False, floatfmt=tuple(
        ".3f" if "<x_pre>" in c else ".1f" for c in table.columns)))
    print("\nconv kernels")
    print(pd.DataFrame(kernels).to_markdown(index=False, floatfmt=".3g"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
