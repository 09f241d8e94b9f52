"""Feature readout (protocols/feature_readout.py): threshold tuning and the end-to-end pipeline."""

import csv
import json

import numpy as np
import pytest

from models.topology import parse_topology
from protocols import feature_readout as fr
from models.parameters import LIFParameters, PoolingParameters

TOPOLOGY = "28x28-4C5-2P-10FC"


def _spikes(n=60, seed=0):
    from protocols.datasets import load_dataset

    images = load_dataset("mnist-5k").train_images[::67][:n]
    from brian2 import ms

    return fr._encode(images, 25, np.random.default_rng(seed), 250.0, 1 * ms)


def test_tuned_thresholds_reproduce_the_target_rate_of_every_map():
    layers = fr._conv_pool_layers(TOPOLOGY)
    lif, pool = LIFParameters(), PoolingParameters()
    rng = np.random.default_rng(3)
    k = np.sqrt(3 / 25)
    kernels = rng.uniform(-k, k, size=(4, 1, 5, 5))
    spikes = _spikes()
    # targets that some threshold does reach: the rates of the same kernels at known thresholds,
    # one map silent
    reference = np.array([0.3, 0.6, 1.0, 50.0])
    target = fr.map_rates(fr.conv_pool_counts(layers, kernels, reference, spikes, lif, pool)[0])
    assert target[:3].min() > 1 and target[3] == 0
    th, rate = fr.tune_thresholds(layers, kernels, spikes, target, lif, pool, iters=24)
    np.testing.assert_allclose(rate, target, rtol=0.01, atol=0.05)
    assert th[3] > kernels[3].clip(0).sum()  # silent map gets a threshold above its reach
    # the rate falls with the threshold (the property bisection relies on), map by map
    higher = fr.map_rates(fr.conv_pool_counts(layers, kernels, th * 1.5, spikes, lif, pool)[0])
    assert np.all(higher[:3] < rate[:3])


def test_pipeline_end_to_end_on_two_digits(tmp_path, monkeypatch):
    """Pre-train (runtime device, 40 images), tune, extract, fit: on 0-vs-1 images every arm is
    far above chance, the rates match, and the files hold what the summary says."""
    import protocols.datasets as datasets

    full = datasets.load_dataset("mnist-5k")

    def two_digits(name, data_dir=None):
        tr = np.isin(full.train_labels, (0, 1))
        te = np.isin(full.test_labels, (0, 1))
        return datasets.Dataset("mnist-5k-01", full.train_images[tr], full.train_labels[tr],
                                full.test_images[te], full.test_labels[te], full.source)

    monkeypatch.setattr(datasets, "load_dataset", two_digits)
    out = tmp_path / "fr"
    assert fr.main(["--seeds", "0", "--topology", TOPOLOGY, "--device", "runtime",
                    "--n-pretrain", "40", "--n-train", "200", "--n-test", "100",
                    "--batch", "100", "--out", str(out), "--no-progress"]) == 0

    rows = list(csv.DictReader((out / "results.csv").open()))
    assert {(r["arm"], r["features"]) for r in rows} == {
        ("stdp", "pool_spikes"), ("random", "pool_spikes"), ("stdp", "conv_sum2x2"),
        ("random", "conv_sum2x2"), ("pixels", "pixels")}
    n_feat = int(np.prod(parse_topology(TOPOLOGY)[2].shape))  # 4 maps × 12 × 12
    for r in rows:
        assert int(r["n_features"]) == (784 if r["arm"] == "pixels" else n_feat)
        assert int(r["n_train"]) == 200 and int(r["n_test"]) == 100
        # 0 vs 1 is trivially separable: chance is 50 %
        if r["features"] != "pool_spikes":  # pooled spikes are sparse on 4 maps; see below
            assert float(r["test_accuracy"]) > 0.9, r
    # the pooled spikes of 4 maps after 40 pre-training images are few (the sparse code of the
    # scaled window offset): above chance by a one-sided binomial test on the 100 test images,
    # not by a margin
    from scipy.stats import binomtest

    pooled = [round(float(r["test_accuracy"]) * 100) for r in rows
              if r["features"] == "pool_spikes"]
    assert binomtest(max(pooled), 100, 0.5, alternative="greater").pvalue < 0.01, pooled

    record = json.loads((out / "results.json").read_text())
    assert record["complete"] and record["seeds_done"] == [0]
    assert record["readout_config"]["C"] == 1.0 and "sklearn" in record["versions"]
    tuning = record["per_seed"]["0"]["tuning"]
    target = np.array(tuning["target_spikes_per_image_per_map"])
    got = np.array(tuning["random_spikes_per_image_per_map"])
    assert target.sum() > 0
    np.testing.assert_allclose(got, target, rtol=0.02, atol=0.05)
    # the STDP thresholds are the pre-training output (base + homeostatic theta), not retuned
    pre = np.load(out / "seed0" / "pretrained.npz", allow_pickle=False)
    np.testing.assert_allclose(tuning["stdp_thresholds"], pre["conv1_thresholds"])
    rand = np.load(out / "seed0" / "random_conv1.npz", allow_pickle=False)
    k = np.sqrt(3 / 25)
    assert rand["conv1_kernels"].shape == (4, 1, 5, 5) and np.abs(rand["conv1_kernels"]).max() <= k
    # out of sample (test images, other Poisson draws) the total rates stay close
    test_rates = record["per_seed"]["0"]["test_rates_per_map"]
    assert sum(test_rates["random"]) == pytest.approx(sum(test_rates["stdp"]), rel=0.25)
    assert "| raw pixels |" in (out / "summary.md").read_text()


