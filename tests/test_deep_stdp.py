"""Deep-STDP protocol (protocols/deep_stdp.py), its network (models/convnet.py) and its metrics
(analysis/clustering.py): hand-computed cases and a tiny end-to-end run on mnist-5k."""

import json

import numpy as np
import pandas as pd
import pytest

from analysis.clustering import (cluster_metrics, contingency, epochs_to_accuracy,
                                 hungarian_accuracy, iso_accuracy, paired_difference, t_ci)
from models.convnet import ConvNet, fisher_trace, softmax
from protocols.config import ConfigError, load_config
from protocols.deep_stdp import (DeepSTDPConfig, DeepSTDPSweep, onoff_intensities, plan,
                                 preprocess, run, uniform_over_clusters)


def test_hungarian_accuracy_hand_computed():
    clusters = np.array([0, 0, 1, 1, 1, 2])
    labels = np.array([1, 1, 0, 0, 2, 2])
    # best map: 0 -> 1 (2 right), 1 -> 0 (2 right), 2 -> 2 (1 right): 5 of 6
    assert hungarian_accuracy(clusters, labels) == pytest.approx(5 / 6)
    # one-to-one matters: a majority vote would map both clusters to class 0 (4 of 6)
    clusters = np.array([0, 0, 0, 1, 1, 1])
    labels = np.array([0, 0, 1, 0, 0, 1])
    assert hungarian_accuracy(clusters, labels) == pytest.approx(3 / 6)  # 0->0 (2) + 1->1 (1)
    # more clusters than classes: the unmatched cluster's images are errors
    assert hungarian_accuracy(np.array([0, 1, 2, 2]), np.array([0, 1, 1, 1])) == 0.75
    np.testing.assert_array_equal(contingency(np.array([1, 1, 0]), np.array([0, 2, 2])),
                                  [[0, 0, 1], [1, 0, 1]])
    perfect = cluster_metrics(np.array([2, 2, 0, 0, 1]), np.array([0, 0, 1, 1, 2]))
    assert perfect == {"accuracy": 1.0, "nmi": pytest.approx(1.0), "ari": pytest.approx(1.0)}
    with pytest.raises(ValueError, match="one length"):
        hungarian_accuracy(np.array([0, 1]), np.array([0]))


def test_iso_accuracy_and_paired_differences():
    rows = []
    for seed in range(3):
        for epoch, (a_stdp, a_km) in enumerate([(0.3, 0.3), (0.5, 0.35), (0.6, 0.4)]):
            rows.append(dict(dataset="d", method="stdp", seed=seed, run=f"s{seed}", epoch=epoch,
                             accuracy=a_stdp + (0.0, 0.01, 0.05)[seed]))
            rows.append(dict(dataset="d", method="kmeans", seed=seed, run=f"k{seed}", epoch=epoch,
                             accuracy=a_km + (0.0, 0.01, 0.05)[seed]))
    table = pd.DataFrame(rows)
    iso = iso_accuracy(table)
    # target: mean best k-means accuracy (0.40, 0.41, 0.45) = 0.42; only seed 2 reaches it
    assert iso.target.iloc[0] == pytest.approx(0.42)
    stdp = iso[iso.method == "stdp"].sort_values("seed").epochs_to_target.tolist()
    assert stdp == [1, 1, 1]
    km = iso[iso.method == "kmeans"].sort_values("seed").epochs_to_target.tolist()
    assert np.isnan(km[0]) and np.isnan(km[1]) and km[2] == 2
    # common target: the lower mean best accuracy, k-means' 0.42 again here
    common = iso_accuracy(table, target="common")
    assert common.target.iloc[0] == pytest.approx(0.42)
    assert iso_accuracy(table, target=0.5).query("method == 'stdp'").epochs_to_target.tolist() == [1, 1, 1]
    diff = paired_difference(table, "accuracy")
    assert diff.accuracy_diff_mean.round(6).tolist() == [0.0, 0.15, 0.2]
    assert epochs_to_accuracy(table[table.run == "s0"], 0.55) == 2
    m, lo, hi = t_ci([1.0, 2.0, 3.0])
    assert m == 2.0 and hi - m == pytest.approx(4.302653 / np.sqrt(3), rel=1e-5)


def test_pseudo_label_bookkeeping():
    labels = np.array([0] * 90 + [3] * 9 + [5])  # clusters 1, 2, 4 are empty
    idx = uniform_over_clusters(labels, 300, np.random.default_rng(0))
    counts = np.bincount(labels[idx], minlength=6)
    assert len(idx) == 300
    assert list(counts) == [100, 0, 0, 100, 0, 100]
    # every index is a real image of its cluster
    assert set(idx[labels[idx] == 5]) == {99}


def test_preprocessing_pca_whitening_l2_and_onoff():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(200, 12)) @ rng.normal(size=(12, 12))
    z = preprocess(feats, 5, seed=0)
    assert z.shape == (200, 5)
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0)
    x = onoff_intensities(z)
    assert x.shape == (200, 10) and x.min() >= 0 and np.allclose(x.max(axis=0), 1.0)
    # on and off channels never both active
    assert not np.any((x[:, :5] > 0) & (x[:, 5:] > 0))


