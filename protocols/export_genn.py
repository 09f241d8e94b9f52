r"""Export a trained network as a brian2genn project for spiking inference on a GPU (docs/gpu.md).

Run (in the GeNN environment: ``envs/make-genn-env.sh`` creates ``.venv-genn`` with a GeNN)::

    .venv-genn/bin/python -m protocols.export_genn --run runs/x [--weights checkpoint.npz] \
        [--n-images 100] [--dataset mnist] [--duration 50ms] [--seed 0] [--cpu-only] \
        [--build | --no-build | --emulate] [--compare] --out runs/genn_shallow
    .venv-genn/bin/python -m protocols.export_genn --init lee --seed 3 --out runs/genn_init
    python -m protocols.export_genn --read runs/genn_shallow     # after building and running it

``--run`` takes a trainer's run folder: the network is built with the topology, LIF membrane
(tau_m, dt, reset), pooling, input rate and tau_p recorded in its ``config.json``
(:func:`read_run`), from its ``final.npz`` (``--weights`` names another file of the run). A
weights file without that record, or weights that do not fit the recorded topology, are
refused. ``--emulate`` runs the exported network on Brian2's runtime device with GeNN's
schedule (no brian2genn needed); ``--compare`` adds the trainer's forward pass on the same
input spikes to the manifest (``trainer_comparison``).

The weights are a ``.npz`` in the format of :func:`models.batched.params_to_arrays`
(``conv1_kernels`` ``(n_maps, C, k, k)``, ``conv1_thresholds`` ``(n_maps,)``, ``fc1_weights``
``(n_out, n_in)``, ``fc1_thresholds`` ``(n_out,)``, ...), as written by the trainer and by
``protocols.pretrain`` (a pre-training file has no FC layers: use the trainer's files).
``--init lee|glorot`` exports a freshly initialised network instead (models/initialisation.py).

What the project contains (brian2genn 1.7 cannot express linked variables, TimedArray,
network_operation, more than one ``run()``, or more than one clock):

* **input**: one SpikeGeneratorGroup playing pre-drawn Poisson spikes
  (:func:`protocols.encoding.poisson_spikes`, seeded ``numpy.random.Generator``) of all N test
  images one after another. Image n owns the *slot* of steps ``[n·S, (n+1)·S)`` with
  ``S = T + gap``: T steps of input, then ``gap`` silent steps;
* **layers**: the LIF groups of :mod:`models.neurons` (the same equation, threshold and reset
  strings as the Brian2 model and the trainer), all on Brian2's ``defaultclock``;
* **synapses**: every conv kernel entry is *copied* into the per-synapse weight ``w`` of each
  position sharing it (index maps of :func:`models.synapses.conv_connectivity`); pooling and FC
  synapses as in :mod:`models.synapses`; every pathway only writes ``v_post += w``;
* **independence of images**: every membrane is set to 0 at the start of each slot by a
  ``run_regularly('v = 0', dt=S·dt, when='start')`` operation (brian2genn runs these on the host
  between GeNN steps and pushes ``v`` to the device). The gap defaults to the network depth
  (see the lag below), so every spike an image causes falls inside its own slot and the reset
  never cuts a response short: the images are exactly independent, not just approximately
  (a silent gap alone would only shrink the residue by :math:`e^{-gap/\tau_m}`);
* **read-back**: a SpikeMonitor on the output layer; spike counts per image and slot.

**Schedule and lag.** GeNN, in each step, first delivers the spikes emitted in the *previous*
step (``v += w`` via the post-synaptic model), then integrates (``v ← e^{-dt/τm} v``), tests the
threshold and resets; brian2genn ignores Brian2's ``when``/``order``. Compared with the Brian2
model / trainer schedule of docs/method.md §2 (:math:`V[t] = d V[t-1] + \sum w s[t]`, a spike crosses
every layer in the step it is emitted) this gives

.. math::
    V[t] = d\,(V[t-1] + \textstyle\sum w\, s[t-1]),

i.e. one step of lag per synaptic layer *and* an extra factor :math:`d = e^{-dt/\tau_m}` on
every input. The export divides every weight (including the fixed pooling weight) by ``d``
(``--no-decay-compensation`` turns this off), which makes the GeNN network the trainer's network
exactly, with layer l's spikes delayed by l steps: the output classification (spike counts, ties
broken by the activation trace, :func:`protocols.bp.predict`) is the trainer's. The Brian2
equivalent of GeNN's order is ``pathway.when = 'before_groups'``, which the builder sets so that
the same network run on Brian2's runtime device (:func:`emulate`, no GPU needed) reproduces what
GeNN computes; ``tests/test_export_genn.py`` checks that against :func:`models.batched.forward`.

Without GeNN (no ``GENN_PATH``, no ``<env>/genn`` built by ``envs/make-genn-env.sh``, no
``genn-buildmodel.sh`` on the PATH) the code is generated and the command prints how to build
and run it (``--build`` makes that an error); with GeNN it is built, run (``--cpu-only`` for
GeNN's CPU backend) and read back into spike counts and accuracy. ``manifest.json`` in the
project records the layers, unit and synapse counts, the timeline, the labels and the names of
the result files, so ``--read`` can score a project that was built and run by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from models.parameters import InputParameters, LIFParameters, PoolingParameters
from models.topology import SHALLOW, ConvLayer, FCLayer, PoolLayer, parse_topology

#: manifest format version
MANIFEST_VERSION = 1


class ExportError(ValueError):
    """Weights, images or options that do not make an exportable network."""


# ----------------------------------------------------------------------------------------------
# What is exported: parameters and the input timeline


def load_params(topology: str, weights: str | os.PathLike | None = None,
                init: str | None = None, seed: int = 0, record: str | os.PathLike | None = None):
    """``(layers, params)`` from a weights ``.npz`` or a fresh initialisation (``init``).

    ``record``: the run record the topology was read from (named in the error when the weights
    do not fit it).
    """
    from models.batched import params_from_arrays

    layers = parse_topology(topology)
    if (weights is None) == (init is None):
        raise ExportError("give exactly one of a run (--run) or weights file (--weights), or "
                          "--init lee|glorot")
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise ExportError(f"weights file {path} does not exist")
        from protocols.records import NpzError, load_npz

        try:
            arrays = load_npz(path, "export a run's final.npz or checkpoint.npz (--run RUN)")
        except NpzError as err:
            raise ExportError(str(err)) from None
        where = f" recorded in {record}" if record is not None else ""
        try:
            params = params_from_arrays(layers, arrays, dtype=np.float64)
        except KeyError as err:
            raise ExportError(
                f"{path} lacks {err} for the topology {topology!r}{where}; it needs "
                f"conv{{i}}_kernels, conv{{i}}_thresholds, fc{{i}}_weights, fc{{i}}_thresholds "
                f"(a pre-training file has no FC layers: export the trainer's final.npz)") from None
        except ValueError as err:
            msg = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ExportError(f"{path} does not fit the topology {topology!r}{where} ({msg}): "
                              f"export these weights from the run folder that trained them"
                              ) from None
        return layers, params
    from models.initialisation import initialise

    params = initialise(layers, np.random.default_rng(seed), scheme=init, dtype=np.float64)
    return layers, params


@dataclass(frozen=True)
class RunRecord:
    """What the exported network is made of: the run's recorded parameters and its weights.

    Read from the ``config.json`` the trainer (:func:`protocols.train.train`) writes beside its
    ``final.npz``; :func:`default_record` gives the package defaults for ``--init``.
    """

    topology: str
    lif: LIFParameters
    pool: PoolingParameters
    input: InputParameters
    tau_p_s: float  # BP activation trace constant (ties between output counts), seconds
    weights: Path | None = None
    config: Path | None = None  # the config.json read; None for --init

    @property
    def tau_p_steps(self) -> float:
        return float(self.tau_p_s / float(self.lif.dt / _second()))

    def describe(self) -> dict:
        """The manifest's record of where the parameters came from."""
        from protocols.config import config_to_dict

        return {"run_record": None if self.config is None else str(self.config),
                "weights": None if self.weights is None else str(self.weights),
                "topology": self.topology, "lif": config_to_dict(self.lif),
                "pooling": config_to_dict(self.pool), "input": config_to_dict(self.input),
                "tau_p_s": self.tau_p_s}


