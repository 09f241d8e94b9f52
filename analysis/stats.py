"""Statistics across seeds of a tidy table of runs (one row per run and logged iteration).

The table has at least the columns ``run``, ``arm``, ``seed``, ``iteration``, ``test_error``
(a fraction in [0, 1]) and, for the NLL analyses, ``train_nll`` and ``test_nll``;
:func:`analysis.runs.load_runs` builds it from run directories. Paper counterparts: Table 2 / 4
(mean ± std of error per arm at chosen iterations), Fig. 5 (iterations to a target error),
Table 5 (final NLL costs).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

#: columns that identify a group of runs compared across seeds
GROUP = ["topology", "init", "arm"]


def _groups(table: pd.DataFrame) -> list[str]:
    return [c for c in GROUP if c in table.columns]


def _by_group(table: pd.DataFrame, keys: list[str]):
    """``(key columns as a dict, rows)`` per group of ``keys`` (one group, {} when no keys)."""
    if not keys:
        yield {}, table
        return
    for key, group in table.groupby(keys, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        yield dict(zip(keys, key)), group


def iterations_to_threshold(table: pd.DataFrame, threshold: float, column: str = "test_error") -> pd.DataFrame:
    """Per run, the first logged iteration whose ``column`` is ≤ ``threshold`` (NaN if never).

    Also reports the last iteration of the run, so "not reached within N" is visible.
    """
    rows = []
    for run, group in table.sort_values("iteration").groupby("run", sort=True):
        hit = group.loc[group[column] <= threshold, "iteration"]
        first = group.iloc[0]
        row = {c: first[c] for c in _groups(table) + ["seed"] if c in group}
        row.update(run=run, iterations_to_threshold=float(hit.iloc[0]) if len(hit) else np.nan,
                   last_iteration=int(group["iteration"].max()))
        rows.append(row)
    return pd.DataFrame(rows)


def threshold_summary(crossings: pd.DataFrame) -> pd.DataFrame:
    """Per group, from :func:`iterations_to_threshold`: how many runs reached the threshold, and
    the mean, std (ddof=1), min and max of their iterations to it (Fig. 5's comparison).

    Runs that never reached it are counted in ``n_runs`` but not averaged; ``censored_at`` is
    the shortest of their lengths (they did not reach it within that many iterations).
    ``median`` is over *all* runs, a run that never reached the threshold counted as later than
    any that did; it is NaN when that median falls on such a run (half or more never reached).
    With a ``threshold`` column (several thresholds), one row per threshold and group.
    """
    rows = []
    keys = (["threshold"] if "threshold" in crossings else []) + _groups(crossings)
    for key, group in _by_group(crossings, keys):
        hit = group["iterations_to_threshold"].dropna().to_numpy(dtype=float)
        missed = group[group["iterations_to_threshold"].isna()]
        median = float(np.median(group["iterations_to_threshold"].fillna(np.inf)))
        rows.append({**key, "n_runs": len(group), "n_reached": len(hit),
                     "median": median if np.isfinite(median) else np.nan,
                     "mean": hit.mean() if len(hit) else np.nan,
                     "std": hit.std(ddof=1) if len(hit) > 1 else np.nan,
                     "min": hit.min() if len(hit) else np.nan,
                     "max": hit.max() if len(hit) else np.nan,
                     "censored_at": float(missed["last_iteration"].min()) if len(missed) else np.nan})
    return pd.DataFrame(rows)


def paired_thresholds(crossings: pd.DataFrame, first: str = "pretrained",
                      second: str = "supervised") -> pd.DataFrame:
    """Matched seeds: per seed run in both arms ``first`` and ``second`` (same threshold,
    topology and init), both arms' iterations to the threshold and which arm got there first.

    ``earlier`` is the arm name, ``"tie"``, ``"neither"`` (no run reached it) or ``"unknown"``
    (one run reached it at i, the other stopped at or before i without reaching it: it might
    still have got there first). A run that never reached it counts as later than one that did
    at an iteration it also ran to. ``difference`` is ``first`` − ``second`` when both reached it.
    A seed with more than one run in an arm (runs of several sweeps under one root) is left out.
    """
    keys = [k for k in ["threshold", "topology", "init"] if k in crossings]
    rows = []
    for key, group in _by_group(crossings, keys):
        by_arm = {arm: runs.set_index("seed") for arm, runs in group.groupby("arm")}
        if first not in by_arm or second not in by_arm:
            continue
        a, b = by_arm[first], by_arm[second]
        once = set(a.index[~a.index.duplicated(keep=False)]) & set(
            b.index[~b.index.duplicated(keep=False)])  # a seed run twice in an arm: not paired
        for seed in sorted(once):
            ia, ib = a.at[seed, "iterations_to_threshold"], b.at[seed, "iterations_to_threshold"]
            la, lb = a.at[seed, "last_iteration"], b.at[seed, "last_iteration"]
            if np.isnan(ia) and np.isnan(ib):
                earlier = "neither"
            elif np.isnan(ib):
                earlier = first if lb >= ia else "unknown"
            elif np.isnan(ia):
                earlier = second if la >= ib else "unknown"
            else:
                earlier = first if ia < ib else second if ib < ia else "tie"
            rows.append({**key, "seed": int(seed), first: ia, second: ib,
                         "difference": ia - ib, f"{first}_last": int(la),
                         f"{second}_last": int(lb), "earlier": earlier})
    return pd.DataFrame(rows)


def _bootstrap_ci(values: np.ndarray, seed: int) -> tuple[float, float]:
    if len(values) < 2 or np.all(values == values[0]):
        return (float(values.mean()), float(values.mean())) if len(values) else (np.nan, np.nan)
    result = stats.bootstrap((values,), np.mean, n_resamples=10_000, confidence_level=0.95,
                             method="percentile", random_state=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def error_summary(table: pd.DataFrame, iterations, column: str = "test_error", seed: int = 0) -> pd.DataFrame:
    """Mean, std (ddof=1), bootstrap 95 % CI of ``column`` across seeds per group and iteration.

    Only iterations that every run of a group logged are summarised (missing → row skipped).
    """
    rows = []
    for key, group in _by_group(table, _groups(table)):
        for iteration in iterations:
            values = group.loc[group["iteration"] == iteration, column].to_numpy(dtype=float)
            if len(values) == 0:
                continue
            low, high = _bootstrap_ci(values, seed)
            rows.append({**key, "iteration": iteration, "n_seeds": len(values),
                         "mean": values.mean(), "std": values.std(ddof=1) if len(values) > 1 else np.nan,
                         "ci95_low": low, "ci95_high": high})
    return pd.DataFrame(rows)


def variance_test(table: pd.DataFrame, iteration: int, column: str = "test_error",
                  arms: tuple[str, str] = ("pretrained", "supervised")) -> pd.DataFrame:
    """Brown–Forsythe test (Levene, median-centred) of equal variance of ``column`` between arms.

    Robust to the non-normal, occasionally stalled error distributions the paper describes.
    One row per (topology, init) group; also the two variances and their ratio. The test needs
    at least 3 seeds per arm (W and p are NaN below that; the variances are still reported).
    """
    rows = []
    keys = [c for c in ("topology", "init") if c in table.columns]
    at = table[table["iteration"] == iteration]
    for key, group in _by_group(at, keys):
        a = group.loc[group["arm"] == arms[0], column].to_numpy(dtype=float)
        b = group.loc[group["arm"] == arms[1], column].to_numpy(dtype=float)
        if len(a) < 2 or len(b) < 2:
            continue
        # with 2 values per arm the median-centred deviations are equal and W degenerates
        statistic, p = (stats.levene(a, b, center="median") if min(len(a), len(b)) >= 3
                        else (np.nan, np.nan))
        var_a, var_b = a.var(ddof=1), b.var(ddof=1)
        rows.append({**key, "iteration": iteration,
                     f"var_{arms[0]}": var_a, f"var_{arms[1]}": var_b,
                     "variance_ratio": var_b / var_a if var_a > 0 else np.inf,
                     "brown_forsythe_W": statistic, "p_value": p})
    return pd.DataFrame(rows)


def final_costs(table: pd.DataFrame, window: tuple[int, int]) -> pd.DataFrame:
    """Train and test NLL per run averaged over logged iterations in ``window`` (inclusive),
    then mean ± std across seeds per group (Table 5 used epochs 130–150)."""
    low, high = window
    inside = table[(table["iteration"] >= low) & (table["iteration"] <= high)]
    per_run = inside.groupby(_groups(table) + ["run"], sort=True)[["train_nll", "test_nll"]].mean()
    keys = _groups(table)
    grouped = per_run.groupby(keys, sort=True) if keys else per_run.groupby(lambda _: "all")
    out = grouped.agg(["mean", "std", "count"])
    out.columns = [f"{col}_{stat}" for col, stat in out.columns]
    return out.reset_index()


def growth_since(table: pd.DataFrame, since: pd.Series, columns: list[str]) -> pd.DataFrame:
    """Per run (the index of ``since``: run → iteration), each of ``columns`` at the run's last
    logged iteration divided by its value at iteration ``since[run]`` (NaN when either is not
    logged or the start is 0): ``<column>_growth``. With ``since`` the end of a run's best
    window (:func:`drift`), it says how much a layer's spikes or weight norm grew while the
    error drifted."""
    rows = []
    for run, group in table.sort_values("iteration").groupby("run", sort=True):
        row = {"run": run}
        start = since.get(run, np.nan)
        values = group.set_index("iteration")
        for c in columns:
            first = values[c].get(start, np.nan) if np.isfinite(start) else np.nan
            last = values[c].iloc[-1]
            row[f"{c}_growth"] = float(last / first) if first and np.isfinite(first) else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def drift(table: pd.DataFrame, window: int = 1000, column: str = "test_error") -> pd.DataFrame:
    """Per run, how far the end of training sits above its best stretch.

    A window of ``window`` iterations ending at a logged iteration ``i`` averages the logged
    values with iteration in ``(i − window, i]``; only windows that fit in the run
    (``i ≥ window``) count. Reported per run: the mean over the last window (ending at the run's
    last logged iteration), the lowest mean over any window and where it ends, and
    ``drift = last − best`` (≥ 0). Windows rather than single evaluations because one evaluation
    scatters by about its binomial standard error (~0.15 points at 2 % on 10,000 images).
    NaN for a run shorter than one window.
    """
    rows = []
    for run, group in table.sort_values("iteration").groupby("run", sort=True):
        its = group["iteration"].to_numpy(dtype=float)
        values = group[column].to_numpy(dtype=float)
        first = group.iloc[0]
        row = {c: first[c] for c in _groups(table) + ["seed"] if c in group}
        means = {}
        for end in its[its >= window]:
            inside = (its > end - window) & (its <= end)
            means[int(end)] = float(values[inside].mean())
        if means:
            best_end = min(means, key=means.get)
            last_end = int(its[-1]) if its[-1] in means else max(means)
            row.update(run=run, last_iteration=int(its[-1]), last_window=means[last_end],
                       best_window=means[best_end], best_window_end=best_end,
                       drift=means[last_end] - means[best_end])
        else:
            row.update(run=run, last_iteration=int(its[-1]), last_window=np.nan,
                       best_window=np.nan, best_window_end=np.nan, drift=np.nan)
        rows.append(row)
    return pd.DataFrame(rows)
