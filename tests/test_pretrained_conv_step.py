"""The step factor for pre-trained conv layers (BPParameters.pretrained_conv_eta_scale): it
scales η only for the conv layers of the arm that starts from STDP pre-training, it acts on the
weights as the factor it names, and records made before it existed still resume."""

import dataclasses
import json

import numpy as np
import pytest
from brian2 import ms

from models.initialisation import initialise
from models.parameters import BPParameters, ParameterError
from models.topology import parse_topology
from protocols.bp import layer_learning_rates
from protocols.train import TrainConfig, TrainingSettings, rng_for, train
from test_train import LIVELY  # noqa: E402 (tests/ on sys.path)

TOPOLOGY = "28x28-3C5-2P-10FC"
# the fixed factor alone: the balanced step (the default since 2026-12-01) off
BP = BPParameters(t_first_epoch=6 * ms, t_later_epochs=4 * ms, eta=0.5,
                  pretrained_conv_step_balance=0.0)
RUN = TrainConfig(topology=TOPOLOGY,
                  training=TrainingSettings(iterations=2, log_every=1, train_eval_images=20,
                                            test_eval_images=20, eval_duration="5 ms"),
                  bp=BP)


@pytest.fixture(scope="module")
def data():
    from protocols.datasets import load_dataset

    return load_dataset("mnist-5k")


def test_learning_rates_scale_only_pretrained_conv_layers():
    layers = parse_topology("28x28-4C5-2P-6C5-2P-10FC")  # conv, pool, conv, pool, fc
    bp = dataclasses.replace(BP, eta=2.0, conv_eta_scale=3.0, pretrained_conv_eta_scale=10.0)
    assert layer_learning_rates(layers, bp, pretrained_conv=True)[1:] == [60.0, 2.0, 60.0, 2.0,
                                                                          2.0]
    assert layer_learning_rates(layers, bp, pretrained_conv=False)[1:] == [6.0, 2.0, 6.0, 2.0,
                                                                           2.0]
    with pytest.raises(ParameterError, match="pretrained_conv_eta_scale"):
        dataclasses.replace(BP, pretrained_conv_eta_scale=0.0)


def _conv_after_training(cfg, run_dir, data):
    params = initialise(parse_topology(TOPOLOGY), rng_for(0, 0), "lee", LIVELY)
    train(cfg, run_dir, data, params, progress=False)
    with np.load(run_dir / "final.npz") as final:
        return final["conv1_kernels"].astype(float), final["fc1_weights"].astype(float)


def test_the_factor_trains_pretrained_conv_layers_as_that_conv_step(tmp_path, data):
    """A pre-trained run with the factor s takes the same steps as a run whose conv η is s times
    larger (conv_eta_scale = s); a run that is not pre-trained ignores it."""
    scaled = dataclasses.replace(RUN, pretrained_conv=True,
                                 bp=dataclasses.replace(BP, pretrained_conv_eta_scale=3.0))
    direct = dataclasses.replace(RUN, bp=dataclasses.replace(BP, conv_eta_scale=3.0))
    ignored = dataclasses.replace(RUN, pretrained_conv=False,
                                  bp=dataclasses.replace(BP, pretrained_conv_eta_scale=3.0))
    conv_s, fc_s = _conv_after_training(scaled, tmp_path / "scaled", data)
    conv_d, fc_d = _conv_after_training(direct, tmp_path / "direct", data)
    conv_i, fc_i = _conv_after_training(ignored, tmp_path / "ignored", data)
    conv_1, fc_1 = _conv_after_training(RUN, tmp_path / "plain", data)
    np.testing.assert_array_equal(conv_s, conv_d)
    np.testing.assert_array_equal(fc_s, fc_d)
    np.testing.assert_array_equal(conv_i, conv_1)
    np.testing.assert_array_equal(fc_i, fc_1)
    assert not np.array_equal(conv_s, conv_1)  # the factor moved the conv layer differently


