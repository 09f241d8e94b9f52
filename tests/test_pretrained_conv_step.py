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
BP = BPParameters(t_first_epoch=6 * ms, t_later_epochs=4 * ms, eta=0.5)
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
    """A pre-trained run recorded before the option existed (no bp key, no pretrained_conv)
    resumes under today's config of its arm; the same arm with a factor is a different run."""
    params = initialise(parse_topology(TOPOLOGY), rng_for(0, 0), "lee", LIVELY)
    today = dataclasses.replace(RUN, pretrained_conv=True)
    train(today, tmp_path, data, params, progress=False, stop_after=1)
    record = json.loads((tmp_path / "config.json").read_text())
    del record["config"]["bp"]["pretrained_conv_eta_scale"]
    del record["config"]["pretrained_conv"]
    (tmp_path / "config.json").write_text(json.dumps(record))
    frame = train(today, tmp_path, data, None, progress=False)
    assert list(frame.iteration) == [0, 1, 2]
    faster = dataclasses.replace(today, bp=dataclasses.replace(BP, pretrained_conv_eta_scale=10.0))
    with pytest.raises(ValueError, match="different 'config'"):
        train(dataclasses.replace(faster, training=dataclasses.replace(
            RUN.training, iterations=3)), tmp_path, data, None, progress=False)
