"""Figures and tables of a set of study runs: the paper's Fig. 4/5/6/8 and Tables 2/4/5.

Run::

    python -m analysis.report RUNS_ROOT --out results/ [--threshold 0.02]
        [--at 600 1200 3000] [--nll-window 2000 3000]

writes, under ``--out``: ``error_curves.{png,svg}`` (test error vs iteration per seed and arm,
log axes, with each run's first crossing of the threshold), ``nll.{png,svg}`` (test vs train
NLL), ``kernels_<arm>.{png,svg}`` (first-layer kernels at the end of one run per arm, Fig. 6),
and the tables ``iterations_to_threshold`` (per run), ``threshold_summary`` (per arm: runs that
reach the threshold, mean ± std of their iterations), ``error_summary`` (mean, std, bootstrap
95 % CI),
``variance_test`` (Brown–Forsythe) and ``final_costs`` (NLL averaged over a window), each as
CSV and Markdown.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import figures, stats
from analysis.kernels import kernel_grid
from analysis.runs import load_runs


def write_table(table: pd.DataFrame, out: Path, name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / f"{name}.csv", index=False, float_format="%.6g")
    (out / f"{name}.md").write_text(table.to_markdown(index=False, floatfmt=".4g") + "\n")


def kernel_figures(table: pd.DataFrame, root: Path, out: Path) -> list[Path]:
    """First conv layer's final kernels of the lowest-seed finished run of each arm."""
    written = []
    for (arm, topology), runs in table.groupby(["arm", "topology"], sort=True):
        run = runs.sort_values("seed")["run"].iloc[0]
        final = root / run / "final.npz"
        if not final.exists():
            continue
        with np.load(final, allow_pickle=False) as arrays:
            if "conv1_kernels" not in arrays.files:
                continue
            kernels = arrays["conv1_kernels"]
        seed = int(runs.sort_values("seed")["seed"].iloc[0])
        figure = kernel_grid(kernels, title=f"{topology} · {arm} · seed {seed}: conv1 kernels")
        written += figures.save(figure, out / f"kernels_{arm}")
    return written


def report(root: Path, out: Path, threshold: float, at: list[int],
           nll_window: tuple[int, int] | None) -> dict[str, pd.DataFrame]:
    table = load_runs(root)
    last = int(table["iteration"].max())
    window = nll_window or (int(0.8 * last), last)
    crossings = stats.iterations_to_threshold(table, threshold)
    tables = {
        "iterations_to_threshold": crossings,
        "threshold_summary": stats.threshold_summary(crossings),
        "error_summary": stats.error_summary(table, at),
        "variance_test": pd.concat([stats.variance_test(table, i) for i in at], ignore_index=True),
        "final_costs": stats.final_costs(table, window),
    }
    for name, frame in tables.items():
        write_table(frame, out, name)
    figures.save(figures.error_curves(table, threshold), out / "error_curves")
    figures.save(figures.nll_trajectories(table), out / "nll")
    kernel_figures(table, root, out)
    return tables


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="folder holding run directories")
    parser.add_argument("--out", type=Path, required=True, help="folder for figures and tables")
    parser.add_argument("--threshold", type=float, default=0.02,
                        help="target test error as a fraction (paper: 0.02 shallow, 0.01 deep)")
    parser.add_argument("--at", type=int, nargs="+", default=[600, 1200, 3000],
                        help="iterations at which to summarise the error across seeds")
    parser.add_argument("--nll-window", type=int, nargs=2, metavar=("FROM", "TO"),
                        help="iterations to average final NLL over (default: last 20 %%)")
    args = parser.parse_args(argv)
    tables = report(args.root, args.out, args.threshold, args.at,
                    tuple(args.nll_window) if args.nll_window else None)
    for name, frame in tables.items():
        print(f"\n## {name}\n")
        print(frame.to_markdown(index=False, floatfmt=".4g"))
    print(f"\nwrote figures and tables to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
