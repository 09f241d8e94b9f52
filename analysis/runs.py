"""Read finished (or running) study runs into one tidy table.

A run directory (written by :mod:`protocols.train`) holds ``config.json`` and ``metrics.csv``;
:func:`load_runs` finds every one below a root and returns one row per run and logged iteration
with the columns of ``metrics.csv`` plus ``run`` (its path relative to the root), ``topology``,
``arm``, ``init``, ``seed`` and ``status`` (from ``status.json``).
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


def run_info(run_dir: Path) -> dict:
    """Identity of a run from its ``config.json`` and ``status.json``."""
    path = run_dir / "config.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise RunsError(f"{path}: cannot read the run's record ({err})") from None
    status_path = run_dir / "status.json"
    status = json.loads(status_path.read_text())["status"] if status_path.exists() else "unknown"
    return {"topology": record["config"]["topology"], "arm": record.get("arm", "unknown"),
            "init": record.get("init", "unknown"), "seed": int(record["seed"]), "status": status}


def load_runs(root: str | Path) -> pd.DataFrame:
    """All runs below ``root`` as one tidy table (see module docstring)."""
    root = Path(root)
    frames = []
    for run_dir in run_directories(root):
        metrics = pd.read_csv(run_dir / "metrics.csv")
        info = run_info(run_dir)
        frames.append(metrics.assign(run=str(run_dir.relative_to(root)), **info))
    if not frames:
        raise RunsError(f"no run directories (with metrics.csv) below {root}")
    return pd.concat(frames, ignore_index=True)
