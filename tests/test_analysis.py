"""The analysis commands on the committed example runs; numbers checked against plain pandas."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis import stats
from analysis.report import main as report_main
from analysis.runs import RunsError, load_runs

EXAMPLE = Path(__file__).resolve().parents[1] / "results" / "example" / "runs"


def _independent_table() -> pd.DataFrame:
    """The same runs read without the package: every metrics.csv joined with its config.json."""
    frames = []
    for metrics in sorted(EXAMPLE.rglob("metrics.csv")):
        record = json.loads((metrics.parent / "config.json").read_text())
        frame = pd.read_csv(metrics)
        frame["run"] = str(metrics.parent.relative_to(EXAMPLE))
        frame["arm"] = record["arm"]
        frame["seed"] = record["seed"]
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def test_example_runs_are_complete():
    table = load_runs(EXAMPLE)
    assert set(table["arm"]) == {"pretrained", "supervised"}
    assert table.groupby("arm")["seed"].nunique().min() >= 2
    assert (table["status"] == "finished").all()


def test_report_tables_match_pandas(tmp_path):
    assert report_main([str(EXAMPLE), "--out", str(tmp_path), "--threshold", "0.1",
                        "--at", "100", "200"]) == 0
    raw = _independent_table()
    for stem in ("error_curves", "nll", "kernels_pretrained", "kernels_supervised"):
        assert (tmp_path / f"{stem}.png").stat().st_size > 0 and (tmp_path / f"{stem}.svg").exists()

    summary = pd.read_csv(tmp_path / "error_summary.csv")
    for (arm, iteration), values in raw[raw.iteration.isin([100, 200])].groupby(["arm", "iteration"]):
        row = summary[(summary.arm == arm) & (summary.iteration == iteration)].iloc[0]
        assert row["mean"] == pytest.approx(values.test_error.mean(), rel=1e-5)
        assert row["std"] == pytest.approx(values.test_error.std(ddof=1), rel=1e-5)
        assert row["ci95_low"] <= row["mean"] <= row["ci95_high"]
        assert row["n_seeds"] == len(values)

    crossing = pd.read_csv(tmp_path / "iterations_to_threshold.csv").set_index("run")
    for run, curve in raw.groupby("run"):
        below = curve[curve.test_error <= 0.1].iteration
        expected = below.min() if len(below) else np.nan
        got = crossing.loc[run, "iterations_to_threshold"]
        assert (np.isnan(expected) and np.isnan(got)) or got == expected

    per_arm = pd.read_csv(tmp_path / "threshold_summary.csv").set_index("arm")
    first = raw[raw.test_error <= 0.1].groupby(["arm", "run"]).iteration.min()
    for arm, runs in raw.groupby("arm"):
        reached = first[arm] if arm in first.index.get_level_values(0) else pd.Series(dtype=float)
        assert per_arm.loc[arm, "n_runs"] == runs.run.nunique()
        assert per_arm.loc[arm, "n_reached"] == len(reached)
        if len(reached):
            assert per_arm.loc[arm, "mean"] == pytest.approx(reached.mean())

    variance = pd.read_csv(tmp_path / "variance_test.csv")
    at200 = raw[raw.iteration == 200]
    row = variance[variance.iteration == 200].iloc[0]
    assert row["var_pretrained"] == pytest.approx(at200[at200.arm == "pretrained"].test_error.var(), rel=1e-5)
    assert row["var_supervised"] == pytest.approx(at200[at200.arm == "supervised"].test_error.var(), rel=1e-5)
    assert np.isnan(row["p_value"])  # 2 seeds per arm: too few for Brown–Forsythe

    costs = pd.read_csv(tmp_path / "final_costs.csv")
    last = raw.iteration.max()
    window = raw[raw.iteration >= int(0.8 * last)]
    per_run = window.groupby(["arm", "run"])[["train_nll", "test_nll"]].mean()
    for arm, values in per_run.groupby("arm"):
        row = costs[costs.arm == arm].iloc[0]
        assert row["test_nll_mean"] == pytest.approx(values.test_nll.mean(), rel=1e-5)
        assert row["train_nll_mean"] == pytest.approx(values.train_nll.mean(), rel=1e-5)
        assert (tmp_path / "final_costs.md").read_text().count("|") > 10


def test_iterations_to_threshold_on_a_hand_made_table():
    table = pd.DataFrame({"run": ["a"] * 3 + ["b"] * 3, "arm": ["x"] * 6, "seed": [0] * 3 + [1] * 3,
                          "iteration": [0, 10, 20] * 2,
                          "test_error": [0.9, 0.05, 0.01, 0.9, 0.5, 0.3]})
    result = stats.iterations_to_threshold(table, 0.05).set_index("run")
    assert result.loc["a", "iterations_to_threshold"] == 10
    assert np.isnan(result.loc["b", "iterations_to_threshold"])
    assert result.loc["b", "last_iteration"] == 20


def test_threshold_summary_counts_and_averages_only_runs_that_reach():
    table = pd.DataFrame({"run": ["a"] * 3 + ["b"] * 3 + ["c"] * 2, "arm": ["x"] * 8,
                          "seed": [0] * 3 + [1] * 3 + [2] * 2,
                          "iteration": [0, 10, 20] * 2 + [0, 10],
                          "test_error": [0.9, 0.05, 0.01, 0.9, 0.5, 0.04, 0.9, 0.3]})
    row = stats.threshold_summary(stats.iterations_to_threshold(table, 0.05)).iloc[0]
    assert (row["n_runs"], row["n_reached"]) == (3, 2)
    assert row["mean"] == 15 and row["std"] == pytest.approx(np.std([10, 20], ddof=1))
    assert (row["min"], row["max"], row["censored_at"]) == (10, 20, 10)


def test_threshold_summary_median_counts_runs_that_never_reached_as_latest():
    # three runs reach at 10, 20 and never (stopped at 30): the median is the middle one, 20;
    # with a fourth that never reaches, half never reach and the median is undefined
    rows = {"a": [0.9, 0.05, 0.01, 0.01], "b": [0.9, 0.5, 0.04, 0.04], "c": [0.9] * 4,
            "d": [0.9] * 4}
    table = pd.DataFrame([{"run": run, "arm": "x", "seed": i, "iteration": 10 * j,
                           "test_error": e} for i, (run, errors) in enumerate(rows.items())
                          for j, e in enumerate(errors)])
    three = table[table.run != "d"]
    assert stats.threshold_summary(stats.iterations_to_threshold(three, 0.05)).iloc[0]["median"] == 20
    assert np.isnan(stats.threshold_summary(stats.iterations_to_threshold(table, 0.05)).iloc[0]["median"])


def test_paired_thresholds_says_which_arm_got_there_first_on_each_seed():
    def run(arm, seed, errors):
        return [{"run": f"{arm}{seed}", "arm": arm, "seed": seed, "iteration": 10 * j,
                 "test_error": e} for j, e in enumerate(errors)]
    table = pd.DataFrame(
        run("pretrained", 0, [0.9, 0.04, 0.03]) + run("supervised", 0, [0.9, 0.5, 0.04])  # pre
        + run("pretrained", 1, [0.9, 0.5, 0.5]) + run("supervised", 1, [0.9, 0.04, 0.04])  # sup
        + run("pretrained", 2, [0.9, 0.04]) + run("supervised", 2, [0.9, 0.04])  # tie
        + run("pretrained", 3, [0.9, 0.5]) + run("supervised", 3, [0.9, 0.5, 0.04])  # unknown
        + run("pretrained", 4, [0.9]) + run("supervised", 4, [0.9])  # neither
        + run("supervised", 5, [0.9, 0.01])  # one arm only: not paired
        + run("pretrained", 6, [0.9, 0.5, 0.04]) + run("supervised", 6, [0.9, 0.5])  # unknown
        + run("pretrained", 7, [0.9, 0.04]) + run("supervised", 7, [0.9, 0.5, 0.5]))  # pre
    paired = stats.paired_thresholds(stats.iterations_to_threshold(table, 0.05)).set_index("seed")
    assert list(paired.index) == [0, 1, 2, 3, 4, 6, 7]
    assert list(paired.earlier) == ["pretrained", "supervised", "tie", "unknown", "neither",
                                    "unknown", "pretrained"]
    assert paired.loc[0, "difference"] == -10 and paired.loc[1, "supervised"] == 10
    assert np.isnan(paired.loc[3, "difference"]) and paired.loc[3, "pretrained_last"] == 10


def test_report_with_two_thresholds_and_a_deep_net(tmp_path):
    """Several thresholds give a row per threshold; a net with two conv layers gets both
    layers' kernel pictures."""
    from protocols.records import atomic_savez, load_npz
    root = tmp_path / "runs"
    for run in EXAMPLE.rglob("metrics.csv"):
        target = root / run.parent.relative_to(EXAMPLE)
        target.mkdir(parents=True)
        for name in ("metrics.csv", "config.json", "status.json"):
            (target / name).write_bytes((run.parent / name).read_bytes())
        arrays = dict(load_npz(run.parent / "final.npz"))
        arrays["conv2_kernels"] = np.ones((4, 3, 5, 5), dtype=np.float32)
        atomic_savez(target / "final.npz", arrays)
    out = tmp_path / "out"
    assert report_main([str(root), "--out", str(out), "--threshold", "0.1", "0.5",
                        "--at", "100"]) == 0
    crossings = pd.read_csv(out / "iterations_to_threshold.csv")
    raw = _independent_table()
    assert sorted(set(crossings.threshold)) == [0.1, 0.5]
    assert len(crossings) == 2 * raw.run.nunique()
    summary = pd.read_csv(out / "threshold_summary.csv")
    assert len(summary) == 2 * raw.arm.nunique()
    paired = pd.read_csv(out / "paired_thresholds.csv")
    assert len(paired) == 2 * len(set(raw[raw.arm == "pretrained"].seed)
                                  & set(raw[raw.arm == "supervised"].seed))
    for arm in ("pretrained", "supervised"):
        assert (out / f"kernels_{arm}.png").exists() and (out / f"kernels_{arm}_conv2.png").exists()