def _second():
    from brian2 import second

    return second


def default_record(topology: str = SHALLOW) -> RunRecord:
    """The package's default parameters (for a freshly initialised network, ``--init``)."""
    from models.parameters import BPParameters

    return RunRecord(topology, LIFParameters(), PoolingParameters(), InputParameters(),
                     float(BPParameters().tau_p / _second()))


def read_run(run: str | os.PathLike | None = None, weights: str | os.PathLike | None = None,
             topology: str | None = None) -> RunRecord:
    """The record of a trained network: ``run`` (a run folder) and/or ``weights`` (a ``.npz``).

    ``run`` alone exports ``run/final.npz``; ``weights`` names another file (a bare name is
    looked up in ``run`` first, e.g. ``checkpoint.npz``); ``weights`` alone takes its record
    from the ``config.json`` beside it. The record must exist and be a trainer's; the topology,
    LIF membrane (tau_m, dt, reset), pooling, input rate and tau_p are the run's. ``topology``
    (``--topology``) must then equal the recorded one.
    """
    from protocols.config import ConfigError, load_config, parse_quantity

    if run is None and weights is None:
        raise ExportError("give the run folder to export (--run runs/x) or its weights file")
    if run is not None:
        run_dir = Path(run)
        if not run_dir.is_dir():
            raise ExportError(f"run folder {run_dir} does not exist; give the folder the trainer "
                              f"wrote (it holds config.json and final.npz)")
        if weights is None:
            path = run_dir / "final.npz"
            if not path.is_file():
                raise ExportError(f"{run_dir} has no final.npz (is the run finished? see its "
                                  f"status.json); to export its last checkpoint give "
                                  f"--weights checkpoint.npz")
        else:
            path = run_dir / weights if (run_dir / weights).is_file() else Path(weights)
    else:
        path = Path(weights)
        run_dir = path.parent
    if not path.is_file():
        raise ExportError(f"weights file {path} does not exist")
    config = run_dir / "config.json"
    if not config.is_file():
        raise ExportError(f"{path} has no run record ({config} is missing), so its tau_m, dt, "
                          f"reset, pooling and topology are unknown: export it from the run "
                          f"folder the trainer wrote (--run RUN)")
    try:
        recorded = json.loads(config.read_text())
    except (OSError, ValueError) as err:
        raise ExportError(f"{config} is not readable JSON ({err}); restore the run's "
                          f"config.json") from None
    cfg = recorded.get("config") if isinstance(recorded, dict) else None
    if not isinstance(cfg, dict) or not {"topology", "lif", "pooling"} <= set(cfg):
        raise ExportError(f"{config} is not a trainer's run record (no config.topology, .lif, "
                          f".pooling): export a run written by protocols.train or "
                          f"protocols.study")
    section = "bp"
    try:
        tau_p = parse_quantity((cfg.get("bp") or {}).get("tau_p", ""), 1 * _second(), "tau_p")
        read = {}
        for section, schema in (("lif", LIFParameters), ("pooling", PoolingParameters),
                                ("input", InputParameters)):
            read[section] = load_config(cfg.get(section, {}), schema)
    except ConfigError as err:
        raise ExportError(f"{config}: [{section}] {err} (a record this version of the package "
                          f"cannot read: export with the version that trained the run)") from None
    lif, pool, inp = read["lif"], read["pooling"], read["input"]
    recorded_topology = cfg["topology"]
    if topology is not None and topology != recorded_topology:
        raise ExportError(f"--topology {topology} is not the topology {recorded_topology} "
                          f"recorded in {config}: drop --topology")
    return RunRecord(recorded_topology, lif, pool, inp, float(tau_p / _second()), path, config)


