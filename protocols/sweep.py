"""Sweeps over seeds × arms × initialisations × networks, run through Dask.

Every run is one study arm (:mod:`protocols.study`) in its own directory
``<out>/<topology>/<init>/<arm>/seed<seed>``. Runs are tasks on a ``dask.distributed`` cluster:
a local one by default (``--workers`` processes of ``--threads`` BLAS threads each), or an
existing scheduler given by ``--scheduler tcp://host:8786`` — e.g. one started by dask-jobqueue
on a SLURM cluster (see ``docs/sweeps.md``).

Re-running the same command skips finished runs (``status.json`` says ``finished`` at the
requested number of iterations), resumes interrupted ones from their last checkpoint (the trainer
does that by itself), and retries runs whose worker died. Asking for more iterations
(``--iterations`` or the config) extends finished runs from their last checkpoint, and
``--seeds`` adds seeds, so a study can be grown in steps without redoing any work. Across
machines or sessions, a study's committed copy (``python -m analysis.archive``, which keeps the
checkpoints of unfinished runs) is grown in place with ``--out``. A run that fails
(configuration error, divergence, crash) does not stop the others; all failures are listed at the end and the exit status is 1. ``--dry-run`` lists the
runs, then times a few iterations of each kind of run on this machine and prints the estimated
wall time of what is left (:mod:`protocols.estimate`).

Run::

    python -m protocols.sweep --config configs/sweep_shallow.toml [--workers 2 --threads 1]
        [--out FOLDER] [--seeds 0 1 2] [--arms pretrained] [--iterations 1200] [--array-module numpy] [--scheduler tcp://host:8786] [--dry-run [--no-estimate]]
        [--population 20]

With ``population = N`` (``--population N``), each Dask task fine-tunes up to N runs of one
topology in lock-step as one population (:mod:`protocols.population`): the same run folders and
results, batched into larger kernels on a GPU; pre-training stays per run, before.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from distributed.diagnostics.plugin import WorkerPlugin

from protocols.config import ConfigError, load_config
from protocols.runstate import RunInterrupted, cli
from protocols.study import StudyConfig

Arm = Literal["pretrained", "supervised"]
Init = Literal["lee", "glorot"]


@dataclass(frozen=True)
class SweepConfig:
    """The grid of a sweep; ``[study]`` holds the settings every run shares."""

    seeds: tuple[int, ...] = (0, 1, 2)
    arms: tuple[Arm, ...] = ("pretrained", "supervised")
    inits: tuple[Init, ...] = ("lee",)
    topologies: tuple[str, ...] = ("28x28-36C5-2P-10FC",)
    #: root folder of the sweep's run directories
    out: str = "runs/sweep"
    #: runs per Dask task, fine-tuned in lock-step as one population (protocols/population.py;
    #: runs of one topology; each pre-trains alone first); 1: one run per task. On the CPU a
    #: population gives no speed (one process per core already); meant for a GPU
    population: int = 1
    study: StudyConfig = field(default_factory=StudyConfig)

    def __post_init__(self):
        for name in ("seeds", "arms", "inits", "topologies"):
            values = getattr(self, name)
            if not values:
                raise ValueError(f"{name} must not be empty")
            if len(set(values)) != len(values):
                raise ValueError(f"{name} has duplicates: {list(values)}")
        if self.population < 1:
            raise ValueError(f"population must be >= 1 (1: one run per task), got "
                             f"{self.population}")
        if self.study.pretrained:
            raise ValueError("[study] pretrained must be empty in a sweep: each pre-trained run "
                             "pre-trains with its own seed")


def run_directory(out: str | Path, topology: str, init: str, arm: str, seed: int) -> Path:
    return Path(out) / topology / init / arm / f"seed{seed}"


def plan(sweep: SweepConfig) -> list[StudyConfig]:
    """One study configuration per point of the grid, each with its own run directory."""
    configs = []
    for topology in sweep.topologies:
        for init in sweep.inits:
            for arm in sweep.arms:
                for seed in sweep.seeds:
                    out = run_directory(sweep.out, topology, init, arm, seed)
                    configs.append(dataclasses.replace(
                        sweep.study, topology=topology, init=init, arm=arm, seed=seed,
                        out=str(out)))
    return configs


def run_status(run_dir: Path, iterations: int | None = None) -> str:
    """``finished``, ``running``, ``interrupted``, ``failed``, ``diverged``, ``new`` or
    ``unknown`` (unreadable status.json); with ``iterations``, a run finished at fewer
    iterations is ``extendable``; a ``running`` run whose process has gone is ``dead``."""
    path = Path(run_dir) / "status.json"
    if not path.exists():
        return "new"
    try:
        record = json.loads(path.read_text())
        status = record["status"]
    except (OSError, ValueError, KeyError):
        return "unknown"
    if status == "finished" and iterations is not None and \
            int(record.get("iteration", 0)) < iterations:
        return "extendable"
    if status == "running":
        from protocols.runstate import RunLock

        lock = RunLock(run_dir)
        owner = lock._owner()
        if not (owner and lock._alive(owner)):
            return "dead"
    return status


def _status(cfg: StudyConfig) -> str:
    return run_status(Path(cfg.out), cfg.training.iterations)


#: a run's result when its sweep was stopped before the run began
NOT_STARTED = {"status": "not started", "message": "the sweep was stopped before this run began"}


def run_one(cfg: StudyConfig, data_dir: str | None, token: str | None = None) -> dict:
    """Run (or resume) one study arm; never raises, reports what happened. ``token``: the
    sweep's, which stops the run at its next iteration once the sweep asks
    (:func:`protocols.runstate.request_stop`)."""
    from protocols import runstate
    from protocols.study import run_study
    from protocols.train import TrainingDiverged

    runstate.VERBOSE = False  # the workers' phase messages would only interleave
    result = {"run": cfg.out, "status": "finished", "message": ""}
    with runstate.stoppable(token):
        if runstate.stop_requested():
            return {"run": cfg.out, **NOT_STARTED}
        try:
            frame = run_study(cfg, data_dir, progress=False)
            if len(frame):
                result["message"] = f"test error {float(frame.iloc[-1].test_error):.4f}"
        except TrainingDiverged as err:
            result.update(status="diverged", message=str(err))
        except KeyboardInterrupt as err:  # the sweep asked; status.json says where it stands
            result.update(status="interrupted", message=str(err))
        except Exception as err:  # a failing run must not stop the sweep
            result.update(status="failed", message=f"{type(err).__name__}: {err}",
                          traceback=traceback.format_exc())
        finally:
            _reset_brian2()
    return result


def populations(configs: list[StudyConfig], size: int) -> list[list[StudyConfig]]:
    """The runs in groups of up to ``size`` of one topology, in plan order."""
    groups: list[list[StudyConfig]] = []
    for topology in dict.fromkeys(c.topology for c in configs):
        same = [c for c in configs if c.topology == topology]
        groups += [same[i:i + size] for i in range(0, len(same), size)]
    return groups


def run_population(cfgs: list[StudyConfig], data_dir: str | None,
                   token: str | None = None) -> list[dict]:
    """Run (or resume) several study arms of one topology as one population: each pre-trains
    alone (arm 'pretrained'), then all fine-tune in lock-step. Never raises; one result per
    run, as :func:`run_one` reports it."""
    from protocols import runstate

    with runstate.stoppable(token):
        if runstate.stop_requested():
            return [{"run": c.out, **NOT_STARTED} for c in cfgs]
        try:
            return _run_population(cfgs, data_dir)
        except KeyboardInterrupt as err:  # during a member's pre-training or between phases
            return [{"run": c.out, "status": "interrupted", "message": str(err)} for c in cfgs]


def _run_population(cfgs: list[StudyConfig], data_dir: str | None) -> list[dict]:
    import contextlib

    from protocols import runstate
    from protocols.datasets import load_dataset
    from protocols.population import Member, train_population
    from protocols.runstate import check_writable, run_guard
    from protocols.study import check_study, prepare_finetuning

    runstate.VERBOSE = False
    results: dict[int, dict] = {}
    members: dict[int, Member] = {}

    def failed(k, err):
        results[k] = {"run": cfgs[k].out, "status": "failed",
                      "message": f"{type(err).__name__}: {err}",
                      "traceback": traceback.format_exc()}

    with contextlib.ExitStack() as stack:
        data = None
        for k, cfg in enumerate(cfgs):
            try:
                cfg, pretrained, excluded, extra = check_study(cfg)
                data = data if data is not None else load_dataset(cfg.dataset, data_dir)
                out = check_writable(Path(cfg.out))
                stack.enter_context(run_guard(out, "the study"))  # held until the end
                with run_guard(out, "the study"):  # records a failure of the preparation
                    tcfg, params, excluded = prepare_finetuning(
                        cfg, out, data, data_dir, pretrained, excluded, extra, False)
                members[k] = Member(tcfg, out, params, excluded, extra)
            except Exception as err:  # a failing run must not stop the others
                failed(k, err)
            finally:
                _reset_brian2()
        if members:
            try:
                outcome = train_population(list(members.values()), data, progress=False)
            except Exception as err:
                for k in members:
                    failed(k, err)
            else:
                for k, r in zip(members, outcome):
                    message = r.message
                    if r.status == "finished" and r.metrics is not None and len(r.metrics):
                        message = f"test error {float(r.metrics.iloc[-1].test_error):.4f}"
                    results[k] = {"run": cfgs[k].out, "status": r.status, "message": message}
    return [results[k] for k in range(len(cfgs))]


def _reset_brian2() -> None:
    """Leave the worker's Brian2 device as new for the next run (pre-training sets it)."""
    if "brian2" in sys.modules:
        from brian2 import device, set_device

        device.reinit()
        device.activate()
        set_device("runtime")