def test_convnet_gradients_and_fisher_trace():
    rng = np.random.default_rng(0)
    net = ConvNet("10x10-3C3-2P-5FC-4FC", rng, dtype=np.float64)
    x = rng.random((3, 1, 10, 10))
    y = np.array([0, 2, 3])

    def loss():
        p = softmax(net.forward(x)[-1])
        return -np.log(p[np.arange(3), y]).sum()

    acts = net.forward(x)
    d = softmax(acts[-1])
    d[np.arange(3), y] -= 1
    grads, sq = net.backward(acts, d, per_sample_sqnorm=True)
    for i, p in enumerate(net.params):
        if p is None:
            continue
        for q, g in zip(p, grads[i]):
            idx = tuple(rng.integers(s) for s in q.shape)
            old = q[idx]
            q[idx] = old + 1e-6
            up = loss()
            q[idx] = old - 1e-6
            down = loss()
            q[idx] = old
            assert (up - down) / 2e-6 == pytest.approx(g[idx], abs=1e-7)
    # per-sample squared gradient norms equal one-image backward passes
    for b in range(3):
        a = net.forward(x[b:b + 1])
        d = softmax(a[-1])
        d[0, y[b]] -= 1
        g, _ = net.backward(a, d)
        assert sq[b] == pytest.approx(sum((q ** 2).sum() for gg in g if gg for q in gg))
    assert fisher_trace(net, x, np.random.default_rng(1)) > 0


def test_config_errors_name_the_problem(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('method = "dbscan"\n')
    with pytest.raises(ConfigError, match="method"):
        load_config(bad, DeepSTDPConfig)
    with pytest.raises(ValueError, match="12FC"):
        run(DeepSTDPConfig(n_clusters=12, out=str(tmp_path / "r")))
    cfg = load_config({"seeds": [1, 2], "datasets": ["mnist-5k"], "out": "x",
                       "run": {"epochs": 2, "wta": {"presentation": "50 ms"}}}, DeepSTDPSweep)
    runs = plan(cfg)
    assert [(c.method, c.seed) for c in runs] == [("stdp", 1), ("stdp", 2), ("kmeans", 1),
                                                  ("kmeans", 2)]
    assert runs[0].out == "x/mnist-5k/stdp/seed1" and runs[0].wta.steps == 50


TINY = dict(dataset="mnist-5k", topology="28x28-4C5-2P-16FC-10FC", epochs=2, train_images=300,
            pca_dim=8, fisher_images=50)


@pytest.mark.parametrize("method", ["stdp", pytest.param("kmeans", marks=pytest.mark.slow)])
def test_tiny_end_to_end_run_on_mnist_5k(tmp_path, method):
    cfg = DeepSTDPConfig(method=method, seed=3, out=str(tmp_path / "a"), **TINY)
    frame = run(cfg, progress=False)
    assert list(frame.epoch) == [0, 1]
    for column in ("accuracy", "nmi", "ari", "fisher_trace", "train_loss"):
        assert frame[column].notna().all(), column
    assert (frame.accuracy > 0.15).all()  # 10 classes: chance with balanced clusters ~0.1-0.15
    record = json.loads((tmp_path / "a" / "config.json").read_text())
    assert record["config"]["seed"] == 3 and record["versions"]["numpy"]
    assert json.loads((tmp_path / "a" / "status.json").read_text())["status"] == "finished"
    # same seed, same numbers; a finished folder is not recomputed
    again = run(DeepSTDPConfig(method=method, seed=3, out=str(tmp_path / "b"), **TINY),
                progress=False)
    pd.testing.assert_frame_equal(frame.drop(columns=["seconds_cluster", "seconds_total"]),
                                  again.drop(columns=["seconds_cluster", "seconds_total"]))
    mtime = (tmp_path / "a" / "metrics.csv").stat().st_mtime
    run(cfg, progress=False)
    assert (tmp_path / "a" / "metrics.csv").stat().st_mtime == mtime


def test_report_reads_finished_runs_and_leaves_out_the_rest(tmp_path):
    from analysis.clustering import report

    for method in ("stdp", "kmeans"):
        for seed in (0, 1):
            run_dir = tmp_path / "runs" / method / f"seed{seed}"
            run_dir.mkdir(parents=True)
            acc = [0.3, 0.4] if method == "stdp" else [0.5, 0.45]
            pd.DataFrame({"epoch": [0, 1], "accuracy": np.add(acc, 0.01 * seed),
                          "nmi": [0.2, 0.3], "ari": [0.1, 0.2],
                          "fisher_trace": [5.0, 4.0]}).to_csv(run_dir / "metrics.csv", index=False)
            (run_dir / "config.json").write_text(json.dumps(
                {"config": {"method": method, "dataset": "d", "seed": seed}}))
            (run_dir / "status.json").write_text(json.dumps({"status": "finished"}))
    broken = tmp_path / "runs" / "stdp" / "seed9"
    broken.mkdir()
    (broken / "metrics.csv").write_text("epoch,accuracy\n0,0.1\n")
    (broken / "status.json").write_text(json.dumps({"status": "running"}))
    result = report(tmp_path / "runs", tmp_path / "out")
    assert result["runs"] == 4 and len(result["skipped"]) == 1 and "seed9" in result["skipped"][0]
    paired = pd.read_csv(tmp_path / "out" / "paired_accuracy.csv")
    assert paired.accuracy_diff_mean.round(6).tolist() == [-0.2, -0.05]
    iso = pd.read_csv(tmp_path / "out" / "iso_accuracy.csv")
    assert set(iso.method) == {"stdp", "kmeans"}
    assert (tmp_path / "out" / "curves_accuracy.png").exists()