@dataclass
class Presentation:
    """N images as Poisson spike trains laid end to end, one slot of ``T + gap`` steps each."""

    spikes: np.ndarray  # bool (T, N, C, H, W)
    labels: np.ndarray  # (N,) int
    image_indices: np.ndarray  # (N,) indices into the dataset split
    gap: int
    dataset: str = ""
    split: str = "test"

    @property
    def steps(self) -> int:
        return int(self.spikes.shape[0])

    @property
    def n_images(self) -> int:
        return int(self.spikes.shape[1])

    @property
    def slot(self) -> int:
        return self.steps + self.gap

    @property
    def total_steps(self) -> int:
        return self.n_images * self.slot

    def timeline(self) -> tuple[np.ndarray, np.ndarray]:
        """SpikeGeneratorGroup ``(indices, steps)``, sorted by step: image n starts at n·slot."""
        T, N = self.spikes.shape[:2]
        flat = self.spikes.reshape(T, N, -1)
        t, n, unit = np.nonzero(flat)
        steps = n.astype(np.int64) * self.slot + t
        order = np.lexsort((unit, steps))
        return unit[order].astype(np.int32), steps[order]


def draw_presentation(dataset: str, n_images: int, duration, seed: int, gap: int,
                      split: str = "test", first: int = 0,
                      max_rate=InputParameters().max_rate, lif=LIFParameters(),
                      channels: int = 1) -> Presentation:
    """Images ``first .. first+n_images`` of a dataset split as seeded Poisson spike trains."""
    from protocols.datasets import load_dataset
    from protocols.encoding import poisson_spikes

    data = load_dataset(dataset)
    images = data.test_images if split == "test" else data.train_images
    labels = data.test_labels if split == "test" else data.train_labels
    if not 0 < n_images <= len(images) - first:
        raise ExportError(f"{dataset} {split} split has {len(images)} images; cannot take "
                          f"{n_images} from index {first}")
    if channels != 1:
        raise ExportError(f"{dataset} images have one channel; the topology asks for {channels}")
    idx = np.arange(first, first + n_images)
    spikes = poisson_spikes(images[idx], duration, np.random.default_rng(seed),
                            max_rate=max_rate, dt=lif.dt)
    return Presentation(spikes[:, :, None], labels[idx].astype(np.int64), idx, int(gap),
                        dataset, split)


# ----------------------------------------------------------------------------------------------
# The brian2genn-compatible network


@dataclass
class ExportedNetwork:
    """Brian2 objects of the exported network and what the manifest says about them."""

    objects: list
    groups: list
    synapses: list
    monitors: dict  # layer index -> SpikeMonitor
    n_units: list  # per layer
    n_synapses: list  # per layer (incoming; 0 for the input)
    weight_scale: float
    layer_names: list = field(default_factory=list)