def local_client(workers: int, threads: int):
    """A Dask client on ``workers`` local processes of ``threads`` BLAS/numba threads each: the
    layout a sweep runs in, and the one its ``--dry-run`` calibrates in.

    The worker's environment is set before its process starts, measured on 2 cores
    (docs/sweeps.md):

    * the thread counts, in this process's environment while the workers are spawned (they
      inherit it; put back afterwards): a spawned worker imports numpy and numba while it
      unpickles its entry point, before ``LocalCluster(env=...)`` is applied, so numba kept one
      thread per CPU and two 1-thread workers oversubscribed the cores. Through Dask's
      ``distributed.nanny.pre-spawn-environ`` alone a value already in the shell would win;
    * without Dask's default ``MALLOC_TRIM_THRESHOLD_=65536`` (that config entry set to None;
      a value the user exported stays): setting it turns off glibc's adaptive mmap threshold,
      so every large temporary array of a training step is mapped and unmapped afresh (page
      faults), which made numpy element-wise work 3x slower.

    Together these made a sweep's run 2.4x slower than the same run in a plain process."""
    import dask
    from dask.distributed import Client, LocalCluster

    from protocols.runstate import deferred_interrupts

    env = {var: str(threads) for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                         "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")}
    pre_spawn = {**dask.config.get("distributed.nanny.pre-spawn-environ", {}), **env,
                 "MALLOC_TRIM_THRESHOLD_": None}  # None: not set (glibc's own default)
    before = {var: os.environ.get(var) for var in pre_spawn}
    cluster = client = None
    try:
        # a Ctrl-C while the cluster starts waits until it has started (a half-started
        # LocalCluster fails again in Dask's exit hook), then stops it cleanly
        with deferred_interrupts():
            os.environ.update(env)
            try:
                with dask.config.set({"distributed.nanny.pre-spawn-environ": pre_spawn}):
                    # no dashboard; the scheduler's HTTP routes (health, metrics) on a free
                    # port, not 8787: a second sweep or a --dry-run beside a running sweep
                    # would print Dask's "Port 8787 is already in use" warning
                    cluster = LocalCluster(n_workers=workers, threads_per_worker=1,
                                           processes=True, dashboard_address=None,
                                           scheduler_kwargs={"dashboard_address": ":0"})
            finally:  # this process's environment as it was (the nanny writes into it too)
                for var, value in before.items():
                    if value is None:
                        os.environ.pop(var, None)
                    else:
                        os.environ[var] = value
            client = Client(cluster)
            client.register_plugin(WorkersLeaveCtrlCToTheSweep(), name="lee2018-ctrl-c")
    except BaseException:
        for part in (client, cluster):
            if part is not None:
                part.close()
        raise
    return client


