"""Spike-based BP fine-tuning loop (docs/method.md §4.6): mini-batch SGD on the batched spiking network.

Schedule [paper]: mini-batches of 100 images; the first epoch presents every training image
except those used for pre-training for 100 ms each, later epochs present all training images for
50 ms; constant learning rate. An epoch is a random permutation of its images cut into whole
mini-batches (a remainder smaller than a batch is left out of that epoch).

Run directory (everything needed to trust and redo the run)::

    config.json      full configuration, seed, versions, command, data set, excluded images
    metrics.csv      iteration, epoch, images_seen, wall_time_s, train_error, test_error,
                     train_nll, test_nll, then per-layer diagnostics (protocols.diagnostics:
                     relative step, spikes per image, silent and saturated fractions, weight
                     norm, per-map kernel mean); one row per evaluation; written atomically
    checkpoint.npz   weights, thresholds, iteration, metrics so far, RNG derivation (no pickle)
    status.json      running (process id, host) / finished / interrupted / diverged / failed,
                     with a message (protocols/runstate.py)
    run.lock         the process working in the folder, while it runs; a second one refuses
    final.npz        the trained weights and thresholds (same keys as pretrained.npz)

Randomness is derived, never carried: the initial weights from ``(seed, 0)``, the permutation of
epoch e from ``(seed, 1, e)``, the Poisson input of iteration i from ``(seed, 2, i)`` and the
evaluation input of evaluation batch j from ``(seed, 3, j)`` (the same for every evaluation, so
that curves compare the network, not the noise). A run killed at any point and started again
with the same command resumes from its last checkpoint and ends with the same metrics
(wall_time_s aside) as an uninterrupted run.

Errors are measured on the spike counts of the output layer (the predicted class is the unit
that fired most, a tie broken by the activation a^L; a silent output layer is an error), see
protocols.bp.predict; the NLL uses p = a^L / Σ a^L as in training.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import numpy as np

from models.batched import to_numpy, forward, params_from_arrays, params_to_arrays
from models.parameters import BPParameters, InputParameters, LIFParameters, PoolingParameters
from models.topology import SHALLOW, ConvLayer, parse_topology
from protocols.bp import (NLL_FLOOR, adapt_thresholds, backward, balanced_step_factors,
                          layer_learning_rates, map_rates, output_probabilities, predict,
                          sgd_step, tau_steps)
from protocols.datasets import fixed_subset
from protocols.diagnostics import (ActivityTally, StepTally, diagnostic_columns, layer_labels,
                                   weight_columns)
from protocols.encoding import counter_key, n_steps, poisson_spikes, poisson_spikes_counter
from protocols.records import (NpzError, atomic_savez, atomic_write_bytes, atomic_write_json,
                               load_npz, versions)
from protocols.runstate import (DivergenceGuard, GuardSettings, RunError, RunInterrupted,
                                check_interrupt, read_json, read_status, run_guard, say,
                                write_status)

METRIC_COLUMNS = ("iteration", "epoch", "images_seen", "wall_time_s", "train_error",
                  "test_error", "train_nll", "test_nll")
CHECKPOINT_FORMAT = 1


class TrainingDiverged(RuntimeError):
    """Weights or outputs became NaN or infinite; the run directory says when and where."""


@dataclass(frozen=True)
class TrainingSettings:
    """The loop's bookkeeping: length, logging, checkpoints, evaluation, precision."""

    #: total SGD iterations (mini-batches) of the run
    iterations: int = 3000
    #: evaluate (and log a metrics row) every this many iterations, and at 0 and the end
    log_every: int = 100
    #: write a checkpoint every this many iterations (0: at every evaluation)
    checkpoint_every: int = 0
    #: fixed training sample for train_error / train_nll (first n of a seeded permutation)
    train_eval_images: int = 1000
    #: test images for test_error / test_nll (0 = all); which ones: ``test_subset``
    test_eval_images: int = 0
    #: [choice] 'sample': a fixed seeded sample (protocols.datasets.fixed_subset), the same
    #: images for every seed and arm, because a split's first n are not a fair sample (mnist-5k
    #: is sorted by digit; MNIST's first 2,000 test images are harder than the rest). 'first': the
    #: first n, as every run recorded before this option. Either way 0 or n >= the split = all
    test_subset: Literal["sample", "first"] = "sample"
    #: [choice] 50 ms, the later epochs' presentation [paper]: the length most of training
    #: uses, so that every point of an error curve is measured the same way
    eval_duration: str = "50 ms"
    #: 'float32' (fast) or 'float64'
    dtype: Literal["float32", "float64"] = "float32"
    #: where the arrays live: 'numpy' (CPU) or 'cupy' (GPU; needs CuPy and a CUDA device)
    array_module: Literal["numpy", "cupy"] = "numpy"
    #: forward pass: 'auto' (the compiled event-driven loop on CPU, array ops on CuPy), 'numba'
    #: or 'xp' (array ops: one matrix product per layer over batch x T, then the recurrence)
    backend: Literal["auto", "numba", "xp"] = "auto"
    #: [choice] BLAS threads while training on the CPU (0: the BLAS library's own setting). 1:
    #: the backward pass's matrix products are small, and idle OpenBLAS threads spin between
    #: calls on the cores the compiled forward pass runs on (shallow net, 2 cores, 2 numba
    #: threads: 1,253 images/s with 1 BLAS thread, 710 with 2; benchmarks/bench_trainer.py)
    blas_threads: int = 1
    #: [choice] 'pcg64': the input spikes drawn on the host with NumPy's PCG64 from
    #: ``rng_for(seed, ...)`` and copied to the device (every run so far; exact CPU/GPU
    #: cross-checks). 'splitmix64': a counter-based draw computed where the arrays live
    #: (protocols.encoding.poisson_spikes_counter): on a GPU no host work or copy per batch,
    #: the same bits on NumPy and CuPy, ~10x slower than PCG64 on a CPU. A different stream, so
    #: a run keeps the generator it started with
    input_rng: Literal["pcg64", "splitmix64"] = "pcg64"

    def __post_init__(self):
        if self.iterations < 0 or self.log_every < 1 or self.checkpoint_every < 0:
            raise ValueError("iterations must be >= 0, log_every >= 1, checkpoint_every >= 0")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")
        if self.blas_threads < 0:
            raise ValueError(f"blas_threads must be >= 0 (0: the BLAS library's own setting), "
                             f"got {self.blas_threads}")
        if self.train_eval_images < 1 or self.test_eval_images < 0:
            raise ValueError("train_eval_images must be >= 1 and test_eval_images >= 0")
        if self.array_module not in ("numpy", "cupy"):
            raise ValueError(f"array_module must be 'numpy' or 'cupy', got {self.array_module!r}")
        if self.backend not in ("auto", "numba", "xp"):
            raise ValueError(f"backend must be 'auto', 'numba' or 'xp', got {self.backend!r}")
        if self.test_subset not in ("sample", "first"):
            raise ValueError(f"test_subset must be 'sample' or 'first', got {self.test_subset!r}")
        if self.input_rng not in ("pcg64", "splitmix64"):
            raise ValueError(f"input_rng must be 'pcg64' or 'splitmix64', got {self.input_rng!r}")
        if self.array_module == "cupy" and self.backend == "numba":
            raise ValueError("backend 'numba' runs on the CPU; use 'auto' or 'xp' with cupy")


