"""How long a sweep will take on this machine: a short calibration, then an estimate per run.

``python -m protocols.sweep --config ... --dry-run`` lists the runs and calls :func:`estimate`.
The calibration runs the package's own code on this machine, in a temporary folder:

* fine-tuning: a few iterations of the real trainer (:func:`protocols.study.run_study`) at each
  presentation length the runs use (first epoch and later epochs), and its evaluation on a few
  images — so the numbers include encoding, forward, backward, SGD and the evaluation pass;
* pre-training (arms ``pretrained`` that have not pre-trained yet): one Brian2 batch per conv
  layer through :mod:`protocols.pretrain`, scaled to the configured number of images (the
  program build is counted once per layer).

A run's estimate is its pre-training + its remaining iterations + its remaining evaluations
(from its ``metrics.csv``, so interrupted and extendable runs count only what is left). The wall
time of the sweep is the longest-first schedule of those estimates over the workers.

The calibration runs in the layout the sweep will run in: as many copies at once as the sweep
will run at once (``--workers``, at most the number of runs left), each in its own worker
process with ``--threads`` threads (:func:`protocols.sweep.local_client`), and the copies'
times are averaged. So the threads a run gets and the cores and memory bandwidth it shares are
in the measurement, not modelled (a calibration in the calling process, with all of its
threads, put a 2-worker, 1-thread sweep on 2 cores at 1.7x the speed it runs at). The
calibration sees the initial network; spike counts, and so the cost of the event-driven
forward pass, change as the network learns (on the shallow net the cost per iteration stays
the same, docs/sweeps.md).
"""

from __future__ import annotations

import dataclasses
import heapq
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from protocols.study import StudyConfig


@dataclass(frozen=True)
class Calibration:
    """Seconds per unit of work for one kind of run, measured on this machine."""

    #: seconds per training iteration in the first epoch and in the later epochs
    s_per_iteration_first: float
    s_per_iteration_later: float
    #: seconds per evaluated image (train and test evaluations cost the same per image)
    s_per_eval_image: float
    #: seconds of pre-training (the whole configured pre-training; 0 for supervised runs)
    pretrain_s: float = 0.0


def _calibration_key(cfg: StudyConfig) -> str:
    """Runs that differ only in seed, arm and folder share one calibration."""
    return repr(dataclasses.replace(cfg, seed=0, out="", pretrained="", arm="supervised"))


def _timed_training(cfg: StudyConfig, folder: Path, iterations: int, eval_images: int,
                    data_dir: str | None, presentation) -> tuple[float, float]:
    """(s per iteration, s per evaluated image) of ``iterations`` supervised iterations whose
    every presentation lasts ``presentation``, evaluated on ``eval_images`` images at 0 and end."""
    from protocols import runstate
    from protocols.study import run_study

    bp = dataclasses.replace(cfg.bp, t_first_epoch=presentation)
    training = dataclasses.replace(cfg.training, iterations=iterations, log_every=iterations,
                                   train_eval_images=eval_images, test_eval_images=eval_images)
    probe = dataclasses.replace(cfg, arm="supervised", pretrained="", out=str(folder), bp=bp,
                                training=training)
    verbose, runstate.VERBOSE = runstate.VERBOSE, False
    try:
        frame = run_study(probe, data_dir, progress=False)
    finally:
        runstate.VERBOSE = verbose
    wall = frame["wall_time_s"].to_numpy(dtype=float)
    eval_s = wall[0]  # the evaluation of the initial network: train and test images
    per_image = eval_s / (2 * eval_images)
    per_iteration = max(wall[-1] - 2 * eval_s, 0.0) / iterations
    return per_iteration, per_image


