"""Deep-STDP (Lu & Sengupta) and its k-means baseline (DeepCluster): one run, or a sweep on Dask.

Each epoch (docs/deep_stdp.md):

1. **features**: the ConvNet (:mod:`models.convnet`, a topology string) maps the training
   images to the output of its last hidden layer;
2. **preprocessing** (both methods alike) [paper DeepCluster]: PCA to ``pca_dim`` dimensions
   with whitening, then L2 normalisation of each vector;
3. **clustering**: ``method = "stdp"``: a fresh WTA network (:mod:`models.wta`) learns on the
   vectors, Poisson-encoded as on/off channels, then, frozen, gives each image its winning
   neuron; ``method = "kmeans"``: scikit-learn k-means on the same vectors;
4. **evaluation**: Hungarian accuracy, NMI, ARI of the pseudo-labels against the true labels
   (never used for training);
5. **training**: a re-initialised classifier head, then one pass of SGD on cross-entropy
   against the pseudo-labels, images sampled uniformly over the non-empty clusters [paper
   DeepCluster]; then the Fisher-information trace of the network (:func:`fisher_trace`).

Row ``epoch = e`` of ``metrics.csv`` is the clustering after ``e`` training epochs (``e = 0``:
features of the random network) and the training that follows it.

Run::

    python -m protocols.deep_stdp --config configs/deep_stdp_quick.toml
    python -m protocols.deep_stdp --sweep configs/deep_stdp_sweep.toml --workers 2
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

if __name__ == "__main__":
    # [choice] one BLAS thread per run unless the caller says otherwise: on a loaded 2-core
    # machine a multi-threaded BLAS made the backward pass ~20x slower (set before NumPy loads)
    for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

from models.wta import WTAParameters  # noqa: E402
from protocols.config import config_to_dict, load_config  # noqa: E402

Method = Literal["stdp", "kmeans"]


@dataclass(frozen=True)
class TrainingSettings:
    """Backpropagation on pseudo-labels [paper DeepCluster where stated, else choice]."""

    #: [choice] 0.01: DeepCluster's 0.05 is for AlexNet with batch norm; 0.01 is stable here
    lr: float = 0.01
    #: [paper DeepCluster] momentum 0.9
    momentum: float = 0.9
    #: [paper DeepCluster] weight decay 1e-5
    weight_decay: float = 1e-5
    #: [choice] mini-batch of 64 images
    batch_size: int = 64
    #: [choice] images per training epoch (0: as many as the training set), sampled uniformly
    #: over the non-empty pseudo-label clusters
    images_per_epoch: int = 0

    def __post_init__(self):
        if self.lr <= 0 or not 0 <= self.momentum < 1 or self.weight_decay < 0:
            raise ValueError("training: lr must be > 0, momentum in [0, 1), weight_decay >= 0")
        if self.batch_size < 1 or self.images_per_epoch < 0:
            raise ValueError("training: batch_size must be >= 1 and images_per_epoch >= 0")


@dataclass(frozen=True)
class DeepSTDPConfig:
    """One run of the Deep-STDP protocol (TOML; unknown keys are errors)."""

    method: Method = "stdp"
    dataset: str = "mnist-5k"
    #: [choice] ConvNet: two small conv layers and a 32-unit feature layer, sized for 2 CPU
    #: cores; the head's size is the number of clusters (the last FC layer must equal n_clusters)
    topology: str = "28x28-8C5-2P-16C5-2P-32FC-10FC"
    seed: int = 0
    epochs: int = 10
    #: [choice] training images used (0: all); the first n of a seeded permutation, so the
    #: compute fits 2 CPU cores (docs/deep_stdp.md)
    train_images: int = 0
    #: [paper] 10 clusters for 10 classes (the paper's 10-class subset)
    n_clusters: int = 10
    #: [choice] 16 PCA dimensions: half the 32 features, as DeepCluster keeps the leading
    #: directions (256 of 4,096)
    pca_dim: int = 16
    #: [choice] images the WTA learns on per epoch (0: all training images), in seeded order
    stdp_images: int = 0
    #: [choice] passes of STDP learning over those images
    stdp_passes: int = 1
    #: [recon] "onoff": each whitened, L2-normalised component z -> rates of max(z, 0) and
    #: max(-z, 0), each channel divided by its maximum over the images (Poisson rates must be
    #: non-negative; the sign is kept as two channels)
    stdp_encoding: Literal["onoff"] = "onoff"
    #: [choice] expected input per step of a mean-weight neuron for the mean vector, in units
    #: of the threshold; sets the WTA's input_gain every epoch (features change scale); 0.1:
    #: a steady state of 10 thresholds (tau_m / dt = 100): 0.03 left a quarter of the images
    #: silent once the thresholds had risen (docs/deep_stdp.md) (0: use [wta] input_gain)
    stdp_drive: float = 0.1
    #: [paper D&C] re-presentations, with doubled input gain, of images no neuron fired for
    stdp_retries: int = 4
    #: [paper DeepCluster] k-means restarts (faiss: 1) and iterations (20)
    kmeans_n_init: int = 1
    kmeans_max_iter: int = 20
    #: [recon] images for the Fisher-information trace after each epoch (0: skip it)
    fisher_images: int = 500
    out: str = "runs/deep_stdp"
    wta: WTAParameters = field(default_factory=WTAParameters)
    training: TrainingSettings = field(default_factory=TrainingSettings)

    def __post_init__(self):
        if self.epochs < 1:
            raise ValueError("epochs must be >= 1")
        if self.n_clusters < 2:
            raise ValueError("n_clusters must be >= 2")
        if self.pca_dim < 1:
            raise ValueError("pca_dim must be >= 1")
        for name in ("train_images", "stdp_images", "fisher_images"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0: all)")
        if self.stdp_drive < 0 or self.stdp_retries < 0:
            raise ValueError("stdp_drive and stdp_retries must be >= 0")
        if self.stdp_passes < 1 or self.kmeans_n_init < 1 or self.kmeans_max_iter < 1:
            raise ValueError("stdp_passes, kmeans_n_init and kmeans_max_iter must be >= 1")
        if self.wta.n_neurons != self.n_clusters:
            object.__setattr__(self, "wta", dataclasses.replace(self.wta,
                                                                n_neurons=self.n_clusters))


# ----------------------------------------------------------------------------------------------
# Steps


def preprocess(features: np.ndarray, pca_dim: int, seed: int) -> np.ndarray:
    """PCA (whitened) to ``pca_dim`` dimensions, then each row scaled to unit L2 norm."""
    from sklearn.decomposition import PCA

    dim = min(pca_dim, features.shape[1], features.shape[0])
    z = PCA(n_components=dim, whiten=True, random_state=seed).fit_transform(features)
    norm = np.linalg.norm(z, axis=1, keepdims=True)
    return z / np.where(norm > 0, norm, 1.0)


def onoff_intensities(z: np.ndarray) -> np.ndarray:
    """``[max(z,0), max(-z,0)]`` per component, each channel divided by its maximum."""
    x = np.concatenate([np.maximum(z, 0), np.maximum(-z, 0)], axis=1)
    top = x.max(axis=0, keepdims=True)
    return np.clip(x / np.where(top > 0, top, 1.0), 0.0, 1.0)


def stdp_cluster(z: np.ndarray, cfg: DeepSTDPConfig, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """Pseudo-labels of the preprocessed vectors ``z`` by a freshly initialised WTA network."""
    from models.wta import encode, initial_weights, respond, run_wta

    from models.wta import gain_for_drive

    x = onoff_intensities(z)
    p = cfg.wta
    if cfg.stdp_drive > 0:
        p = dataclasses.replace(p, input_gain=gain_for_drive(x, cfg.stdp_drive, p))
    w = initial_weights(x.shape[1], p, rng)
    theta = np.zeros(p.n_neurons)
    n_learn = cfg.stdp_images or len(x)
    chunk = 500
    for _ in range(cfg.stdp_passes):
        order = rng.permutation(len(x))[:n_learn]
        for s in range(0, len(order), chunk):
            idx = order[s:s + chunk]
            res = run_wta(encode(x[idx], p, rng), w, theta, p, learn=True)
            w, theta = res.weights, res.theta
    counts, labels = respond(x, w, theta, p, rng, retries=cfg.stdp_retries)
    info = {"silent_images": int((counts.sum(1) == 0).sum()), "input_gain": p.input_gain,
            "mean_spikes": float(counts.sum(1).mean())}
    return labels, info


def kmeans_cluster(z: np.ndarray, cfg: DeepSTDPConfig, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=cfg.n_clusters, n_init=cfg.kmeans_n_init, max_iter=cfg.kmeans_max_iter,
                random_state=int(rng.integers(2**31 - 1)))
    return km.fit_predict(z), {"silent_images": 0, "input_gain": float("nan"),
                               "mean_spikes": float("nan")}


def uniform_over_clusters(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` image indices, each cluster drawn equally often (empty clusters skipped)
    [paper DeepCluster: avoids a trivial solution where one large cluster dominates]."""
    clusters = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    per = int(np.ceil(n / len(clusters)))
    picks = np.concatenate([rng.choice(m, per, replace=len(m) < per) for m in clusters])
    return rng.permutation(picks)[:n]