def gpu_versions(xp) -> dict:
    """CuPy's version and the GPU's name when the arrays live on a GPU; {} on NumPy."""
    if xp is np:
        return {}
    props = xp.cuda.runtime.getDeviceProperties(xp.cuda.Device().id)
    return {"cupy": xp.__version__, "cuda_runtime": xp.cuda.runtime.runtimeGetVersion(),
            "gpu": props["name"].decode()}


def array_module(name: str):
    """The array module of ``TrainingSettings.array_module``, with a clear error when CuPy or
    its GPU is missing."""
    if name == "numpy":
        return np
    try:
        import cupy
    except ImportError as err:
        raise ValueError("training.array_module = 'cupy' needs CuPy: pip install cupy-cuda12x "
                         "(or use 'numpy')") from err
    try:
        n_gpus = cupy.cuda.runtime.getDeviceCount()
    except Exception as err:  # CUDARuntimeError without a driver
        raise ValueError(f"training.array_module = 'cupy' but CUDA is unusable: {err}") from err
    if n_gpus < 1:
        raise ValueError("training.array_module = 'cupy' but no CUDA GPU is visible")
    return cupy


@dataclass(frozen=True)
class TrainConfig:
    """What a fine-tuning run depends on, apart from the initial parameters and the data."""

    topology: str = SHALLOW
    seed: int = 0
    training: TrainingSettings = field(default_factory=TrainingSettings)
    bp: BPParameters = field(default_factory=BPParameters)
    lif: LIFParameters = field(default_factory=LIFParameters)
    pooling: PoolingParameters = field(default_factory=PoolingParameters)
    input: InputParameters = field(default_factory=InputParameters)
    #: when a run counts as diverged besides NaN/inf (may change when a run is resumed)
    guard: GuardSettings = field(default_factory=GuardSettings)
    #: the conv layers start from STDP pre-training (arm "pretrained"): their η takes
    #: ``bp.pretrained_conv_eta_scale`` as well (protocols/bp.py, layer_learning_rates)
    pretrained_conv: bool = False


# ----------------------------------------------------------------------------------------------
# Files


def metrics_frame(rows: Sequence[dict]):
    """The metrics table: METRIC_COLUMNS, then the diagnostic columns any row has (rows of runs
    made before the diagnostics existed leave them empty)."""
    import pandas as pd

    seen: dict = {}
    for row in rows:
        seen.update(dict.fromkeys(row))
    return pd.DataFrame(list(rows), columns=list(METRIC_COLUMNS) + diagnostic_columns(seen))


def write_metrics(run_dir: Path, rows: Sequence[dict]) -> None:
    buf = io.StringIO()
    metrics_frame(rows).to_csv(buf, index=False, float_format="%.10g")
    atomic_write_bytes(run_dir / "metrics.csv", buf.getvalue().encode())