def build_export(layers, params, presentation: Presentation, *, lif=LIFParameters(),
                 pool=PoolingParameters(), decay_compensation: bool = True,
                 monitor_all: bool = False) -> ExportedNetwork:
    """The network for brian2genn (also runs on Brian2's runtime device, with GeNN's schedule).

    Every group runs on ``defaultclock`` (set ``defaultclock.dt = lif.dt`` before running).
    """
    from brian2 import SpikeGeneratorGroup, SpikeMonitor, Synapses, defaultclock

    from models import neurons
    from models.synapses import conv_connectivity, pool_connectivity

    if presentation.gap < 0:
        raise ExportError("gap must be >= 0 steps")
    dt = lif.dt
    scale = 1.0 / lif.decay if decay_compensation else 1.0
    idx, steps = presentation.timeline()
    n_in = int(np.prod(layers[0].shape))
    inp = SpikeGeneratorGroup(n_in, idx, steps * dt, name="layer0_input")
    groups, syns, objects = [inp], [None], [inp]
    n_units, n_syn, names = [n_in], [0], [inp.name]
    for index, layer in enumerate(layers[1:], start=1):
        name = f"layer{index}_{layer.kind}"
        n = int(np.prod(layer.shape))
        if isinstance(layer, PoolLayer):
            group = neurons.pooling_group(n, lif, pool, name, clock=defaultclock)
            pre, post = pool_connectivity(layer)
            syn = Synapses(groups[-1], group, on_pre=f"v_post += {pool.weight * scale!r}",
                           name=f"{name}_in")
            syn.connect(i=pre, j=post)
        else:
            p = params[index]
            th = np.asarray(p.thresholds, dtype=float)
            if isinstance(layer, ConvLayer):
                vth = np.repeat(np.broadcast_to(th, (layer.n_maps,)),
                                layer.shape[1] * layer.shape[2])
                pre, post, kidx = conv_connectivity(layer)
                w = np.asarray(p.weights, dtype=float).ravel()[kidx]  # kernel copied per synapse
            elif isinstance(layer, FCLayer):
                vth = np.broadcast_to(th, (n,)).copy()
                post, pre = np.meshgrid(np.arange(layer.n, dtype=np.int32),
                                        np.arange(layer.fan_in, dtype=np.int32), indexing="ij")
                pre, post = pre.ravel(), post.ravel()
                w = np.asarray(p.weights, dtype=float).ravel()  # (n_out, n_in) row-major
            else:  # pragma: no cover - parse_topology yields no other kinds
                raise ExportError(f"layer {index}: cannot export a {layer.kind} layer")
            if not np.all(np.isfinite(w)) or not np.all(np.isfinite(vth)):
                raise ExportError(f"layer {index} ({layer.kind}): weights or thresholds are not "
                                  f"finite")
            group = neurons.lif_group(n, lif, vth, name, clock=defaultclock)
            syn = Synapses(groups[-1], group, model="w : 1", on_pre="v_post += w",
                           name=f"{name}_in")
            syn.connect(i=pre, j=post)
            syn.w = w * scale
        # GeNN's order: deliver the previous step's spikes, then integrate, test, reset
        syn.pre.when = "before_groups"
        groups.append(group)
        syns.append(syn)
        objects += [group, syn]
        n_units.append(n)
        n_syn.append(int(len(pre)))
        names.append(name)
    # every membrane starts each image's slot at 0 (brian2genn recognises run_regularly
    # operations by "_run_regularly" in their name and drops others silently)
    for group in groups[1:]:
        objects.append(group.run_regularly("v = 0", dt=presentation.slot * dt, when="start",
                                           name=f"{group.name}_run_regularly"))
    monitored = range(len(layers)) if monitor_all else [len(layers) - 1]
    monitors = {}
    for index in monitored:
        mon = SpikeMonitor(groups[index], name=f"{groups[index].name}_spikes")
        monitors[index] = mon
        objects.append(mon)
    return ExportedNetwork(objects, groups, syns, monitors, n_units, n_syn, scale, names)


# ----------------------------------------------------------------------------------------------
# Reading spikes back


def slot_counts(i: np.ndarray, step: np.ndarray, n_units: int, presentation_steps: int,
                gap: int, n_images: int, lag: int, tau_p_steps: float):
    """Per-image spike counts ``(N, n_units)`` and activation traces at the (lagged) last step.

    ``step``: spike times in steps. Spikes of slot n belong to image n; the trace is
    :math:`\\sum_k e^{-(T-1-(t_k - lag))/\\tau_p}` as the trainer computes it at step T-1.
    """
    slot = presentation_steps + gap
    i = np.asarray(i, dtype=np.int64)
    step = np.asarray(step, dtype=np.int64)
    image, within = np.divmod(step, slot)
    keep = image < n_images
    image, within, i = image[keep], within[keep], i[keep]
    counts = np.zeros((n_images, n_units), dtype=np.int64)
    np.add.at(counts, (image, i), 1)
    age = (presentation_steps - 1) - (within - lag)
    trace = np.zeros((n_images, n_units))
    np.add.at(trace, (image, i), np.exp(-age / tau_p_steps))
    return counts, trace


def score(counts: np.ndarray, trace: np.ndarray, labels: np.ndarray) -> dict:
    """Predictions (:func:`protocols.bp.predict`) and accuracy of per-image output counts."""
    from protocols.bp import predict

    pred = np.asarray(predict(counts, trace))
    labels = np.asarray(labels)
    return {"predictions": pred.tolist(), "accuracy": float(np.mean(pred == labels)),
            "silent_images": int(np.sum(counts.sum(axis=1) == 0)),
            "output_spikes_per_image": float(counts.sum() / max(len(labels), 1))}


def _tau_p_steps(lif: LIFParameters) -> float:
    from models.parameters import BPParameters

    return float(BPParameters().tau_p / lif.dt)


