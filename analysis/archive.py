"""Copy a sweep's runs into ``results/`` as a compact record: everything but the FC weights.

A committed study keeps, per run, what its report reads: ``config.json`` (the full config,
versions, commit, seed), ``metrics.csv``, ``status.json``, the pre-training record
(``pretrain/``) and the conv layers of its first and last weights, as ``initial_conv.npz``
and ``final_conv.npz`` (every ``conv<n>_*`` array: kernels and thresholds). The FC weights,
checkpoints, locks and per-run figures stay behind: they are most of a run's bytes (a deep
run's FC layers are 160,000 of its 188,000 weights) and are regenerated exactly by re-running
the run's command. [choice] The repository must stay small enough to travel to a GPU machine
with its working tree (64 MiB); ``--full-weights`` keeps ``initial.npz`` / ``final.npz`` whole.

:func:`weights_path` finds a run's weights in either form, so the report, the ablation
summary and the kernel pictures read archived and live runs alike.

Run::

    python -m analysis.archive runs/sweep_shallow_gpu_pcg64 --out results/shallow_mnist_defaults/runs
    python -m analysis.archive results/old_study/runs --in-place   # slim a committed copy
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from protocols.records import NpzError, atomic_savez, load_npz

#: the records copied as they are (the pre-training folder whole)
RECORDS = ("config.json", "metrics.csv", "status.json")
WEIGHTS = ("initial", "final")


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


def archive_run(source: Path, target: Path, full_weights: bool = False) -> list[str]:
    """Write ``source``'s records and weights into ``target`` (may be ``source``: in place);
    returns the files written."""
    target.mkdir(parents=True, exist_ok=True)
    in_place = target.resolve() == source.resolve()
    written = []
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
        if not full.exists():
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
    args = parser.parse_args(argv)
    if (args.out is None) == (not args.in_place):
        parser.error("give either --out FOLDER or --in-place")
    if args.in_place and args.full_weights:
        parser.error("--in-place with --full-weights would change nothing")
    runs = run_folders(args.source) if args.source.is_dir() else []
    if not runs:
        print(f"archive error: no run folder (one with metrics.csv) below {args.source}",
              file=sys.stderr)
        return 2
    for run in runs:
        target = run if args.in_place else args.out / run.relative_to(args.source)
        try:
            written = archive_run(run, target, args.full_weights)
        except NpzError as err:
            print(f"archive error: {err}", file=sys.stderr)
            return 2
        print(f"{target}: {', '.join(written)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
