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
    pooled = [float(r["test_accuracy"]) for r in rows if r["features"] == "pool_spikes"]
    assert max(pooled) > 0.7

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