def test_records_without_the_factor_resume_and_a_factor_is_another_run(tmp_path, data):
    """A run recorded before the options existed (no bp keys, no pretrained_conv) resumes under
    a config of its arm with both off; a pre-trained one under today's default (the balanced
    step) or with a factor is a different run; a supervised one resumes under today's default,
    whose pre-trained-conv options do not act on it."""
    params = initialise(parse_topology(TOPOLOGY), rng_for(0, 0), "lee", LIVELY)

    def as_recorded_before_the_options(folder):
        record = json.loads((folder / "config.json").read_text())
        del record["config"]["bp"]["pretrained_conv_eta_scale"]
        del record["config"]["bp"]["pretrained_conv_step_balance"]
        del record["config"]["pretrained_conv"]
        (folder / "config.json").write_text(json.dumps(record))

    longer = dataclasses.replace(RUN.training, iterations=3)
    pinned = dataclasses.replace(RUN, pretrained_conv=True)
    train(pinned, tmp_path / "pre", data, params, progress=False, stop_after=1)
    as_recorded_before_the_options(tmp_path / "pre")
    frame = train(pinned, tmp_path / "pre", data, None, progress=False)
    assert list(frame.iteration) == [0, 1, 2]
    for other in (dataclasses.replace(BP, pretrained_conv_eta_scale=10.0),
                  dataclasses.replace(BP, pretrained_conv_step_balance=BPParameters()
                                      .pretrained_conv_step_balance)):
        with pytest.raises(ValueError, match="different 'config'"):
            train(dataclasses.replace(pinned, bp=other, training=longer), tmp_path / "pre",
                  data, None, progress=False)

    default_bp = dataclasses.replace(BPParameters(), t_first_epoch=6 * ms,
                                     t_later_epochs=4 * ms, eta=0.5)
    assert default_bp.pretrained_conv_step_balance > 0
    supervised = dataclasses.replace(RUN, pretrained_conv=False)
    train(supervised, tmp_path / "sup", data, params, progress=False, stop_after=1)
    as_recorded_before_the_options(tmp_path / "sup")
    frame = train(dataclasses.replace(supervised, bp=default_bp), tmp_path / "sup", data, None,
                  progress=False)
    assert list(frame.iteration) == [0, 1, 2]


def test_balanced_factors_follow_the_rule_and_its_bounds():
    from protocols.bp import STEP_FACTOR_BOUNDS, balanced_step_factors

    layers = parse_topology("28x28-4C5-2P-6C5-2P-20FC-10FC")  # conv1 pool1 conv2 pool2 fc1 fc2
    steps = {"conv1_rel_step": 0.001, "conv2_rel_step": 0.004, "fc1_rel_step": 0.01,
             "fc2_rel_step": 0.03}
    out = balanced_step_factors(layers, [1.0, 2.0, 1.0, 3.0, 1.0, 1.0, 1.0], steps, 0.5)
    # r_fc = 0.02, c·r_fc = 0.01: conv1 2 × 10 = 20, conv2 3 × 2.5 = 7.5; the rest unchanged
    assert out == pytest.approx([1.0, 20.0, 1.0, 7.5, 1.0, 1.0, 1.0])
    low, high = STEP_FACTOR_BOUNDS
    assert balanced_step_factors(layers, [1.0, 5.0, 1.0, 1.0, 1.0, 1.0, 1.0],
                                 {**steps, "conv1_rel_step": 1.0}, 0.5)[1] == low
    assert balanced_step_factors(layers, [1.0, 50.0, 1.0, 1.0, 1.0, 1.0, 1.0], steps, 0.5)[1] == high
    # a conv layer without a step in the interval (gated, silent) keeps its factor
    assert balanced_step_factors(layers, [1.0, 4.0, 1.0, 1.0, 1.0, 1.0, 1.0],
                                 {k: v for k, v in steps.items() if k != "conv1_rel_step"},
                                 0.5)[1] == 4.0


BALANCED = dataclasses.replace(
    RUN, pretrained_conv=True,
    training=dataclasses.replace(RUN.training, iterations=4),
    bp=dataclasses.replace(BP, pretrained_conv_step_balance=5.0))


def test_a_balanced_run_sets_its_factor_from_the_last_intervals_steps(tmp_path, data):
    """The factor of each interval is the previous one times c·r_fc/r_conv of the previous
    interval (within the bounds); the first interval runs at 1; an arm that is not pre-trained
    has no factor."""
    params = initialise(parse_topology(TOPOLOGY), rng_for(0, 0), "lee", LIVELY)
    frame = train(BALANCED, tmp_path / "balanced", data, params, progress=False)
    f = frame["conv1_step_factor"].to_numpy()
    assert f[0] == 1.0 and f[1] == 1.0  # iteration 0 and the first interval
    for k in range(2, len(frame)):
        want = f[k - 1] * 5.0 * frame["fc1_rel_step"].iloc[k - 1] / frame["conv1_rel_step"].iloc[k - 1]
        assert f[k] == pytest.approx(min(100.0, max(1.0, want)), rel=1e-9)
    assert f[2:].max() > 1.0  # the rule acted
    plain = train(dataclasses.replace(BALANCED, pretrained_conv=False), tmp_path / "plain", data,
                  params, progress=False)
    assert "conv1_step_factor" not in plain.columns


def test_a_balanced_run_resumed_from_its_checkpoint_ends_as_one_uninterrupted(tmp_path, data):
    params = initialise(parse_topology(TOPOLOGY), rng_for(0, 0), "lee", LIVELY)
    whole = train(BALANCED, tmp_path / "whole", data, params, progress=False)
    train(BALANCED, tmp_path / "split", data, params, progress=False, stop_after=3)
    resumed = train(BALANCED, tmp_path / "split", data, None, progress=False)
    cols = [c for c in whole.columns if c != "wall_time_s"]
    assert whole[cols].equals(resumed[cols])
