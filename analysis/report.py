"""Figures and tables of a set of study runs: the paper's Fig. 4/5/6/8 and Tables 2/4/5.

Run::

    python -m analysis.report RUNS_ROOT --out results/ [--threshold 0.02 [0.01 ...]]
        [--at 600 1200 3000] [--nll-window 2000 3000]

writes, under ``--out``: ``error_curves.{png,svg}`` (test error vs iteration as Fig. 4/5: a
linear iteration axis from 0, ``--log-x`` for a log one; every seed, each arm's mean ± 95 % CI,
each run's first crossing of the first threshold), ``nll.{png,svg}`` (test vs train
NLL), ``kernels_<arm>.{png,svg}`` (first-layer kernels at the end of one run per arm, Fig. 6;
``kernels_<arm>_conv2`` etc. for deeper conv layers),
and the tables ``iterations_to_threshold`` (per run and threshold), ``threshold_summary`` (per
arm and threshold: runs that reach it, the median over all runs, mean ± std of the iterations of
those that reach it), ``paired_thresholds`` (matched seeds: which arm got there first),
``error_summary`` (mean, std, bootstrap 95 % CI),
``variance_test`` (Brown–Forsythe), ``final_costs`` (NLL averaged over a window) and ``drift``
(per run: mean test error over the last ``--drift-window`` iterations minus the lowest over any
such window; the same for the train error, and each layer's growth in spikes and weight norm
since the best window), each as CSV and Markdown; for runs that logged them, ``layer_diagnostics.{png,svg}`` (per-layer relative
step, spikes, silent and saturated fractions, kernel means over iterations) and the table of
their means at the ``--at`` iterations.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import figures, stats
from analysis.archive import weights_path
from analysis.kernels import kernel_grid
from analysis.layer_diagnostics import (QUANTITIES, diagnostics_figure, diagnostics_table,
                                       layer_columns)
from analysis.runs import RunsError, collect_runs
from protocols.records import NpzError, load_npz


def write_table(table: pd.DataFrame, out: Path, name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / f"{name}.csv", index=False, float_format="%.6g")
    (out / f"{name}.md").write_text(table.to_markdown(index=False, floatfmt=".4g") + "\n")


def kernel_figures(table: pd.DataFrame, root: Path, out: Path) -> list[Path]:
    """Every conv layer's final kernels of the lowest-seed finished run of each arm:
    ``kernels_<arm>`` for conv 1 (Fig. 6), ``kernels_<arm>_conv<n>`` for the deeper ones (each
    tile the mean over the map's input channels)."""
    written = []
    for (arm, topology), runs in table.groupby(["arm", "topology"], sort=True):
        run = runs.sort_values("seed")["run"].iloc[0]
        final = weights_path(root / run, "final")
        if final is None:
            continue
        try:
            arrays = load_npz(final)
        except NpzError as err:  # one unreadable file does not stop the report
            print(f"kernel figure of {arm} left out: {err}", file=sys.stderr)
            continue
        seed = int(runs.sort_values("seed")["seed"].iloc[0])
        layer = 1
        while f"conv{layer}_kernels" in arrays:
            kernels = arrays[f"conv{layer}_kernels"]
            what = "kernels" if layer == 1 else "kernels, mean over input maps"
            figure = kernel_grid(kernels, title=f"{topology} · {arm} · seed {seed}: "
                                               f"conv{layer} {what}")
            suffix = "" if layer == 1 else f"_conv{layer}"
            written += figures.save(figure, out / f"kernels_{arm}{suffix}")
            layer += 1
    return written


def drift_table(table: pd.DataFrame, window: int) -> pd.DataFrame:
    """:func:`analysis.stats.drift` of the test error, with, where the runs logged them, the
    same of the train error (``train_drift``: a worse fit, not overfitting, when it rises too)
    and how much each layer's spikes per image and weight norm grew from the end of the best
    test window to the end of the run (``<layer>_spikes_growth``, ``<layer>_wnorm_growth``)."""
    result = stats.drift(table, window)
    if "train_error" in table and table["train_error"].notna().any():
        train = stats.drift(table, window, "train_error")[["run", "drift"]]
        result = result.merge(train.rename(columns={"drift": "train_drift"}), on="run",
                              how="left")
    columns = layer_columns(table, "spikes") + layer_columns(table, "wnorm")
    if columns and "best_window_end" in result:
        grown = stats.growth_since(table, result.set_index("run")["best_window_end"], columns)
        result = result.merge(grown, on="run", how="left")
    return result


def report(root: Path, out: Path, threshold: float | list[float], at: list[int],
           nll_window: tuple[int, int] | None, include_unfinished: bool = False,
           log_x: bool = False, drift_window: int = 1000,
           seeds: list[int] | None = None) -> dict[str, pd.DataFrame]:
    """The tables (written with the figures under ``out``); ``left_out`` lists the run folders
    not reported and why (see analysis.runs.collect_runs). ``threshold``: one target error or
    several (the first is marked in the error curves). ``seeds``: only runs of these seeds."""
    thresholds = [threshold] if np.isscalar(threshold) else list(threshold)
    if not thresholds:
        raise ValueError("give at least one threshold")
    table, left_out = collect_runs(root, include_unfinished, seeds)
    left_out.attrs["truncated_at"] = table.attrs.get("truncated_at")
    last = int(table["iteration"].max())
    window = nll_window or (int(0.8 * last), last)
    crossings = pd.concat([stats.iterations_to_threshold(table, t).assign(threshold=t)
                           for t in thresholds], ignore_index=True)
    crossings = crossings[["threshold"] + [c for c in crossings if c != "threshold"]]
    tables = {
        "iterations_to_threshold": crossings,
        "threshold_summary": stats.threshold_summary(crossings),
        "paired_thresholds": stats.paired_thresholds(crossings),
        "error_summary": stats.error_summary(table, at),
        "variance_test": pd.concat([stats.variance_test(table, i) for i in at], ignore_index=True),
        "final_costs": stats.final_costs(table, window),
        "drift": drift_table(table, drift_window),
        "left_out": left_out,
    }
    for name, frame in tables.items():
        write_table(frame, out, name)
    figures.save(figures.error_curves(table, thresholds[0], log_x=log_x,
                                      other_thresholds=thresholds[1:]), out / "error_curves")
    figures.save(figures.nll_trajectories(table), out / "nll")
    if any(layer_columns(table, q) for q in QUANTITIES):  # runs made with the diagnostics
        tables["layer_diagnostics"] = diagnostics_table(table, at, ["topology", "init", "arm"])
        write_table(tables["layer_diagnostics"], out, "layer_diagnostics")
        figures.save(diagnostics_figure(table), out / "layer_diagnostics")
    kernel_figures(table, root, out)
    return tables


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.report",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="folder holding run directories")
    parser.add_argument("--out", type=Path, required=True, help="folder for figures and tables")
    parser.add_argument("--threshold", type=float, nargs="+", default=[0.02],
                        help="target test error(s) as a fraction (paper: 0.02 shallow, 0.01 "
                             "deep); the first is marked in the error curves")
    parser.add_argument("--at", type=int, nargs="+", default=[600, 1200, 3000],
                        help="iterations at which to summarise the error across seeds")
    parser.add_argument("--nll-window", type=int, nargs=2, metavar=("FROM", "TO"),
                        help="iterations to average final NLL over (default: last 20 %%)")
    parser.add_argument("--drift-window", type=int, default=1000,
                        help="iterations per window of the drift table: mean test error over "
                             "the last window minus the lowest over any window (default 1000)")
    parser.add_argument("--include-unfinished", action="store_true",
                        help="also report unfinished runs (interrupted, failed, running), every "
                             "run cut at the last iteration all of them reached; diverged and "
                             "unreadable runs are always left out")
    parser.add_argument("--seeds", type=int, nargs="+",
                        help="only runs of these seeds, e.g. the seeds both arms have while one "
                             "arm of a study is still growing (the others are listed as left out)")
    parser.add_argument("--log-x", action="store_true",
                        help="logarithmic iteration axis in error_curves (default: linear, "
                             "as the paper's Fig. 4/5, from iteration 0)")
    args = parser.parse_args(argv)
    try:
        tables = report(args.root, args.out, args.threshold, args.at,
                        tuple(args.nll_window) if args.nll_window else None,
                        args.include_unfinished, args.log_x, args.drift_window, args.seeds)
    except RunsError as err:
        print(f"report error: {err}", file=sys.stderr)
        return 2
    for name, frame in tables.items():
        print(f"\n## {name}\n")
        print(frame.to_markdown(index=False, floatfmt=".4g"))
    left = tables["left_out"]
    if len(left):
        print(f"\nleft out {len(left)} run folder(s) (also in left_out.csv):", file=sys.stderr)
        for row in left.itertuples():
            print(f"  {row.status}: {row.run}: {row.reason}", file=sys.stderr)
    truncated = left.attrs.get("truncated_at")
    if args.include_unfinished:
        print(f"\nevery run cut at iteration {truncated}", file=sys.stderr)
    print(f"\nwrote figures and tables to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