def train_epoch(net, opt, images: np.ndarray, labels: np.ndarray, cfg: DeepSTDPConfig,
                rng: np.random.Generator) -> float:
    from models.convnet import cross_entropy_step

    n = cfg.training.images_per_epoch or len(images)
    idx = uniform_over_clusters(labels, n, rng)
    bs = cfg.training.batch_size
    losses = [cross_entropy_step(net, opt, images[idx[s:s + bs]], labels[idx[s:s + bs]])
              for s in range(0, len(idx), bs)]
    return float(np.mean(losses))


# ----------------------------------------------------------------------------------------------
# A run


def load_images(cfg: DeepSTDPConfig, data_dir: str | None, rng: np.random.Generator):
    """The run's training images ``(N, 1, 28, 28)`` float32 in [0, 1] and their labels."""
    from protocols.datasets import load_dataset

    data = load_dataset(cfg.dataset, data_dir)
    order = rng.permutation(len(data.train_labels))
    if cfg.train_images:
        if cfg.train_images > len(order):
            raise ValueError(f"train_images = {cfg.train_images} exceeds the {len(order)} "
                             f"training images of {cfg.dataset}; lower it (0: all)")
        order = order[:cfg.train_images]
    images = data.train_images[order].astype(np.float32)[:, None] / np.float32(255)
    return images, data.train_labels[order].astype(np.int64)