def _timed_pretraining(cfg: StudyConfig, folder: Path, data_dir: str | None) -> float:
    """Seconds the configured pre-training would take: one batch per layer, scaled."""
    import json

    from protocols.study import run_pretraining

    n = cfg.pretraining.n_images
    one_batch = dataclasses.replace(cfg.pretraining, n_images=min(n, cfg.pretraining.batch_images))
    probe = dataclasses.replace(cfg, pretraining=one_batch)
    run_pretraining(probe, folder, data_dir, progress=False)
    record = json.loads((folder / "pretrain" / "pretrained.json").read_text())
    total = 0.0
    for layer in record["layers"].values():
        total += float(layer["build_s"]) + n / max(float(layer["images_per_s"]), 1e-9)
    return total


def calibrate(cfg: StudyConfig, data_dir: str | None = None, iterations: int = 3,
              eval_images: int = 100, pretraining: bool | None = None) -> Calibration:
    """Measure the cost of ``cfg``'s kind of run on this machine (see the module docstring);
    pre-training is timed when ``pretraining`` (default: when ``cfg.arm`` is 'pretrained')."""
    if pretraining is None:
        pretraining = cfg.arm == "pretrained"
    with tempfile.TemporaryDirectory(prefix="calibrate-") as tmp:
        tmp = Path(tmp)
        # warm-up: numba's cached kernels load and Brian2 imports on the first call
        _timed_training(cfg, tmp / "warmup", 1, 1, data_dir, cfg.bp.t_later_epochs)
        later = _timed_training(cfg, tmp / "later", iterations, eval_images, data_dir,
                                cfg.bp.t_later_epochs)
        if cfg.bp.t_first_epoch == cfg.bp.t_later_epochs:
            first = later
        else:
            first = _timed_training(cfg, tmp / "first", iterations, eval_images, data_dir,
                                    cfg.bp.t_first_epoch)
        pretrain_s = _timed_pretraining(cfg, tmp / "pretrain", data_dir) if pretraining else 0.0
    return Calibration(s_per_iteration_first=first[0], s_per_iteration_later=later[0],
                       s_per_eval_image=(first[1] + later[1]) / 2, pretrain_s=pretrain_s)


def _calibrate_in_worker(cfg: StudyConfig, data_dir: str | None, iterations: int,
                         eval_images: int, pretraining: bool) -> Calibration:
    """:func:`calibrate` as a Dask task; leaves the worker's Brian2 device as a sweep task does."""
    from protocols.sweep import _reset_brian2

    try:
        return calibrate(cfg, data_dir, iterations, eval_images, pretraining)
    finally:
        _reset_brian2()


def calibrate_concurrently(client, cfg: StudyConfig, copies: int, data_dir: str | None = None,
                           iterations: int = 3, eval_images: int = 100,
                           pretraining: bool | None = None) -> Calibration:
    """:func:`calibrate` run ``copies`` times at once on ``client``'s workers (the load of a
    sweep running that many runs at once); the mean of the copies."""
    futures = [client.submit(_calibrate_in_worker, cfg, data_dir, iterations, eval_images,
                             pretraining, pure=False) for _ in range(max(1, copies))]
    cals = client.gather(futures)
    return Calibration(*(sum(getattr(c, f.name) for c in cals) / len(cals)
                         for f in dataclasses.fields(Calibration)))


def _done_iterations(run_dir: Path) -> int:
    """The iteration a run would resume from: the last row of its metrics.csv (0 if none)."""
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if len(lines) < 2:
        return 0
    try:
        return int(float(lines[-1].split(",")[0]))
    except ValueError:
        return 0


def run_seconds(cfg: StudyConfig, cal: Calibration, n_train: int, n_test: int) -> float:
    """Estimated seconds to finish one run from where its folder stands."""
    from protocols.train import make_schedule

    out = Path(cfg.out)
    done = _done_iterations(out)
    total = cfg.training.iterations
    if done >= total:
        return 0.0
    first = make_schedule(n_train, (), cfg.bp.batch_size, cfg.seed).first_epoch_iterations
    n_first = max(0, min(total, first) - done)
    n_later = (total - done) - n_first
    log = cfg.training.log_every
    evaluations = len({i for i in range(done + 1, total + 1) if i % log == 0 or i == total})
    if done == 0:
        evaluations += 1  # the initial network
    per_eval = (min(cfg.training.train_eval_images, n_train)
                + min(cfg.training.test_eval_images or n_test, n_test))
    pretrain = cal.pretrain_s if cfg.arm == "pretrained" and not cfg.pretrained and \
        not (out / "pretrain" / "pretrained.npz").is_file() else 0.0
    return (pretrain + n_first * cal.s_per_iteration_first + n_later * cal.s_per_iteration_later
            + evaluations * per_eval * cal.s_per_eval_image)


