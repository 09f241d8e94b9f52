"""The WTA clustering network alone on raw digit images: the first check of models/wta.py.

The k excitatory neurons learn on the training images (pixels as Poisson rates, one pass);
then, frozen, they respond to the training images, each neuron is labelled with the class it
fired most for (Diehl & Cook 2015's assignment), and a test image's class is the label with
the most spikes over that label's neurons (D&C's vote). Also reported: the Hungarian accuracy,
NMI and ARI of the winning neuron as a cluster id (what Deep-STDP uses as a pseudo-label).

Run::

    python -m protocols.wta_digits --dataset mnist-5k --neurons 10 50 100 --out results/wta_digits
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path

if __name__ == "__main__":
    for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
from brian2 import Hz  # noqa: E402

from models.wta import (WTAParameters, encode, initial_weights, respond,  # noqa: E402
                        run_wta)


def responses(x, w, theta, p, rng):
    """Counts and winners of the frozen network, silent images re-presented (models.wta.respond)."""
    return respond(x, w, theta, p, rng)


def digits_check(train_x, train_y, test_x, test_y, n_neurons: int, seed: int,
                 params: WTAParameters, passes: int = 1, drive: float = 0.03) -> dict:
    """Learn, label, vote; returns the accuracies, NMI, ARI and timings."""
    from analysis.clustering import cluster_metrics

    from models.wta import gain_for_drive

    p = dataclasses.replace(params, n_neurons=n_neurons)
    if drive > 0:
        p = dataclasses.replace(p, input_gain=gain_for_drive(train_x, drive, p))
    rng = np.random.default_rng(seed)
    w = initial_weights(train_x.shape[1], p, rng)
    theta = np.zeros(n_neurons)
    t0 = time.time()
    for _ in range(passes):
        order = rng.permutation(len(train_x))
        for s in range(0, len(order), 500):
            res = run_wta(encode(train_x[order[s:s + 500]], p, rng), w, theta, p, learn=True)
            w, theta = res.weights, res.theta
    t1 = time.time()
    train_counts, train_win = responses(train_x, w, theta, p, rng)
    n_classes = int(train_y.max()) + 1
    rates = np.zeros((n_neurons, n_classes))
    for c in range(n_classes):
        rates[:, c] = train_counts[train_y == c].mean(axis=0)
    neuron_label = rates.argmax(axis=1)
    test_counts, test_win = responses(test_x, w, theta, p, rng)
    votes = np.stack([test_counts[:, neuron_label == c].sum(axis=1) / max(1, (neuron_label == c).sum())
                      for c in range(n_classes)], axis=1)
    vote_pred = votes.argmax(axis=1)
    out = {"n_neurons": n_neurons, "seed": seed, "passes": passes,
           "vote_accuracy_test": float((vote_pred == test_y).mean()),
           "winner_label_accuracy_test": float((neuron_label[test_win] == test_y).mean()),
           "silent_test_images_after_retries": int((test_counts.sum(1) == 0).sum()),
           "mean_spikes_test": float(test_counts.sum(1).mean()),
           "seconds_learning": t1 - t0}
    out.update({f"cluster_{k}_test": v for k, v in cluster_metrics(test_win, test_y).items()})
    return out


def main(argv=None) -> int:
    import pandas as pd

    from analysis.report import write_table
    from protocols.datasets import load_dataset
    from protocols.records import atomic_write_json, versions

    parser = argparse.ArgumentParser(prog="python -m protocols.wta_digits",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="mnist-5k")
    parser.add_argument("--data-dir")
    parser.add_argument("--neurons", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--passes", type=int, default=1)
    parser.add_argument("--train-images", type=int, default=0, help="0: all")
    parser.add_argument("--max-rate", type=float, default=63.75,
                        help="Hz at pixel 255 [paper D&C: 63.75 Hz]")
    parser.add_argument("--drive", type=float, default=0.03,
                        help="expected input per step of a mean neuron (sets input_gain)")
    parser.add_argument("--eta", type=float, default=WTAParameters().eta)
    parser.add_argument("--delta-theta", type=float, default=0.05)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    data = load_dataset(args.dataset, args.data_dir)
    n = args.train_images or len(data.train_labels)
    train_x = data.train_images[:n].reshape(n, -1) / 255.0
    test_x = data.test_images.reshape(len(data.test_labels), -1) / 255.0
    params = WTAParameters(max_rate=args.max_rate * Hz, eta=args.eta,
                           delta_theta=args.delta_theta)
    rows = []
    for k in args.neurons:
        for seed in args.seeds:
            row = digits_check(train_x, data.train_labels[:n], test_x, data.test_labels, k, seed,
                               params, args.passes)
            print(row, flush=True)
            rows.append(row)
    write_table(pd.DataFrame(rows), args.out, "wta_digits")
    atomic_write_json(args.out / "wta_digits.json",
                      {"args": {k: (str(v) if isinstance(v, Path) else v)
                                for k, v in vars(args).items()},
                       "params": {f.name: str(getattr(params, f.name))
                                  for f in dataclasses.fields(params)},
                       "versions": versions(), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