def test_subsets_are_fixed_across_seeds_and_validated():
    a = fr.subset(1000, 100)
    np.testing.assert_array_equal(a, fr.subset(1000, 100))
    assert len(np.unique(a)) == 100 and np.all(np.diff(a) > 0)
    np.testing.assert_array_equal(fr.subset(50, None), np.arange(50))
    with pytest.raises(ValueError):
        fr.subset(10, 0)
    with pytest.raises(ValueError, match="conv layer followed by pooling"):
        fr._conv_pool_layers("28x28-10FC")


def test_layer1_numbers_unchanged_by_the_stack_generalisation():
    """Values the one-layer code produced before conv_pool_counts / tune_thresholds /
    extract_features took a stack of conv+pool layers (commit dc164e0; same inputs)."""
    from brian2 import ms

    layers = fr._conv_pool_layers(TOPOLOGY)
    lif, pool = LIFParameters(), PoolingParameters()
    rng = np.random.default_rng(3)
    k = np.sqrt(3 / 25)
    kernels = rng.uniform(-k, k, size=(4, 1, 5, 5))
    from protocols.datasets import load_dataset

    images = load_dataset("mnist-5k").train_images[::67][:30]
    spikes = fr._encode(images, 25, np.random.default_rng(0), 250.0, 1 * ms)
    th0 = np.array([0.3, 0.6, 1.0, 50.0])
    conv, pooled = fr.conv_pool_counts(layers, kernels, th0, spikes, lif, pool)
    assert conv.sum(axis=(0, 2, 3)).tolist() == [11517, 22749, 14315, 0]
    assert pooled.sum(axis=(0, 2, 3)).tolist() == [1760, 4483, 2680, 0]
    th, rate = fr.tune_thresholds(layers, kernels, spikes, fr.map_rates(conv) * 0.7, lif, pool,
                                  iters=24)
    np.testing.assert_allclose(th, [0.4261276327307511, 0.8467346401309034,
                                    1.3348351056511518, 33.93525104284159], rtol=1e-9)
    np.testing.assert_allclose(rate, [268.73333740234375, 530.7999877929688, 334.0, 0.0])
    res = fr.extract_features(layers, {"a": (kernels, th0), "b": (kernels, th)}, images,
                              np.random.default_rng(5), fr.ReadoutConfig(batch=12), 250.0, lif,
                              pool)
    checksums = {}
    for key, f in res["features"].items():
        w = (np.arange(f.size) % 97).reshape(f.shape)
        checksums[key] = (int(f.sum(dtype=np.int64)), int((f.astype(np.int64) * w).sum()))
    assert checksums == {("a", "pool_spikes"): (8931, 436971),
                         ("a", "conv_sum2x2"): (48740, 2377078),
                         ("b", "pool_spikes"): (5652, 277459),
                         ("b", "conv_sum2x2"): (33958, 1659795)}
    np.testing.assert_allclose(res["rates"]["a"], [389.3, 759.3666666666667, 476.0, 0.0])
    np.testing.assert_allclose(res["rates"]["b"], [270.2, 527.2, 334.53333333333336, 0.0])
    assert res["pool_spikes_per_image"] == pytest.approx({"a": 297.7, "b": 188.4})
    # the new per-layer totals agree with the old per-map / pooled numbers
    assert res["layer_spikes_per_image"]["a"]["conv1"] == pytest.approx(sum(res["rates"]["a"]))
    assert res["layer_spikes_per_image"]["a"]["pool1"] == pytest.approx(297.7)