# ----------------------------------------------------------------------------------------------
# Schedule and randomness


def rng_for(seed: int, *key: int) -> np.random.Generator:
    """The generator of one purpose: ``(seed, 0)`` init, ``(seed, 1, epoch)`` permutation,
    ``(seed, 2, iteration)`` Poisson input, ``(seed, 3, batch)`` evaluation input."""
    return np.random.default_rng(np.random.SeedSequence([seed, *key]))


def draw_input(cfg: "TrainConfig", images, T: int, key: tuple[int, ...], xp=np):
    """The input spikes ``(T, batch, ...)`` of a batch of uint8 ``images``, as an ``xp`` array,
    drawn by ``cfg.training.input_rng`` from ``(cfg.seed, *key)``: ``(2, iteration)`` for
    training, ``(3, batch index)`` for evaluation."""
    duration = T * cfg.lif.dt
    if cfg.training.input_rng == "splitmix64":
        return poisson_spikes_counter(xp.asarray(images), duration, counter_key(cfg.seed, *key),
                                      cfg.input.max_rate, cfg.lif.dt, xp=xp)
    return xp.asarray(poisson_spikes(images, duration, rng_for(cfg.seed, *key),
                                     cfg.input.max_rate, cfg.lif.dt))


@dataclass(frozen=True)
class Schedule:
    """Which images and presentation length each iteration uses."""

    first_epoch_images: np.ndarray  # indices of epoch 1 (training set minus excluded)
    n_train: int
    batch: int
    seed: int

    @property
    def first_epoch_iterations(self) -> int:
        return len(self.first_epoch_images) // self.batch

    @property
    def later_epoch_iterations(self) -> int:
        return self.n_train // self.batch

    def locate(self, iteration: int) -> tuple[int, int]:
        """(epoch, position in epoch) of 0-based iteration ``iteration``; epochs are 1-based."""
        first = self.first_epoch_iterations
        if iteration < first:
            return 1, iteration
        later = self.later_epoch_iterations
        rest = iteration - first
        return 2 + rest // later, rest % later

    def batch_indices(self, iteration: int) -> tuple[int, np.ndarray]:
        epoch, pos = self.locate(iteration)
        pool = self.first_epoch_images if epoch == 1 else np.arange(self.n_train)
        order = rng_for(self.seed, 1, epoch).permutation(len(pool))
        return epoch, pool[order[pos * self.batch:(pos + 1) * self.batch]]


def make_schedule(n_train: int, excluded: Sequence[int], batch: int, seed: int) -> Schedule:
    excluded = np.unique(np.asarray(excluded, dtype=np.int64))
    if excluded.size and (excluded.min() < 0 or excluded.max() >= n_train):
        raise ValueError(f"excluded image indices must lie in [0, {n_train}); got "
                         f"{excluded.min()}..{excluded.max()}")
    keep = np.setdiff1d(np.arange(n_train), excluded)
    if len(keep) < batch or n_train < batch:
        raise ValueError(f"too few training images ({len(keep)} after excluding "
                         f"{excluded.size}) for a mini-batch of {batch}")
    return Schedule(keep, n_train, batch, seed)


# ----------------------------------------------------------------------------------------------
# Evaluation


def evaluate(layers, params, images, labels, cfg: TrainConfig, eval_seed_offset: int,
             batch: int = 100, xp=np, activity: ActivityTally | None = None
             ) -> tuple[float, float]:
    """(error, mean NLL) of the network on ``images``; input noise fixed by the batch index.
    ``params`` live in ``xp``; the input is drawn by ``cfg.training.input_rng``.
    ``activity``, when given, tallies every layer's spike counts."""
    T = n_steps(_duration(cfg.training.eval_duration), cfg.lif.dt)
    dtype = np.dtype(cfg.training.dtype)
    tau_p = tau_steps(cfg.bp.tau_p, cfg.lif.dt)
    wrong = 0
    nll = 0.0
    for j, b0 in enumerate(range(0, len(images), batch)):
        x = draw_input(cfg, images[b0:b0 + batch], T, (3, eval_seed_offset + j), xp)
        out = forward(layers, params, x, cfg.lif, cfg.pooling, xp=xp, dtype=dtype,
                      tau_p=tau_p, keep_spikes=False, record_trace_m=False,
                      hidden_traces=False, backend=cfg.training.backend)
        y = labels[b0:b0 + batch]
        if activity is not None:
            activity.add(out.count_cl, T)
        w, n = score_batch(out.count_cl[-1], out.trace_p_cl[-1], y, xp)
        wrong += w
        nll += n
    return wrong / len(images), nll / len(images)


def score_batch(count_out, trace_p_out, y, xp=np) -> tuple[int, float]:
    """(wrong predictions, summed NLL) of one evaluation batch from the output layer's spike
    counts and activations ``(batch, ...)`` and the labels ``y`` (NumPy)."""
    a_out = trace_p_out.reshape(len(y), -1)
    pred = to_numpy(predict(count_out.reshape(len(y), -1), a_out, xp))
    p = to_numpy(output_probabilities(a_out, xp))
    return (int((pred != y).sum()),
            float(-np.log(np.maximum(p[np.arange(len(y)), y], NLL_FLOOR)).sum()))


