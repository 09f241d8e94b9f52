"""Greedy layer-wise STDP pre-training of the conv layers (docs/method.md §3.4), as the paper's methods read.

1. Present N training images for 25 ms each (dt = 1 ms) as Poisson spike trains and train conv
   layer 1 with weight-dependent STDP on shared kernels (updates of a map's positions that fire
   in the same step are averaged) and feature-map-wise homeostasis.
2. Freeze its kernels and thresholds (effective threshold = base v_th + adapted theta); present
   the images again through conv 1 and its pooling layer, and train conv layer 2 on the pooled
   spikes; repeat for every conv layer. Fully-connected layers are not touched.

Run::

    python -m protocols.pretrain --config configs/pretrain_shallow.toml [--n-images 200]
        [--seed 1] [--device runtime] [--out runs/pretrain_shallow]

Output (``--out``): ``pretrained.npz`` with ``conv{i}_kernels`` (n_maps, C_in, k, k),
``conv{i}_thresholds`` (n_maps,) effective thresholds to carry into fine-tuning,
``conv{i}_theta``, ``conv{i}_v_th_base``, ``image_indices``; and ``pretrained.json`` with the
config, seed, versions, firing statistics and timings. Both written atomically, no pickle, and only
when every layer's pre-training ran to its end: each Brian2 run is checked to have simulated its
full duration, and Ctrl-C stops with a message and exit status 130, writing nothing (pre-training
has no checkpoint; the same command starts it again). Configuration, data and output-folder
errors are one line naming the file and the fix, exit status 2, before any simulation starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from models.parameters import (HomeostasisParameters, LIFParameters, PoolingParameters,
                               PretrainingParameters, STDPParameters)
from models.topology import SHALLOW, ConvLayer, parse_topology
from protocols.config import ConfigError, config_to_dict, load_config
from protocols.records import atomic_savez, atomic_write_bytes, load_npz, versions
from protocols.runstate import RunInterrupted, check_writable, cli, run_guard, say


@dataclass(frozen=True)
class PretrainConfig:
    """Everything a pre-training run depends on (TOML: top-level keys + one table per dataclass)."""

    topology: str = SHALLOW
    #: dataset name for protocols.datasets.load_dataset ('mnist', 'mnist-5k', 'fashion-mnist')
    dataset: str = "mnist"
    seed: int = 0
    #: 'runtime' (Cython) or 'cpp_standalone' (built once per layer, re-run per batch)
    device: str = "cpp_standalone"
    out: str = "runs/pretrain"
    pretraining: PretrainingParameters = field(default_factory=PretrainingParameters)
    stdp: STDPParameters = field(default_factory=STDPParameters)
    homeostasis: HomeostasisParameters = field(default_factory=HomeostasisParameters)
    lif: LIFParameters = field(default_factory=LIFParameters)
    pooling: PoolingParameters = field(default_factory=PoolingParameters)

    def __post_init__(self):
        from protocols.datasets import DATASETS

        if self.dataset not in DATASETS:
            raise ValueError(f"dataset = {self.dataset!r} is not one of {', '.join(DATASETS)}")


#: what an STDP option was in pre-training records written before it existed: the paper's
#: constant offset on every layer, and a window-mean offset unscaled (lambda = 1)
LEGACY_STDP = {"offset": ["constant"], "window_scale": [1.0]}

#: where a pre-training ran, not what it learned: not compared by :func:`record_differences`
WHERE_KEYS = ("out", "device")


def _layer_offsets(stdp: dict, layers) -> list[str]:
    """Each conv layer's STDP offset as it acts: 'constant chi=...' or 'window_mean lambda=...'
    (per-conv-layer lists resolved as the network builder does)."""
    from models.network import _per_conv_layer

    offsets = stdp.get("offset", LEGACY_STDP["offset"])
    scales = stdp.get("window_scale", LEGACY_STDP["window_scale"])
    return [f"constant chi={stdp.get('chi_offset')}"
            if _per_conv_layer(offsets, layers, index) == "constant"
            else f"window_mean lambda={_per_conv_layer(scales, layers, index)}"
            for index, layer in enumerate(layers) if isinstance(layer, ConvLayer)]


def record_differences(recorded: dict, expected: dict) -> list[str]:
    """What a pre-training record's config (``pretrained.json`` "config", or ``pretrain.toml``)
    has that ``expected`` (``config_to_dict`` of a PretrainConfig) does not, as
    ``"key: recorded -> expected"``. Where it ran (WHERE_KEYS) is not compared; the STDP offset is
    compared per conv layer as it acts (so ``["constant", "window_mean"]`` equals the same list
    with a third entry on a two-conv net), with LEGACY_STDP for records older than a key; a
    section the record lacks entirely (records older than it) is not compared."""
    layers = parse_topology(str(expected["topology"]))
    found = []
    for key, want in expected.items():
        if key in WHERE_KEYS:
            continue
        have = recorded.get(key)
        if not isinstance(want, dict):
            if have != want:
                found.append(f"{key}: {have!r} -> {want!r}")
            continue
        if not isinstance(have, dict):
            continue
        if key == "stdp":
            for i, (a, b) in enumerate(zip(_layer_offsets(have, layers),
                                           _layer_offsets(want, layers)), start=1):
                if a != b:
                    found.append(f"stdp offset of conv{i}: {a} -> {b}")
            want = {k: v for k, v in want.items()
                    if k not in ("offset", "window_scale", "chi_offset")}
        for sub, value in want.items():
            old = have.get(sub)
            if isinstance(old, (list, tuple)) or isinstance(value, (list, tuple)):
                old, value = list(old or []), list(value)
            if old != value:
                found.append(f"{key}.{sub}: {have.get(sub)!r} -> {value!r}")
    return found


def recorded_config(folder: str | os.PathLike) -> dict | None:
    """The config a pre-training folder was made with: its ``pretrained.json`` record (written
    with the kernels), else its ``pretrain.toml``; None when it has neither."""
    import tomllib

    folder = Path(folder)
    try:
        record = json.loads((folder / "pretrained.json").read_text())
        if isinstance(record.get("config"), dict):
            return record["config"]
    except (OSError, ValueError, AttributeError):
        pass
    try:
        return tomllib.loads((folder / "pretrain.toml").read_text())
    except (OSError, ValueError):
        return None


class SimulationIncomplete(RuntimeError):
    """A Brian2 run that stopped before the end of its duration (not by Ctrl-C)."""


def _check_full_run(sn, program, t_before: float, duration, index: int, start: int) -> None:
    """Raise KeyboardInterrupt when Brian2 turned a Ctrl-C into a stop, SimulationIncomplete when
    the run simulated less than ``duration`` for another reason."""
    from brian2 import Network, get_device, second

    from protocols.runstate import check_interrupt

    check_interrupt()
    if Network._globally_stopped:
        raise KeyboardInterrupt
    if program is not None:
        fraction = float(getattr(get_device(), "_last_run_completed_fraction", 1.0))
    else:
        fraction = (float(sn.net.t / second) - t_before) / float(duration / second)
    if abs(fraction - 1.0) > 1e-6:
        raise SimulationIncomplete(f"layer {index}: the Brian2 run of the batch from image "
                                   f"{start} simulated {fraction:.1%} of its {duration}")


def load_pretrained(path: str | os.PathLike) -> dict:
    """The arrays of a ``pretrained.npz`` (loaded without pickle)."""
    return load_npz(path)


def pretraining_indices(n_train: int, n: int, seed: int) -> np.ndarray:
    """The ``n`` training images used for pre-training: a seeded sample without replacement.

    [choice] a random sample, not the first ``n``: mnist-5k is sorted by digit, so its first
    1,000 images hold only 0s, 1s and 2s. The generator is spawned from the run's seed apart from
    the one that draws spikes, so both streams stay independent; the order is the presentation order.
    """
    rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(2)[1])
    return rng.choice(n_train, size=n, replace=False)  # in presentation order


def stimulus_table(images: np.ndarray, steps: int, rng: np.random.Generator,
                   max_rate) -> np.ndarray:
    """Poisson spikes of a batch of images laid end to end: ``(B·steps, C·H·W)`` float 0/1."""
    from protocols.encoding import poisson_spikes

    from brian2 import ms

    spikes = poisson_spikes(images, steps * ms, rng, max_rate=max_rate)  # (T, B, ...)
    spikes = np.moveaxis(spikes, 1, 0)  # (B, T, ...)
    return spikes.reshape(images.shape[0] * steps, -1).astype(np.float64)


def pretrain_layer(
    topology: str,
    index: int,
    frozen: dict,
    images: np.ndarray,
    rng: np.random.Generator,
    cfg: PretrainConfig,
    progress: bool = True,
    directory: str | None = None,
) -> dict:
    """STDP pre-training of conv layer ``index`` on ``images`` with the layers below frozen.

    ``frozen``: ``{layer index: (kernels, effective thresholds)}`` of the conv layers below.
    Returns kernels, base threshold, adapted theta, effective thresholds, spikes per image and
    timings.
    """
    from brian2 import second
    from tqdm import tqdm

    from models.devices import StandaloneProgram, is_standalone, use_device
    from models.network import build_network

    from models.batched import layer_names

    layers = parse_topology(topology)
    layer = layers[index]
    name = layer_names(layers)[index]
    p = cfg.pretraining
    lif = cfg.lif
    steps = int(round(float(p.presentation / lif.dt)))
    batch = min(p.batch_images, len(images))
    if len(images) % batch:
        raise ConfigError(f"pretraining.n_images = {len(images)} must be a multiple of "
                          f"pretraining.batch_images = {batch}")
    k = float(np.sqrt(3.0 / layer.fan_in))
    kernels = rng.uniform(-k, k, size=(layer.n_maps, layer.in_shape[0], layer.kernel,
                                       layer.kernel))
    v_th = p.v_th_alpha * k
    theta = np.zeros(layer.n_maps)

    weights = {i: kt[0] for i, kt in frozen.items()}
    thresholds = {i: kt[1] for i, kt in frozen.items()}
    weights[index] = kernels
    thresholds[index] = v_th
    try:  # on a loaded machine building the network takes long enough to be interrupted in
        use_device(cfg.device, directory=directory)
        sn = build_network(topology, weights, thresholds, input_mode="stimulus",
                           stimulus_steps=batch * steps, presentation=p.presentation,
                           plastic_layer=index, up_to=index, lif=lif, pool=cfg.pooling,
                           stdp=cfg.stdp, homeostasis=cfg.homeostasis, monitor=[index])
    except KeyboardInterrupt:
        raise RunInterrupted(
            f"STDP pre-training of layer {name} interrupted while its Brian2 network was being "
            f"built; nothing of it was written: rerun the same command to pre-train") from None
    duration = batch * steps * lif.dt
    t0 = time.perf_counter()
    program = None
    if is_standalone():
        say(f"building the Brian2 program of layer {name} on {cfg.device} once (C++ "
            f"compilation: about 30-90 s; re-run per batch without recompiling)")
        program = StandaloneProgram(sn.net, duration)
        try:
            program.build()
        except KeyboardInterrupt:
            raise RunInterrupted(
                f"building the Brian2 program of layer {name} interrupted; nothing was written: "
                f"rerun the same command to pre-train") from None
    else:
        say(f"preparing layer {name} on the runtime device (Cython code is compiled on the "
            f"first run and cached: up to a minute the first time)")
    build_s = time.perf_counter() - t0
    kernel_group = sn.kernels[index]
    maps = sn.maps[index]
    spikes_per_image = []
    t0 = time.perf_counter()
    say(f"pre-training layer {name} with STDP on {len(images)} images ({batch} per Brian2 run)")
    bar = tqdm(total=len(images), desc=f"STDP layer {index}", unit="img", disable=not progress)
    try:
        for start in range(0, len(images), batch):
            _pretrain_batch(sn, program, kernel_group, maps, images, start, batch, steps, rng,
                            p, kernels, theta, duration, index)
            kernels = np.asarray(kernel_group.k[:]).reshape(kernels.shape).copy()
            theta = np.asarray(maps.theta[:]).copy()
            mon = sn.monitors[index]
            # standalone runs start at t = 0; the runtime clock continues across batches
            offset = 0 if program is not None else start * steps
            step = np.rint(np.asarray(mon.t_[:]) / float(lif.dt / second)).astype(np.int64) - offset
            img = step[(step >= 0) & (step < batch * steps)] // steps
            spikes_per_image.extend(np.bincount(img, minlength=batch).tolist())
            bar.update(batch)
            if not np.all(np.isfinite(kernels)):
                raise FloatingPointError(f"layer {index}: kernels became non-finite; lower stdp.eta")
    except KeyboardInterrupt:
        bar.close()
        raise RunInterrupted(
            f"STDP pre-training of layer {name} interrupted after {len(spikes_per_image)} of "
            f"{len(images)} images; nothing of it was written (pre-training has no checkpoint): "
            f"rerun the same command to pre-train again") from None
    bar.close()
    run_s = time.perf_counter() - t0
    return {"kernels": kernels, "v_th_base": np.full(layer.n_maps, v_th), "theta": theta,
            "thresholds": v_th + theta, "spikes_per_image": np.asarray(spikes_per_image),
            "build_s": build_s, "run_s": run_s}


def _pretrain_batch(sn, program, kernel_group, maps, images, start, batch, steps, rng, p,
                    kernels, theta, duration, index) -> None:
    """One Brian2 run over a batch of images, checked to have simulated its whole duration."""
    from brian2 import Network, second

    table = stimulus_table(images[start:start + batch], steps, rng, p.max_rate)
    Network._globally_stopped = False  # a standalone run does not reset Brian2's stop flag
    t_before = float(sn.net.t / second)
    if program is not None:
        try:
            program.run({sn.stimulus: table, kernel_group.k: kernels.ravel(),
                         maps.theta: theta})
        except RuntimeError:
            if Network._globally_stopped:  # Ctrl-C also stopped the C++ program
                raise KeyboardInterrupt from None
            raise
    else:
        sn.stimulus.values[:] = table
        _runtime_run(sn, duration)
    _check_full_run(sn, program, t_before, duration, index, start)


def _runtime_run(sn, duration) -> None:
    """``net.run`` from a frame without local names that Brian2 could take for model names."""
    sn.groups[0].t_start = sn.net.t
    sn.net.run(duration)


def pretrain(cfg: PretrainConfig, images: np.ndarray, progress: bool = True) -> dict:
    """Greedy layer-wise pre-training of every conv layer of ``cfg.topology``.

    Returns the flat arrays of ``pretrained.npz`` and a summary for ``pretrained.json``.
    """
    import brian2

    from models.batched import layer_names

    layers = parse_topology(cfg.topology)
    names = layer_names(layers)
    rng = np.random.default_rng(cfg.seed)
    brian2.seed(cfg.seed)
    frozen: dict = {}
    arrays: dict = {}
    summary: dict = {"layers": {}}
    for index, layer in enumerate(layers):
        if not isinstance(layer, ConvLayer):
            continue
        result = pretrain_layer(cfg.topology, index, frozen, images, rng, cfg, progress)
        frozen[index] = (result["kernels"], result["thresholds"])
        name = names[index]
        for key in ("kernels", "thresholds", "theta", "v_th_base"):
            arrays[f"{name}_{key}"] = result[key]
        arrays[f"{name}_spikes_per_image"] = result["spikes_per_image"]
        spk = result["spikes_per_image"]
        summary["layers"][name] = {
            "layer_index": index, "build_s": round(result["build_s"], 3),
            "run_s": round(result["run_s"], 3),
            "images_per_s": round(len(images) / result["run_s"], 2),
            "spikes_per_image_first100": float(spk[:100].mean()),
            "spikes_per_image_last100": float(spk[-100:].mean()),
            "theta_mean": float(result["theta"].mean()),
            "thresholds_mean": float(result["thresholds"].mean()),
        }
    return {"arrays": arrays, "summary": summary}


def main(argv=None) -> int:
    """The command line; errors become one line and an exit status (protocols.runstate.cli)."""
    return cli(command, argv)


def command(argv=None) -> int:
    """The command's work; raises the package's errors (main turns them into exit statuses)."""
    from protocols import runstate

    parser = argparse.ArgumentParser(prog="python -m protocols.pretrain",
                                     description=__doc__.split("\n\n")[0],
                                     epilog="Exit status: 0 written, 2 configuration, data or "
                                            "path error, 130 interrupted (nothing written).")
    parser.add_argument("--config", required=True, help="TOML file (see configs/pretrain_*.toml)")
    parser.add_argument("--n-images", type=int, help="override pretraining.n_images")
    parser.add_argument("--seed", type=int, help="override seed")
    parser.add_argument("--device", help="override device (runtime, cpp_standalone)")
    parser.add_argument("--out", help="override out (folder of pretrained.npz/.json)")
    parser.add_argument("--data-dir", help="dataset folder (default: protocols.datasets rules)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars (the phase messages stay)")
    parser.add_argument("--quiet", "-q", action="store_true",
                        help="no progress bars and no phase messages")
    args = parser.parse_args(argv)
    if args.quiet:
        runstate.VERBOSE = False

    cfg = load_config(args.config, PretrainConfig)
    try:
        if args.n_images is not None:
            cfg = dataclasses.replace(cfg, pretraining=dataclasses.replace(
                cfg.pretraining, n_images=args.n_images,
                batch_images=min(cfg.pretraining.batch_images, args.n_images)))
        for key in ("seed", "device", "out"):
            if getattr(args, key) is not None:
                cfg = dataclasses.replace(cfg, **{key: getattr(args, key)})
    except (ValueError, TypeError) as err:
        raise ConfigError(str(err)) from None
    from models.devices import check_device

    check_device(cfg.device)
    from protocols.datasets import load_dataset

    say(f"loading data {cfg.dataset!r}")
    data = load_dataset(cfg.dataset, args.data_dir)
    n = cfg.pretraining.n_images
    if n > len(data.train_images):
        raise ConfigError(f"pretraining.n_images = {n} exceeds the {len(data.train_images)} "
                          f"training images of {cfg.dataset!r}")
    out = check_writable(cfg.out)
    from protocols.runstate import RunLock

    with RunLock(out):
        indices = pretraining_indices(len(data.train_images), n, cfg.seed)
        images = data.train_images[indices]
        t0 = time.perf_counter()
        result = pretrain(cfg, images, progress=not (args.no_progress or args.quiet))
        record = {"config": config_to_dict(cfg), "seed": cfg.seed, "versions": versions(),
                  "command": " ".join(sys.argv),
                  "image_indices": f"{n} training images drawn without replacement "
                                   f"(seed {cfg.seed})",
                  "wall_s": round(time.perf_counter() - t0, 2), **result["summary"]}
        arrays = dict(result["arrays"])
        arrays["image_indices"] = indices
        arrays["seed"] = np.asarray(cfg.seed)
        arrays["config_json"] = np.asarray(json.dumps(record["config"]))
        arrays["versions_json"] = np.asarray(json.dumps(record["versions"]))
        # the record first: pretrained.npz, the file the study looks for, appears last
        atomic_write_bytes(out / "pretrained.json", json.dumps(record, indent=2).encode())
        atomic_savez(out / "pretrained.npz", arrays)
    if runstate.VERBOSE:
        print(json.dumps(result["summary"], indent=2))
    print(f"wrote {out / 'pretrained.npz'} and {out / 'pretrained.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