TOPOLOGY2 = "28x28-4C5-2P-6C5-2P-10FC"


def test_conv2_thresholds_tuned_on_a_fixed_conv1_reach_the_target_rates():
    from brian2 import ms

    layers = fr._conv_pool_layers(TOPOLOGY2, 2)
    assert fr.stack_names(layers) == ["conv1", "pool1", "conv2", "pool2"]
    lif, pool = LIFParameters(), PoolingParameters()
    rng = np.random.default_rng(3)
    k1 = rng.uniform(-np.sqrt(3 / 25), np.sqrt(3 / 25), size=(4, 1, 5, 5))
    k2 = rng.uniform(-np.sqrt(3 / 100), np.sqrt(3 / 100), size=(6, 4, 5, 5))
    th1 = np.array([0.3, 0.3, 0.4, 0.5])
    spikes = _spikes()
    # targets that some threshold does reach: the conv2 rates of the same kernels at known
    # thresholds, one map silent
    counts = fr.stack_counts(layers, [k1, k2], [th1, np.array([0.05, 0.1, 0.15, 0.2, 0.3, 50])],
                             spikes, lif, pool)
    assert [c.shape[1:] for c in counts] == [(4, 24, 24), (4, 12, 12), (6, 8, 8), (6, 4, 4)]
    target = fr.map_rates(counts[2])
    assert target[:5].min() > 1 and target[5] == 0
    th, rate = fr.tune_thresholds(layers, [k1, k2], spikes, target, lif, pool, iters=24,
                                  lower_thresholds=[th1])
    np.testing.assert_allclose(rate, target, rtol=0.01, atol=0.05)
    # the returned rates are those of the whole stack with the tuned thresholds
    again = fr.conv_pool_counts(layers, [k1, k2], [th1, th], spikes, lif, pool)[0]
    np.testing.assert_array_equal(fr.map_rates(again), rate)
    with pytest.raises(ValueError, match="lower_thresholds"):
        fr.tune_thresholds(layers, [k1, k2], spikes, target, lif, pool, iters=2)
    with pytest.raises(ValueError, match="one array per conv layer"):
        fr.stack_counts(layers, k1, th1, spikes, lif, pool)
    with pytest.raises(ValueError, match="2 pairs of a conv layer followed by pooling"):
        fr._conv_pool_layers(TOPOLOGY, 2)