def _duration(text: str):
    from brian2 import ms

    from protocols.config import parse_quantity

    return parse_quantity(text, 1 * ms, "eval_duration")


# ----------------------------------------------------------------------------------------------
# The loop


def _finite(params, *values) -> bool:
    for p in params:
        if p is not None and not np.isfinite(float(p.weights.sum())):
            return False
    return all(math.isfinite(v) for v in values)


def _write_status(run_dir: Path, status: str, message: str, **extra) -> None:
    write_status(run_dir, status, message, **extra)  # with the process id and host


#: training keys a resumed run may change: its length (to extend it) and where it runs
RESUMABLE_CHANGES = ("iterations", "array_module", "backend", "blas_threads")


#: the value an option had in runs recorded before it existed, where that differs from today's
#: default (a changed default must not change what an old run record means); (section, key)
LEGACY_VALUES: dict[tuple[str, str], object] = {
    ("bp", "conv_reduction"): "mean",
    ("bp", "silent_units"): "pass",
    ("bp", "conv_eta_scale"): 1.0,
    ("bp", "pretrained_conv_eta_scale"): 1.0,
    ("bp", "pretrained_conv_step_balance"): 0.0,
    ("bp", "weight_decay"): 0.0,
    ("training", "test_subset"): "first",
}


def _with_new_defaults(config: dict) -> dict:
    """``config`` (a recorded TrainConfig) with every option added since it was recorded set to
    the value under which that run was made: its LEGACY_VALUES entry, else today's default
    (options are added with defaults that keep earlier behaviour)."""
    from protocols.config import config_to_dict

    defaults = config_to_dict(TrainConfig())
    out = dict(config)
    for section, values in defaults.items():
        if isinstance(values, dict) and isinstance(out.get(section), dict):
            legacy = {k: v for (sec, k), v in LEGACY_VALUES.items() if sec == section}
            out[section] = {**values, **legacy, **out[section]}
    return out


def _segment(record: dict, start) -> dict:
    training = (record.get("config") or {}).get("training") or {}
    return {"from_iteration": start, "versions": record.get("versions"),
            "command": record.get("command"),
            **{k: training.get(k) for k in RESUMABLE_CHANGES}}


def run_segments(previous: dict | None, record: dict, start: int) -> list[dict]:
    """Where each stretch of a run ran: the previous record's segments (one for a record written
    before segments existed: its last writer, start unknown) and this one, from ``start``. A
    run resumed on another machine or device keeps what ran before (versions, commit, command,
    and the RESUMABLE_CHANGES keys: length, array module, backend, BLAS threads); the
    top-level ``versions`` and ``command`` are the last segment's."""
    if previous is None:
        before = []
    else:
        before = previous.get("segments") or [_segment(previous, None)]
    return [*before, _segment(record, int(start))]


def _comparable(config):
    """A run's recorded configuration without the keys of RESUMABLE_CHANGES (nor test_subset
    when the run evaluates every test image)."""
    if not isinstance(config, dict) or not isinstance(config.get("training"), dict):
        return config
    config = {k: v for k, v in _with_new_defaults(config).items() if k != "guard"}
    # the pre-trained conv layers' own step options matter only to a run whose conv layers are
    # pre-trained, and which arm a run is matters here only where those options act (records
    # made before the key existed lack it, and used neither option), so that a supervised run
    # made before the balanced step became the default still continues under today's config
    bp = config["bp"]
    if (not config.get("pretrained_conv")
            or (bp.get("pretrained_conv_eta_scale", 1.0) == 1.0
                and not bp.get("pretrained_conv_step_balance", 0.0))):
        config.pop("pretrained_conv", None)
        config["bp"] = {k: v for k, v in bp.items()
                        if k not in ("pretrained_conv_eta_scale", "pretrained_conv_step_balance")}
    # with the whole test split evaluated, which subset rule applies does not matter
    unused = ("test_subset",) if not config["training"].get("test_eval_images") else ()
    return {**config, "training": {k: v for k, v in config["training"].items()
                                   if k not in RESUMABLE_CHANGES + unused}}


