"""Does each layer learn? The per-layer diagnostics of ``metrics.csv`` over iterations.

The columns are written by :mod:`protocols.diagnostics` (``conv1_rel_step``, ``fc1_spikes``,
...). :func:`diagnostics_figure` draws one panel per quantity with one line per run and layer;
:func:`diagnostics_table` gives the values at chosen iterations; :func:`kernel_change` measures
how far a run's kernels moved from its initial ones.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

#: the quantities drawn, with their axis labels and whether a log axis suits them
QUANTITIES = {
    "rel_step": ("relative step ‖ηΔW‖/‖W‖", True),
    "spikes": ("spikes per image", True),
    "silent": ("fraction silent", False),
    "saturated": ("fraction saturated", False),
    "map_mean": ("mean of per-map kernel means", False),
    "wnorm": ("‖W‖", True),
    "step_factor": ("balanced factor on η", True),
}


def layer_columns(table: pd.DataFrame, quantity: str) -> list[str]:
    """The ``<layer>_<quantity>`` columns of ``table`` that hold at least one value."""
    suffix = f"_{quantity}"
    return [c for c in table.columns
            if c.endswith(suffix) and not c.endswith("_sd") and table[c].notna().any()
            and c.split("_", 1)[0].rstrip("0123456789") in ("conv", "pool", "fc")
            and c.split("_", 1)[1] == quantity]


def diagnostics_figure(table: pd.DataFrame, group: str = "arm"):
    """One panel per quantity; a line per run and layer (colour: ``group``, style: layer)."""
    import matplotlib.pyplot as plt

    present = [(q, layer_columns(table, q)) for q in QUANTITIES]
    present = [(q, cols) for q, cols in present if cols]
    if not present:
        raise ValueError("no per-layer diagnostic columns in these runs (made before the "
                         "diagnostics existed?)")
    ncols = min(3, len(present))
    nrows = -(-len(present) // ncols)
    figure, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.4 * nrows), squeeze=False)
    layers = sorted({c.split("_", 1)[0] for _, cols in present for c in cols},
                    key=lambda name: (name.rstrip("0123456789") != "conv",
                                      name.rstrip("0123456789") != "pool", name))
    styles = dict(zip(layers, ["-", "--", ":", "-.", (0, (5, 1)), (0, (1, 1))] * 2))
    keys = sorted(table[group].astype(str).unique())
    colours = dict(zip(keys, list(plt.get_cmap("tab10").colors) * 3))
    for ax, (quantity, cols) in zip(axes.flat, present):
        label, log = QUANTITIES[quantity]
        for (run, key), runs in table.groupby(["run", group], sort=True):
            runs = runs.sort_values("iteration")
            for col in cols:
                ax.plot(runs["iteration"], runs[col], ls=styles[col.split("_", 1)[0]], lw=1.2,
                        color=colours[str(key)], alpha=0.85)
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("iteration")
        ax.set_ylabel(label)
    for ax in list(axes.flat)[len(present):]:
        ax.axis("off")
    handles = [plt.Line2D([], [], color=c, label=k) for k, c in colours.items()]
    handles += [plt.Line2D([], [], color="black", ls=s, label=layer)
                for layer, s in styles.items()]
    figure.legend(handles=handles, loc="upper center", ncol=min(len(handles), 6),
                  frameon=False, bbox_to_anchor=(0.5, 1.0 + 0.04 * (len(handles) > 6)))
    figure.tight_layout(rect=(0, 0, 1, 0.93))
    return figure


def diagnostics_table(table: pd.DataFrame, at: list[int], group: list[str]) -> pd.DataFrame:
    """Mean over runs of every diagnostic column at the iterations ``at``, per ``group``."""
    cols = [c for q in QUANTITIES for c in layer_columns(table, q)]
    rows = table[table["iteration"].isin(at)]
    if not cols or rows.empty:
        return pd.DataFrame(columns=[*group, "iteration"])
    return rows.groupby([*group, "iteration"], sort=True)[cols].mean().reset_index()


def kernel_change(run_dir: str | Path, layer: str = "conv1") -> float:
    """‖K_final − K_initial‖ / ‖K_initial‖ of one layer of a run (its initial and final
    weights, whole or archived by :mod:`analysis.archive`, or checkpoint.npz if not finished);
    NaN when the files are not there."""
    from analysis.archive import weights_path

    run_dir = Path(run_dir)
    key = f"{layer}_kernels"
    end = weights_path(run_dir, "final") or weights_path(run_dir, "checkpoint")
    start = weights_path(run_dir, "initial")
    if start is None or end is None:
        return float("nan")
    from protocols.records import load_npz

    a, b = load_npz(start), load_npz(end)  # an unreadable file: NpzError naming it
    if key not in a or key not in b:
        return float("nan")
    k0, k1 = a[key].astype(float), b[key].astype(float)
    return float(np.linalg.norm(k1 - k0) / np.linalg.norm(k0))