def test_variance_test_against_scipy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.05, 0.002, 6), rng.normal(0.05, 0.02, 6)
    table = pd.DataFrame({"arm": ["pretrained"] * 6 + ["supervised"] * 6, "iteration": 100,
                          "test_error": np.r_[a, b]})
    row = stats.variance_test(table, 100).iloc[0]
    from scipy.stats import levene

    assert row["p_value"] == pytest.approx(levene(a, b, center="median").pvalue)
    assert row["variance_ratio"] == pytest.approx(b.var(ddof=1) / a.var(ddof=1))


def test_no_runs_is_an_error(tmp_path):
    with pytest.raises(RunsError, match="no run directories"):
        load_runs(tmp_path)


def test_drift_on_a_hand_made_table():
    # run a: logged every 100; windows of 300 end at 300..600 and average 3 evaluations
    errors_a = [0.9, 0.5, 0.04, 0.03, 0.02, 0.03, 0.05]  # iterations 0..600
    table = pd.DataFrame({"run": ["a"] * 7 + ["b"] * 2, "arm": ["x"] * 9,
                          "seed": [0] * 7 + [1] * 2,
                          "iteration": list(range(0, 700, 100)) + [0, 100],
                          "test_error": errors_a + [0.9, 0.1]})
    result = stats.drift(table, window=300).set_index("run")
    windows = {end: np.mean(errors_a[end // 100 - 2:end // 100 + 1]) for end in (300, 400, 500, 600)}
    assert result.loc["a", "last_window"] == pytest.approx(windows[600])
    assert result.loc["a", "best_window"] == pytest.approx(min(windows.values()))
    assert result.loc["a", "best_window_end"] == 500  # (0.03 + 0.02 + 0.03) / 3
    assert result.loc["a", "drift"] == pytest.approx(windows[600] - windows[500])
    assert np.isnan(result.loc["b", "drift"])  # shorter than one window


def test_drift_table_adds_the_train_drift_and_the_growth_since_the_best_window():
    from analysis.report import drift_table

    errors = [0.9, 0.5, 0.04, 0.03, 0.02, 0.03, 0.05]  # best 300-window ends at 500
    train = [0.9, 0.4, 0.03, 0.02, 0.01, 0.01, 0.04]  # best ends at 500 too: 0.04 - 0.02
    spikes = [100.0, 110, 120, 130, 150, 200, 300]
    table = pd.DataFrame({"run": ["a"] * 7, "arm": ["x"] * 7, "seed": [0] * 7,
                          "iteration": list(range(0, 700, 100)), "test_error": errors,
                          "train_error": train, "conv1_spikes": spikes,
                          "fc1_wnorm": [1.0, 1, 1, 1, 2, 3, 5]})
    row = drift_table(table, 300).set_index("run").loc["a"]
    assert row["best_window_end"] == 500
    assert row["train_drift"] == pytest.approx(np.mean(train[4:7]) - np.mean(train[3:6]))
    assert row["conv1_spikes_growth"] == pytest.approx(300 / 200)  # at 600 over at 500
    assert row["fc1_wnorm_growth"] == pytest.approx(5 / 3)
    # without diagnostics or train error: the plain drift table
    assert list(drift_table(table[["run", "arm", "seed", "iteration", "test_error"]], 300)) == \
        list(stats.drift(table, 300))


def test_ablation_compares_variants_up_to_an_iteration(tmp_path):
    """analysis.ablation on committed runs: a variant folder of ROOT and one given with
    --variant, cut at --until; numbers checked against the runs' metrics.csv read by pandas."""
    from analysis.ablation import main as ablation_main

    screen = Path(__file__).resolve().parents[1] / "results" / "ablation_shallow_screen" / "runs"
    assert ablation_main([str(screen), "--variant", f"example={EXAMPLE}", "--out",
                          str(tmp_path), "--at", "100", "200", "--until", "400",
                          "--threshold", "0.1"]) == 0
    runs = pd.read_csv(tmp_path / "per_run.csv")
    assert {"example", "sum_gate", "baseline"} <= set(runs.variant)
    assert runs.iterations.max() <= 400
    for variant, folder in (("example", EXAMPLE), ("sum_gate", screen / "sum_gate")):
        for metrics in folder.rglob("metrics.csv"):
            raw = pd.read_csv(metrics).set_index("iteration")
            seed = json.loads((metrics.parent / "config.json").read_text())["seed"]
            arm = metrics.parent.parent.name
            row = runs[(runs.variant == variant) & (runs.arm == arm) & (runs.seed == seed)].iloc[0]
            cut = raw[raw.index <= 400]
            assert row["test_200"] == pytest.approx(cut.test_error[200])
            assert row["best_test"] == pytest.approx(cut.test_error.min())
            below = cut.index[cut.test_error <= 0.1]
            assert (np.isnan(row["iter_to_0.1"]) and not len(below)) or row["iter_to_0.1"] == below[0]
            assert row["kernels_at"] == raw.index.max()  # the kernels of the run's last file
    summary = pd.read_csv(tmp_path / "ablation.csv")
    example = summary[(summary.variant == "example") & (summary.arm == "supervised")].iloc[0]
    mine = runs[(runs.variant == "example") & (runs.arm == "supervised")]
    assert example["reached_0.1"] == mine["iter_to_0.1"].notna().sum()
    assert example["test_200"] == pytest.approx(mine.test_200.mean())


def test_ablation_keeps_only_the_matched_seeds_asked_for(tmp_path, capsys):
    from analysis.ablation import main as ablation_main

    screen = Path(__file__).resolve().parents[1] / "results" / "ablation_shallow_screen" / "runs"
    args = [str(screen), "--variant", f"example={EXAMPLE}", "--out", str(tmp_path), "--at",
            "100", "200", "--until", "400", "--threshold", "0.1"]
    assert ablation_main(args + ["--seeds", "1"]) == 0
    runs = pd.read_csv(tmp_path / "per_run.csv")
    assert set(runs.seed) == {1} and {"example", "sum_gate"} <= set(runs.variant)
    assert ablation_main(args + ["--seeds", "1", "7"]) == 2
    assert "--seeds 7: no run of that seed" in capsys.readouterr().out


def test_collapsed_runs_are_those_whose_output_fell_silent():
    from analysis.ablation import SILENT_OUTPUT, collapsed

    def run(**cols):
        return pd.DataFrame(cols, index=pd.Index([0, 100, 200], name="iteration"))

    assert collapsed(run(fc1_spikes=[3.0, 0.0, 2.0])) == 1  # silent once is enough
    assert collapsed(run(fc1_spikes=[3.0, 2.0, SILENT_OUTPUT])) == 0
    assert collapsed(run(fc1_spikes=[0.0, 2.0, 1.0])) == 0  # the untrained net does not count
    # the output is the last FC layer (fc2 of the deep net), not fc1
    assert collapsed(run(fc1_spikes=[50.0, 40.0, 0.0], fc2_spikes=[3.0, 2.0, 1.0])) == 0
    assert collapsed(run(fc1_spikes=[50.0, 40.0, 30.0], fc2_spikes=[3.0, 0.01, 1.0])) == 1
    assert collapsed(run(test_error=[0.9, 0.5, 0.1])) == 0  # runs without diagnostics
