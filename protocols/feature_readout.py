"""Feature quality of STDP pre-trained conv kernels vs equally tuned random kernels (issue 3).

Question: does STDP pre-training (docs/method.md §3) give the first conv layer better features than random
kernels, once the firing rates are the same? The readout is a linear classifier on the frozen
layer's pooled spike counts, so it measures the features, not a fine-tuning procedure.
``--layer 2`` asks the same of the deep net's second conv layer (see *Layer 2* below).

Per seed (``--layer 1``, the default):

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

**Layer 2** (``--layer 2``; the topology must have exactly two conv layers, each followed by
pooling, e.g. the deep net ``28x28-20C5-2P-50C5-2P-200FC-10FC``). The simulated stack is conv1
→ pool1 → conv2 → pool2 (:func:`stack_counts`, one :func:`models.batched.forward` pass of that
topology prefix); features are pool2's spike counts (50·4·4 = 800 for the deep net) and, as the
control, conv2's counts summed over each pooling window.

1. **STDP arm**: :func:`protocols.pretrain.pretrain` with its defaults pre-trains both conv layers
   layer-wise (conv2 on the frozen conv1 + pool1; ``STDPParameters.offset`` =
   ``("constant", "window_mean")``, so conv2 uses the window-mean offset, docs/pretraining.md).
   Both layers' kernels and effective thresholds are frozen.
2. **Random arm**: both conv layers Lee-initialised (the same ``initialise`` call draws both),
   thresholds tuned layer by layer on the pre-training images with the same Poisson spikes:
   first conv1 per map to the STDP conv1 rates (as for layer 1), then, with that tuned random
   conv1 (and pool1) feeding it, conv2 per map to the STDP conv2 rates
   (:func:`tune_thresholds` with ``lower_thresholds``).
3. Optional (``--mixed-arm``) third arm ``stdp_below_random``: the STDP conv1 with a random conv2
   tuned per map to the same STDP conv2 rates on the STDP conv1's output.
4. Features and readout as above; all arms see the same Poisson input spikes. Reported in
   addition: spikes per image of every layer (conv1, pool1, conv2, pool2) per arm on the
   training and the test images (CSV columns ``<layer>_spikes_per_image_<train|test>``;
   ``conv_spikes_per_image_*`` / ``pool_spikes_per_image_test`` are those of conv2 / pool2).

Run::

    MNIST_DIR=/path/to/mnist python -m protocols.feature_readout --seeds 0 1 2 \
        [--n-train 20000 --n-test 10000] [--out results/feature_readout]
    MNIST_DIR=/path/to/mnist python -m protocols.feature_readout --layer 2 \
        --topology 28x28-20C5-2P-50C5-2P-200FC-10FC --seeds 0 1 2 [--mixed-arm] \
        [--n-train 10000 --n-test 5000] [--out results/feature_readout_deep_conv2]

Outputs (``--out``, all written atomically, no pickle): ``results.csv`` (tidy: one row per seed
and arm, the pixel reference once), ``results.json`` (config, seeds, versions, per-map rates,
timings), ``summary.md`` (mean ± std over seeds), and per seed ``seed<k>/pretrained.npz`` (the
pre-training output, for ``python -m analysis.kernels``) and ``seed<k>/random_conv<L>.npz``
(``--layer L``: random kernels ``conv<i>_kernels`` and tuned thresholds ``conv<i>_thresholds`` of
conv1 .. conv<L>; with ``--mixed-arm`` also ``stdp_below_random_conv<L>_thresholds``). For
``--layer`` >= 2, ``results.json`` also has ``layer`` and ``arms``, and each seed's ``tuning``
record (flat: the read-out layer) has ``lower_layers`` (conv1 ..) and, with ``--mixed-arm``,
``stdp_below_random``; for ``--layer 1`` every output is as it was before ``--layer`` existed.

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

from models.topology import DEEP, SHALLOW, ConvLayer, PoolLayer, parse_topology
from protocols.datasets import SUBSET_SEED, fixed_subset
from protocols.pretrain import PretrainConfig, pretrain, pretraining_indices
from protocols.records import atomic_savez, atomic_write_bytes, versions

#: stream keys of np.random.SeedSequence([seed, key]) (pre-training uses default_rng(seed) itself)
STREAM_RANDOM_KERNELS, STREAM_TUNING, STREAM_TRAIN, STREAM_TEST = 1, 2, 3, 4
ARMS = ("stdp", "random")
#: optional third arm of a read-out of conv layer >= 2: STDP layers below, random read-out layer
MIXED_ARM = "stdp_below_random"
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


def _conv_pool_layers(topology: str, layer: int = 1):
    """The input layer and the first ``layer`` (conv, pooling) pairs of ``topology``.

    This is the stack the read-out simulates: its last pooling layer gives the features, e.g.
    ``[input, conv1, pool1]`` for ``layer=1`` and ``[input, conv1, pool1, conv2, pool2]`` for
    ``layer=2``.
    """
    if layer < 1:
        raise ValueError(f"layer must be >= 1, got {layer}")
    layers = parse_topology(topology)
    n = 1 + 2 * layer
    if len(layers) < n or not all(isinstance(layers[2 * i + 1], ConvLayer)
                                  and isinstance(layers[2 * i + 2], PoolLayer)
                                  for i in range(layer)):
        if layer == 1:
            raise ValueError(f"topology {topology!r} must start with a conv layer followed by "
                             f"pooling (e.g. {SHALLOW!r})")
        raise ValueError(f"topology {topology!r} must start with {layer} pairs of a conv layer "
                         f"followed by pooling for layer {layer} (e.g. {DEEP!r})")
    return layers[:n]


def stack_names(layers) -> list[str]:
    """Names of the layers after the input of a conv+pool stack: conv1, pool1, conv2, pool2..."""
    names, n_conv, n_pool = [], 0, 0
    for layer in layers[1:]:
        if isinstance(layer, ConvLayer):
            n_conv += 1
            names.append(f"conv{n_conv}")
        else:
            n_pool += 1
            names.append(f"pool{n_pool}")
    return names


def _per_conv(layers, arrays, what: str) -> list:
    """One array per conv layer of ``layers``: a list as given, or a lone array for one layer."""
    n_conv = sum(isinstance(layer, ConvLayer) for layer in layers)
    if isinstance(arrays, (list, tuple)):
        if len(arrays) != n_conv:
            raise ValueError(f"{what}: {len(arrays)} arrays for {n_conv} conv layers")
        return list(arrays)
    if n_conv != 1:
        raise ValueError(f"{what}: give one array per conv layer ({n_conv})")
    return [arrays]


def _encode(images, steps: int, rng: np.random.Generator, max_rate_hz: float, dt):
    from brian2 import Hz

    from protocols.encoding import poisson_spikes

    return poisson_spikes(images, steps * dt, rng, max_rate=max_rate_hz * Hz, dt=dt)


def stack_counts(layers, kernels, thresholds, spikes, lif, pool) -> list[np.ndarray]:
    """Per-image spike counts of every layer of a conv+pool stack after the input.

    ``[conv1 (B, M1, H1, W1), pool1 (B, M1, h1, w1), conv2, pool2, ...]``. ``kernels`` and
    ``thresholds``: one array per conv layer (a lone array when the stack has one conv layer).
    ``spikes``: bool ``(T, B, C, H, W)`` input. One batched forward pass, float32.
    """
    from models.batched import LayerParams, forward

    ks = iter(_per_conv(layers, kernels, "kernels"))
    ths = iter(_per_conv(layers, thresholds, "thresholds"))
    params = [None]
    for layer in layers[1:]:
        params.append(LayerParams(np.asarray(next(ks), np.float32),
                                  np.asarray(next(ths), np.float32))
                      if isinstance(layer, ConvLayer) else None)
    fw = forward(layers, params, spikes, lif, pool, dtype=np.float32, keep_spikes=False)
    return [np.asarray(c) for c in fw.count[1:]]


def conv_pool_counts(layers, kernels, thresholds, spikes, lif, pool):
    """Per-image spike counts of the stack's last conv layer ``(B, M, H, W)`` and its pooling
    ``(B, M, h, w)`` (:func:`stack_counts`; every lower layer is simulated too)."""
    counts = stack_counts(layers, kernels, thresholds, spikes, lif, pool)
    return counts[-2], counts[-1]


def map_rates(conv_counts: np.ndarray) -> np.ndarray:
    """Mean spike count per image of each map, ``(M,)``, from conv counts ``(B, M, H, W)``."""
    return conv_counts.sum(axis=(2, 3)).mean(axis=0)


def tune_thresholds(layers, kernels, spikes, target: np.ndarray, lif, pool,
                    iters: int = 30, lower_thresholds=()) -> tuple[np.ndarray, np.ndarray]:
    """Per-map thresholds of the stack's last conv layer so that each of its maps' mean
    spikes/image on ``spikes`` equals ``target``.

    ``kernels``: one array per conv layer of the stack (a lone array for one conv layer);
    ``lower_thresholds``: the fixed thresholds of the conv layers below the tuned one, which
    drive it unchanged at every step. Bisection on every map at once (maps do not interact: each
    map's count depends only on its own kernel and threshold, given its input). The count is a
    non-increasing step function of the threshold, so the result is the bracket end whose rate is
    closer to the target. Bracket: (0, V_max], with V_max = (sum of positive weights)/(1 - decay)
    + 1 the largest membrane any binary input can reach (above it a map is silent), used as is
    for a silent target. Returns thresholds and rates.
    """
    ks = _per_conv(layers, kernels, "kernels")
    lower = [np.asarray(th, np.float64) for th in lower_thresholds]
    if len(lower) != len(ks) - 1:
        raise ValueError(f"lower_thresholds: {len(lower)} arrays for {len(ks) - 1} lower conv "
                         "layers")
    kern = np.asarray(ks[-1], np.float64)
    m = kern.shape[0]
    target = np.asarray(target, np.float64)
    pos = np.clip(kern, 0, None).reshape(m, -1).sum(axis=1)
    v_max = pos / (1.0 - lif.decay) + 1.0
    lo = np.zeros(m)
    hi = v_max.copy()
    r_lo = np.full(m, np.inf)
    r_hi = np.zeros(m)

    def rates(th):
        return map_rates(conv_pool_counts(layers, ks, [*lower, th], spikes, lif, pool)[0])

    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        rate = rates(mid)
        above = rate > target
        lo = np.where(above, mid, lo)
        r_lo = np.where(above, rate, r_lo)
        hi = np.where(above, hi, mid)
        r_hi = np.where(above, r_hi, rate)
    pick_lo = np.abs(r_lo - target) < np.abs(r_hi - target)
    th = np.where(pick_lo, lo, hi)
    th = np.where(target <= 0, v_max, th)
    return th, rates(th)


def extract_features(layers, arms: dict, images, rng, rcfg: ReadoutConfig, max_rate_hz, lif,
                     pool, progress: bool = False, desc: str = "") -> dict:
    """Pooled spike counts ``(N, M·h·w)`` uint8 of the stack's last pooling layer, for every arm
    on the same Poisson input.

    ``arms``: ``{name: (kernels, thresholds)}``, one array each per conv layer of ``layers`` (a
    lone array for one conv layer). Also returns each arm's mean spikes per image per map of the
    last conv layer (``rates``), mean pooled spikes per image (``pool_spikes_per_image``) and
    mean spikes per image of every layer after the input (``layer_spikes_per_image``: name ->
    value, names from :func:`stack_names`).
    """
    from tqdm import tqdm

    n = len(images)
    n_feat = int(np.prod(layers[-1].shape))
    size = layers[-1].size
    m, ph, pw = layers[-1].shape
    if rcfg.steps * size * size > 255:
        raise ValueError("steps · pool window too large for uint8 conv-sum features")
    names = stack_names(layers)
    feats = {(a, v): np.empty((n, n_feat), np.uint8) for a in arms for v in FEATURES}
    conv_sum = {a: np.zeros(layers[-2].n_maps) for a in arms}
    layer_sum = {a: np.zeros(len(names)) for a in arms}
    for start in tqdm(range(0, n, rcfg.batch), desc=desc, disable=not progress, unit="batch"):
        spikes = _encode(images[start:start + rcfg.batch], rcfg.steps, rng, max_rate_hz, lif.dt)
        for a, (kern, th) in arms.items():
            counts = stack_counts(layers, kern, th, spikes, lif, pool)
            conv, pooled = counts[-2], counts[-1]
            b = len(pooled)
            feats[a, "pool_spikes"][start:start + b] = pooled.reshape(b, -1)
            window = conv[:, :, :ph * size, :pw * size].reshape(b, m, ph, size, pw, size)
            feats[a, "conv_sum2x2"][start:start + b] = window.sum(axis=(3, 5)).reshape(b, -1)
            conv_sum[a] += conv.sum(axis=(0, 2, 3))
            layer_sum[a] += [c.sum(dtype=np.float64) for c in counts]
    return {"features": feats, "rates": {a: conv_sum[a] / n for a in arms},
            "pool_spikes_per_image": {a: float(feats[a, "pool_spikes"].sum(dtype=np.int64)) / n
                                      for a in arms},
            "layer_spikes_per_image": {a: dict(zip(names, (layer_sum[a] / n).tolist()))
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


def _tuning_record(target, rate, rand_th, stdp_th) -> dict:
    """How well one layer's tuned random rates match the STDP targets (per map)."""
    rel = np.abs(rate - target) / np.maximum(target, 1e-12)
    return {"target_spikes_per_image_per_map": target.tolist(),
            "random_spikes_per_image_per_map": rate.tolist(),
            "random_thresholds": rand_th.tolist(), "stdp_thresholds": stdp_th.tolist(),
            "total_stdp": float(target.sum()), "total_random": float(rate.sum()),
            "max_abs_diff_per_map": float(np.max(np.abs(rate - target))),
            "max_rel_diff_active_maps": float(rel[target > 0].max()) if (target > 0).any()
            else 0.0,
            "silent_stdp_maps": int((target <= 0).sum())}


def run_seed(seed: int, data, pcfg: PretrainConfig, rcfg: ReadoutConfig, train_idx, test_idx,
             out: Path | None = None, progress: bool = False, layer: int = 1,
             mixed_arm: bool = False) -> dict:
    """Steps 1-4 for one seed, read-out of conv layer ``layer``; returns per-arm results, rates
    and timings. ``mixed_arm`` (``layer`` >= 2): also the arm :data:`MIXED_ARM`, the STDP
    layers below the read-out layer with a random read-out layer tuned on their output."""
    from models.initialisation import initialise

    pcfg = dataclasses.replace(pcfg, seed=seed)
    layers = _conv_pool_layers(pcfg.topology, layer)
    max_rate_hz = (rcfg.max_rate_hz if rcfg.max_rate_hz is not None
                   else float(pcfg.pretraining.max_rate / _hz()))
    lif, pool = pcfg.lif, pcfg.pooling
    timings = {}
    if mixed_arm and layer < 2:
        raise ValueError("the mixed arm needs layer >= 2 (STDP layers below a random one)")

    # 1. STDP pre-training (its own API and defaults): pretrain() trains every conv layer of the
    # topology, layer-wise; the read-out uses conv1 .. conv<layer>
    pre_idx = pretraining_indices(len(data.train_images), pcfg.pretraining.n_images, seed)
    pre_images = data.train_images[pre_idx]
    n_conv = sum(isinstance(x, ConvLayer) for x in parse_topology(pcfg.topology))
    if n_conv != layer:
        raise ValueError(f"feature readout of conv layer {layer} needs a topology with "
                         f"{layer} conv layer(s) (e.g. {SHALLOW if layer == 1 else DEEP!r}); "
                         f"got {pcfg.topology!r}")
    t0 = time.perf_counter()
    try:
        result = pretrain(pcfg, pre_images, progress=progress)
    finally:
        _reset_brian2()
    timings["pretrain_s"] = round(time.perf_counter() - t0, 2)
    arrays = result["arrays"]
    stdp_k = [arrays[f"conv{i}_kernels"] for i in range(1, layer + 1)]
    stdp_th = [arrays[f"conv{i}_thresholds"] for i in range(1, layer + 1)]

    # 2. random arm, thresholds tuned per map to the STDP map's rate on the pre-training images,
    # layer by layer: conv i's targets are the STDP conv i rates, with the tuned random conv
    # 1 .. i-1 below it
    t0 = time.perf_counter()
    init = initialise(parse_topology(pcfg.topology), rng_for(seed, STREAM_RANDOM_KERNELS), "lee")
    rand_k = [np.asarray(init[2 * i - 1].weights, np.float64) for i in range(1, layer + 1)]
    spikes = _encode(pre_images, rcfg.steps, rng_for(seed, STREAM_TUNING), max_rate_hz, lif.dt)
    rand_th, tunings = [], []
    for i in range(1, layer + 1):
        sub = layers[:2 * i + 1]
        target = map_rates(conv_pool_counts(sub, stdp_k[:i], stdp_th[:i], spikes, lif, pool)[0])
        th, rate = tune_thresholds(sub, rand_k[:i], spikes, target, lif, pool, rcfg.tune_iters,
                                   lower_thresholds=rand_th)
        rand_th.append(th)
        tunings.append(_tuning_record(target, rate, th, stdp_th[i - 1]))
    if mixed_arm:
        # STDP conv 1 .. layer-1, random conv<layer> tuned to the same targets on their output
        mix_k = [*stdp_k[:-1], rand_k[-1]]
        mix_th_last, mix_rate = tune_thresholds(layers, mix_k, spikes, target, lif, pool,
                                                rcfg.tune_iters, lower_thresholds=stdp_th[:-1])
        mix_th = [*stdp_th[:-1], mix_th_last]
    del spikes
    timings["tune_s"] = round(time.perf_counter() - t0, 2)
    # the read-out layer's record is flat (as for layer 1); lower layers are listed by name
    tuning = tunings[-1]
    if layer > 1:
        tuning["lower_layers"] = {f"conv{i}": tunings[i - 1] for i in range(1, layer)}
    if mixed_arm:
        tuning[MIXED_ARM] = _tuning_record(target, mix_rate, mix_th_last, stdp_th[-1])

    if out is not None:
        seed_dir = out / f"seed{seed}"
        atomic_savez(seed_dir / "pretrained.npz", {**arrays, "image_indices": pre_idx,
                                               "seed": np.asarray(seed)})
        saved = {}
        for i in range(1, layer + 1):
            saved[f"conv{i}_kernels"] = rand_k[i - 1]
            saved[f"conv{i}_thresholds"] = rand_th[i - 1]
        if mixed_arm:
            saved[f"{MIXED_ARM}_conv{layer}_thresholds"] = mix_th_last
        atomic_savez(seed_dir / f"random_conv{layer}.npz", {**saved, "seed": np.asarray(seed)})

    # 3. features of every arm on the same Poisson input
    arms = {"stdp": (stdp_k, stdp_th), "random": (rand_k, rand_th)}
    if mixed_arm:
        arms[MIXED_ARM] = (mix_k, mix_th)
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
    pre_rate = {"stdp": target.sum(), "random": tunings[-1]["total_random"]}
    if mixed_arm:
        pre_rate[MIXED_ARM] = mix_rate.sum()
    rows = []
    for v in FEATURES:
        for a in arms:
            fit = fit_readout(tr["features"][a, v], y_tr, te["features"][a, v], y_te, rcfg)
            row = {"seed": seed, "arm": a, "features": v, **fit,
                   "conv_spikes_per_image_pretrain_images": float(pre_rate[a]),
                   "conv_spikes_per_image_test": float(te["rates"][a].sum()),
                   "pool_spikes_per_image_test": te["pool_spikes_per_image"][a],
                   "n_train": len(train_idx), "n_test": len(test_idx)}
            if layer > 1:
                for part, res in (("train", tr), ("test", te)):
                    for name, value in res["layer_spikes_per_image"][a].items():
                        row[f"{name}_spikes_per_image_{part}"] = value
            rows.append(row)
            timings[f"fit_{a}_{v}_s"] = fit["fit_s"]
            print(f"  seed {seed} {a}/{v}: test {100 * fit['test_accuracy']:.2f} %, "
                  f"{fit['lr_n_iter']} lbfgs iterations, {fit['fit_s']} s", flush=True)
    return {"rows": rows, "tuning": tuning, "timings": timings,
            "test_rates_per_map": {a: te["rates"][a].tolist() for a in arms},
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
    if n is not None and n < 1:
        raise ValueError(f"subset size must be positive, got {n}")
    return fixed_subset(n_total, n)


CSV_FIELDS = ("seed", "arm", "features", "test_accuracy", "train_accuracy", "n_train", "n_test",
              "n_features", "n_constant_features", "conv_spikes_per_image_pretrain_images",
              "conv_spikes_per_image_test", "pool_spikes_per_image_test", "lr_n_iter",
              "lr_converged", "fit_s")


def csv_fields(layer: int = 1) -> tuple[str, ...]:
    """:data:`CSV_FIELDS`, and for a read-out of conv layer >= 2 the spikes per image of every
    layer of the stack on the training and test images (``conv1_spikes_per_image_train``, ...)."""
    if layer == 1:
        return CSV_FIELDS
    names = [f"{kind}{i}" for i in range(1, layer + 1) for kind in ("conv", "pool")]
    return CSV_FIELDS + tuple(f"{name}_spikes_per_image_{part}" for part in ("train", "test")
                              for name in names)


def to_csv(rows, layer: int = 1) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=csv_fields(layer), extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    return buf.getvalue().encode()


def summarise(rows, seeds, layer: int = 1) -> str:
    """Markdown table: per features variant and arm, test accuracy mean ± std (ddof = 1); for a
    read-out of conv layer >= 2 also spikes per image of every layer on train and test images."""
    seeds = list(seeds)
    conv = f"conv{layer}"
    kernels_header = "conv1 kernels" if layer == 1 else \
        f"conv kernels ({', '.join(f'conv{i}' for i in range(1, layer + 1))})"
    lines = [f"Seeds: {', '.join(map(str, seeds))} (n = {len(seeds)}); mean ± std over seeds "
             f"(ddof = 1); the pixel reference is one deterministic fit.", "",
             f"| features | {kernels_header} | test accuracy (%) | train accuracy (%) "
             f"| {conv} spikes/image (test) | pooled spikes/image (test) | dims "
             "| n_train / n_test |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]

    def ms(values, scale=1.0, digits=2):
        v = np.asarray(values, float) * scale
        if len(v) == 1:
            return f"{v[0]:.{digits}f}"
        return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"

    label = {"pool_spikes": "pooling-unit spike counts", "conv_sum2x2": f"{conv} counts summed 2×2",
             "pixels": "raw pixels"}
    if layer == 1:
        kern = {"stdp": "STDP", "random": "random, rate-matched", "pixels": "—"}
    else:
        below = f"conv1-{layer - 1}" if layer > 2 else "conv1"
        kern = {"stdp": "all STDP", "random": "all random, rate-matched layer by layer",
                MIXED_ARM: f"STDP {below}, random {conv} rate-matched", "pixels": "—"}
    arms = [a for a in (*ARMS, MIXED_ARM) if any(r["arm"] == a for r in rows)]
    notes = []
    for v in (*FEATURES, "pixels"):
        for arm in (*arms, "pixels"):
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
        for other in arms[1:]:
            diffs = [100 * (paired[r["seed"]] - r["test_accuracy"]) for r in rows
                     if r["arm"] == other and r.get("features") == v and r["seed"] in paired]
            if diffs:
                versus = "random" if other == "random" else other
                notes.append(f"- {label[v]}: STDP − {versus} per seed (percentage points) "
                             f"{', '.join(f'{d:+.2f}' for d in diffs)}; "
                             f"mean {np.mean(diffs):+.2f}")
    not_conv = [f"{r['arm']}/{r.get('features')} seed {r['seed']}" for r in rows
                if not r["lr_converged"]]
    if not_conv:
        notes.append(f"- lbfgs did not converge within max_iter for: {', '.join(not_conv)}")
    if notes:
        lines += ["", "Paired differences (same Poisson input for both arms):", "", *notes]
    if layer > 1:
        names = [f"{kind}{i}" for i in range(1, layer + 1) for kind in ("conv", "pool")]
        lines += ["", "Spikes per image per layer (mean ± std over seeds; train: the read-out's "
                  "training images, test: its test images, each presented once):", "",
                  "| conv kernels | images | " + " | ".join(names) + " |",
                  "| --- | --- | " + " | ".join("---" for _ in names) + " |"]
        for arm in arms:
            sel = [r for r in rows if r["arm"] == arm and r.get("features") == "pool_spikes"]
            for part in ("train", "test"):
                lines.append(f"| {kern[arm]} | {part} | " + " | ".join(
                    ms([r[f"{name}_spikes_per_image_{part}"] for r in sel], digits=1)
                    for name in names) + " |")
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
    parser.add_argument("--layer", type=int, default=1,
                        help="read out conv layer L (default 1); the topology must have L conv "
                             "layers, each followed by pooling (--layer 2: --topology " + DEEP
                             + ")")
    parser.add_argument("--mixed-arm", action="store_true",
                        help=f"--layer >= 2: also the arm {MIXED_ARM!r} (STDP layers below, "
                             "random read-out layer tuned on their output)")
    parser.add_argument("--topology", help="override the topology (--layer conv layers, each "
                                           "followed by pooling)")
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
    _conv_pool_layers(pcfg.topology, args.layer)
    if args.mixed_arm and args.layer < 2:
        parser.error("--mixed-arm needs --layer >= 2")
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
                           "conv_sum2x2": f"conv{args.layer} spike counts summed over each "
                                          "pooling window"},
              "classifier": "sklearn LogisticRegression(solver='lbfgs', multinomial, "
                            f"C={rcfg.C}, max_iter={rcfg.max_iter}, tol={rcfg.tol}, "
                            "random_state=0) on StandardScaler (train-fit) float64 features",
              "versions": {**versions(), "sklearn": sklearn.__version__,
                           "numba": numba.__version__},
              "pixel_fit_s": pixel_s}
    if args.layer != 1:  # (layer-1 records stay as they were: no key means layer 1)
        record["layer"] = args.layer
        record["arms"] = {"stdp": f"conv1-{args.layer} STDP pre-trained, frozen",
                          "random": f"conv1-{args.layer} Lee-random, thresholds tuned per map, "
                                    "layer by layer, to the STDP rates"}
        if args.mixed_arm:
            record["arms"][MIXED_ARM] = (f"STDP conv1-{args.layer - 1}, Lee-random "
                                         f"conv{args.layer} tuned to the STDP rates")
    def write(final: bool) -> str:
        # rewritten after every seed, so a stopped run keeps its finished seeds
        all_rows = rows + [pixels]
        done = record["seeds_done"]
        summary = summarise(all_rows, done, args.layer)
        record.update(rows=all_rows, per_seed=per_seed, complete=final,
                      wall_s=round(time.perf_counter() - t_start, 2))
        atomic_write_bytes(out / "results.csv", to_csv(all_rows, args.layer))
        atomic_write_bytes(out / "results.json", json.dumps(record, indent=2).encode())
        atomic_write_bytes(out / "summary.md", (
            f"# Feature readout{'' if args.layer == 1 else f' of conv{args.layer}'}\n\n"
            f"Command: `{command}`\n\n" + summary
            + f"\nWall time: {record['wall_s']:.0f} s"
            + ("" if final else f" (incomplete: seeds done {done} of {record['seeds']})")
            + ".\n").encode())
        return summary

    for seed in args.seeds:
        res = run_seed(seed, data, pcfg, rcfg, train_idx, test_idx, out,
                       progress=not args.no_progress, layer=args.layer,
                       mixed_arm=args.mixed_arm)
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