class TrainingRun:
    """One run folder of the trainer: its record, parameters, metrics and checkpoints, and the
    bookkeeping of one SGD iteration around the forward and backward passes. :func:`_train`
    drives one; :mod:`protocols.population` drives several in lock-step, so that both write
    the same files.

    Construction checks the folder against ``cfg`` and loads its checkpoint (or takes
    ``initial_params`` and writes ``initial.npz``); ``done`` says the run had already finished.
    :meth:`begin` marks it running; then per iteration :meth:`batch`, the passes,
    :meth:`step`, :meth:`record_row` when :meth:`eval_due`, :meth:`checkpoint_if_due`; at the
    end :meth:`finish`. A divergence raises TrainingDiverged after recording it.
    """

    def __init__(self, cfg: TrainConfig, run_dir, data, initial_params: Sequence | None = None,
                 excluded: Sequence[int] = (), extra_record: dict | None = None):
        from protocols.config import config_to_dict

        self.cfg = cfg
        self.data = data
        self.xp = xp = array_module(cfg.training.array_module)
        self.run_dir = run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.layers = layers = parse_topology(cfg.topology)
        self.dtype = dtype = np.dtype(cfg.training.dtype)
        self.schedule = schedule = make_schedule(len(data.train_labels), excluded,
                                                 cfg.bp.batch_size, cfg.seed)
        self.record = record = {
            "config": config_to_dict(cfg),
            "seed": cfg.seed,
            "versions": {**versions(), **gpu_versions(xp)},
            "command": " ".join(sys.argv),
            "n_train": int(len(data.train_labels)),
            "n_test": int(len(data.test_labels)),
            "excluded_images": int(len(np.unique(np.asarray(excluded)))) if len(excluded) else 0,
            "first_epoch_iterations": schedule.first_epoch_iterations,
            "later_epoch_iterations": schedule.later_epoch_iterations,
            "checkpoint_format": CHECKPOINT_FORMAT,
            **(extra_record or {}),
        }
        self.config_path = config_path = run_dir / "config.json"
        self.previous_record = None
        if config_path.exists():
            old = read_json(config_path, "run record", "use a new run folder (--out)")
            if not isinstance(old, dict):
                raise RunError(f"{config_path}: the run record is not a JSON object; use a new "
                               f"run folder (--out)")
            for key in ("config", "n_train", "n_test", "excluded_images"):
                if _comparable(old.get(key)) != _comparable(record.get(key)):
                    status = read_status(run_dir) or {}
                    why = (f"; that run diverged at iteration {status.get('iteration')} "
                           f"({status.get('reason', 'see its status.json')})"
                           if status.get("status") == "diverged" else "")
                    raise ValueError(
                        f"{run_dir} holds a run with a different {key!r}{why}; resume needs the "
                        f"same configuration: start the new one in a new run folder (--out NEW)")
            self.previous_record = old

        self.checkpoint = checkpoint = run_dir / "checkpoint.npz"
        self.rows: list[dict] = []
        step_sums = None  # the relative-step tally since the last row, from the checkpoint
        if checkpoint.exists():
            fix = ("delete it to restart the run from iteration 0, or use a new run folder "
                   "(--out)")
            try:
                arrays = load_npz(checkpoint, fix)
            except NpzError as err:
                raise RunError(str(err)) from None
            missing = [k for k in ("iteration", "metrics_json", "wall_time_s",
                                   "next_input_rng_json") if k not in arrays]
            if missing:
                raise RunError(f"{checkpoint}: not a checkpoint of this trainer (no "
                               f"{', '.join(missing)}); {fix}")
            if int(arrays["iteration"]) > cfg.training.iterations:
                raise RunError(
                    f"{run_dir} already holds {int(arrays['iteration'])} iterations, more than "
                    f"the {cfg.training.iterations} asked for, and was left as it is; read the "
                    f"first {cfg.training.iterations} from its metrics.csv, or start a run of "
                    f"that length in a new folder (--out NEW)")
            self.params = params_from_arrays(layers, arrays, dtype=dtype, xp=xp)
            self.start = int(arrays["iteration"])
            self.rows = json.loads(str(arrays["metrics_json"]))
            step_sums = arrays.get("rel_step_sums")
            factors = arrays.get("step_factors")
            self.wall_offset = float(arrays["wall_time_s"])
            saved_rng = json.loads(str(arrays["next_input_rng_json"]))
            if saved_rng != rng_for(cfg.seed, 2, self.start).bit_generator.state:
                raise RuntimeError(f"{checkpoint}: its RNG state does not match the seed "
                                   f"derivation of this code; cannot resume identically")
        else:
            if initial_params is None:
                raise ValueError("initial_params are required for a new run")
            self.params = [None if p is None else dataclasses.replace(
                p, weights=xp.array(to_numpy(p.weights), dtype=dtype),
                thresholds=xp.array(to_numpy(p.thresholds), dtype=dtype))
                for p in initial_params]
            self.start = 0
            self.wall_offset = 0.0
            factors = None
            atomic_savez(run_dir / "initial.npz", params_to_arrays(layers, self.params))
        self.total = total = cfg.training.iterations
        self.iteration = self.start
        previous = read_status(run_dir) if self.start == total else None
        self.done = bool(previous and previous.get("status") == "finished" and
                         previous.get("iteration") == total and
                         (run_dir / "final.npz").exists())
        self.steps = StepTally(layers)
        #: the balanced step factor of each layer (bp.pretrained_conv_step_balance; else 1)
        self.factors = [1.0] * len(layers) if factors is None else [float(f) for f in factors]
        if step_sums is not None:
            self.steps.sums[:] = step_sums
            self.steps.n = int(arrays["rel_step_n"])

    def frame(self):
        return metrics_frame(self.rows)

    def begin(self) -> None:
        """Record the run as running; fix the evaluation sets, the homeostasis targets, the
        learning rates and the clock."""
        cfg, data = self.cfg, self.data
        if self.start < self.total:  # an extended run is not finished until it is again
            for name in ("final.npz", "final_conv.npz"):
                (self.run_dir / name).unlink(missing_ok=True)
        self.record["segments"] = run_segments(self.previous_record, self.record, self.start)
        atomic_write_json(self.config_path, self.record)
        _write_status(self.run_dir, "running", f"training from iteration {self.start}")
        n_tr = min(cfg.training.train_eval_images, len(data.train_labels))
        tr_idx = np.sort(rng_for(cfg.seed, 4).permutation(len(data.train_labels))[:n_tr])
        n_test = len(data.test_labels)
        te_idx = (fixed_subset(n_test, cfg.training.test_eval_images)
                  if cfg.training.test_subset == "sample"
                  else np.arange(min(cfg.training.test_eval_images or n_test, n_test)))
        self.tr_x, self.tr_y = data.train_images[tr_idx], np.asarray(data.train_labels)[tr_idx]
        self.te_x, self.te_y = data.test_images[te_idx], np.asarray(data.test_labels)[te_idx]
        self.tau_p = tau_steps(cfg.bp.tau_p, cfg.lif.dt)
        self.t_first = n_steps(cfg.bp.t_first_epoch, cfg.lif.dt)
        self.t_later = n_steps(cfg.bp.t_later_epochs, cfg.lif.dt)
        self.t0 = time.perf_counter()
        homeostasis = cfg.bp.threshold_homeostasis
        self.targets = (homeostasis_targets(cfg, self.layers, self.run_dir, data, self.schedule,
                                            self.xp) if homeostasis > 0 else None)
        self.etas = layer_learning_rates(self.layers, cfg.bp, cfg.pretrained_conv)
        self.balance = cfg.bp.pretrained_conv_step_balance if cfg.pretrained_conv else 0.0
        self.guard = DivergenceGuard(cfg.guard, self.rows)
        self.ck_every = cfg.training.checkpoint_every or cfg.training.log_every

    def wall(self) -> float:
        return self.wall_offset + time.perf_counter() - self.t0

    @property
    def needs_initial_row(self) -> bool:
        return self.start == 0 and not self.rows

    def evaluate(self) -> tuple:
        """(train_error, train_nll, test_error, test_nll, activity) of the current network."""
        activity = ActivityTally(self.layers)
        train_err, train_nll = evaluate(self.layers, self.params, self.tr_x, self.tr_y,
                                        self.cfg, 0, xp=self.xp, activity=activity)
        test_err, test_nll = evaluate(self.layers, self.params, self.te_x, self.te_y, self.cfg,
                                      1_000_000, xp=self.xp)
        return train_err, train_nll, test_err, test_nll, activity

    def record_row(self, iteration: int, epoch: int, evaluation: tuple) -> dict:
        """Log a metrics row of ``evaluation`` (:meth:`evaluate`'s tuple) and check it; the
        initial row (iteration 0) is then checkpointed."""
        train_err, train_nll, test_err, test_nll, activity = evaluation
        steps = self.steps.columns()
        factors = {}
        if self.balance:  # the factors of the interval just ended, then the next interval's
            factors = {f"{label}_step_factor": f for label, layer, f in
                       zip(layer_labels(self.layers), self.layers, self.factors)
                       if isinstance(layer, ConvLayer)}
            if iteration > 0:
                self.factors = balanced_step_factors(self.layers, self.factors, steps,
                                                     self.balance)
        row = {"iteration": iteration, "epoch": epoch,
               "images_seen": iteration * self.cfg.bp.batch_size,
               "wall_time_s": round(self.wall(), 3),
               "train_error": train_err, "test_error": test_err, "train_nll": train_nll,
               "test_nll": test_nll, **steps, **factors, **activity.columns(),
               **weight_columns(self.layers, self.params, thresholds=self.targets is not None)}
        self.rows.append(row)
        write_metrics(self.run_dir, self.rows)
        if iteration == 0:
            if not _finite(self.params, row["train_nll"], row["test_nll"]):
                self.diverged(0, "non-finite initial weights or outputs")
            self.save_checkpoint(0)
            return row
        if not _finite(self.params, row["train_nll"], row["test_nll"]):
            self.diverged(iteration, "non-finite outputs in evaluation")
        if (reason := self.guard.evaluation(row["train_error"])) is not None:
            self.diverged(iteration, reason)
        return row

    def save_checkpoint(self, iteration: int) -> None:
        cfg = self.cfg
        arrays = params_to_arrays(self.layers, self.params)
        arrays.update(
            iteration=np.asarray(iteration),
            wall_time_s=np.asarray(self.wall()),
            metrics_json=np.asarray(json.dumps(self.rows)),
            rel_step_sums=self.steps.sums.copy(),
            rel_step_n=np.asarray(self.steps.n),
            step_factors=np.asarray(self.factors, dtype=np.float64),
            next_input_rng_json=np.asarray(json.dumps(
                rng_for(cfg.seed, 2, iteration).bit_generator.state)),
            rng_derivation=np.asarray("poisson input of iteration i: SeedSequence([seed, 2, i])"),
            seed=np.asarray(cfg.seed),
            format=np.asarray(CHECKPOINT_FORMAT),
        )
        atomic_savez(self.checkpoint, arrays)

    def diverged(self, iteration: int, what: str, fix: str | None = None):
        fix = fix or (f"with a lower bp.eta (this run: {self.cfg.bp.eta:g}), or check the "
                      f"thresholds")
        msg = (f"training diverged at iteration {iteration}: {what}. metrics.csv holds the "
               f"curve up to here and {self.checkpoint} the last good checkpoint. To rerun, "
               f"start a new run folder (--out NEW) {fix}")
        write_metrics(self.run_dir, self.rows)
        _write_status(self.run_dir, "diverged", msg, iteration=iteration, reason=what)
        raise TrainingDiverged(msg)

    def batch(self, iteration: int):
        """(epoch, T, input spikes, labels) of iteration ``iteration``; the spikes in the run's
        array module (``training.input_rng``), the labels in NumPy."""
        epoch, idx = self.schedule.batch_indices(iteration)
        T = self.t_first if epoch == 1 else self.t_later
        x = draw_input(self.cfg, self.data.train_images[idx], T, (2, iteration), self.xp)
        return epoch, T, x, np.asarray(self.data.train_labels)[idx]

    def step(self, out, grads, stats) -> None:
        """Check the gradients, take the SGD step (and the threshold homeostasis), advance
        ``iteration`` and check the weights."""
        if not all(g is None or np.isfinite(float(g.sum())) for g in grads) or \
                not math.isfinite(stats.loss):
            self.diverged(self.iteration + 1, "non-finite gradient or loss")
        self.check_alive(out)
        etas = ([e * f for e, f in zip(self.etas, self.factors)] if self.balance
                else self.etas)
        self.steps.add(sgd_step(self.params, grads, etas, self.cfg.bp.weight_decay))
        if self.targets is not None:
            adapt_thresholds(self.params, map_rates(self.layers, out, self.xp), self.targets,
                             self.cfg.bp.threshold_homeostasis, self.xp)
        self.iteration += 1
        if not _finite(self.params):
            self.diverged(self.iteration, "non-finite weights after the SGD step")
        if (reason := self.guard.weights(self.params)) is not None:
            self.diverged(self.iteration, reason)

    def check_alive(self, out) -> None:
        """Stop a run that can no longer learn: with ``bp.silent_units = 'zero'`` (and no
        threshold homeostasis to revive it) a hidden layer that fires no spike on a whole
        mini-batch passes no gradient down (a' = 0 for every unit) and no input up (â = 0), so
        every weight gradient of the batch is zero, the weights stay, and so does the silence.
        At the first iteration that is a silent start; later, a collapse."""
        cfg = self.cfg
        if cfg.bp.silent_units != "zero" or cfg.bp.threshold_homeostasis > 0:
            return
        for i in range(1, len(self.layers) - 1):
            if float(out.count_cl[i].sum()) == 0:
                name = layer_labels(self.layers)[i]
                gated = ("and with bp.silent_units = 'zero' a silent layer passes no gradient, "
                         "so no weight changes")
                if self.iteration == 0:
                    self.diverged(
                        0, f"a silent start: hidden layer {name} fired no spike on the first "
                           f"mini-batch, {gated}",
                        fix="with a smaller initialisation.alpha (thresholds v_th = alpha·k) so "
                            "that every layer fires at the start, or with bp.silent_units = "
                            "'pass'")
                self.diverged(
                    self.iteration + 1,
                    f"a silent layer: hidden layer {name} fired no spike on mini-batch "
                    f"{self.iteration + 1}, {gated}",
                    fix=f"with a smaller bp.eta (this run: {cfg.bp.eta:g}), or with "
                        f"bp.threshold_homeostasis > 0, which lowers the thresholds of silent "
                        f"maps")

    def eval_due(self) -> bool:
        return self.iteration % self.cfg.training.log_every == 0 or self.iteration == self.total

    def checkpoint_if_due(self) -> None:
        if self.iteration % self.ck_every == 0 or self.iteration == self.total:
            self.save_checkpoint(self.iteration)

    def interrupted(self) -> str:
        """Record a Ctrl-C at the current iteration; returns the message."""
        try:
            last = int(load_npz(self.checkpoint)["iteration"])
        except (NpzError, KeyError):
            last = None
        kept = (f"keeps its checkpoint at iteration {last}" if last is not None
                else "has no checkpoint yet")
        msg = (f"fine-tuning interrupted at iteration {self.iteration} of {self.total}; "
               f"{self.run_dir} {kept} and no final.npz; rerun the same command to resume from "
               f"there")
        _write_status(self.run_dir, "interrupted", msg, iteration=last)
        return msg

    def finish(self) -> None:
        """final.npz and status 'finished' once every iteration is done."""
        if self.iteration >= self.total:
            atomic_savez(self.run_dir / "final.npz", params_to_arrays(self.layers, self.params))
            _write_status(self.run_dir, "finished", f"finished {self.total} iterations",
                          iteration=self.total)