def run(cfg: DeepSTDPConfig, data_dir: str | None = None, progress: bool = True):
    """Run (or re-run from the start) one Deep-STDP / k-means run; return its metrics table.
    A folder whose status.json says ``finished`` for as many epochs is left as it is."""
    import pandas as pd

    from analysis.clustering import cluster_metrics
    from models.convnet import SGD, ConvNet, fisher_trace
    from protocols import runstate
    from protocols.records import atomic_savez, atomic_write_bytes, atomic_write_json, versions

    out = Path(cfg.out)
    status = runstate.read_status(out) if out.exists() else None
    if status and status.get("status") == "finished" and status.get("epochs") == cfg.epochs \
            and (out / "metrics.csv").exists():
        return pd.read_csv(out / "metrics.csv")
    runstate.check_writable(out)
    net_probe = ConvNet(cfg.topology, np.random.default_rng(0))
    if net_probe.n_classes != cfg.n_clusters:
        raise ValueError(f"topology {cfg.topology!r} ends in {net_probe.n_classes} units but "
                         f"n_clusters = {cfg.n_clusters}; make its last FC layer "
                         f"{cfg.n_clusters}FC")
    return _run(cfg, out, data_dir, progress)


def _run(cfg, out, data_dir, progress):
    import pandas as pd

    from analysis.clustering import cluster_metrics
    from models.convnet import SGD, ConvNet, fisher_trace
    from protocols import runstate
    from protocols.records import atomic_savez, atomic_write_bytes, atomic_write_json, versions

    rngs = [np.random.default_rng(s) for s in np.random.SeedSequence(cfg.seed).spawn(5)]
    data_rng, net_rng, cluster_rng, train_rng, fisher_rng = rngs
    images, labels = load_images(cfg, data_dir, data_rng)
    atomic_write_json(out / "config.json", {"config": config_to_dict(cfg), "versions": versions(),
                                            "seed": cfg.seed, "n_train_images": len(images)})
    with runstate.RunLock(out):
        runstate.write_status(out, "running", f"epoch 0 of {cfg.epochs}")
        try:
            net = ConvNet(cfg.topology, net_rng)
            opt = SGD(net, cfg.training.lr, cfg.training.momentum, cfg.training.weight_decay)
            fisher_x = images[:cfg.fisher_images]
            rows = []
            cluster = stdp_cluster if cfg.method == "stdp" else kmeans_cluster
            for epoch in range(cfg.epochs):
                t0 = time.time()
                feats = net.features(images)
                z = preprocess(feats, cfg.pca_dim, cfg.seed + epoch)
                t1 = time.time()
                pseudo, info = cluster(z, cfg, cluster_rng)
                t2 = time.time()
                metrics = cluster_metrics(pseudo, labels)
                sizes = np.bincount(pseudo, minlength=cfg.n_clusters)
                net.reset_head(net_rng)
                opt.reset_head()
                loss = train_epoch(net, opt, images, pseudo, cfg, train_rng)
                t3 = time.time()
                fisher = (fisher_trace(net, fisher_x, fisher_rng) if cfg.fisher_images
                          else float("nan"))
                rows.append({"epoch": epoch, **metrics, "empty_clusters": int((sizes == 0).sum()),
                             "largest_cluster": float(sizes.max() / len(pseudo)),
                             "train_loss": loss, "fisher_trace": fisher, **info,
                             "seconds_cluster": t2 - t1, "seconds_total": time.time() - t0})
                frame = pd.DataFrame(rows)
                atomic_write_bytes(out / "metrics.csv", frame.to_csv(index=False).encode())
                runstate.write_status(out, "running", f"epoch {epoch + 1} of {cfg.epochs}")
                if progress:
                    runstate.say(f"{cfg.method} {cfg.dataset} seed {cfg.seed} epoch {epoch}: "
                                 f"accuracy {metrics['accuracy']:.3f} NMI {metrics['nmi']:.3f} "
                                 f"loss {loss:.3f} ({time.time() - t0:.0f} s)")
                runstate.check_interrupt()
            atomic_savez(out / "final.npz", {f"layer{i}_{n}": q for i, p in enumerate(net.params)
                                             if p is not None for n, q in zip("Wb", p)}
                         | {"pseudo_labels": pseudo, "labels": labels})
            runstate.write_status(out, "finished", f"{cfg.epochs} epochs", epochs=cfg.epochs)
        except KeyboardInterrupt:
            runstate.write_status(out, "interrupted", "stopped by Ctrl-C; rerun the same command "
                                  "(a run restarts from epoch 0)")
            raise
        except Exception as err:
            runstate.write_status(out, "failed", f"{type(err).__name__}: {err}")
            raise
    return frame


