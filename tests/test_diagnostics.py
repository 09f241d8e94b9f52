"""Per-layer diagnostics of fine-tuning (protocols/diagnostics.py) and the record of options
added after a run was made."""

import dataclasses
import json

import numpy as np
import pytest
from brian2 import ms

from models.initialisation import initialise
from models.parameters import BPParameters
from models.topology import parse_topology
from protocols.diagnostics import ActivityTally, StepTally, weight_columns
from protocols.train import TrainConfig, TrainingSettings, metrics_frame, rng_for, train
from test_train import LIVELY  # noqa: E402 (tests/ on sys.path)


def test_activity_tally_counts_spikes_silent_and_saturated_units():
    layers = parse_topology("2x2-3FC-2FC")
    T = 10
    hidden = np.array([[0, 1, 10], [0, 9, 4]])[:, None, None, :]  # (batch, 1, 1, 3)
    out = np.array([[0, 2], [5, 0]])[:, None, None, :]
    tally = ActivityTally(layers)
    tally.add([None, hidden, out], T)
    cols = tally.columns()
    assert cols["fc1_spikes"] == pytest.approx((11 + 13) / 2)
    assert cols["fc1_silent"] == pytest.approx(2 / 6)
    assert cols["fc1_saturated"] == pytest.approx(2 / 6)  # 10 and 9 of 10 steps
    assert cols["fc2_spikes"] == pytest.approx(3.5)
    assert cols["fc2_silent"] == pytest.approx(0.5)
    assert cols["fc2_saturated"] == 0


def test_step_tally_averages_since_last_row():
    tally = StepTally(parse_topology("2x2-3FC-2FC"))
    tally.add([None, 0.1, 0.3])
    tally.add([None, 0.3, 0.5])
    assert tally.columns() == pytest.approx({"fc1_rel_step": 0.2, "fc2_rel_step": 0.4})
    assert tally.columns() == {}


def test_weight_columns_give_the_per_map_kernel_mean():
    layers = parse_topology("6x6-2C3-2FC")
    params = initialise(layers, np.random.default_rng(0))
    params[1].weights[0] = 0.5
    params[1].weights[1] = -0.25
    cols = weight_columns(layers, params)
    assert cols["conv1_map_mean"] == pytest.approx(0.125)
    assert cols["conv1_map_mean_sd"] == pytest.approx(0.375)
    assert cols["fc1_wnorm"] == pytest.approx(np.linalg.norm(params[2].weights))


TINY = TrainConfig(
    topology="28x28-3C5-2P-10FC",
    training=TrainingSettings(iterations=3, log_every=1, train_eval_images=50,
                              test_eval_images=50, eval_duration="5 ms"),
    bp=BPParameters(t_first_epoch=6 * ms, t_later_epochs=4 * ms, conv_reduction="sum",
                    conv_eta_scale=0.1, weight_decay=1e-3))


@pytest.fixture(scope="module")
def data():
    from protocols.datasets import load_dataset

    return load_dataset("mnist-5k")


def test_metrics_rows_carry_the_measured_relative_steps(tmp_path, data):
    """With a row per iteration, each row's rel_step is the relative change of the weights
    between consecutive checkpoints, and wnorm their norm."""
    params = initialise(parse_topology(TINY.topology), rng_for(0, 0), "lee", LIVELY)
    weights = []
    for _ in range(3):
        frame = train(TINY, tmp_path, data, params, progress=False, stop_after=1)
        with np.load(tmp_path / "checkpoint.npz") as ck:
            weights.append({k: ck[k].astype(float) for k in ("conv1_kernels", "fc1_weights")})
    w0 = {"conv1_kernels": params[1].weights.astype(float),
          "fc1_weights": params[3].weights.astype(float)}
    before = [w0] + weights[:-1]
    for row, (a, b) in enumerate(zip(before, weights), start=1):
        for layer, key in (("conv1", "conv1_kernels"), ("fc1", "fc1_weights")):
            change = np.linalg.norm(b[key] - a[key]) / np.linalg.norm(a[key])
            assert frame[f"{layer}_rel_step"].iloc[row] == pytest.approx(change, rel=1e-4)
            assert frame[f"{layer}_wnorm"].iloc[row] == pytest.approx(np.linalg.norm(b[key]),
                                                                      rel=1e-5)
    assert np.isnan(frame["conv1_rel_step"].iloc[0])  # no step before the first row
    assert (frame["conv1_spikes"] > 0).all()


def test_runs_recorded_before_an_option_existed_still_resume(tmp_path, data):
    """A record without these options was made under the values of that time (LEGACY_VALUES:
    conv_reduction 'mean', silent_units 'pass'), not under today's defaults ('sum', 'zero'):
    it resumes with those values, and today's defaults are another run."""
    params = initialise(parse_topology(TINY.topology), rng_for(0, 0))
    then = BPParameters(t_first_epoch=6 * ms, t_later_epochs=4 * ms, conv_reduction="mean",
                        silent_units="pass", conv_eta_scale=1.0, weight_decay=0.0)
    cfg = dataclasses.replace(TINY, bp=then)
    train(cfg, tmp_path, data, params, progress=False, stop_after=1)
    record = json.loads((tmp_path / "config.json").read_text())
    for key in ("silent_units", "conv_reduction", "conv_eta_scale", "weight_decay"):
        del record["config"]["bp"][key]  # as written before these options existed
    (tmp_path / "config.json").write_text(json.dumps(record))
    frame = train(cfg, tmp_path, data, None, progress=False)  # the values of that time
    assert list(frame.iteration) == [0, 1, 2, 3]
    today = dataclasses.replace(cfg, bp=BPParameters(t_first_epoch=6 * ms, t_later_epochs=4 * ms))
    summed = dataclasses.replace(cfg, bp=dataclasses.replace(cfg.bp, conv_reduction="sum"))
    for other in (today, summed):
        with pytest.raises(ValueError, match="different 'config'"):
            train(other, tmp_path, data, None, progress=False)


