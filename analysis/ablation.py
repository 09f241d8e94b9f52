"""Compare fine-tuning variants: one sweep folder per variant, side by side.

Each sub-folder of ROOT is one variant's sweep (``configs/ablation/<variant>.toml`` writes
``runs/ablation/<variant>/``); ``--variant NAME=FOLDER`` adds a sweep folder from elsewhere (a
committed study with the same settings), and ``--until N`` compares runs of different lengths up
to iteration N. Writes, under ``--out``: ``ablation.{csv,md}`` (per variant and arm:
seeds, test error at the ``--at`` iterations and its best, the runs that reached ``--threshold``
and the median iteration they first did, train error at the last, conv1's
relative kernel change, the per-layer relative steps and their ratio, conv1 spikes per image,
and how many runs collapsed: their output fell silent at an evaluation),
``per_run.{csv,md}`` (the same per run; the summary leaves out, and names, runs that
stopped before the largest ``--at``: diverged or unfinished), ``error_curves.{png,svg}`` (test error per variant, one
panel per arm), ``diagnostics.{png,svg}`` (:mod:`analysis.layer_diagnostics`, one line style
per variant) and ``kernels_<variant>_<arm>.{png,svg}`` (conv1 kernels of the lowest seed).

Run::

    python -m analysis.ablation runs/ablation --out results/ablation_shallow --at 600 1200
        [--variant baseline=results/shallow_mnist_eta3_gpu/runs --until 3000] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import stats
from analysis.archive import weights_path
from analysis.layer_diagnostics import diagnostics_figure, kernel_change
from analysis.report import write_table
from analysis.runs import load_runs
from protocols.records import load_npz


def load_variants(root: Path | None, extra: dict[str, Path] | None = None) -> pd.DataFrame:
    """All runs of every variant folder below ``root`` and of the ``extra`` folders (variant
    name: sweep folder), with ``variant`` and ``run_dir`` (the run's folder) columns."""
    folders = {}
    if root is not None:
        folders.update({p.name: p for p in sorted(Path(root).iterdir()) if p.is_dir()})
    for name, folder in (extra or {}).items():
        if name in folders:
            raise ValueError(f"variant {name!r} is both a folder of {root} and given with "
                             f"--variant; rename one")
        if not Path(folder).is_dir():
            raise ValueError(f"--variant {name}={folder}: no such folder")
        folders[name] = Path(folder)
    frames = []
    for name, folder in sorted(folders.items()):
        if not any(folder.rglob("metrics.csv")):
            continue
        table = load_runs(folder)
        table["run_dir"] = [str(folder / r) for r in table["run"]]
        table["run"] = [str(Path(name) / r) for r in table["run"]]
        frames.append(table.assign(variant=name))
    if not frames:
        raise ValueError(f"no variant folders with runs below {root}")
    return pd.concat(frames, ignore_index=True)


def per_run(table: pd.DataFrame, at: list[int], threshold: float = 0.02,
            until: int | None = None) -> pd.DataFrame:
    """One row per run; with ``until``, every number but the kernel change (from the run's
    last weights file, at ``kernels_at``) uses only iterations up to ``until``."""
    shown = table if until is None else table[table["iteration"] <= until]
    crossing = stats.iterations_to_threshold(shown, threshold).set_index("run")
    rows = []
    for (variant, arm, seed, run), full in table.groupby(["variant", "arm", "seed", "run"]):
        full = full.sort_values("iteration").set_index("iteration")
        runs = full if until is None else full[full.index <= until]
        last = runs.iloc[-1]
        row = {"variant": variant, "arm": arm, "seed": seed, "status": last.get("status", ""),
               "iterations": int(runs.index[-1])}
        for i in at:
            row[f"test_{i}"] = runs["test_error"].get(i, np.nan)
        row["best_test"] = runs["test_error"].min()
        row[f"iter_to_{threshold:g}"] = crossing.loc[run, "iterations_to_threshold"]
        row["train_last"] = last["train_error"]
        row["conv1_change"] = kernel_change(full["run_dir"].iloc[0])
        row["kernels_at"] = int(full.index[-1])
        for col in ("conv1_rel_step", "fc1_rel_step", "conv1_spikes", "conv1_silent",
                    "fc1_saturated", "fc1_wnorm"):
            row[col] = last.get(col, np.nan)
        row["step_ratio"] = row["fc1_rel_step"] / row["conv1_rel_step"]
        row["collapsed"] = collapsed(runs)
        rows.append(row)
    return pd.DataFrame(rows)


#: output spikes per image below which an evaluation counts as a silent network
SILENT_OUTPUT = 0.05


def collapsed(run: pd.DataFrame) -> int:
    """1 when the run's output layer fell silent (fewer than :data:`SILENT_OUTPUT` spikes per
    image at an evaluation after iteration 0: every image is then an error), else 0. ``run``:
    its metrics rows indexed by iteration; the output layer is the last ``fc*_spikes`` column."""
    cols = sorted((c for c in run.columns
                   if c.startswith("fc") and c.endswith("_spikes") and c[2:-7].isdigit()),
                  key=lambda c: int(c[2:-7]))
    if not cols:
        return 0
    later = run[run.index > 0][cols[-1]]
    return int((later < SILENT_OUTPUT).any())


def summary(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean over seeds per variant and arm (with the seed count); for the first crossing of the
    threshold, how many runs reached it and the median of their iterations."""
    crossing = [c for c in runs.columns if c.startswith("iter_to_")]
    value_cols = [c for c in runs.columns
                  if c not in ("variant", "arm", "seed", "status", "kernels_at", "collapsed",
                               *crossing)]
    grouped = runs.groupby(["variant", "arm"], sort=True)
    out = grouped[value_cols].mean()
    out.insert(0, "seeds", grouped.size())
    if "collapsed" in runs.columns:
        out["collapsed"] = grouped["collapsed"].sum()
    for col in crossing:
        out[col.replace("iter_to_", "reached_")] = grouped[col].count()
        out[col + "_median"] = grouped[col].median()
    return out.reset_index()


def error_figure(table: pd.DataFrame):
    import matplotlib.pyplot as plt

    arms = sorted(table["arm"].unique())
    figure, axes = plt.subplots(1, len(arms), figsize=(5.5 * len(arms), 4), squeeze=False,
                                sharey=True)
    variants = sorted(table["variant"].unique())
    palette = plt.get_cmap("tab10" if len(variants) <= 10 else "tab20").colors
    colours = {v: palette[i % len(palette)] for i, v in enumerate(variants)}
    for ax, arm in zip(axes.flat, arms):
        for (variant, run), runs in table[table["arm"] == arm].groupby(["variant", "run"]):
            runs = runs.sort_values("iteration")
            ax.plot(runs["iteration"], 100 * runs["test_error"], color=colours[variant], lw=1.2,
                    label=variant)
        ax.set_title(arm)
        ax.set_xlabel("iteration")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes.flat[0].set_ylabel("test error (%)")
    unique = {}
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            unique.setdefault(label, handle)
    unique = dict(sorted(unique.items()))
    figure.legend(unique.values(), unique.keys(), loc="upper center", ncol=4, frameon=False,
                  bbox_to_anchor=(0.5, 1.0))
    figure.tight_layout(rect=(0, 0, 1, 0.82))
    return figure


def main(argv=None) -> int:
    from analysis import figures
    from analysis.kernels import kernel_grid

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, nargs="?", help="folder of variant sweep folders")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=FOLDER",
                        help="one more variant: a sweep folder elsewhere (e.g. a committed study "
                             "made with the same settings)")
    parser.add_argument("--until", type=int,
                        help="compare runs only up to this iteration (runs of different lengths)")
    parser.add_argument("--threshold", type=float, default=0.02,
                        help="test error whose first crossing is reported (default 0.02)")
    parser.add_argument("--out", type=Path, required=True, help="folder for tables and figures")
    parser.add_argument("--at", type=int, nargs="+", default=[600, 1200],
                        help="iterations at which to compare the test error")
    parser.add_argument("--seeds", type=int, nargs="+",
                        help="only these seeds (matched seeds, e.g. while one variant's sweep "
                             "is still growing)")
    args = parser.parse_args(argv)
    try:
        extra = dict(v.split("=", 1) for v in args.variant)
    except ValueError:
        parser.error("--variant takes NAME=FOLDER")
    if args.root is None and not extra:
        parser.error("give a folder of variant folders, or --variant NAME=FOLDER")
    try:
        table = load_variants(args.root, {k: Path(v) for k, v in extra.items()})
    except ValueError as err:
        print(f"error: {err}")
        return 2
    if args.seeds:
        missing = sorted(set(args.seeds) - set(table["seed"]))
        if missing:
            print(f"error: --seeds {' '.join(map(str, missing))}: no run of that seed; the "
                  f"runs have seeds {' '.join(map(str, sorted(set(table['seed']))))}")
            return 2
        table = table[table["seed"].isin(args.seeds)]
    table_shown = table if args.until is None else table[table["iteration"] <= args.until]
    runs = per_run(table, args.at, args.threshold, args.until)
    write_table(runs, args.out, "per_run")
    short = runs["iterations"] < max(args.at)
    for _, r in runs[short].iterrows():
        print(f"left out of the summary (reached {r.iterations} of {max(args.at)} iterations): "
              f"{r.variant} {r.arm} seed {r.seed}")
    write_table(summary(runs[~short]), args.out, "ablation")
    figures.save(error_figure(table_shown), args.out / "error_curves")
    figures.save(diagnostics_figure(table_shown, group="variant"), args.out / "diagnostics")
    for (variant, arm), group in table.groupby(["variant", "arm"]):
        run_dir = Path(group.sort_values("seed")["run_dir"].iloc[0])
        for name in ("final", "checkpoint"):
            path = weights_path(run_dir, name)
            if path is not None:
                kernels = load_npz(path)["conv1_kernels"]
                figures.save(kernel_grid(kernels, title=f"{variant} · {arm} · conv1"),
                             args.out / f"kernels_{variant}_{arm}")
                break
    print(summary(runs[~short]).to_markdown(index=False, floatfmt=".4g"))
    print(f"\nwrote tables and figures to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