# ----------------------------------------------------------------------------------------------
# Sweep


@dataclass(frozen=True)
class DeepSTDPSweep:
    """Seeds × methods × datasets; ``[run]`` holds the settings every run shares."""

    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    methods: tuple[Method, ...] = ("stdp", "kmeans")
    datasets: tuple[str, ...] = ("mnist",)
    out: str = "runs/deep_stdp_sweep"
    run: DeepSTDPConfig = field(default_factory=DeepSTDPConfig)

    def __post_init__(self):
        for name in ("seeds", "methods", "datasets"):
            values = getattr(self, name)
            if not values or len(set(values)) != len(values):
                raise ValueError(f"{name} must be a non-empty list without duplicates")


def plan(sweep: DeepSTDPSweep) -> list[DeepSTDPConfig]:
    return [dataclasses.replace(sweep.run, dataset=d, method=m, seed=s,
                                out=str(Path(sweep.out) / d / m / f"seed{s}"))
            for d in sweep.datasets for m in sweep.methods for s in sweep.seeds]


def run_one(cfg: DeepSTDPConfig, data_dir: str | None, token: str | None = None) -> dict:
    """One run of a sweep; never raises. ``token``: the sweep's, which stops the run at the end
    of its epoch once the sweep asks (:func:`protocols.runstate.request_stop`)."""
    from protocols import runstate
    from protocols.sweep import NOT_STARTED

    runstate.VERBOSE = False
    with runstate.stoppable(token):
        if runstate.stop_requested():
            return {"run": cfg.out, **NOT_STARTED}
        try:
            frame = run(cfg, data_dir, progress=False)
            return {"run": cfg.out, "status": "finished",
                    "message": f"accuracy {float(frame.iloc[-1].accuracy):.3f}"}
        except KeyboardInterrupt:  # the sweep asked; status.json says so
            return {"run": cfg.out, "status": "interrupted",
                    "message": "stopped; a rerun restarts it from epoch 0"}
        except Exception as err:  # one failing run never stops the sweep
            return {"run": cfg.out, "status": "failed",
                    "message": f"{type(err).__name__}: {err}",
                    "traceback": traceback.format_exc()}


