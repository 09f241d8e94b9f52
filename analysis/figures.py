"""The paper's learning-curve figures from a tidy table of runs (see :mod:`analysis.stats`).

* :func:`error_curves` — test error vs iteration per seed and arm, log–log axes (Fig. 4/5),
  with the target error drawn and each run's first crossing marked.
* :func:`nll_trajectories` — test NLL against train NLL along training (Fig. 8).

Every figure is saved as PNG and SVG by :func:`save`.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker as mticker  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from analysis.stats import iterations_to_threshold  # noqa: E402

ARM_COLOURS = {"pretrained": "#c0392b", "supervised": "#2c3e50"}


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


def error_curves(table: pd.DataFrame, threshold: float = 0.02, column: str = "test_error") -> plt.Figure:
    """Test error (%) vs iteration, one thin line per seed, colour per arm, log–log axes."""
    panels = _panels(table)
    figure, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    crossings = iterations_to_threshold(table, threshold, column).set_index("run")
    for ax, (title, group) in zip(axes[0], panels):
        shown = group[group["iteration"] > 0]
        for (arm, run), curve in shown.groupby(["arm", "run"], sort=True):
            colour = ARM_COLOURS.get(arm)
            ax.plot(curve["iteration"], 100 * curve[column], color=colour, alpha=0.6, lw=1,
                    label=arm)
            hit = crossings.loc[run, "iterations_to_threshold"]
            if pd.notna(hit):
                ax.plot([hit], [100 * threshold], "v", color=colour, ms=5)
        ax.axhline(100 * threshold, color="grey", ls="--", lw=0.8)
        ax.set(xscale="log", yscale="log", xlabel="iteration (mini-batches of 100)",
               ylabel=f"{column.replace('_', ' ')} (%)", title=title)
        _plain_log_ticks(ax)
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        ax.legend(unique.values(), unique.keys(), frameon=False)
        sns.despine(ax=ax)
    figure.suptitle(f"error vs iteration; ▼ first ≤ {100 * threshold:g} %", fontsize=10)
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