def read_results(project: str | os.PathLike) -> dict:
    """Score a project that was built and run (by this command or by hand): counts, accuracy."""
    project = Path(project)
    manifest_path = project / "manifest.json"
    if not manifest_path.is_file():
        raise ExportError(f"{manifest_path} not found; is {project} a project written by "
                          f"protocols.export_genn?")
    manifest = json.loads(manifest_path.read_text())
    out = manifest["output"]
    files = {k: project / "results" / v for k, v in out["result_files"].items()}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise ExportError(f"results missing ({', '.join(missing)}): build and run the project "
                          f"first (see {project / 'BUILD.txt'})")
    i = np.fromfile(files["i"], dtype=np.int32)
    t = np.fromfile(files["t"], dtype=np.float64)
    step = np.rint(t / manifest["dt_s"]).astype(np.int64)
    tl = manifest["timeline"]
    counts, trace = slot_counts(i, step, out["n_units"], tl["presentation_steps"],
                                tl["gap_steps"], tl["n_images"], out["lag_steps"],
                                manifest["tau_p_steps"])
    result = score(counts, trace, np.asarray(manifest["labels"]))
    result["counts"] = counts.tolist()
    return result


# ----------------------------------------------------------------------------------------------
# Generating, building, running


def genn_path() -> str | None:
    """GeNN's root folder: ``$GENN_PATH``, else the GeNN built into this environment
    (``<env>/genn``, by ``envs/make-genn-env.sh``), else the folder above ``genn-buildmodel.sh``
    on PATH; None without one. A ``GENN_PATH`` that is not a GeNN root is an error."""
    if os.environ.get("GENN_PATH"):
        root = os.environ["GENN_PATH"]
        if not os.path.isfile(os.path.join(root, "bin", "genn-buildmodel.sh")):
            raise ExportError(f"GENN_PATH={root} has no bin/genn-buildmodel.sh: point it at a "
                              f"GeNN 4.x root folder (or unset it to use the environment's GeNN)")
        return root
    bundled = os.path.join(sys.prefix, "genn")
    if os.path.isfile(os.path.join(bundled, "bin", "genn-buildmodel.sh")):
        return bundled
    found = shutil.which("genn-buildmodel.sh")
    return os.path.dirname(os.path.dirname(found)) if found else None


#: how to get a GeNN, for errors and skip reasons
GET_GENN = ("build the environment with one: `GENN_TARBALL=/path/to/genn-4.9.0.tar.gz bash "
            "envs/make-genn-env.sh` or `GENN_PATH=<GeNN 4.x checkout> bash envs/make-genn-env.sh` "
            "(docs/gpu.md)")


def build_instructions(project: Path, use_gpu: bool, duration_s: float) -> str:
    cpu = "" if use_gpu else " -c"
    cuda = ("export CUDA_PATH=/usr/local/cuda          # CUDA toolkit used by GeNN's CUDA backend\n"
            if use_gpu else "")
    return (
        f"# GeNN 4.x (>= 4.2.1; brian2genn 1.7 does not support GeNN 5) is needed to build:\n"
        f"#   {GET_GENN},\n"
        f"#   then export GENN_PATH=.venv-genn/genn (or your GeNN 4.x root)\n"
        f"{cuda}"
        f"cd {project}\n"
        f"$GENN_PATH/bin/genn-buildmodel.sh{cpu} -i {project}:{project}/brianlib/randomkit "
        f"magicnetwork_model.cpp\n"
        f"make\n"
        f"./main test {duration_s!r}\n"
        f"cd - && python -m protocols.export_genn --read {project}\n"
        f"# or, with a GeNN in the environment, re-run the export: it builds, runs and reads back\n"
        f"# (generated for {'the GPU (CUDA backend)' if use_gpu else 'the CPU backend'}; "
        f"{'--cpu-only' if use_gpu else '--use-gpu'} generates for the other)\n"
    )


