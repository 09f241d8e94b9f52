"""Per-map threshold homeostasis during fine-tuning (BPParameters.threshold_homeostasis).

The rule is checked on numbers worked out by hand, its effect on the spiking network itself
(a map pushed towards silence fires at its first rate again), and its place in the trainer
(the targets come back identically when a run resumes)."""

import math

import numpy as np
import pandas as pd
import pytest
from brian2 import ms

from models.batched import forward
from models.initialisation import initialise
from models.parameters import BPParameters, ParameterError
from models.topology import parse_topology
from protocols.bp import adapt_thresholds, map_rates
from protocols.train import TrainConfig, TrainingSettings, rng_for, train
from test_train import LIVELY  # noqa: E402 (tests/ on sys.path)


def test_rule_on_hand_worked_numbers():
    from models.batched import LayerParams

    th = np.array([1.0, 2.0, 0.5, 1.0, 3.0], np.float32)
    p = LayerParams(weights=np.zeros((5, 1, 3, 3), np.float32), thresholds=th.copy())
    target = np.array([0.1, 0.1, 0.1, 0.0, 0.2])
    rate = np.array([0.0, 0.1, 0.15, 0.3, 1.0])  # silent, on target, +50 %, no target, 5x
    adapt_thresholds([None, p], [None, rate], [None, target], gamma=0.1)
    want = th * np.exp(0.1 * np.array([-1.0, 0.0, 0.5, 0.0, 1.0]))  # the clip caps 4.0 at 1
    np.testing.assert_allclose(p.thresholds, want, rtol=1e-6)
    with pytest.raises(ParameterError, match="threshold_homeostasis"):
        BPParameters(threshold_homeostasis=-0.1)


def test_a_map_pushed_towards_silence_fires_at_its_first_rate_again():
    layers = parse_topology("12x12-4C3-2P-10FC")
    rng = np.random.default_rng(0)
    params = initialise(layers, rng)
    params[1].weights[:] = np.abs(params[1].weights)  # excitatory maps firing at moderate rates
    params[1].thresholds[:] = 2.0
    x = rng.random((40, 30, 1, 12, 12)) < 0.3
    tau_p = 20.0
    targets = map_rates(layers, forward(layers, params, x, tau_p=tau_p, keep_spikes=False))
    assert (targets[1] > 0).all()
    params[1].weights[2] *= 0.4  # map 2's drive falls: it nearly stops firing
    th0 = params[1].thresholds.copy()
    first = map_rates(layers, forward(layers, params, x, tau_p=tau_p, keep_spikes=False))[1]
    assert first[2] < 0.5 * targets[1][2]
    for _ in range(60):
        rates = map_rates(layers, forward(layers, params, x, tau_p=tau_p, keep_spikes=False))
        adapt_thresholds(params, rates, targets, gamma=0.1)
    rates = map_rates(layers, forward(layers, params, x, tau_p=tau_p, keep_spikes=False))[1]
    assert rates[2] == pytest.approx(targets[1][2], rel=0.15)
    assert params[1].thresholds[2] < 0.7 * th0[2]  # it got there by lowering its threshold
    others = [0, 1, 3]
    np.testing.assert_allclose(rates[others], targets[1][others], rtol=0.15)
    fc_th = initialise(layers, np.random.default_rng(0))[3].thresholds
    np.testing.assert_array_equal(params[3].thresholds, fc_th)  # FC thresholds stay frozen


#: a 3-map net that trains in seconds, with homeostasis on: resuming it needs initial.npz (the
#: targets are recomputed from it); also tests/test_archive.py
HOMEOSTASIS_RUN = TrainConfig(topology="28x28-3C5-2P-10FC",
                              training=TrainingSettings(iterations=6, log_every=2,
                                                        train_eval_images=50,
                                                        test_eval_images=50,
                                                        eval_duration="5 ms"),
                              bp=BPParameters(t_first_epoch=6 * ms, t_later_epochs=4 * ms,
                                              eta=3.0, threshold_homeostasis=0.2))


def test_trainer_adapts_thresholds_and_resumes_identically(tmp_path):
    from protocols.datasets import load_dataset

    data = load_dataset("mnist-5k")
    cfg = HOMEOSTASIS_RUN
    # alive at the start: the run without homeostasis below would stop at a silent pool1
    params = initialise(parse_topology(cfg.topology), rng_for(0, 0), "lee", LIVELY)
    full = train(cfg, tmp_path / "full", data, params, excluded=range(3850), progress=False)
    assert "conv1_th_mean" in full.columns
    th = full.conv1_th_mean.to_numpy()
    assert not np.allclose(th, th[0])  # the thresholds moved
    part = train(cfg, tmp_path / "part", data, params, excluded=range(3850), progress=False,
                 stop_after=3)
    rest = train(cfg, tmp_path / "part", data, None, excluded=range(3850), progress=False)
    pd.testing.assert_frame_equal(full.drop(columns="wall_time_s"),
                                  rest.drop(columns="wall_time_s"))
    # off (the default), no threshold column and the thresholds stay as initialised
    # (eta 0.5: at 3, without homeostasis, this net's pool1 falls silent by batch 3 and the
    # gated run stops there)
    off = TrainConfig(topology=cfg.topology, training=cfg.training,
                      bp=BPParameters(t_first_epoch=6 * ms, t_later_epochs=4 * ms, eta=0.5))
    plain = train(off, tmp_path / "off", data, params, excluded=range(3850), progress=False)
    assert "conv1_th_mean" not in plain.columns
    with np.load(tmp_path / "off" / "final.npz") as final:
        np.testing.assert_array_equal(final["conv1_thresholds"], params[1].thresholds)
    assert math.isfinite(float(full.test_error.iloc[-1]))