def test_layer2_pipeline_end_to_end(tmp_path, monkeypatch):
    """--layer 2 (and the mixed arm) on a small deep net: runs, tunes conv1 then conv2 of the
    random arm to the STDP rates, and reports spikes per image of every layer."""
    import protocols.datasets as datasets

    full = datasets.load_dataset("mnist-5k")
    monkeypatch.setattr(datasets, "load_dataset", lambda name, data_dir=None: full)
    out = tmp_path / "fr2"
    assert fr.main(["--layer", "2", "--mixed-arm", "--seeds", "0", "--topology", TOPOLOGY2,
                    "--device", "runtime", "--n-pretrain", "100", "--n-train", "100",
                    "--n-test", "50", "--batch", "50", "--out", str(out), "--no-progress"]) == 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    arms = ("stdp", "random", fr.MIXED_ARM)
    assert {(r["arm"], r["features"]) for r in rows} == {
        *((a, v) for a in arms for v in fr.FEATURES), ("pixels", "pixels")}
    for r in rows:
        assert int(r["n_features"]) == (784 if r["arm"] == "pixels" else 6 * 4 * 4)
        if r["arm"] != "pixels":
            for part in ("train", "test"):
                assert all(float(r[f"{n}_spikes_per_image_{part}"]) >= 0
                           for n in ("conv1", "pool1", "conv2", "pool2"))
            assert float(r["conv2_spikes_per_image_test"]) == pytest.approx(
                float(r["conv_spikes_per_image_test"]))
            assert float(r["pool2_spikes_per_image_test"]) == pytest.approx(
                float(r["pool_spikes_per_image_test"]))
    # the mixed arm runs the STDP conv1: its conv1/pool1 spikes are the STDP arm's
    by_arm = {r["arm"]: r for r in rows if r["features"] == "pool_spikes"}
    for n in ("conv1", "pool1"):
        assert by_arm[fr.MIXED_ARM][f"{n}_spikes_per_image_test"] == \
            by_arm["stdp"][f"{n}_spikes_per_image_test"]

    record = json.loads((out / "results.json").read_text())
    assert record["layer"] == 2 and record["complete"]
    tuning = record["per_seed"]["0"]["tuning"]
    # conv2 fires < 1 spike per image per map here, so one spike more or less over the 100
    # tuning images is 0.01: the rate is a step function of the threshold
    for t in (tuning, tuning["lower_layers"]["conv1"], tuning[fr.MIXED_ARM]):
        target = np.array(t["target_spikes_per_image_per_map"])
        assert target.sum() > 0
        np.testing.assert_allclose(t["random_spikes_per_image_per_map"], target, rtol=0.02,
                                   atol=0.05)
    assert len(tuning["target_spikes_per_image_per_map"]) == 6
    assert len(tuning["lower_layers"]["conv1"]["target_spikes_per_image_per_map"]) == 4
    pre = np.load(out / "seed0" / "pretrained.npz", allow_pickle=False)
    np.testing.assert_allclose(tuning["stdp_thresholds"], pre["conv2_thresholds"])
    rand = np.load(out / "seed0" / "random_conv2.npz", allow_pickle=False)
    assert rand["conv1_kernels"].shape == (4, 1, 5, 5)
    assert rand["conv2_kernels"].shape == (6, 4, 5, 5)
    assert np.abs(rand["conv2_kernels"]).max() <= np.sqrt(3 / 100)
    np.testing.assert_allclose(rand["conv2_thresholds"], tuning["random_thresholds"])
    summary = (out / "summary.md").read_text()
    assert "| conv kernels | images | conv1 | pool1 | conv2 | pool2 |" in summary
    with pytest.raises(ValueError, match="needs a topology with 2 conv"):
        fr.main(["--layer", "2", "--seeds", "0", "--topology", "28x28-4C5-2P-6C5-2P-4C3-10FC",
                 "--device", "runtime", "--n-pretrain", "4", "--n-train", "10", "--n-test",
                 "10", "--out", str(tmp_path / "x"), "--no-progress"])
