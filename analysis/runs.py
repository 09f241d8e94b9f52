"""Read finished (or running) study runs into one tidy table.

A run directory (written by :mod:`protocols.train`) holds ``config.json`` and ``metrics.csv``;
:func:`load_runs` finds every one below a root and returns one row per run and logged iteration
with the columns of ``metrics.csv`` plus ``run`` (its path relative to the root), ``topology``,
``arm``, ``init``, ``seed`` and ``status`` (from ``status.json``).

:func:`collect_runs` is the careful reader the report uses: it keeps the runs whose
``status.json`` says ``finished`` (with ``include_unfinished``, also unfinished ones, every run cut
at the last iteration all of them reached) and lists every other run folder it found with the
reason it was left out: diverged, unfinished (interrupted, failed, still running, or dead while
running), or unreadable (the file and what is wrong with it). One broken run never stops it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd


class RunsError(ValueError):
    """No runs, or a run directory that cannot be read."""


def run_directories(root: str | Path) -> list[Path]:
    """Every directory below ``root`` (itself included) that holds a ``metrics.csv``."""
    root = Path(root)
    if not root.is_dir():
        raise RunsError(f"{root} is not a directory of runs")
    return sorted(p.parent for p in root.rglob("metrics.csv"))


def _json(path: Path) -> dict:
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        reason = err.strerror if isinstance(err, OSError) else "not valid JSON"
        raise RunsError(f"{path}: cannot be read ({reason})") from None
    if not isinstance(record, dict):
        raise RunsError(f"{path}: not a JSON object")
    return record


def run_status(run_dir: Path) -> dict:
    """The content of ``status.json`` ({'status': 'unknown'} without one); RunsError naming the
    file when it cannot be read."""
    path = run_dir / "status.json"
    if not path.exists():
        return {"status": "unknown"}
    record = _json(path)
    if "status" not in record:
        raise RunsError(f"{path}: has no 'status'")
    return record


def run_info(run_dir: Path) -> dict:
    """Identity of a run from its ``config.json`` and ``status.json``."""
    path = run_dir / "config.json"
    record = _json(path)
    try:
        info = {"topology": record["config"]["topology"], "arm": record.get("arm", "unknown"),
                "init": record.get("init", "unknown"), "seed": int(record["seed"])}
    except (KeyError, TypeError, ValueError) as err:
        raise RunsError(f"{path}: not a run record of protocols.train (no {err})") from None
    return {**info, "status": run_status(run_dir)["status"]}


def read_metrics(run_dir: Path) -> pd.DataFrame:
    """``metrics.csv`` of a run, checked to have the columns the analysis needs."""
    path = run_dir / "metrics.csv"
    try:
        metrics = pd.read_csv(path)
    except FileNotFoundError:
        raise RunsError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, ValueError, pd.errors.ParserError) as err:
        raise RunsError(f"{path}: cannot be read as CSV ({' '.join(str(err).split())})") from None
    needed = ("iteration", "test_error", "train_error", "test_nll", "train_nll")
    missing = [c for c in needed if c not in metrics.columns]
    if missing:
        raise RunsError(f"{path}: lacks the column{'s' if len(missing) > 1 else ''} "
                        f"{', '.join(missing)}")
    if not len(metrics) or not pd.api.types.is_numeric_dtype(metrics["iteration"]) or \
            not pd.api.types.is_numeric_dtype(metrics["test_error"]):
        raise RunsError(f"{path}: no rows, or non-numeric iteration or test_error values")
    return metrics


def _candidates(root: Path) -> list[Path]:
    """Every folder below ``root`` that looks like a run folder of protocols.train."""
    found = set()
    for name in ("metrics.csv", "config.json", "status.json", "checkpoint.npz"):
        found.update(p.parent for p in root.rglob(name))
    return sorted(found)


def _alive(run_dir: Path) -> bool:
    from protocols.runstate import RunLock

    lock = RunLock(run_dir)
    owner = lock._owner()
    return bool(owner) and lock._alive(owner)


def collect_runs(root: str | Path, include_unfinished: bool = False,
                 seeds: list[int] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(table, left_out): the runs below ``root`` fit to report, as :func:`load_runs` gives
    them, and one row per run folder left out, with ``run``, ``status`` and ``reason``.

    Default: finished runs only. ``include_unfinished``: unfinished runs too, and every run cut
    at the last iteration all of them reached (the ``truncated_at`` attribute of the table).
    ``seeds``: only runs of these seeds (matched seeds while one arm of a study is still
    growing); the others are listed as left out, and do not set the common iteration."""
    root = Path(root)
    if not root.is_dir():
        raise RunsError(f"{root} is not a directory of runs")
    frames, left = [], []
    for run_dir in _candidates(root):
        name = str(run_dir.relative_to(root)) or "."
        try:
            status = run_status(run_dir)
            info = run_info(run_dir)
            metrics = read_metrics(run_dir)
        except RunsError as err:
            left.append({"run": name, "status": "unreadable", "reason": str(err)})
            continue
        if seeds is not None and int(info["seed"]) not in seeds:
            left.append({"run": name, "status": "not selected",
                         "reason": f"seed {info['seed']} is not among --seeds"})
            continue
        state = status["status"]
        last = int(metrics["iteration"].max())
        if state == "diverged":
            left.append({"run": name, "status": "diverged",
                         "reason": f"diverged at iteration {status.get('iteration', '?')}: "
                                   f"{status.get('reason') or status.get('message', '')}"})
            continue
        if state != "finished":
            if state == "running":
                state = "running" if _alive(run_dir) else "dead while running"
            if not include_unfinished:
                left.append({"run": name, "status": state,
                             "reason": f"unfinished ({state}), last evaluation at iteration "
                                       f"{last}; --include-unfinished reports it, cut at a "
                                       f"common iteration"})
                continue
        frames.append(metrics.assign(run=name, **{**info, "status": state}))
    left_out = pd.DataFrame(left, columns=["run", "status", "reason"])
    if not frames:
        raise RunsError(f"no finished runs below {root}" + (
            f" ({len(left)} left out: " + "; ".join(f"{r['run']}: {r['reason']}" for r in left)
            + ")" if left else " (no run folders with metrics.csv)"))
    table = pd.concat(frames, ignore_index=True)
    if include_unfinished:
        common = int(table.groupby("run")["iteration"].max().min())
        table = table[table["iteration"] <= common].reset_index(drop=True)
        table.attrs["truncated_at"] = common
    return table, left_out


def load_runs(root: str | Path) -> pd.DataFrame:
    """All runs below ``root`` as one tidy table (see module docstring)."""
    root = Path(root)
    frames = []
    for run_dir in run_directories(root):
        metrics = read_metrics(run_dir)
        info = run_info(run_dir)
        frames.append(metrics.assign(run=str(run_dir.relative_to(root)), **info))
    if not frames:
        raise RunsError(f"no run directories (with metrics.csv) below {root}")
    return pd.concat(frames, ignore_index=True)