class WorkersLeaveCtrlCToTheSweep(WorkerPlugin):
    """Worker plugin of the local cluster: its processes ignore SIGINT.

    A Ctrl-C in a terminal reaches every process of the sweep. The sweep's process asks each
    run to stop at its next iteration (:func:`sweep`); a worker that took the signal itself would
    instead shut down under its runs (asyncio's handler) or, when the sweep was started in the
    background and SIGINT was ignored before Brian2 was imported, fail in Brian2's handler,
    which calls the ignored disposition as a function. Brian2 is imported first, so that its
    handler is installed before this one replaces it; Brian2's C++ programs inherit the ignore."""

    def setup(self, worker) -> None:
        import signal

        import brian2  # noqa: F401  (installs Brian2's SIGINT handler now, not later)

        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _client(scheduler: str | None, workers: int, threads: int):
    from dask.distributed import Client

    if scheduler:
        return Client(scheduler)
    return local_client(workers, threads)


def sweep(cfg: SweepConfig, scheduler: str | None = None, workers: int = 1, threads: int = 1,
          data_dir: str | None = None, progress: bool = True) -> list[dict]:
    """Run every unfinished point of the grid; return one result per run (skipped included)."""
    from tqdm import tqdm

    configs = plan(cfg)
    results = [{"run": c.out, "status": "skipped", "message": "already finished"}
               for c in configs if _status(c) == "finished"]
    todo = [c for c in configs if _status(c) != "finished"]
    if not todo:
        return results
    with _client(scheduler, workers, threads) as client:
        if cfg.population > 1:
            groups = {f"population-{g[0].out}": g for g in populations(todo, cfg.population)}
            tasks = TaskQueue(client, run_population,
                              [(key, (g, data_dir)) for key, g in groups.items()],
                              window=None if scheduler else workers)
        else:
            groups = {f"run-{c.out}": [c] for c in todo}
            tasks = TaskQueue(client, run_one, [(f"run-{c.out}", (c, data_dir)) for c in todo],
                              window=None if scheduler else workers)
        bar = tqdm(total=len(todo), desc="sweep", unit="run", disable=not progress)
        try:
            _collect(tasks, groups, results, bar)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM (runstate.cli): stop the runs cleanly
            bar.close()
            print("stopping: each running run stops at its next iteration and keeps its "
                  "checkpoint (Ctrl-C again quits at once; its runs then resume from their "
                  "last checkpoint)", file=sys.stderr, flush=True)
            results += [{"run": c.out, **NOT_STARTED} for key in tasks.stop()
                        for c in groups[key]]
            _collect(tasks, groups, results, None)
            raise SweepInterrupted(results) from None
        bar.close()
    return results