def trainer_outputs(layers, params, presentation: Presentation, record: RunRecord,
                    batch: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Output spike counts and activation traces ``(N, n_out)`` of the trainer's forward pass
    (:func:`models.batched.forward`, float64) on the presentation's own input spikes, with the
    run's membrane, pooling and tau_p: what an export must reproduce."""
    from models.batched import forward

    counts, traces = [], []
    n_out = int(np.prod(layers[-1].shape))
    for b0 in range(0, presentation.n_images, batch):
        x = presentation.spikes[:, b0:b0 + batch]
        out = forward(layers, params, x, record.lif, record.pool, dtype=np.float64,
                      tau_p=record.tau_p_steps, keep_spikes=False, record_trace_m=False,
                      backend="xp")
        counts.append(np.asarray(out.count[-1]).reshape(x.shape[1], n_out))
        traces.append(np.asarray(out.trace_p[-1]).reshape(x.shape[1], n_out))
    return np.concatenate(counts).astype(np.int64), np.concatenate(traces)


def compare_with_trainer(counts, trace, layers, params, presentation, record) -> dict:
    """How an export's output counts and predictions agree with :func:`trainer_outputs`."""
    from protocols.bp import predict

    ref_counts, ref_trace = trainer_outputs(layers, params, presentation, record)
    mine = np.asarray(predict(np.asarray(counts), np.asarray(trace)))
    ref = np.asarray(predict(ref_counts, ref_trace))
    labels = np.asarray(presentation.labels)
    return {"n_images": int(len(labels)),
            "same_predictions": int(np.sum(mine == ref)),
            "same_counts_images": int(np.sum(np.all(np.asarray(counts) == ref_counts, axis=1))),
            "counts_equal": bool(np.array_equal(np.asarray(counts), ref_counts)),
            "export_accuracy": float(np.mean(mine == labels)),
            "trainer_accuracy": float(np.mean(ref == labels)),
            "export_out_spikes": float(np.asarray(counts).sum() / max(len(labels), 1)),
            "trainer_out_spikes": float(ref_counts.sum() / max(len(labels), 1)),
            "trainer_predictions": ref.tolist()}


def _manifest(record: RunRecord, parts: ExportedNetwork, layers, presentation: Presentation,
              *, use_gpu, decay_compensation, source, seed, monitor) -> dict:
    import brian2

    last = len(layers) - 1
    lif = record.lif
    manifest = {
        "format": MANIFEST_VERSION,
        "topology": record.topology,
        "source": source,
        "seed": seed,
        "dt_s": float(lif.dt / brian2.second),
        "tau_m_s": float(lif.tau_m / brian2.second),
        "reset": lif.reset,
        "pool_weight": record.pool.weight,
        "pool_v_th": record.pool.v_th,
        "tau_p_steps": record.tau_p_steps,
        "record": record.describe(),
        "weight_scale": parts.weight_scale,
        "decay_compensation": decay_compensation,
        "use_gpu": use_gpu,
        "layers": [{"name": nm, "kind": layer.kind, "shape": list(layer.shape), "units": nu,
                    "incoming_synapses": ns}
                   for nm, layer, nu, ns in zip(parts.layer_names, layers,
                                                 parts.n_units, parts.n_synapses)],
        "timeline": {"n_images": presentation.n_images,
                     "presentation_steps": presentation.steps, "gap_steps": presentation.gap,
                     "slot_steps": presentation.slot, "total_steps": presentation.total_steps,
                     "input_spikes": int(presentation.spikes.sum())},
        "dataset": presentation.dataset, "split": presentation.split,
        "image_indices": presentation.image_indices.tolist(),
        "labels": presentation.labels.tolist(),
        "output": {"layer": last, "n_units": parts.n_units[last], "lag_steps": last,
                   "monitor": monitor.name},
        "versions": {"python": sys.version.split()[0], "brian2": brian2.__version__,
                     "numpy": np.__version__},
    }
    return manifest


def export(record: RunRecord, params, layers, presentation: Presentation,
           out: str | os.PathLike, *, use_gpu: bool = True, build: bool | None = None,
           decay_compensation: bool = True, source: str = "", seed: int = 0,
           compare: bool = False) -> dict:
    """Write the brian2genn project into ``out``; build and run it when GeNN is found.

    ``record``: the run's parameters (:func:`read_run`, or :func:`default_record` for a fresh
    initialisation). ``build``: None = when GeNN is found (and, for the CUDA backend, a
    GPU); True = required (an error without them); False = never. ``compare``: after a run, add ``trainer_comparison``
    (:func:`compare_with_trainer`). Returns the manifest (plus ``result`` when it ran).
    """
    import brian2
    import brian2genn  # noqa: F401  (registers the 'genn' device)
    from brian2 import Network, defaultclock, device, prefs, set_device

    lif = record.lif
    out = Path(out).resolve()
    if out.exists() and any(out.iterdir()):
        if not (out / "manifest.json").is_file():
            raise ExportError(f"{out} exists and is not an export project; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    root = genn_path() if build is not False else None
    gpu = None
    if use_gpu and build is not False:
        from protocols.export_cuda import gpu_available

        gpu = gpu_available()
    if build is None:  # build when it can also run: GeNN found, and a GPU for the CUDA backend
        build = root is not None and (not use_gpu or gpu)
    if build and use_gpu and not gpu:
        raise ExportError("running GeNN's CUDA backend needs a GPU and nvidia-smi lists none: "
                          "build for GeNN's CPU backend with --cpu-only, or generate only with "
                          "--no-build")
    if build and root is None:
        raise ExportError(f"building needs GeNN 4.x and none was found (no GENN_PATH, no "
                          f"{os.path.join(sys.prefix, 'genn')}, no genn-buildmodel.sh on PATH): "
                          f"{GET_GENN}")
    if build:
        prefs.devices.genn.path = root
        if use_gpu and not (os.environ.get("CUDA_PATH") or
                            prefs.devices.genn.cuda_backend.cuda_path):
            if os.path.isdir("/usr/local/cuda"):
                prefs.devices.genn.cuda_backend.cuda_path = "/usr/local/cuda"
            else:
                raise ExportError("GeNN's CUDA backend needs the CUDA toolkit: set CUDA_PATH "
                                  "(or build for the CPU backend with --cpu-only)")
    prefs.core.default_float_dtype = np.float64
    set_device("genn", directory=str(out), compile=build, run=build, use_GPU=use_gpu,
               with_output=True)
    defaultclock.dt = lif.dt
    parts = build_export(layers, params, presentation, lif=lif, pool=record.pool,
                         decay_compensation=decay_compensation)
    net = Network(*parts.objects)
    duration = presentation.total_steps * lif.dt
    last = len(layers) - 1
    mon = parts.monitors[last]
    manifest = _manifest(record, parts, layers, presentation, use_gpu=use_gpu,
                         decay_compensation=decay_compensation, source=source, seed=seed,
                         monitor=mon)
    manifest["versions"]["brian2genn"] = brian2genn.__version__
    manifest["built"] = bool(build)
    if build:
        manifest["genn_path"] = root
        manifest["genn_version"] = Path(root, "version.txt").read_text().strip() \
            if Path(root, "version.txt").is_file() else None
    t0 = time.perf_counter()
    try:
        net.run(duration)  # generates (and, with GeNN, builds and runs) the project
    except (OSError, RuntimeError, subprocess.CalledProcessError) as err:
        if not build:
            raise
        text = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ExportError(f"building or running {out} with GeNN at {root} failed ({text}); its "
                          f"output is above: check that GeNN 4.x is built there ({GET_GENN})") \
            from None
    elapsed = time.perf_counter() - t0
    if build:  # brian2genn reads the simulation's own time from results/last_run_info.txt
        manifest["genn_simulation_s"] = getattr(device, "_last_run_time", None)
    manifest["output"]["result_files"] = {
        "i": os.path.basename(device.get_array_filename(mon.variables["i"])),
        "t": os.path.basename(device.get_array_filename(mon.variables["t"]))}
    manifest["generate_or_build_run_s"] = round(elapsed, 3)
    if build:
        steps = np.rint(np.asarray(mon.t[:] / lif.dt)).astype(np.int64)
        counts, trace = slot_counts(np.asarray(mon.i[:]), steps, parts.n_units[last],
                                    presentation.steps, presentation.gap,
                                    presentation.n_images, last, record.tau_p_steps)
        manifest["result"] = {**score(counts, trace, presentation.labels),
                              "counts": counts.tolist()}
        if compare:
            manifest["trainer_comparison"] = compare_with_trainer(counts, trace, layers, params,
                                                                  presentation, record)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    (out / "BUILD.txt").write_text(build_instructions(out, use_gpu,
                                                      float(duration / brian2.second)))
    return manifest


def emulate(layers, params, presentation: Presentation, *, lif=LIFParameters(),
            pool=PoolingParameters(), decay_compensation: bool = True, monitor_all=False,
            codegen_target: str = "numpy"):
    """Run the exported network on Brian2's runtime device (GeNN's schedule), no GPU needed.

    Returns ``(ExportedNetwork, spikes)`` with ``spikes[l]`` = ``(i, step)`` of monitored layer l.
    """
    from brian2 import Network, defaultclock, prefs, set_device

    set_device("runtime")
    prefs.codegen.target = codegen_target
    defaultclock.dt = lif.dt
    parts = build_export(layers, params, presentation, lif=lif, pool=pool,
                         decay_compensation=decay_compensation, monitor_all=monitor_all)
    Network(*parts.objects).run(presentation.total_steps * lif.dt)
    spikes = {l: (np.asarray(m.i[:]), np.rint(np.asarray(m.t[:] / lif.dt)).astype(np.int64))
              for l, m in parts.monitors.items()}
    return parts, spikes


def emulate_export(record: RunRecord, params, layers, presentation: Presentation,
                   out: str | os.PathLike, *, decay_compensation: bool = True, source: str = "",
                   seed: int = 0, compare: bool = False) -> dict:
    """The exported network run by :func:`emulate` (GeNN's schedule on Brian2's runtime device;
    no brian2genn or GeNN needed); writes and returns a manifest with its ``result``."""
    out = Path(out).resolve()
    if out.exists() and any(out.iterdir()):
        if not (out / "manifest.json").is_file():
            raise ExportError(f"{out} exists and is not an export project; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    parts, spikes = emulate(layers, params, presentation, lif=record.lif, pool=record.pool,
                            decay_compensation=decay_compensation)
    last = len(layers) - 1
    manifest = _manifest(record, parts, layers, presentation, use_gpu=False,
                         decay_compensation=decay_compensation, source=source, seed=seed,
                         monitor=parts.monitors[last])
    manifest["built"] = False
    manifest["emulated"] = True
    counts, trace = slot_counts(*spikes[last], parts.n_units[last], presentation.steps,
                                presentation.gap, presentation.n_images, last,
                                record.tau_p_steps)
    manifest["result"] = {**score(counts, trace, presentation.labels), "counts": counts.tolist()}
    if compare:
        manifest["trainer_comparison"] = compare_with_trainer(counts, trace, layers, params,
                                                              presentation, record)
    manifest["generate_or_build_run_s"] = round(time.perf_counter() - t0, 3)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


# ----------------------------------------------------------------------------------------------
# Command line


def _duration(text: str):
    from protocols.config import parse_quantity
    from brian2 import ms

    return parse_quantity(text, 1 * ms, "--duration")


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by the GeNN and brian2cuda exports."""
    parser.add_argument("--run", metavar="RUN",
                        help="the trained run's folder (config.json + final.npz): the network "
                             "is built with its recorded topology, tau_m, dt, reset, pooling")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--weights",
                     help="weights .npz to export instead of RUN/final.npz (e.g. "
                          "checkpoint.npz); without --run, its folder must hold the run's "
                          "config.json")
    src.add_argument("--init", choices=("lee", "glorot"),
                     help="export a freshly initialised network with the package's default "
                          "parameters (seeded by --seed)")
    parser.add_argument("--topology", default=None,
                        help=f"network; with --run/--weights it must be the recorded one "
                             f"(default: the run's; {SHALLOW} with --init)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the Poisson input (and of --init); default 0")
    parser.add_argument("--dataset", default="mnist-5k", help="default mnist-5k (offline)")
    parser.add_argument("--split", default="test", choices=("test", "train"))
    parser.add_argument("--first-image", type=int, default=0)
    parser.add_argument("--n-images", type=int, default=10)
    parser.add_argument("--duration", default="50 ms",
                        help="presentation per image (default 50 ms, the paper's later epochs)")
    parser.add_argument("--compare", action="store_true",
                        help="after a run, compare the output counts and predictions with the "
                             "trainer's forward pass on the same input spikes")
    parser.add_argument("--out", required=False, help="project directory to write")


def record_and_params(args) -> tuple[RunRecord, list, list, str]:
    """``(record, layers, params, source)`` of the command line's network (errors: ExportError)."""
    if args.init is not None:
        if args.run is not None:
            raise ExportError("--init exports a fresh network: drop --run (or drop --init)")
        record = default_record(args.topology or SHALLOW)
        layers, params = load_params(record.topology, init=args.init, seed=args.seed)
        return record, layers, params, f"init={args.init} seed={args.seed}"
    if args.run is None and args.weights is None:
        raise ExportError("give the trained run's folder (--run runs/x), or --init lee|glorot")
    record = read_run(args.run, args.weights, args.topology)
    layers, params = load_params(record.topology, record.weights, record=record.config)
    return record, layers, params, str(record.weights)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m protocols.export_genn",
                                     description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--gap", type=int, default=None,
                        help="silent steps after each image (default: network depth)")
    gpu = parser.add_mutually_exclusive_group()
    gpu.add_argument("--use-gpu", dest="use_gpu", action="store_true", default=True,
                     help="generate for GeNN's CUDA backend (default)")
    gpu.add_argument("--cpu-only", dest="use_gpu", action="store_false",
                     help="generate for GeNN's single-threaded CPU backend")
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--build", action="store_true",
                     help="build and run with GeNN, an error without one (default: when GeNN "
                          "is found and, without --cpu-only, a GPU)")
    how.add_argument("--no-build", action="store_true",
                     help="only generate, even when GeNN is found")
    how.add_argument("--emulate", action="store_true",
                     help="run the exported network on Brian2's runtime device with GeNN's "
                          "schedule instead (no brian2genn or GeNN needed)")
    parser.add_argument("--no-decay-compensation", action="store_true",
                        help="keep the weights as trained (GeNN then scales inputs by e^-dt/tau_m)")
    parser.add_argument("--read", metavar="PROJECT",
                        help="score a project that was built and run; nothing is generated")
    args = parser.parse_args(argv)

    try:
        if args.read:
            result = read_results(args.read)
            print(json.dumps({k: v for k, v in result.items() if k != "counts"}, indent=1))
            return 0
        if not args.out:
            parser.error("--out is required (the project directory to write)")
        record, layers, params, source = record_and_params(args)
        if not args.emulate:
            try:
                import brian2genn  # noqa: F401
            except ImportError:
                raise ExportError("brian2genn is not importable in this environment: run "
                                  "`bash envs/make-genn-env.sh` and use .venv-genn/bin/python "
                                  "(or --emulate)") from None
        gap = len(layers) - 1 if args.gap is None else args.gap
        pres = draw_presentation(args.dataset, args.n_images, _duration(args.duration),
                                 args.seed, gap, split=args.split, first=args.first_image,
                                 max_rate=record.input.max_rate, lif=record.lif,
                                 channels=layers[0].shape[0])
        t0 = time.perf_counter()
        if args.emulate:
            manifest = emulate_export(record, params, layers, pres, args.out,
                                      decay_compensation=not args.no_decay_compensation,
                                      source=source, seed=args.seed, compare=args.compare)
        else:
            build = False if args.no_build else (True if args.build else None)
            manifest = export(record, params, layers, pres, args.out, use_gpu=args.use_gpu,
                              build=build, decay_compensation=not args.no_decay_compensation,
                              source=source, seed=args.seed, compare=args.compare)
    except ExportError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    wall = time.perf_counter() - t0
    out = Path(args.out).resolve()
    summary = {"project": str(out), "layers": manifest["layers"],
               "timeline": manifest["timeline"], "built": manifest["built"],
               "export_wall_s": round(wall, 2)}
    if "result" in manifest:
        summary["accuracy"] = manifest["result"]["accuracy"]
        summary["output_spikes_per_image"] = manifest["result"]["output_spikes_per_image"]
    if "trainer_comparison" in manifest:
        summary["trainer_comparison"] = {k: v for k, v in manifest["trainer_comparison"].items()
                                         if k != "trainer_predictions"}
    print(json.dumps(summary, indent=1))
    if not manifest["built"] and not manifest.get("emulated"):
        if args.no_build:
            why = "--no-build"
        elif genn_path() is None:
            why = ("GeNN not found: no GENN_PATH, no GeNN in this environment, no "
                   "genn-buildmodel.sh on PATH")
        else:
            why = "no GPU here for GeNN's CUDA backend; --cpu-only builds for its CPU backend"
        print(f"\nCode generated only ({why}). To build and run it:\n")
        print((out / "BUILD.txt").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