def test_missing_options_take_their_legacy_value_not_a_changed_default(monkeypatch):
    import protocols.train as train_module
    from protocols.config import config_to_dict

    record = config_to_dict(TINY)
    for (section, key) in train_module.LEGACY_VALUES:  # every entry names a real option
        assert key in record[section], (section, key)
    del record["bp"]["weight_decay"]
    # as if weight decay's default had changed after this run was recorded
    monkeypatch.setattr(train_module, "LEGACY_VALUES", {("bp", "weight_decay"): 0.0})
    monkeypatch.setattr(train_module, "TrainConfig", lambda: dataclasses.replace(
        TINY, bp=dataclasses.replace(TINY.bp, weight_decay=5e-4)))
    assert train_module._with_new_defaults(record)["bp"]["weight_decay"] == 0.0
    record["bp"]["weight_decay"] = 1e-3  # a recorded value is never replaced
    assert train_module._with_new_defaults(record)["bp"]["weight_decay"] == 1e-3


def test_metrics_of_older_runs_without_diagnostics_load():
    frame = metrics_frame([{"iteration": 0, "test_error": 0.5},
                           {"iteration": 100, "test_error": 0.1, "fc1_spikes": 3.0}])
    assert list(frame.columns[-1:]) == ["fc1_spikes"]
    assert np.isnan(frame["fc1_spikes"].iloc[0])


def test_diagnostics_table_averages_runs_per_group_at_the_chosen_iterations():
    import pandas as pd

    from analysis.layer_diagnostics import diagnostics_table, layer_columns

    table = pd.DataFrame({
        "run": ["a", "a", "b", "b", "c", "c"], "arm": ["p", "p", "p", "p", "s", "s"],
        "iteration": [0, 100] * 3,
        "conv1_rel_step": [None, 0.1, None, 0.3, None, 0.5],
        "conv1_map_mean": [0.0, 0.2, 0.0, 0.4, 0.0, 0.6],
        "conv1_map_mean_sd": [1.0] * 6, "test_error": [0.5] * 6})
    assert layer_columns(table, "map_mean") == ["conv1_map_mean"]
    assert layer_columns(table, "spikes") == []
    out = diagnostics_table(table, [100], ["arm"]).set_index("arm")
    assert out.loc["p", "conv1_rel_step"] == pytest.approx(0.2)
    assert out.loc["p", "conv1_map_mean"] == pytest.approx(0.3)
    assert out.loc["s", "conv1_rel_step"] == pytest.approx(0.5)
    assert "conv1_map_mean_sd" not in out.columns and "test_error" not in out.columns


def test_step_probe_reproduces_the_first_step_of_a_run(tmp_path):
    """protocols.step_probe's batch 0 is the run's first SGD step: the same relative steps as
    the run logs at iteration 1 (log_every = 1)."""
    import pandas as pd

    from protocols.step_probe import main as probe_main
    from protocols.study import StudyConfig, run_study
    from protocols.config import load_config

    config = tmp_path / "study.toml"
    config.write_text(f"""
topology = "28x28-3C5-2P-10FC"
arm = "supervised"
seed = 4
dataset = "mnist-5k"
out = "{tmp_path / 'run'}"
[training]
iterations = 1
log_every = 1
train_eval_images = 20
test_eval_images = 20
eval_duration = "5 ms"
[bp]
t_first_epoch = "6 ms"
t_later_epochs = "4 ms"
conv_reduction = "sum"
silent_units = "zero"
eta = 2.0
""")
    run_study(load_config(config, StudyConfig), progress=False)
    logged = pd.read_csv(tmp_path / "run" / "metrics.csv").set_index("iteration").loc[1]
    assert probe_main(["--config", str(config), "--batches", "2", "--json",
                       str(tmp_path / "probe.json")]) == 0
    rows = json.loads((tmp_path / "probe.json").read_text())["rows"]
    assert len(rows) == 2
    for layer in ("conv1", "fc1"):
        assert rows[0][f"{layer}_rel_step"] == pytest.approx(logged[f"{layer}_rel_step"], rel=1e-6)
    assert rows[1]["conv1_rel_step"] != pytest.approx(rows[0]["conv1_rel_step"], rel=1e-6)
    # an override reaches the configuration: a 10x larger eta, 10x larger steps
    assert probe_main(["--config", str(config), "--batches", "1", "--set", "bp.eta=20.0",
                       "--json", str(tmp_path / "probe10.json")]) == 0
    ten = json.loads((tmp_path / "probe10.json").read_text())["rows"][0]
    assert ten["fc1_rel_step"] == pytest.approx(10 * rows[0]["fc1_rel_step"], rel=1e-5)
    assert probe_main(["--config", str(config), "--set", "bp.eta"]) == 2  # one-line error