class TaskQueue:
    """``fn(*args, token)`` for each ``(key, args)`` on a Dask client, started in this order: at
    most ``window`` submitted at a time (the local cluster's workers), the next as one
    completes; ``window=None`` submits all at once and leaves the order to the cluster (an
    external scheduler, whose adaptive scaling reads its queue). Iterating yields futures as
    they complete. ``token`` names this queue's tasks, so that :meth:`stop` stops only them
    (``fn`` runs under :class:`protocols.runstate.stoppable`).

    Submitting everything to a local cluster let Dask place a second task on each 1-thread
    worker (worker saturation 1.1, and tasks are not queued centrally until a group outnumbers
    the threads twice), where it waited behind a long run while another worker went on to later
    ones: a sweep grown across sessions filled seed 5 before seed 4."""

    def __init__(self, client, fn, tasks: list[tuple[str, tuple]], window: int | None = None):
        from dask.distributed import as_completed

        self.client, self.fn, self.window = client, fn, window
        self.token = uuid.uuid4().hex
        self.waiting = list(tasks)
        self.running = as_completed()
        self._fill()

    def _fill(self) -> None:
        while self.waiting and (self.window is None or self.running.count() < self.window):
            key, args = self.waiting.pop(0)
            self.running.add(self.client.submit(self.fn, *args, self.token, key=key,
                                                pure=False, priority=len(self.waiting)))

    def __iter__(self):
        for future in self.running:
            yield future
            self._fill()

    def stop(self) -> list[str]:
        """Submit nothing more and ask every worker to stop this queue's running tasks at their
        next check (they then complete, and iterating goes on yielding them); returns the keys
        of the tasks never submitted."""
        keys = [key for key, _ in self.waiting]
        self.waiting = []
        self.client.run(_request_stop, self.token)
        return keys


def _collect(pending, groups: dict, results: list, bar) -> None:
    """Append the result of every task as it completes."""
    for future in pending:
        try:
            done = future.result()
        except Exception as err:  # the worker died too often (dask's allowed failures)
            done = [{"run": c.out, "status": "failed",
                     "message": f"worker lost: {type(err).__name__}: {err}"}
                    for c in groups[future.key]]
        for result in done if isinstance(done, list) else [done]:
            results.append(result)
            if bar is not None:
                bar.set_postfix_str(f"{Path(result['run']).name}: {result['status']}")
                bar.update()


