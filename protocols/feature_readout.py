"""Feature quality of STDP pre-trained conv kernels vs equally tuned random kernels (issue 3).

Question: does STDP pre-training (docs/method.md §3) give the first conv layer better features than random
kernels, once the firing rates are the same? The readout is a linear classifier on the frozen
layer's pooled spike counts, so it measures the features, not a fine-tuning procedure.

Per seed:

1. **STDP arm.** Pre-train the first conv layer with :func:`protocols.pretrain.pretrain` and its
   defaults (``PretrainConfig``: cpp_standalone, 1,000 seeded training images, 25 ms at 250 Hz,
   homeostasis). Kernels and effective thresholds (base + adapted theta) are frozen.
2. **Random arm.** Lee-initialised kernels ``U[-k, k]``, ``k = sqrt(3/fan_in)``
   (:func:`models.initialisation.initialise`, scheme ``lee``) with **equally tuned** thresholds:
   *for every map m, the random map's threshold is set (by bisection) so that its mean spike count
   per image on the pre-training images equals that of STDP map m with its frozen threshold, with
   both layers driven by the very same Poisson input spikes (presentation and rate of the readout),
   homeostasis off.* Per-map rather than overall matching also equalises how the spikes are spread
   over maps; a map is matched to its STDP partner by index (the random maps are exchangeable).
   The rates are measured again on the readout's test images to show the match holds out of
   sample (``conv_spikes_per_image_test``, ``pool_spikes_per_image_test``).
3. **Features.** Every training and test image is presented once as Poisson spikes
   (:func:`protocols.encoding.poisson_spikes`, 25 ms at the pre-training rate, 250 Hz: the input
   statistics under which the STDP thresholds were adapted and the random ones tuned) through the
   frozen conv layer and its fixed 2×2 pooling with the batched forward pass
   (:func:`models.batched.forward`, float32). Both arms see the *same* spikes (common random
   numbers: a paired comparison). Features: pooled spike counts per (map, position), e.g.
   36·12·12 = 5,184 for the shallow net.
4. **Readout.** ``StandardScaler`` (fit on the training features; constant features are left at
   0) and ``LogisticRegression(solver='lbfgs', C=--C (1.0), max_iter=--max-iter (1000),
   tol=1e-4)``, multinomial, float64; lbfgs has no randomness (``random_state=0`` is set anyway),
   so a fit is deterministic up to BLAS summation order. Reported: test accuracy per arm, and the
   same classifier on raw pixels (intensity/255) as a reference (seed-independent: fit once).

Run::

    MNIST_DIR=/path/to/mnist python -m protocols.feature_readout --seeds 0 1 2 \
        [--n-train 20000 --n-test 10000] [--out results/feature_readout]

Outputs (``--out``, all written atomically, no pickle): ``results.csv`` (tidy: one row per seed
and arm, the pixel reference once), ``results.json`` (config, seeds, versions, per-map rates,
timings), ``summary.md`` (mean ± std over seeds), and per seed ``seed<k>/pretrained.npz`` (the
pre-training output, for ``python -m analysis.kernels``) and ``seed<k>/random_conv1.npz``
(random kernels ``conv1_kernels`` and tuned thresholds).

Subsets (``--n-train``/``--n-test``) are seeded samples without replacement drawn with a fixed
seed (:data:`SUBSET_SEED`), the same for every readout seed, so seeds differ only in pre-training,
random kernels and Poisson draws.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.topology import SHALLOW, ConvLayer, PoolLayer, parse_topology
from protocols.pretrain import PretrainConfig, pretrain, pretraining_indices
from protocols.records import atomic_savez, atomic_write_bytes, versions

#: seed of the fixed train/test subsets (independent of the readout seeds)
SUBSET_SEED = 20180435
#: stream keys of np.random.SeedSequence([seed, key]) (pre-training uses default_rng(seed) itself)
STREAM_RANDOM_KERNELS, STREAM_TUNING, STREAM_TRAIN, STREAM_TEST = 1, 2, 3, 4
ARMS = ("stdp", "random")
#: feature variants, both (maps · pooled positions)-dimensional: the spike counts of the fixed
#: LIF pooling units (what the network passes on; the brief's definition) and, as a control, the
#: conv spike counts summed over each 2×2 pooling window (equal total rate by construction)
FEATURES = ("pool_spikes", "conv_sum2x2")


@dataclass(frozen=True)
class ReadoutConfig:
    """Everything the readout (steps 2-4) depends on, beside the pre-training config."""

    #: presentation per image in steps of dt (25 = the pre-training presentation)
    steps: int = 25
    #: input rate in Hz (None: the pre-training rate, PretrainingParameters.max_rate)
    max_rate_hz: float | None = None
    #: images per forward batch (memory: steps·batch·pooled units bytes of spikes)
    batch: int = 1000
    #: bisection steps of the threshold tuning
    tune_iters: int = 24
    #: LogisticRegression inverse regularisation strength (on standardised features)
    C: float = 1.0
    max_iter: int = 1000
    tol: float = 1e-4


def rng_for(seed: int, key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, key]))


def _conv_pool_layers(topology: str):
    """The input layer, the first conv layer and its pooling layer of ``topology``."""
    layers = parse_topology(topology)
    if len(layers) < 3 or not (isinstance(layers[1], ConvLayer)
                               and isinstance(layers[2], PoolLayer)):
        raise ValueError(f"topology {topology!r} must start with a conv layer followed by "
                         f"pooling (e.g. {SHALLOW!r})")
    return layers[:3]


def _encode(images, steps: int, rng: np.random.Generator, max_rate_hz: float, dt):
    from brian2 import Hz

    from protocols.encoding import poisson_spikes

    return poisson_spikes(images, steps * dt, rng, max_rate=max_rate_hz * Hz, dt=dt)


def conv_pool_counts(layers, kernels, thresholds, spikes, lif, pool):
    """Per-image spike counts of the conv layer ``(B, M, H, W)`` and pooling ``(B, M, h, w)``.

    ``spikes``: bool ``(T, B, C, H, W)`` input. One batched forward pass, float32.
    """
    from models.batched import LayerParams, forward

    params = [None, LayerParams(np.asarray(kernels, np.float32),
                                np.asarray(thresholds, np.float32)), None]
    fw = forward(layers, params, spikes, lif, pool, dtype=np.float32, keep_spikes=False)
    return np.asarray(fw.count[1]), np.asarray(fw.count[2])


def map_rates(conv_counts: np.ndarray) -> np.ndarray:
    """Mean spike count per image of each map, ``(M,)``, from conv counts ``(B, M, H, W)``."""
    return conv_counts.sum(axis=(2, 3)).mean(axis=0)


def tune_thresholds(layers, kernels, spikes, target: np.ndarray, lif, pool,
                    iters: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """Per-map thresholds so that each map's mean spikes/image on ``spikes`` equals ``target``.

    Bisection on every map at once (maps do not interact: each map's count depends only on its
    own kernel and threshold). The count is a non-increasing step function of the threshold, so
    the result is the bracket end whose rate is closer to the target. Bracket: (0, V_max], with
    V_max = (sum of positive weights)/(1 - decay) + 1 the largest membrane any input can reach
    (above it a map is silent), used as is for a silent target. Returns thresholds and rates.
    """
    kernels = np.asarray(kernels, np.float64)
    m = kernels.shape[0]
    target = np.asarray(target, np.float64)
    pos = np.clip(kernels, 0, None).reshape(m, -1).sum(axis=1)
    v_max = pos / (1.0 - lif.decay) + 1.0
    lo = np.zeros(m)
    hi = v_max.copy()
    r_lo = np.full(m, np.inf)
    r_hi = np.zeros(m)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        rate = map_rates(conv_pool_counts(layers, kernels, mid, spikes, lif, pool)[0])
        above = rate > target
        lo = np.where(above, mid, lo)
        r_lo = np.where(above, rate, r_lo)
        hi = np.where(above, hi, mid)
        r_hi = np.where(above, r_hi, rate)
    pick_lo = np.abs(r_lo - target) < np.abs(r_hi - target)
    th = np.where(pick_lo, lo, hi)
    th = np.where(target <= 0, v_max, th)
    rate = map_rates(conv_pool_counts(layers, kernels, th, spikes, lif, pool)[0])
    return th, rate


def extract_features(layers, arms: dict, images, rng, rcfg: ReadoutConfig, max_rate_hz, lif,
                     pool, progress: bool = False, desc: str = "") -> dict:
    """Pooled spike counts ``(N, M·h·w)`` uint8 of every arm on the same Poisson input.

    ``arms``: ``{name: (kernels, thresholds)}``. Also returns each arm's mean conv spikes per
    image per map (``rates``) and mean pooled spikes per image.
    """
    from tqdm import tqdm

    n = len(images)
    n_feat = int(np.prod(layers[2].shape))
    size = layers[2].size
    m, ph, pw = layers[2].shape
    if rcfg.steps * size * size > 255:
        raise ValueError("steps · pool window too large for uint8 conv-sum features")
    feats = {(a, v): np.empty((n, n_feat), np.uint8) for a in arms for v in FEATURES}
    conv_sum = {a: np.zeros(layers[1].n_maps) for a in arms}
    for start in tqdm(range(0, n, rcfg.batch), desc=desc, disable=not progress, unit="batch"):
        spikes = _encode(images[start:start + rcfg.batch], rcfg.steps, rng, max_rate_hz, lif.dt)
        for a, (kern, th) in arms.items():
            conv, pooled = conv_pool_counts(layers, kern, th, spikes, lif, pool)
            b = len(pooled)
            feats[a, "pool_spikes"][start:start + b] = pooled.reshape(b, -1)
            window = conv[:, :, :ph * size, :pw * size].reshape(b, m, ph, size, pw, size)
            feats[a, "conv_sum2x2"][start:start + b] = window.sum(axis=(3, 5)).reshape(b, -1)
            conv_sum[a] += conv.sum(axis=(0, 2, 3))
    return {"features": feats, "rates": {a: conv_sum[a] / n for a in arms},
            "pool_spikes_per_image": {a: float(feats[a, "pool_spikes"].sum(dtype=np.int64)) / n
                                      for a in arms}}


def fit_readout(x_train, y_train, x_test, y_test, rcfg: ReadoutConfig) -> dict:
    """Standardise (fit on train) + multinomial logistic regression; accuracies and fit info."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    t0 = time.perf_counter()
    scaler = StandardScaler().fit(x_train.astype(np.float64))
    xtr = scaler.transform(x_train.astype(np.float64))
    xte = scaler.transform(x_test.astype(np.float64))
    clf = LogisticRegression(solver="lbfgs", C=rcfg.C, max_iter=rcfg.max_iter, tol=rcfg.tol,
                             random_state=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        clf.fit(xtr, y_train)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return {"train_accuracy": float(clf.score(xtr, y_train)),
            "test_accuracy": float(clf.score(xte, y_test)),
            "n_features": int(x_train.shape[1]),
            "n_constant_features": int((scaler.var_ == 0).sum()),
            "lr_n_iter": int(np.max(clf.n_iter_)), "lr_converged": bool(converged),
            "fit_s": round(time.perf_counter() - t0, 2)}


def _reset_brian2() -> None:
    """Leave Brian2's device as new after a standalone pre-training run."""
    if "brian2" in sys.modules:
        from brian2 import device, set_device

        device.reinit()
        device.activate()
        set_device("runtime")


def run_seed(seed: int, data, pcfg: PretrainConfig, rcfg: ReadoutConfig, train_idx, test_idx,
             out: Path | None = None, progress: bool = False) -> dict:
    """Steps 1-4 for one seed; returns per-arm results, rates and timings."""
    from models.initialisation import initialise

    pcfg = dataclasses.replace(pcfg, seed=seed)
    layers = _conv_pool_layers(pcfg.topology)
    max_rate_hz = (rcfg.max_rate_hz if rcfg.max_rate_hz is not None
                   else float(pcfg.pretraining.max_rate / _hz()))
    lif, pool = pcfg.lif, pcfg.pooling
    timings = {}

    # 1. STDP pre-training (its own API and defaults), first conv layer only
    pre_idx = pretraining_indices(len(data.train_images), pcfg.pretraining.n_images, seed)
    pre_images = data.train_images[pre_idx]
    # pretrain() trains every conv layer of the topology; the readout is about the first only
    if sum(isinstance(layer, ConvLayer) for layer in parse_topology(pcfg.topology)) > 1:
        raise ValueError("feature readout needs a topology with one conv layer (e.g. "
                         f"{SHALLOW!r}); got {pcfg.topology!r}")
    t0 = time.perf_counter()
    try:
        result = pretrain(pcfg, pre_images, progress=progress)
    finally:
        _reset_brian2()
    timings["pretrain_s"] = round(time.perf_counter() - t0, 2)
    arrays = result["arrays"]
    stdp_k = arrays["conv1_kernels"]
    stdp_th = arrays["conv1_thresholds"]

    # 2. random arm, thresholds tuned per map to the STDP map's rate on the pre-training images
    t0 = time.perf_counter()
    rand_k = np.asarray(initialise(parse_topology(pcfg.topology),
                                   rng_for(seed, STREAM_RANDOM_KERNELS), "lee")[1].weights,
                        np.float64)
    spikes = _encode(pre_images, rcfg.steps, rng_for(seed, STREAM_TUNING), max_rate_hz, lif.dt)
    target = map_rates(conv_pool_counts(layers, stdp_k, stdp_th, spikes, lif, pool)[0])
    rand_th, rand_rate = tune_thresholds(layers, rand_k, spikes, target, lif, pool,
                                         rcfg.tune_iters)
    del spikes
    timings["tune_s"] = round(time.perf_counter() - t0, 2)
    rel = np.abs(rand_rate - target) / np.maximum(target, 1e-12)
    tuning = {"target_spikes_per_image_per_map": target.tolist(),
              "random_spikes_per_image_per_map": rand_rate.tolist(),
              "random_thresholds": rand_th.tolist(), "stdp_thresholds": stdp_th.tolist(),
              "total_stdp": float(target.sum()), "total_random": float(rand_rate.sum()),
              "max_abs_diff_per_map": float(np.max(np.abs(rand_rate - target))),
              "max_rel_diff_active_maps": float(rel[target > 0].max()) if (target > 0).any()
              else 0.0,
              "silent_stdp_maps": int((target <= 0).sum())}

    if out is not None:
        seed_dir = out / f"seed{seed}"
        atomic_savez(seed_dir / "pretrained.npz", {**arrays, "image_indices": pre_idx,
                                               "seed": np.asarray(seed)})
        atomic_savez(seed_dir / "random_conv1.npz", {"conv1_kernels": rand_k,
                                                 "conv1_thresholds": rand_th,
                                                 "seed": np.asarray(seed)})

    # 3. features of both arms on the same Poisson input
    arms = {"stdp": (stdp_k, stdp_th), "random": (rand_k, rand_th)}
    t0 = time.perf_counter()
    tr = extract_features(layers, arms, data.train_images[train_idx], rng_for(seed, STREAM_TRAIN),
                          rcfg, max_rate_hz, lif, pool, progress, f"seed {seed} train")
    te = extract_features(layers, arms, data.test_images[test_idx], rng_for(seed, STREAM_TEST),
                          rcfg, max_rate_hz, lif, pool, progress, f"seed {seed} test")
    timings["features_s"] = round(time.perf_counter() - t0, 2)
    print(f"  seed {seed}: pretrain {timings['pretrain_s']} s, tune {timings['tune_s']} s, "
          f"features {timings['features_s']} s", flush=True)

    # 4. logistic regression per arm
    y_tr, y_te = data.train_labels[train_idx], data.test_labels[test_idx]
    rows = []
    for v in FEATURES:
        for a in ARMS:
            fit = fit_readout(tr["features"][a, v], y_tr, te["features"][a, v], y_te, rcfg)
            rows.append({"seed": seed, "arm": a, "features": v, **fit,
                         "conv_spikes_per_image_pretrain_images": float(
                             target.sum() if a == "stdp" else rand_rate.sum()),
                         "conv_spikes_per_image_test": float(te["rates"][a].sum()),
                         "pool_spikes_per_image_test": te["pool_spikes_per_image"][a],
                         "n_train": len(train_idx), "n_test": len(test_idx)})
            timings[f"fit_{a}_{v}_s"] = fit["fit_s"]
            print(f"  seed {seed} {a}/{v}: test {100 * fit['test_accuracy']:.2f} %, "
                  f"{fit['lr_n_iter']} lbfgs iterations, {fit['fit_s']} s", flush=True)
    return {"rows": rows, "tuning": tuning, "timings": timings,
            "test_rates_per_map": {a: te["rates"][a].tolist() for a in ARMS},
            "pretrain_summary": result["summary"]}


def _hz():
    from brian2 import Hz

    return Hz


def pixel_reference(data, train_idx, test_idx, rcfg: ReadoutConfig) -> dict:
    """The same readout on raw pixels (intensity in [0, 1]); deterministic, seed-independent."""
    from protocols.encoding import intensities

    def flat(x):
        return intensities(x).reshape(len(x), -1)

    fit = fit_readout(flat(data.train_images[train_idx]), data.train_labels[train_idx],
                      flat(data.test_images[test_idx]), data.test_labels[test_idx], rcfg)
    return {"seed": "", "arm": "pixels", "features": "pixels", **fit,
            "conv_spikes_per_image_pretrain_images": "", "conv_spikes_per_image_test": "",
            "pool_spikes_per_image_test": "",
            "n_train": len(train_idx), "n_test": len(test_idx)}


def subset(n_total: int, n: int | None) -> np.ndarray:
    """All indices, or a fixed seeded sample of ``n`` (sorted), the same for every seed."""
    if n is None or n >= n_total:
        return np.arange(n_total)
    if n < 1:
        raise ValueError(f"subset size must be positive, got {n}")
    return np.sort(np.random.default_rng(SUBSET_SEED).choice(n_total, size=n, replace=False))


CSV_FIELDS = ("seed", "arm", "features", "test_accuracy", "train_accuracy", "n_train", "n_test",
              "n_features", "n_constant_features", "conv_spikes_per_image_pretrain_images",
              "conv_spikes_per_image_test", "pool_spikes_per_image_test", "lr_n_iter",
              "lr_converged", "fit_s")


def to_csv(rows) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    return buf.getvalue().encode()


def summarise(rows, seeds) -> str:
    """Markdown table: per features variant and arm, test accuracy mean ± std (ddof = 1)."""
    seeds = list(seeds)
    lines = [f"Seeds: {', '.join(map(str, seeds))} (n = {len(seeds)}); mean ± std over seeds "
             f"(ddof = 1); the pixel reference is one deterministic fit.", "",
             "| features | conv1 kernels | test accuracy (%) | train accuracy (%) "
             "| conv1 spikes/image (test) | pooled spikes/image (test) | dims | n_train / n_test |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]

    def ms(values, scale=1.0, digits=2):
        v = np.asarray(values, float) * scale
        if len(v) == 1:
            return f"{v[0]:.{digits}f}"
        return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"

    label = {"pool_spikes": "pooling-unit spike counts", "conv_sum2x2": "conv1 counts summed 2×2",
             "pixels": "raw pixels"}
    kern = {"stdp": "STDP", "random": "random, rate-matched", "pixels": "—"}
    notes = []
    for v in (*FEATURES, "pixels"):
        for arm in (*ARMS, "pixels"):
            sel = [r for r in rows if r["arm"] == arm and r.get("features") == v]
            if not sel:
                continue
            spk = "—" if arm == "pixels" else ms([r["conv_spikes_per_image_test"] for r in sel],
                                                 digits=1)
            pool = "—" if arm == "pixels" else ms([r["pool_spikes_per_image_test"] for r in sel],
                                                  digits=1)
            lines.append(f"| {label[v]} | {kern[arm]} | "
                         f"{ms([r['test_accuracy'] for r in sel], 100)} | "
                         f"{ms([r['train_accuracy'] for r in sel], 100)} | {spk} | {pool} | "
                         f"{sel[0]['n_features']} | {sel[0]['n_train']} / {sel[0]['n_test']} |")
        paired = {r["seed"]: r["test_accuracy"] for r in rows
                  if r["arm"] == "stdp" and r.get("features") == v}
        diffs = [100 * (paired[r["seed"]] - r["test_accuracy"]) for r in rows
                 if r["arm"] == "random" and r.get("features") == v and r["seed"] in paired]
        if diffs:
            notes.append(f"- {label[v]}: STDP − random per seed (percentage points) "
                         f"{', '.join(f'{d:+.2f}' for d in diffs)}; mean {np.mean(diffs):+.2f}")
    not_conv = [f"{r['arm']}/{r.get('features')} seed {r['seed']}" for r in rows
                if not r["lr_converged"]]
    if not_conv:
        notes.append(f"- lbfgs did not converge within max_iter for: {', '.join(not_conv)}")
    if notes:
        lines += ["", "Paired differences (same Poisson input for both arms):", "", *notes]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--n-train", type=int, help="training images (default: all)")
    parser.add_argument("--n-test", type=int, help="test images (default: all)")
    parser.add_argument("--out", default="results/feature_readout")
    parser.add_argument("--config", help="pre-training TOML (default: PretrainConfig defaults, "
                                         "= configs/pretrain_shallow.toml)")
    parser.add_argument("--topology", help="override the topology (one conv layer + pooling)")
    parser.add_argument("--dataset", help="override the dataset (mnist, mnist-5k, ...)")
    parser.add_argument("--data-dir", help="dataset folder (default: protocols.datasets rules)")
    parser.add_argument("--device", help="override the pre-training device")
    parser.add_argument("--n-pretrain", type=int, help="override pretraining.n_images")
    parser.add_argument("--C", type=float, default=ReadoutConfig.C)
    parser.add_argument("--max-iter", type=int, default=ReadoutConfig.max_iter)
    parser.add_argument("--batch", type=int, default=ReadoutConfig.batch)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    from protocols.config import config_to_dict, load_config
    from protocols.datasets import load_dataset

    pcfg = load_config(args.config, PretrainConfig) if args.config else PretrainConfig()
    for key in ("topology", "dataset", "device"):
        if getattr(args, key) is not None:
            pcfg = dataclasses.replace(pcfg, **{key: getattr(args, key)})
    if args.n_pretrain is not None:
        pcfg = dataclasses.replace(pcfg, pretraining=dataclasses.replace(
            pcfg.pretraining, n_images=args.n_pretrain,
            batch_images=min(pcfg.pretraining.batch_images, args.n_pretrain)))
    rcfg = ReadoutConfig(C=args.C, max_iter=args.max_iter, batch=args.batch)
    _conv_pool_layers(pcfg.topology)
    out = Path(args.out)
    t_start = time.perf_counter()
    data = load_dataset(pcfg.dataset, args.data_dir)
    train_idx = subset(len(data.train_images), args.n_train)
    test_idx = subset(len(data.test_images), args.n_test)

    rows, per_seed = [], {}
    t0 = time.perf_counter()
    pixels = pixel_reference(data, train_idx, test_idx, rcfg)
    pixel_s = round(time.perf_counter() - t0, 2)
    import numba
    import sklearn

    command = " ".join(["python -m protocols.feature_readout",
                        *(sys.argv[1:] if argv is None else argv)])
    record = {"command": command, "seeds": list(args.seeds), "seeds_done": [],
              "pretrain_config": config_to_dict(pcfg),
              "readout_config": dataclasses.asdict(rcfg),
              "max_rate_hz_used": rcfg.max_rate_hz if rcfg.max_rate_hz is not None
              else float(pcfg.pretraining.max_rate / _hz()),
              "dataset": data.name, "dataset_source": data.source,
              "n_train": len(train_idx), "n_test": len(test_idx), "subset_seed": SUBSET_SEED,
              "features": {"pool_spikes": "spike counts of the fixed LIF pooling units per "
                                          "(map, position)",
                           "conv_sum2x2": "conv1 spike counts summed over each pooling window"},
              "classifier": "sklearn LogisticRegression(solver='lbfgs', multinomial, "
                            f"C={rcfg.C}, max_iter={rcfg.max_iter}, tol={rcfg.tol}, "
                            "random_state=0) on StandardScaler (train-fit) float64 features",
              "versions": {**versions(), "sklearn": sklearn.__version__,
                           "numba": numba.__version__},
              "pixel_fit_s": pixel_s}

    def write(final: bool) -> str:
        # rewritten after every seed, so a stopped run keeps its finished seeds
        all_rows = rows + [pixels]
        done = record["seeds_done"]
        summary = summarise(all_rows, done)
        record.update(rows=all_rows, per_seed=per_seed, complete=final,
                      wall_s=round(time.perf_counter() - t_start, 2))
        atomic_write_bytes(out / "results.csv", to_csv(all_rows))
        atomic_write_bytes(out / "results.json", json.dumps(record, indent=2).encode())
        atomic_write_bytes(out / "summary.md", (
            f"# Feature readout\n\nCommand: `{command}`\n\n" + summary
            + f"\nWall time: {record['wall_s']:.0f} s"
            + ("" if final else f" (incomplete: seeds done {done} of {record['seeds']})")
            + ".\n").encode())
        return summary

    for seed in args.seeds:
        res = run_seed(seed, data, pcfg, rcfg, train_idx, test_idx, out,
                       progress=not args.no_progress)
        rows.extend(res["rows"])
        per_seed[str(seed)] = {k: v for k, v in res.items() if k != "rows"}
        record["seeds_done"].append(seed)
        print(f"seed {seed}: " + ", ".join(f"{r['arm']}/{r['features']} "
                                           f"{100 * r['test_accuracy']:.2f} %"
                                           for r in res["rows"]) + f"; {res['timings']}",
              flush=True)
        write(final=False)
    summary = write(final=True)
    print(summary)
    print(f"wrote {out / 'results.csv'}, {out / 'results.json'}, {out / 'summary.md'} "
          f"({record['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