def _train(
    cfg: TrainConfig,
    run_dir: str | os.PathLike,
    data,
    initial_params: Sequence | None = None,
    excluded: Sequence[int] = (),
    extra_record: dict | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> "pandas.DataFrame":  # noqa: F821
    """Fine-tune from ``initial_params`` (or from the seeded initialisation given by the caller)
    on ``data`` (``.train_images``, ``.train_labels``, ``.test_images``, ``.test_labels``);
    resume from ``run_dir/checkpoint.npz`` when it exists. Returns the metrics table.

    ``stop_after``: return after this many iterations of this call (tests and benchmarks);
    a later call resumes. A finished run can be extended: the same configuration with a larger
    ``training.iterations`` continues from its last checkpoint (the schedule and every random
    draw depend on the iteration, not on the run's length).
    """
    from tqdm import tqdm

    run = TrainingRun(cfg, run_dir, data, initial_params, excluded, extra_record)
    if run.done:
        say(f"{run.run_dir}: already finished {run.total} iterations; nothing to do")
        return run.frame()
    run.begin()
    layers, xp, dtype = run.layers, run.xp, run.dtype
    if run.needs_initial_row:
        say(f"evaluating the initial network ({len(run.tr_y)} training, {len(run.te_y)} test "
            f"images)")
        run.record_row(0, 1, run.evaluate())

    start, total = run.start, run.total
    if start < total:
        say(f"fine-tuning {run.run_dir}: iterations {start} to {total}, evaluating every "
            f"{cfg.training.log_every}")
    bar = tqdm(total=total, initial=start, disable=not progress, unit="it", dynamic_ncols=True,
               desc=run.run_dir.name)
    last_test = run.rows[-1]["test_error"] if run.rows else float("nan")
    running: list[float] = []
    done_here = 0
    try:
        while run.iteration < total:
            epoch, T, x, y = run.batch(run.iteration)
            out = forward(layers, run.params, xp.asarray(x), cfg.lif, cfg.pooling, xp=xp,
                          dtype=dtype, tau_p=run.tau_p, keep_spikes=False,
                          backend=cfg.training.backend,
                          record_trace_m=cfg.bp.derivative == "lee2020")
            grads, stats = backward(layers, run.params, out, xp.asarray(y), cfg.bp, cfg.lif,
                                    cfg.pooling, xp=xp)
            run.step(out, grads, stats)
            done_here += 1
            running.append(float((to_numpy(stats.predictions) != y).mean()))
            running = running[-50:]
            if run.eval_due():
                last_test = run.record_row(run.iteration, epoch, run.evaluate())["test_error"]
            run.checkpoint_if_due()
            bar.update(1)
            bar.set_postfix(epoch=epoch, train_err=f"{np.mean(running):.3f}",
                            test_err=f"{last_test:.4f}", refresh=False)
            if stop_after is not None and done_here >= stop_after:
                break
            check_interrupt()  # a Ctrl-C that Python swallowed in a callback
    except KeyboardInterrupt:
        bar.close()
        raise RunInterrupted(run.interrupted(), recorded=run.run_dir) from None
    finally:
        bar.close()
    run.finish()
    return run.frame()


def homeostasis_targets(cfg: TrainConfig, layers, run_dir: Path, data, schedule, xp) -> list:
    """The per-map target rates of ``bp.threshold_homeostasis``: each conv map's spikes per unit
    and step when the run's initial weights (``initial.npz``) meet its first mini-batch (the
    images and Poisson draw of iteration 0). Recomputed identically when a run resumes."""
    dtype = np.dtype(cfg.training.dtype)
    try:
        arrays = load_npz(run_dir / "initial.npz", "start the run again in a new folder (--out)")
    except NpzError as err:
        raise RunError(f"threshold homeostasis needs the run's initial weights: {err}") from None
    first = params_from_arrays(layers, arrays, dtype=dtype, xp=xp)
    epoch, idx = schedule.batch_indices(0)
    T = n_steps(cfg.bp.t_first_epoch if epoch == 1 else cfg.bp.t_later_epochs, cfg.lif.dt)
    x = draw_input(cfg, data.train_images[idx], T, (2, 0), xp)
    out = forward(layers, first, x, cfg.lif, cfg.pooling, xp=xp, dtype=dtype,
                  tau_p=tau_steps(cfg.bp.tau_p, cfg.lif.dt), keep_spikes=False,
                  record_trace_m=False, backend=cfg.training.backend)
    return map_rates(layers, out, xp)


def blas_limit(threads: int):
    """A context that holds the BLAS library to ``threads`` threads (0: leaves it as it is)."""
    if threads == 0:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=threads, user_api="blas")


def train(cfg: TrainConfig, run_dir: str | os.PathLike, data, *args, **kwargs):
    with run_guard(run_dir, "fine-tuning"), blas_limit(cfg.training.blas_threads):
        return _train(cfg, run_dir, data, *args, **kwargs)


train.__doc__ = (_train.__doc__ or "") + """
    The run folder is locked while it runs (protocols.runstate): a second process refuses. A
    Ctrl-C leaves status.json at 'interrupted' and raises RunInterrupted (a KeyboardInterrupt);
    a shorter ``training.iterations`` than the folder holds is a RunError, nothing rewritten.
    """


def main(argv=None) -> int:
    """Fine-tuning only, from a TOML config (see protocols/study.py for the full study)."""
    from protocols.study import main as study_main

    return study_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