def _request_stop(token: str) -> None:
    """On a worker: stop the tasks of the sweep ``token`` (via Client.run)."""
    from protocols.runstate import request_stop

    request_stop(token)


class SweepInterrupted(RunInterrupted):
    """The sweep was stopped; every run it started recorded where it stands."""

    def __init__(self, results: list[dict]):
        self.results = results
        where = [_where(Path(r["run"])) for r in results if r["status"] == "interrupted"]
        super().__init__(f"the sweep was stopped ({_counts(results)}"
                         + (f": {', '.join(where)}" if where else "")
                         + "); rerun the same command to resume")


def _where(run: Path) -> str:
    """'<arm>/<seed> at its checkpoint of iteration N', from the run's status.json."""
    from protocols.runstate import RunError, read_status

    name = "/".join(run.parts[-2:])
    try:
        record = read_status(run) or {}
    except RunError:
        record = {}
    if record.get("iteration") is not None:
        return f"{name} at its checkpoint of iteration {record['iteration']}"
    return f"{name} ({record.get('message', 'no status')})"


def _counts(results: list[dict]) -> str:
    counts: dict[str, int] = {}
    for r in results:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))


def main(argv=None) -> int:
    """The command line; Ctrl-C or SIGTERM stops the runs at their next iteration
    (:func:`sweep`) and exits 130 with one line saying where they stand."""
    return cli(_main, argv)


def _main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m protocols.sweep",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="sweep TOML (see configs/sweep_*.toml)")
    parser.add_argument("--scheduler", help="address of a running Dask scheduler")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                        help="local worker processes (default: half the cores)")
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads per worker")
    parser.add_argument("--data-dir", help="dataset folder (default: protocols.datasets rules)")
    parser.add_argument("--out", help="override the config's out folder, e.g. a committed study "
                             "copy whose unfinished runs kept their checkpoints (analysis.archive)")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the config's seeds")
    parser.add_argument("--arms", nargs="+", choices=("pretrained", "supervised"),
                        help="override the config's arms, e.g. re-run only the arm a changed "
                             "pre-training default affects")
    parser.add_argument("--iterations", type=int,
                        help="override [study.training] iterations (more extends finished runs)")
    parser.add_argument("--array-module", choices=("numpy", "cupy"),
                        help="override [study.training] array_module, e.g. run a GPU config on "
                             "CPUs; runs may resume on the other one")
    parser.add_argument("--population", type=int,
                        help="override population: runs per task, fine-tuned in lock-step "
                             "(protocols/population.py; for a GPU; 1: one run per task)")
    parser.add_argument("--dry-run", action="store_true",
                        help="list the runs and their status, then calibrate on this machine "
                             "and estimate the sweep's wall time (protocols/estimate.py)")
    parser.add_argument("--no-estimate", action="store_true",
                        help="with --dry-run: only list, no calibration")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, SweepConfig)
    except ConfigError as err:
        print(f"configuration error: {err}", file=sys.stderr)
        return 2
    try:
        if args.out:
            cfg = dataclasses.replace(cfg, out=args.out)
        if args.seeds:
            cfg = dataclasses.replace(cfg, seeds=tuple(args.seeds))
        if args.arms:
            cfg = dataclasses.replace(cfg, arms=tuple(args.arms))
        if args.iterations is not None:
            cfg = dataclasses.replace(cfg, study=dataclasses.replace(
                cfg.study, training=dataclasses.replace(cfg.study.training,
                                                        iterations=args.iterations)))
        if args.population is not None:
            cfg = dataclasses.replace(cfg, population=args.population)
        if args.array_module is not None:
            cfg = dataclasses.replace(cfg, study=dataclasses.replace(
                cfg.study, training=dataclasses.replace(cfg.study.training,
                                                        array_module=args.array_module)))
    except ValueError as err:
        print(f"configuration error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        configs = plan(cfg)
        for c in configs:
            print(f"{_status(c):>10}  {c.out}")
        todo = [c for c in configs if _status(c) != "finished"]
        if todo and not args.no_estimate:
            from protocols.estimate import estimate

            estimate(todo, args.workers, args.threads, args.data_dir)
        return 0
    results = sweep(cfg, args.scheduler, args.workers, args.threads, args.data_dir,
                    progress=not args.no_progress)
    print("sweep: " + _counts(results))
    failed = [r for r in results if r["status"] in ("failed", "diverged")]
    for r in failed:
        print(f"  {r['status']}: {r['run']}: {r['message']}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
