"""The paper's learning-curve figures from a tidy table of runs (see :mod:`analysis.stats`).

* :func:`error_curves` — test error vs iteration as in the paper's Fig. 4/5: a linear iteration
  axis from iteration 0 (``log_x=True`` for a logarithmic one), a thin line per seed, the seeds'
  mean with its 95 % confidence band per arm, the target error drawn and each run's first
  crossing marked where there is one.
* :func:`nll_trajectories` — test NLL against train NLL along training (Fig. 8).

Every figure is saved as PNG and SVG by :func:`save`. Nothing here picks a matplotlib backend:
in Jupyter the figures show inline; scripts without a display get matplotlib's non-interactive
default (CI sets ``MPLBACKEND=Agg``).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import matplotlib.ticker as mticker
import pandas as pd
import seaborn as sns

from analysis.stats import error_summary, iterations_to_threshold

ARM_COLOURS = {"pretrained": "#c0392b", "supervised": "#2c3e50"}

#: readable tick values of a logarithmic percentage axis
_PERCENT_TICKS = [0.1, 0.2, 0.5, 1, 2, 3, 5, 10, 20, 30, 50, 100]


def save(figure: plt.Figure, path_stem: Path) -> list[Path]:
    """Write ``<stem>.png`` and ``<stem>.svg``; return both paths."""
    path_stem = Path(path_stem)
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [path_stem.with_suffix(".png"), path_stem.with_suffix(".svg")]
    for path in paths:
        figure.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(figure)
    return paths


def _plain_log_ticks(ax) -> None:
    """Log axes labelled with plain numbers (600, 1200, 2 %) instead of powers of ten."""
    plain = mticker.FuncFormatter(lambda value, _: f"{value:g}")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(mticker.NullFormatter())
    low, high = ax.get_ylim()
    # minor labels help within a decade or so and crowd the axis beyond
    ax.yaxis.set_minor_formatter(plain if high / low < 20 else mticker.NullFormatter())


def _panels(table: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    keys = [c for c in ("topology", "init") if c in table.columns and table[c].nunique() > 1]
    if not keys:
        return [("", table)]
    return [(" · ".join(map(str, k if isinstance(k, tuple) else (k,))), g)
            for k, g in table.groupby(keys, sort=True)]


def _mean_band(runs: pd.DataFrame, column: str) -> pd.DataFrame:
    """Mean and bootstrap 95 % CI across the runs of one arm (as the ``error_summary`` table),
    at the iterations that every one of them logged."""
    n_runs = runs["run"].nunique()
    per_iteration = runs.groupby("iteration")["run"].nunique()
    common = per_iteration[per_iteration == n_runs].index.tolist()
    summary = error_summary(runs.drop(columns=["topology", "init", "arm"], errors="ignore"),
                            common, column)
    return summary.sort_values("iteration")


def _iteration_axis(ax, log_x: bool) -> None:
    if log_x:
        ax.set_xscale("log")
        low, high = ax.get_xlim()
        ticks = [m * 10**e for e in range(0, 8) for m in (1, 2, 5) if low <= m * 10**e <= high]
        ax.xaxis.set_major_locator(mticker.FixedLocator(ticks))
        ax.xaxis.set_major_formatter(mticker.FuncFormatter(lambda value, _: f"{value:,g}"))
        ax.xaxis.set_minor_formatter(mticker.NullFormatter())
    else:
        ax.set_xlim(left=0)
        ax.xaxis.set_major_locator(mticker.MaxNLocator(nbins=7, steps=[1, 2, 2.5, 5, 10],
                                                       integer=True))
        ax.xaxis.set_major_formatter(mticker.FuncFormatter(lambda value, _: f"{value:,.0f}"))


def _percent_axis(ax, log_y: bool) -> None:
    if not log_y:
        ax.set_ylim(bottom=0)
        return
    ax.set_yscale("log")
    low, high = ax.get_ylim()
    ticks = [t for t in _PERCENT_TICKS if low <= t <= high]
    ax.yaxis.set_major_locator(mticker.FixedLocator(ticks))
    ax.yaxis.set_major_formatter(mticker.FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_formatter(mticker.NullFormatter())


def error_curves(table: pd.DataFrame, threshold: float = 0.02, column: str = "test_error",
                 log_x: bool = False, log_y: bool = True, band: bool = True,
                 other_thresholds=()) -> plt.Figure:
    """Test error (%) vs iteration as the paper's Fig. 4/5, one panel per topology and init.

    Per arm (colour): a thin line per run (seed), and with ``band`` and at least two runs the
    seeds' mean (thick) with its bootstrap 95 % confidence band, at the iterations every run
    of the arm logged (the CI of the ``error_summary`` table). The dashed line is the target
    ``threshold``; a ▼ marks the first logged iteration at or below it of each run that gets
    there (×n where n runs get there at the same iteration); the legend says how many runs of
    each arm do. The iteration axis is linear from iteration 0 (``log_x=True``: logarithmic,
    iteration 0 left out); the error axis is logarithmic with plain percentages
    (``log_y=False``: linear). ``other_thresholds`` are drawn as dotted lines, unmarked.
    """
    panels = _panels(table)
    figure, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.4), squeeze=False)
    crossings = iterations_to_threshold(table, threshold, column).set_index("run")
    target = f"{100 * threshold:g} %"
    for ax, (title, group) in zip(axes[0], panels):
        shown = group[group["iteration"] > 0] if log_x else group
        handles = []
        markers = False
        for arm, runs in shown.groupby("arm", sort=True):
            colour = ARM_COLOURS.get(arm)
            names = sorted(runs["run"].unique())
            for run in names:
                curve = runs[runs["run"] == run].sort_values("iteration")
                ax.plot(curve["iteration"], 100 * curve[column], color=colour, alpha=0.35, lw=0.8)
            hits = crossings.loc[names, "iterations_to_threshold"].dropna()
            for hit, count in hits.value_counts().sort_index().items():
                if hit <= 0 and log_x:  # iteration 0 is off a log axis
                    continue
                ax.plot([hit], [100 * threshold], "v", color=colour, ms=6, zorder=3)
                markers = True
                if count > 1:
                    ax.annotate(f"×{count}", (hit, 100 * threshold), xytext=(4, -11),
                                textcoords="offset points", fontsize=7, color=colour)
            seeds = f"{len(names)} seed{'s' if len(names) > 1 else ''}"
            if band and len(names) > 1:
                mean = _mean_band(runs, column)
                ax.fill_between(mean["iteration"], 100 * mean["ci95_low"],
                                100 * mean["ci95_high"], color=colour, alpha=0.2, lw=0)
                line, = ax.plot(mean["iteration"], 100 * mean["mean"], color=colour, lw=2.2)
                label = f"{arm}: mean ± 95 % CI of {seeds}"
            else:
                line, = ax.plot([], [], color=colour, lw=0.8)
                label = f"{arm}: {seeds}"
            line.set_label(f"{label}; {len(hits)} reach {target}")
            handles.append(line)
        handles.append(ax.plot([], [], color="0.5", alpha=0.6, lw=0.8, label="one seed")[0])
        handles.append(ax.axhline(100 * threshold, color="grey", ls="--", lw=0.8,
                                  label=f"target {target}"))
        for other in other_thresholds:
            handles.append(ax.axhline(100 * other, color="grey", ls=":", lw=0.8,
                                      label=f"{100 * other:g} %"))
        if markers:
            handles.append(ax.plot([], [], "v", color="0.3", ms=6, ls="none",
                                   label=f"first logged iteration ≤ {target}")[0])
        _iteration_axis(ax, log_x)
        _percent_axis(ax, log_y)
        ax.set(xlabel="iteration (mini-batches of 100)" + (", log scale" if log_x else ""),
               ylabel=f"{column.replace('_', ' ')} (%)", title=title)
        ax.grid(axis="y", which="major", color="0.9", lw=0.6)
        ax.legend(handles=handles, frameon=False, fontsize=8)
        sns.despine(ax=ax)
    figure.suptitle(f"{column.replace('_', ' ')} vs iteration", fontsize=10)
    return figure


def nll_trajectories(table: pd.DataFrame) -> plt.Figure:
    """Test NLL against train NLL along training, one line per run (Fig. 8)."""
    panels = _panels(table)
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.5), squeeze=False)
    for ax, (title, group) in zip(axes[0], panels):
        for (arm, run), curve in group.sort_values("iteration").groupby(["arm", "run"], sort=True):
            ax.plot(curve["train_nll"], curve["test_nll"], color=ARM_COLOURS.get(arm), alpha=0.6,
                    lw=1, label=arm)
            ax.plot(curve["train_nll"].iloc[-1:], curve["test_nll"].iloc[-1:], "o",
                    color=ARM_COLOURS.get(arm), ms=3)
        ax.set(xscale="log", yscale="log", xlabel="train NLL", ylabel="test NLL", title=title)
        _plain_log_ticks(ax)
        ax.invert_xaxis()
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        ax.legend(unique.values(), unique.keys(), frameon=False)
        sns.despine(ax=ax)
    figure.suptitle("test vs train NLL along training (● = last logged point)", fontsize=10)
    return figure
