"""Copy a sweep's runs into ``results/`` as a compact record: everything but the FC weights.

A committed study keeps, per run, what its report reads: ``config.json`` (the full config,
versions, commit, seed), ``metrics.csv``, ``status.json``, the pre-training record
(``pretrain/``) and the conv layers of its first and last weights, as ``initial_conv.npz``
and ``final_conv.npz`` (every ``conv<n>_*`` array: kernels and thresholds). The FC weights,
checkpoints, locks and per-run figures stay behind: they are most of a run's bytes (a deep
run's FC layers are 160,000 of its 188,000 weights) and are regenerated exactly by re-running
the run's command. [choice] The repository must stay small enough to travel to a GPU machine
with its working tree (64 MiB); ``--full-weights`` keeps ``initial.npz`` / ``final.npz`` whole.

A run that has not ended (``status.json`` says ``running`` or ``interrupted``) keeps what resuming
it reads whole: ``checkpoint.npz``, and ``initial.npz`` where the run uses threshold homeostasis
(its targets are recomputed from the initial weights; otherwise the conv layers of
``initial.npz`` are kept, as for an ended run), so a study that one session or machine
could not finish is committed and grown by the next: ``python -m protocols.sweep --config C
--out <the committed runs folder>`` resumes every such run where it stopped, bit for bit, then
``--in-place`` slims what has finished. ``--resumable`` keeps that state for finished runs too,
so that a larger ``--iterations`` extends them from their end (a compact finished run would be
trained again from iteration 0: the same numbers, seeded, at the full cost).

:func:`weights_path` finds a run's weights in either form, so the report, the ablation
summary and the kernel pictures read archived and live runs alike.

Run::

    python -m analysis.archive runs/sweep_shallow_gpu_pcg64 --out results/shallow_mnist_defaults/runs
    python -m analysis.archive results/old_study/runs --in-place   # slim a committed copy
    python -m analysis.archive runs/deep --out results/deep_mnist/runs --resumable
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from protocols.records import NpzError, atomic_savez, load_npz
from protocols.runstate import RunError, read_status

#: the records copied as they are (the pre-training folder whole)
RECORDS = ("config.json", "metrics.csv", "status.json")
WEIGHTS = ("initial", "final")
#: what resuming or extending a run reads besides its records (protocols.train.RunState);
#: initial.npz only under threshold homeostasis (protocols.train.homeostasis_targets)
RESUME_STATE = ("checkpoint.npz", "initial.npz")
#: the statuses of a run that has ended (any other, e.g. running or interrupted: the same
#: command resumes it)
ENDED = ("finished", "diverged", "failed")


def weights_path(run_dir: str | Path, which: str) -> Path | None:
    """``<which>.npz`` of a run, else its archived ``<which>_conv.npz``, else None."""
    for name in (f"{which}.npz", f"{which}_conv.npz"):
        path = Path(run_dir) / name
        if path.exists():
            return path
    return None


def conv_arrays(arrays: dict) -> dict:
    """The conv layers' arrays (``conv<n>_kernels``, ``conv<n>_thresholds``, ...)."""
    return {k: v for k, v in arrays.items() if k.startswith("conv")}


def run_folders(root: Path) -> list[Path]:
    """Folders below ``root`` (or ``root`` itself) that hold a run's ``metrics.csv``."""
    return sorted(p.parent for p in root.rglob("metrics.csv"))


def keeps_resume_state(run_dir: Path, resumable: bool = False) -> bool:
    """Whether the archive keeps ``run_dir``'s checkpoint and initial weights whole: it has a
    checkpoint and has not ended (or ``resumable`` asks for every run with a checkpoint)."""
    if not (run_dir / "checkpoint.npz").exists():
        return False
    try:
        status = (read_status(run_dir) or {}).get("status")
    except RunError:
        status = None  # an unreadable status: keep what can resume the run
    return resumable or status not in ENDED


def resume_state(run_dir: Path) -> tuple[str, ...]:
    """The files of :data:`RESUME_STATE` that resuming ``run_dir`` reads: its checkpoint, and
    its whole initial weights only when ``bp.threshold_homeostasis`` is on (or the record
    cannot say). [choice] A deep run's initial FC weights are 0.75 MB that nothing else reads."""
    try:
        bp = json.loads((run_dir / "config.json").read_text())["config"]["bp"]
        homeostasis = float(bp.get("threshold_homeostasis", 0.0)) > 0
    except (OSError, ValueError, KeyError, TypeError):
        homeostasis = True  # an unreadable record: keep whatever might be needed
    return RESUME_STATE if homeostasis else ("checkpoint.npz",)


def archive_run(source: Path, target: Path, full_weights: bool = False,
                resumable: bool = False) -> list[str]:
    """Write ``source``'s records and weights into ``target`` (may be ``source``: in place);
    returns the files written (in place: kept, slimmed or removed)."""
    target.mkdir(parents=True, exist_ok=True)
    in_place = target.resolve() == source.resolve()
    written = []
    kept = []
    if keeps_resume_state(source, resumable):
        kept = [name for name in resume_state(source) if (source / name).exists()]
        for name in kept:
            if not in_place:
                shutil.copy2(source / name, target / name)
            written.append(f"{name} (kept whole: resumable)")
    elif in_place and (source / "checkpoint.npz").exists():
        (source / "checkpoint.npz").unlink()
        written.append("checkpoint.npz (removed: the run has ended)")
    if not in_place:
        for name in RECORDS:
            if (source / name).exists():
                shutil.copy2(source / name, target / name)
                written.append(name)
        if (source / "pretrain").is_dir():
            shutil.copytree(source / "pretrain", target / "pretrain", dirs_exist_ok=True)
            written.append("pretrain/")
    for which in WEIGHTS:
        full = source / f"{which}.npz"
        if not full.exists() or full.name in kept:
            continue
        if full_weights:
            if not in_place:
                shutil.copy2(full, target / full.name)
                written.append(full.name)
            continue
        arrays = conv_arrays(load_npz(full))
        if not arrays:
            raise NpzError(f"{full} holds no conv layer to keep; archive it with --full-weights")
        atomic_savez(target / f"{which}_conv.npz", arrays)
        written.append(f"{which}_conv.npz")
        if in_place:
            full.unlink()
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.archive",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="a sweep's output folder (or one run folder)")
    parser.add_argument("--out", type=Path, help="where the runs go, same relative paths")
    parser.add_argument("--in-place", action="store_true",
                        help="replace initial.npz / final.npz under SOURCE by their conv layers")
    parser.add_argument("--full-weights", action="store_true",
                        help="keep initial.npz / final.npz whole (FC weights too)")
    parser.add_argument("--resumable", action="store_true",
                        help="keep finished runs' resume state too (checkpoint.npz; initial.npz "
                             "under threshold homeostasis), so that more iterations extend them "
                             "(unfinished runs always keep it)")
    args = parser.parse_args(argv)
    if (args.out is None) == (not args.in_place):
        parser.error("give either --out FOLDER or --in-place")
    if args.in_place and args.full_weights and args.resumable:
        parser.error("--in-place with --full-weights and --resumable would change nothing")
    runs = run_folders(args.source) if args.source.is_dir() else []
    if not runs:
        print(f"archive error: no run folder (one with metrics.csv) below {args.source}",
              file=sys.stderr)
        return 2
    for run in runs:
        target = run if args.in_place else args.out / run.relative_to(args.source)
        try:
            written = archive_run(run, target, args.full_weights, args.resumable)
        except NpzError as err:
            print(f"archive error: {err}", file=sys.stderr)
            return 2
        print(f"{target}: {', '.join(written)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
