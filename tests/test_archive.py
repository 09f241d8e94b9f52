"""analysis.archive: a committed copy of runs keeps every record and the conv layers, and the
report reads it exactly as it reads the runs themselves."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.archive import main as archive_main
from analysis.layer_diagnostics import kernel_change
from analysis.report import main as report_main
from protocols.records import load_npz

EXAMPLE = Path(__file__).resolve().parents[1] / "results" / "example" / "runs"


def test_an_archived_copy_keeps_records_and_conv_layers_and_reports_the_same(tmp_path):
    out = tmp_path / "archived"
    assert archive_main([str(EXAMPLE), "--out", str(out)]) == 0
    runs = sorted(p.parent for p in EXAMPLE.rglob("metrics.csv"))
    assert runs
    for run in runs:
        copy = out / run.relative_to(EXAMPLE)
        for name in ("config.json", "metrics.csv", "status.json"):
            assert (copy / name).read_bytes() == (run / name).read_bytes()
        assert not (copy / "final.npz").exists() and not (copy / "initial.npz").exists()
        full, slim = load_npz(run / "final.npz"), load_npz(copy / "final_conv.npz")
        assert set(slim) == {k for k in full if k.startswith("conv")} and "fc1_weights" not in slim
        for key, value in slim.items():
            np.testing.assert_array_equal(value, full[key])
        if (run / "initial.npz").exists():
            assert kernel_change(copy) == kernel_change(run)
        if (run / "pretrain").is_dir():
            assert sorted(p.name for p in (copy / "pretrain").iterdir()) == sorted(
                p.name for p in (run / "pretrain").iterdir())

    assert report_main([str(EXAMPLE), "--out", str(tmp_path / "a"), "--at", "100"]) == 0
    assert report_main([str(out), "--out", str(tmp_path / "b"), "--at", "100"]) == 0
    for table in ("error_summary", "iterations_to_threshold", "final_costs", "drift"):
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "a" / f"{table}.csv"),
                                      pd.read_csv(tmp_path / "b" / f"{table}.csv"))
    for arm in ("pretrained", "supervised"):
        assert (tmp_path / "b" / f"kernels_{arm}.png").stat().st_size > 0


def test_in_place_slims_a_copy_and_refuses_what_has_no_conv_layer(tmp_path, capsys):
    import shutil

    from protocols.records import atomic_savez

    run = next(p.parent for p in EXAMPLE.rglob("final.npz"))
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    final = load_npz(copy / "final.npz")
    atomic_savez(copy / "initial.npz", {k: 0.5 * v + 0.01 for k, v in final.items()})
    before = kernel_change(copy)
    assert np.isfinite(before) and before > 0
    assert archive_main([str(copy), "--in-place"]) == 0
    for which in ("final", "initial"):
        assert not (copy / f"{which}.npz").exists() and (copy / f"{which}_conv.npz").exists()
    assert kernel_change(copy) == before
    # weights without a conv layer: one line naming the file and the fix, exit 2
    fc_only = tmp_path / "fc" / "run"
    fc_only.mkdir(parents=True)
    (fc_only / "metrics.csv").write_text("iteration,test_error\n0,0.9\n")
    atomic_savez(fc_only / "final.npz", {"fc1_weights": np.zeros((2, 3), np.float32)})
    assert archive_main([str(tmp_path / "fc"), "--in-place"]) == 2
    err = capsys.readouterr().err
    assert "no conv layer" in err and "--full-weights" in err
    assert (fc_only / "final.npz").exists()  # nothing removed
    with pytest.raises(SystemExit):
        archive_main([str(copy)])  # neither --out nor --in-place


@pytest.mark.parametrize("homeostasis", [0.2, 0.0], ids=["homeostasis", "plain"])
def test_an_unfinished_run_keeps_its_checkpoint_and_grows_where_it_was_committed(tmp_path,
                                                                                 homeostasis):
    """A run stopped mid-way (as by a killed session) and archived keeps what resuming it reads;
    grown in its committed folder it ends with the metrics of a run never stopped, and once
    finished ``--in-place`` slims it like any other. Under threshold homeostasis the resume
    also needs ``initial.npz`` whole (its targets are recomputed from it); without it only the
    initial conv layers are kept, and the run still grows to the same end."""
    import dataclasses

    from models.initialisation import initialise
    from models.topology import parse_topology
    from protocols.datasets import load_dataset
    from protocols.train import rng_for, train
    from test_threshold_homeostasis import HOMEOSTASIS_RUN  # noqa: E402 (tests/ on sys.path)
    from test_train import LIVELY  # noqa: E402

    # without homeostasis this tiny net's pool1 falls silent, which the gate cannot leave
    # (the guard stops the run): the ungated derivative keeps it training
    cfg = dataclasses.replace(HOMEOSTASIS_RUN, bp=dataclasses.replace(
        HOMEOSTASIS_RUN.bp, threshold_homeostasis=homeostasis,
        silent_units=HOMEOSTASIS_RUN.bp.silent_units if homeostasis else "pass"))
    data = load_dataset("mnist-5k")
    params = initialise(parse_topology(cfg.topology), rng_for(0, 0), "lee", LIVELY)
    kw = dict(excluded=range(3850), progress=False)
    full = train(cfg, tmp_path / "full", data, params, **kw)
    train(cfg, tmp_path / "runs" / "part", data, params, stop_after=3, **kw)
    train(cfg, tmp_path / "runs" / "done", data, params, **kw)

    committed = tmp_path / "committed"
    assert archive_main([str(tmp_path / "runs"), "--out", str(committed)]) == 0
    part, done = committed / "part", committed / "done"
    assert (part / "checkpoint.npz").exists() and not (part / "final_conv.npz").exists()
    if homeostasis:
        assert (part / "initial.npz").exists() and not (part / "initial_conv.npz").exists()
    else:
        assert not (part / "initial.npz").exists() and (part / "initial_conv.npz").exists()
    assert not (done / "checkpoint.npz").exists() and not (done / "initial.npz").exists()
    assert (done / "initial_conv.npz").exists() and (done / "final_conv.npz").exists()

    grown = train(cfg, part, data, None, **kw)
    pd.testing.assert_frame_equal(full.drop(columns="wall_time_s"),
                                  grown.drop(columns="wall_time_s"))
    assert archive_main([str(committed), "--in-place"]) == 0
    assert sorted(p.name for p in part.glob("*.npz")) == ["final_conv.npz", "initial_conv.npz"]
    assert kernel_change(part) == kernel_change(tmp_path / "full")

    # --resumable keeps a finished run's checkpoint too (a larger --iterations extends it)
    kept = tmp_path / "kept"
    assert archive_main([str(tmp_path / "runs" / "done"), "--out", str(kept), "--resumable"]) == 0
    assert (kept / "checkpoint.npz").exists() and (kept / "final_conv.npz").exists()
    assert (kept / "initial.npz").exists() == bool(homeostasis)
    assert not (kept / "final.npz").exists()


def test_sweep_out_overrides_the_config(tmp_path, monkeypatch):
    import protocols.sweep as sweep_module

    seen = {}
    monkeypatch.setattr(sweep_module, "sweep", lambda cfg, *a, **k: seen.update(out=cfg.out) or [])
    path = tmp_path / "sweep.toml"
    path.write_text('seeds = [0]\narms = ["supervised"]\ntopologies = ["28x28-3C5-2P-10FC"]\n'
                    f'out = "{tmp_path / "runs"}"\n')
    assert sweep_module.main(["--config", str(path)]) == 0
    assert seen["out"] == str(tmp_path / "runs")
    assert sweep_module.main(["--config", str(path), "--out", str(tmp_path / "elsewhere")]) == 0
    assert seen["out"] == str(tmp_path / "elsewhere")
