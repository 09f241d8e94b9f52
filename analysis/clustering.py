"""Clustering metrics and the Deep-STDP report (docs/deep_stdp.md).

* :func:`hungarian_accuracy`: accuracy of cluster ids against labels under the best one-to-one
  map of clusters to classes (scipy.optimize.linear_sum_assignment on the contingency table);
  with more clusters than classes, the clusters left unmapped count as errors.
* :func:`cluster_metrics`: that accuracy, NMI and ARI (scikit-learn).
* :func:`epochs_to_accuracy`: the first epoch at which a run reaches a target accuracy
  (iso-accuracy convergence), NaN if never.
* :func:`report`: per-epoch curves (mean ± 95 % CI over seeds) and tables of a set of Deep-STDP
  runs: ``python -m analysis.clustering results/deep_stdp/runs --out results/deep_stdp``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment


def contingency(clusters: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Counts ``(n_clusters, n_classes)`` of images per cluster id and class (ids from 0)."""
    clusters = np.asarray(clusters, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    if clusters.shape != labels.shape or clusters.ndim != 1:
        raise ValueError(f"clusters and labels must be 1-D of one length, got {clusters.shape} "
                         f"and {labels.shape}")
    if clusters.size and (clusters.min() < 0 or labels.min() < 0):
        raise ValueError("cluster ids and labels must be non-negative integers")
    table = np.zeros((clusters.max(initial=-1) + 1, labels.max(initial=-1) + 1), dtype=np.int64)
    np.add.at(table, (clusters, labels), 1)
    return table


def hungarian_accuracy(clusters: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of images whose cluster maps to their class under the best one-to-one map."""
    table = contingency(clusters, labels)
    if table.size == 0:
        return float("nan")
    rows, cols = linear_sum_assignment(table, maximize=True)
    return float(table[rows, cols].sum() / len(np.asarray(labels)))


def cluster_metrics(clusters: np.ndarray, labels: np.ndarray) -> dict:
    """``accuracy`` (Hungarian), ``nmi`` and ``ari`` of cluster ids against labels."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    return {"accuracy": hungarian_accuracy(clusters, labels),
            "nmi": float(normalized_mutual_info_score(labels, clusters)),
            "ari": float(adjusted_rand_score(labels, clusters))}


def epochs_to_accuracy(curve: pd.DataFrame, target: float, column: str = "accuracy") -> float:
    """First ``epoch`` of one run's table whose ``column`` is ≥ ``target`` (NaN if never)."""
    hit = curve.sort_values("epoch").loc[lambda c: c[column] >= target, "epoch"]
    return float(hit.iloc[0]) if len(hit) else float("nan")


def t_ci(values) -> tuple[float, float, float]:
    """Mean and Student-t 95 % confidence interval of the mean (NaN band for < 2 values)."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return (np.nan, np.nan, np.nan)
    if len(v) < 2:
        return (float(v.mean()), np.nan, np.nan)
    from scipy import stats

    half = stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))
    return float(v.mean()), float(v.mean() - half), float(v.mean() + half)


# ----------------------------------------------------------------------------------------------
# Report over runs


def load_runs(root: Path) -> tuple[pd.DataFrame, list[str]]:
    """All finished runs under ``root`` (folders with ``metrics.csv`` and a finished
    ``status.json``): one row per run and epoch; and a list of what was left out and why."""
    frames, skipped = [], []
    for metrics in sorted(Path(root).rglob("metrics.csv")):
        run = metrics.parent
        try:
            status = json.loads((run / "status.json").read_text()).get("status")
        except (OSError, ValueError):
            status = None
        if status != "finished":
            skipped.append(f"{run}: status {status!r}")
            continue
        try:
            frame = pd.read_csv(metrics)
            config = json.loads((run / "config.json").read_text())["config"]
        except (OSError, ValueError, KeyError) as err:
            skipped.append(f"{run}: unreadable ({err})")
            continue
        frame["run"] = str(run)
        frame["method"] = config["method"]
        frame["dataset"] = config["dataset"]
        frame["seed"] = config["seed"]
        frames.append(frame)
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return table, skipped


def summary(table: pd.DataFrame, columns=("accuracy", "nmi", "ari")) -> pd.DataFrame:
    """Mean and t 95 % CI over seeds per dataset, method and epoch."""
    rows = []
    for (dataset, method, epoch), g in table.groupby(["dataset", "method", "epoch"]):
        row = {"dataset": dataset, "method": method, "epoch": int(epoch), "n_seeds": len(g)}
        for c in columns:
            if c in g:
                m, lo, hi = t_ci(g[c])
                row.update({f"{c}_mean": m, f"{c}_ci95_low": lo, f"{c}_ci95_high": hi})
        rows.append(row)
    return pd.DataFrame(rows)


def iso_accuracy(table: pd.DataFrame, reference: str = "kmeans",
                 target: float | str | None = None) -> pd.DataFrame:
    """Epochs to a target accuracy per run. The target is ``target`` (a number), or per
    dataset the mean over seeds of the best accuracy the ``reference`` method reached (None:
    the paper's iso-accuracy comparison, how soon does each method reach what the baseline ends
    up with), or with ``"common"`` the lower of the methods' mean best accuracies (a level both
    reach on average, so both have a convergence time)."""
    rows = []
    for dataset, d in table.groupby("dataset"):
        best = d.groupby(["method", "run"])["accuracy"].max().groupby("method").mean()
        if target == "common":
            goal = float(best.min())
        elif target is None:
            goal = float(best[reference])
        else:
            goal = float(target)
        for run, r in d.groupby("run"):
            rows.append({"dataset": dataset, "method": r.method.iloc[0], "seed": r.seed.iloc[0],
                         "run": run, "target": goal,
                         "epochs_to_target": epochs_to_accuracy(r, goal),
                         "last_epoch": int(r.epoch.max())})
    return pd.DataFrame(rows)


def iso_summary(iso: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for (dataset, method), g in iso.groupby(["dataset", "method"]):
        hit = g.epochs_to_target.dropna()
        m, lo, hi = t_ci(hit)
        rows.append({"dataset": dataset, "method": method, "target": g.target.iloc[0],
                     "n_runs": len(g), "n_reached": len(hit), "epochs_mean": m,
                     "epochs_ci95_low": lo, "epochs_ci95_high": hi})
    return pd.DataFrame(rows)


def paired_difference(table: pd.DataFrame, column: str, a: str = "stdp",
                      b: str = "kmeans") -> pd.DataFrame:
    """Per dataset and epoch: mean and t 95 % CI of ``a − b`` paired by seed."""
    rows = []
    for (dataset, epoch), g in table.groupby(["dataset", "epoch"]):
        wide = g.pivot_table(index="seed", columns="method", values=column)
        if a not in wide or b not in wide:
            continue
        diff = (wide[a] - wide[b]).dropna()
        m, lo, hi = t_ci(diff)
        rows.append({"dataset": dataset, "epoch": int(epoch), "n_pairs": len(diff),
                     f"{column}_diff_mean": m, "ci95_low": lo, "ci95_high": hi})
    return pd.DataFrame(rows)


def curves_figure(table: pd.DataFrame, column: str, label: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted(table.dataset.unique())
    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 3.6), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        for method, g in table[table.dataset == dataset].groupby("method"):
            s = summary(g, (column,))
            ax.plot(s.epoch, s[f"{column}_mean"], marker="o", ms=3,
                    label=f"{method} (n={int(s.n_seeds.min())})")
            ax.fill_between(s.epoch, s[f"{column}_ci95_low"], s[f"{column}_ci95_high"], alpha=0.25)
        ax.set_title(dataset)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


def report(root: Path, out: Path) -> dict:
    """Tables and figures of the runs under ``root``; the comparisons (paired differences,
    iso-accuracy) only where both methods, stdp and kmeans, are there."""
    from analysis.figures import save
    from analysis.report import write_table

    table, skipped = load_runs(root)
    if table.empty:
        raise ValueError(f"{root}: no finished Deep-STDP runs (metrics.csv + status.json "
                         f"'finished'); run python -m protocols.deep_stdp --sweep first")
    out.mkdir(parents=True, exist_ok=True)
    columns = [c for c in ("accuracy", "nmi", "ari", "fisher_trace") if c in table]
    write_table(summary(table, columns), out, "summary")
    if {"stdp", "kmeans"} <= set(table.method):
        iso = iso_accuracy(table)
        write_table(iso, out, "iso_accuracy_runs")
        write_table(iso_summary(iso), out, "iso_accuracy")
        common = iso_accuracy(table, target="common")
        write_table(common, out, "iso_accuracy_common_runs")
        write_table(iso_summary(common), out, "iso_accuracy_common")
        for c in ("accuracy", "nmi"):
            write_table(paired_difference(table, c), out, f"paired_{c}")
        if "fisher_trace" in table:
            write_table(paired_difference(table.dropna(subset=["fisher_trace"]), "fisher_trace"),
                        out, "paired_fisher_trace")
    for c, label in (("accuracy", "clustering accuracy (Hungarian)"), ("nmi", "NMI"),
                     ("ari", "ARI"), ("fisher_trace", "trace of Fisher information")):
        if c in table:
            save(curves_figure(table.dropna(subset=[c]), c, label), out / f"curves_{c}")
    if skipped:
        (out / "skipped.txt").write_text("\n".join(skipped) + "\n")
    return {"runs": int(table.run.nunique()), "skipped": skipped}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.clustering",
                                     description="Curves and tables of a set of Deep-STDP runs")
    parser.add_argument("root", type=Path, help="folder holding run folders (searched recursively)")
    parser.add_argument("--out", type=Path, required=True, help="folder for tables and figures")
    args = parser.parse_args(argv)
    try:
        result = report(args.root, args.out)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"report: {result['runs']} runs -> {args.out}"
          + (f"; left out {len(result['skipped'])} (see skipped.txt)" if result["skipped"] else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