def schedule_wall_time(seconds: list[float], workers: int) -> float:
    """Wall time of running jobs of these lengths longest-first on ``workers`` workers."""
    finish = [0.0] * max(1, workers)
    for s in sorted(seconds, reverse=True):
        heapq.heapreplace(finish, finish[0] + s)
    return max(finish)


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h} h {m:02d} min" if h else (f"{m} min {s:02d} s" if m else f"{s} s")


def estimate(configs: list[StudyConfig], workers: int, threads: int = 1,
             data_dir: str | None = None, iterations: int = 3, eval_images: int = 100,
             say=print) -> dict:
    """Calibrate once per kind of run (in the sweep's own layout of ``workers`` processes of
    ``threads`` threads, see the module docstring), estimate every run, and print the sweep's
    wall time."""
    from protocols.datasets import load_dataset
    from protocols.sweep import local_client

    calibrations: dict = {}
    sizes: dict = {}
    per_run = []
    copies = max(1, min(workers, len(configs)))
    needs_pretraining = {_calibration_key(c) for c in configs if c.arm == "pretrained"}
    load = os.getloadavg()[0]
    with local_client(copies, threads) as client:
        for cfg in configs:
            key = _calibration_key(cfg)
            if key not in calibrations:
                pretraining = key in needs_pretraining
                say(f"calibrating {cfg.topology} ({cfg.dataset}) on this machine, {copies} "
                    f"at once with {threads} thread(s) each: {iterations} iterations at each "
                    f"presentation length and {2 * eval_images} evaluated images"
                    + (", one pre-training batch" if pretraining else ""))
                calibrations[key] = calibrate_concurrently(client, cfg, copies, data_dir,
                                                           iterations, eval_images, pretraining)
                cal = calibrations[key]
                say(f"  {cal.s_per_iteration_later * 1e3:.0f} ms per iteration "
                    f"({cal.s_per_iteration_first * 1e3:.0f} ms in the first epoch), "
                    f"{cal.s_per_eval_image * 1e3:.1f} ms per evaluated image"
                    + (f", pre-training {format_duration(cal.pretrain_s)}" if pretraining
                       else ""))
            if cfg.dataset not in sizes:
                data = load_dataset(cfg.dataset, data_dir)
                sizes[cfg.dataset] = (len(data.train_labels), len(data.test_labels))
            per_run.append(run_seconds(cfg, calibrations[key], *sizes[cfg.dataset]))
    wall = schedule_wall_time(per_run, workers)
    for cfg, s in zip(configs, per_run):
        say(f"  {format_duration(s):>14}  {cfg.out}")
    cpus = os.cpu_count() or 1
    say(f"estimate: {len(configs)} runs, {format_duration(sum(per_run))} of work as timed "
        f"{copies} at once; on {workers} worker(s) x {threads} thread(s) ({cpus} CPUs): about "
        f"{format_duration(wall)} wall time (calibrated with the initial network at load "
        f"average {load:.1f}; a busy machine over-estimates)")
    return {"runs": [c.out for c in configs], "seconds": per_run, "wall_s": wall,
            "copies": copies, "threads": threads,
            "calibrations": [dataclasses.asdict(v) for v in calibrations.values()]}


__all__ = ["Calibration", "calibrate", "calibrate_concurrently", "estimate", "run_seconds",
           "schedule_wall_time", "format_duration"]
