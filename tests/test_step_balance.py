"""analysis.step_balance: a conv layer's relative step over the FC layers' mean, per run."""

import numpy as np
import pandas as pd
import pytest

from analysis.step_balance import main, step_balance, summarise


def _table():
    return pd.DataFrame({
        "arm": ["pretrained"] * 2 + ["supervised"] * 2, "seed": [0, 0, 0, 0],
        "run": ["p", "p", "s", "s"], "iteration": [0, 200, 0, 200],
        "conv1_rel_step": [np.nan, 0.001, np.nan, 0.006],
        "conv2_rel_step": [np.nan, 0.002, np.nan, 0.004],
        "fc1_rel_step": [np.nan, 0.01, np.nan, 0.008],
        "fc2_rel_step": [np.nan, 0.03, np.nan, 0.012],
        "conv1_spikes": [1.0, 2.0, 3.0, 4.0]})


def test_balance_is_each_conv_step_over_the_mean_fc_step():
    out = step_balance(_table()).set_index(["run", "layer"])["balance"]
    assert out[("p", "conv1")] == pytest.approx(0.001 / 0.02)
    assert out[("p", "conv2")] == pytest.approx(0.002 / 0.02)
    assert out[("s", "conv1")] == pytest.approx(0.006 / 0.01)
    assert len(out) == 4  # the rows without steps (iteration 0) are left out
    summary = summarise(step_balance(_table()), [200])
    assert set(summary["runs"]) == {1}


def test_runs_without_steps_and_bad_arguments_get_one_line(tmp_path, capsys):
    with pytest.raises(ValueError, match="rel_step"):
        step_balance(_table().drop(columns=["fc1_rel_step", "fc2_rel_step"]))
    assert main([f"x={tmp_path / 'missing'}"]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["just-a-folder"]) == 2