def sweep(cfg: DeepSTDPSweep, workers: int = 1, threads: int = 1, scheduler: str | None = None,
          data_dir: str | None = None) -> list[dict]:
    """Every run of the grid on Dask (a local cluster, or ``scheduler``); finished runs skip."""
    from protocols.runstate import RunInterrupted
    from protocols.sweep import NOT_STARTED, TaskQueue, _client, _counts

    configs = plan(cfg)
    results = []

    def collect(pending):
        for future in pending:
            try:
                result = future.result()
            except Exception as err:
                result = {"run": future.key, "status": "failed", "message": f"worker lost: {err}"}
            print(f"{result['status']:>9}  {result['run']}  {result['message']}", flush=True)
            results.append(result)

    with _client(scheduler, workers, threads) as client:
        tasks = TaskQueue(client, run_one,
                          [(f"deep-stdp-{c.out}", (c, data_dir)) for c in configs],
                          window=None if scheduler else workers)
        try:
            collect(tasks)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: each run stops at the end of its epoch
            print("stopping: each running run stops at the end of its epoch (Ctrl-C again "
                  "quits at once)", file=sys.stderr, flush=True)
            results.extend({"run": key.removeprefix("deep-stdp-"), **NOT_STARTED}
                           for key in tasks.stop())
            collect(tasks)
            raise RunInterrupted(f"the sweep was stopped ({_counts(results)}); rerun the same "
                                 f"command: finished runs are kept, the others restart") from None
    return results


def _main(argv=None) -> int:
    from protocols import runstate

    parser = argparse.ArgumentParser(prog="python -m protocols.deep_stdp",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--config", help="one run (configs/deep_stdp_*.toml)")
    what.add_argument("--sweep", help="a sweep (configs/deep_stdp_sweep.toml)")
    parser.add_argument("--seed", type=int, help="override the run's seed")
    parser.add_argument("--method", choices=("stdp", "kmeans"), help="override the run's method")
    parser.add_argument("--out", help="override the output folder")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the sweep's seeds")
    parser.add_argument("--workers", type=int, default=1, help="local Dask worker processes")
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads per worker")
    parser.add_argument("--scheduler", help="address of a running Dask scheduler")
    parser.add_argument("--data-dir", help="dataset folder (default: protocols.datasets rules)")
    parser.add_argument("--quiet", action="store_true", help="no per-epoch messages")
    args = parser.parse_args(argv)
    runstate.VERBOSE = not args.quiet
    if args.sweep:
        cfg = load_config(args.sweep, DeepSTDPSweep)
        if args.seeds:
            cfg = dataclasses.replace(cfg, seeds=tuple(args.seeds))
        results = sweep(cfg, args.workers, args.threads, args.scheduler, args.data_dir)
        failed = [r for r in results if r["status"] != "finished"]
        for r in failed:
            print(f"failed: {r['run']}: {r['message']}", file=sys.stderr)
        return 1 if failed else 0
    cfg = load_config(args.config, DeepSTDPConfig)
    cfg = dataclasses.replace(cfg, **{k: v for k, v in (("seed", args.seed), ("method", args.method),
                                                        ("out", args.out)) if v is not None})
    frame = run(cfg, args.data_dir, progress=not args.quiet)
    last = frame.iloc[-1]
    print(f"{cfg.method} on {cfg.dataset}, seed {cfg.seed}: epoch {int(last.epoch)} accuracy "
          f"{last.accuracy:.3f}, NMI {last.nmi:.3f}, ARI {last.ari:.3f} -> {cfg.out}")
    return 0


def main(argv=None) -> int:
    from protocols import runstate

    return runstate.cli(_main, argv)


if __name__ == "__main__":
    raise SystemExit(main())
