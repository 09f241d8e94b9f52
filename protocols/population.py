"""A population of fine-tuning runs advanced in lock-step by one process (issue #14).

Members are independent runs of one topology (different seeds, arms, initialisations, learning
rates): each keeps its own run folder, written by the same :class:`protocols.train.TrainingRun`
as a single run, so it holds the same files with the same contents (``wall_time_s`` aside), its
own RNG streams (derived from its seed and iteration), checkpoints and metrics; a member's
folder can be resumed or extended by :func:`protocols.train.train` and the other way round.

At every lock-step iteration each live member takes one SGD iteration of its own. On the
array-module path (``backend='xp'``, or CuPy) the members whose iteration has the same
presentation length T run as one batched forward and backward pass
(:mod:`models.batched_population`, :mod:`protocols.bp_population`): one matrix product per
layer over all members, which on a GPU makes one kernel of R small ones. On the compiled CPU
path (numba) the members run one after the other inside the same loop: the sweep already runs
one process per core there, so a population gives no speed on a CPU, only the same results.
Evaluations are batched the same way.

Results: on the CPU a member's metrics and weights equal its single run's bit for bit (numba:
the same calls; NumPy array path: the same matrix products, shape for shape). On a GPU they
agree within float32 rounding (cuBLAS's batched products may sum in another order).

Members may be at different iterations (resumed from their checkpoints at different points):
each advances from its own iteration, so a laggard never catches up but runs alongside; a
member that finishes, diverges (same status.json as a single run) or was already finished
leaves the population without disturbing the others.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from models.batched import _HAVE_NUMBA, forward
from models.batched_population import forward_population, member
from protocols.bp import backward, tau_steps
from protocols.bp_population import backward_population
from protocols.diagnostics import ActivityTally
from protocols.encoding import n_steps
from protocols.runstate import RunInterrupted, check_interrupt, run_guard, say
from protocols.train import (TrainConfig, TrainingDiverged, TrainingRun, _duration, blas_limit,
                             draw_input, score_batch)


@dataclass(frozen=True)
class Member:
    """One run of a population: what :func:`protocols.train.train` takes for it."""

    cfg: TrainConfig
    run_dir: str | Path
    initial_params: Sequence | None = None
    excluded: Sequence[int] = ()
    extra_record: dict | None = None


@dataclass
class MemberResult:
    """How a member left :func:`train_population`: ``finished``, ``stopped`` (``stop_after``),
    ``diverged`` or ``failed`` (its folder refused: the message says why and how to fix)."""

    run_dir: Path
    status: str
    message: str = ""
    metrics: object = None  # the metrics table (pandas), when the member got that far


#: (section, key) that every member must share: they shape the batched passes or the lock-step
SHARED = (("topology",), ("bp", "batch_size"), ("bp", "t_first_epoch"),
          ("bp", "t_later_epochs"), ("bp", "tau_p"), ("bp", "derivative"),
          ("bp", "silent_units"), ("bp", "activation_norm"), ("bp", "conv_reduction"),
          ("lif",), ("pooling",), ("training", "dtype"), ("training", "array_module"),
          ("training", "backend"), ("training", "eval_duration"),
          ("training", "train_eval_images"), ("training", "test_eval_images"),
          ("training", "test_subset"), ("training", "blas_threads"))


def check_members(members: Sequence[Member]) -> None:
    """Raise a one-line ValueError when the members cannot run as one population."""
    if not members:
        raise ValueError("a population needs at least one member")
    dirs = [Path(m.run_dir).resolve() for m in members]
    if len(set(dirs)) != len(dirs):
        raise ValueError("two population members share a run folder; give each its own")
    first = members[0].cfg
    for k, m in enumerate(members[1:], start=1):
        for path in SHARED:
            a, b = first, m.cfg
            for key in path:
                a, b = getattr(a, key), getattr(b, key)
            if a != b:
                name = ".".join(path)
                raise ValueError(f"population members differ in {name}: {a!r} (member 0, "
                                 f"{members[0].run_dir}) vs {b!r} (member {k}, {m.run_dir}); "
                                 f"put runs that differ in {name} in separate populations")


def batched(cfg: TrainConfig) -> bool:
    """Whether a population of ``cfg`` runs its members as one batched pass (the array-module
    path) rather than one after the other (the compiled CPU loop)."""
    t = cfg.training
    return not (t.backend == "numba" or (t.backend == "auto" and t.array_module == "numpy"
                                         and _HAVE_NUMBA))


def train_population(members: Sequence[Member], data, progress: bool = True,
                     stop_after: int | None = None) -> list[MemberResult]:
    """Train (or resume) every member in lock-step on ``data``; one result per member, in order.

    ``stop_after``: return after this many lock-step iterations of this call (members left
    ``stopped``; a later call resumes them). Every member's folder is locked while the population
    runs. A member whose folder refuses (a different configuration, a corrupt checkpoint) is
    ``failed`` and left as it is; the others run. Ctrl-C marks every live member
    ``interrupted`` and raises RunInterrupted.
    """
    check_members(members)
    with contextlib.ExitStack() as stack:
        for m in members:
            stack.enter_context(run_guard(m.run_dir, "fine-tuning (population)"))
        stack.enter_context(blas_limit(members[0].cfg.training.blas_threads))
        return _train_population(members, data, progress, stop_after)


def _train_population(members, data, progress, stop_after) -> list[MemberResult]:
    from tqdm import tqdm

    results: dict[int, MemberResult] = {}
    runs: dict[int, TrainingRun] = {}
    for k, m in enumerate(members):
        try:
            run = TrainingRun(m.cfg, m.run_dir, data, m.initial_params, m.excluded,
                              m.extra_record)
        except (ValueError, RuntimeError) as err:  # the folder refuses; RunError included
            results[k] = MemberResult(Path(m.run_dir), "failed", f"{type(err).__name__}: {err}")
            continue
        if run.done:
            results[k] = MemberResult(run.run_dir, "finished",
                                      f"already finished {run.total} iterations", run.frame())
        else:
            runs[k] = run
    for k in list(runs):
        try:
            runs[k].begin()
        except (ValueError, RuntimeError) as err:  # e.g. homeostasis without initial.npz
            results[k] = MemberResult(runs.pop(k).run_dir, "failed",
                                      f"{type(err).__name__}: {err}")

    def leave(k: int, err: TrainingDiverged) -> None:
        results[k] = MemberResult(runs[k].run_dir, "diverged", str(err), runs[k].frame())
        del runs[k]

    first = [k for k, run in runs.items() if run.needs_initial_row]
    if first:
        say(f"evaluating the initial networks of {len(first)} population members")
        for k, ev in zip(first, evaluate_members([runs[k] for k in first])):
            try:
                runs[k].record_row(0, 1, ev)
            except TrainingDiverged as err:
                leave(k, err)

    left = sum(run.total - run.iteration for run in runs.values())
    say(f"fine-tuning a population of {len(runs)} runs ({left} member-iterations left)")
    bar = tqdm(total=left, disable=not progress, unit="it", dynamic_ncols=True,
               desc="population")
    done_here = 0
    try:
        while live := [k for k, run in runs.items() if run.iteration < run.total]:
            epoch = dict(zip(live, _iterate([runs[k] for k in live])))
            for k, outcome in epoch.items():
                if isinstance(outcome, TrainingDiverged):
                    leave(k, outcome)
            live = [k for k in live if k in runs]
            due = [k for k in live if runs[k].eval_due()]
            for k, ev in zip(due, evaluate_members([runs[k] for k in due])):
                try:
                    runs[k].record_row(runs[k].iteration, epoch[k], ev)
                except TrainingDiverged as err:
                    leave(k, err)
            for k in live:
                if k in runs:
                    runs[k].checkpoint_if_due()
            bar.update(len(live))
            done_here += 1
            if stop_after is not None and done_here >= stop_after:
                break
            check_interrupt()
    except KeyboardInterrupt:
        bar.close()
        messages = [run.interrupted() for run in runs.values()]
        err = RunInterrupted(f"population interrupted; {len(messages)} members keep their "
                             f"checkpoints: " + " | ".join(messages))
        err.recorded = {Path(m.run_dir).resolve() for m in members}
        raise err from None
    finally:
        bar.close()
    for k, run in runs.items():
        run.finish()
        status = "finished" if run.iteration >= run.total else "stopped"
        results[k] = MemberResult(run.run_dir, status, "", run.frame())
    return [results[k] for k in range(len(members))]


def _iterate(runs: Sequence[TrainingRun]) -> list:
    """One SGD iteration of every run; per run its epoch, or the TrainingDiverged it raised.
    Runs whose presentations have the same length go through one batched pass."""
    cfg = runs[0].cfg
    xp, dtype = runs[0].xp, runs[0].dtype
    drawn = [run.batch(run.iteration) for run in runs]  # (epoch, T, x, y)
    outcomes: list = [None] * len(runs)
    lee2020 = cfg.bp.derivative == "lee2020"
    for T in sorted({d[1] for d in drawn}):
        group = [i for i, d in enumerate(drawn) if d[1] == T]
        if batched(cfg):
            x = xp.stack([drawn[i][2] for i in group], axis=1)
            fwd = forward_population(runs[0].layers, [runs[i].params for i in group], x,
                                     cfg.lif, cfg.pooling, xp=xp, dtype=dtype,
                                     tau_p=runs[0].tau_p, record_trace_m=lee2020,
                                     use_cuda=_use_cuda(cfg, xp))
            grads, stats = backward_population(runs[0].layers, [runs[i].params for i in group],
                                               fwd, [xp.asarray(drawn[i][3]) for i in group],
                                               cfg.bp, cfg.lif, cfg.pooling, xp=xp)
            passes = [(member(fwd, r, len(group)), grads[r], stats[r])
                      for r in range(len(group))]
        else:
            passes = []
            for i in group:  # exactly the single run's calls
                run, c = runs[i], runs[i].cfg
                out = forward(run.layers, run.params, xp.asarray(drawn[i][2]), c.lif,
                              c.pooling, xp=xp, dtype=dtype, tau_p=run.tau_p,
                              keep_spikes=False, backend=c.training.backend,
                              record_trace_m=lee2020)
                passes.append((out, *backward(run.layers, run.params, out,
                                              xp.asarray(drawn[i][3]), c.bp, c.lif,
                                              c.pooling, xp=xp)))
        for i, (out, g, st) in zip(group, passes):
            try:
                runs[i].step(out, g, st)
                outcomes[i] = drawn[i][0]
            except TrainingDiverged as err:
                outcomes[i] = err
    return outcomes


def _use_cuda(cfg: TrainConfig, xp) -> bool:
    return cfg.training.backend == "auto" and xp is not np


def evaluate_members(runs: Sequence[TrainingRun]) -> list[tuple]:
    """:meth:`TrainingRun.evaluate` of every run, as one batched pass per evaluation batch on
    the array-module path (each member draws its own input noise, as a single run does)."""
    if not runs:
        return []
    if not batched(runs[0].cfg):
        return [run.evaluate() for run in runs]
    activity = [ActivityTally(run.layers) for run in runs]
    train = _evaluate(runs, [(run.tr_x, run.tr_y) for run in runs], 0, activity)
    test = _evaluate(runs, [(run.te_x, run.te_y) for run in runs], 1_000_000, None)
    return [(*tr, *te, act) for tr, te, act in zip(train, test, activity)]


def _evaluate(runs, sets, eval_seed_offset: int, activity, batch: int = 100) -> list:
    """:func:`protocols.train.evaluate` of every run on its own (images, labels)."""
    cfg = runs[0].cfg
    xp, dtype = runs[0].xp, runs[0].dtype
    T = n_steps(_duration(cfg.training.eval_duration), cfg.lif.dt)
    tau_p = tau_steps(cfg.bp.tau_p, cfg.lif.dt)
    n = len(sets[0][1])
    R = len(runs)
    wrong = [0] * R
    nll = [0.0] * R
    for j, b0 in enumerate(range(0, n, batch)):
        x = xp.stack([draw_input(run.cfg, images[b0:b0 + batch], T, (3, eval_seed_offset + j),
                                 xp) for run, (images, _) in zip(runs, sets)], axis=1)
        out = forward_population(runs[0].layers, [run.params for run in runs], x,
                                 cfg.lif, cfg.pooling, xp=xp, dtype=dtype, tau_p=tau_p,
                                 record_trace_m=False, hidden_traces=False,
                                 use_cuda=_use_cuda(cfg, xp))
        for r, (_, labels) in enumerate(sets):
            one = member(out, r, R)
            y = labels[b0:b0 + batch]
            if activity is not None:
                activity[r].add(one.count_cl, T)
            w, s = score_batch(one.count_cl[-1], one.trace_p_cl[-1], y, xp)
            wrong[r] += w
            nll[r] += s
    return [(wrong[r] / n, nll[r] / n) for r in range(R)]
