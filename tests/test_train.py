"""The trainer loop and the study command: schedule, resume after SIGKILL, divergence, config
errors. Tiny nets on the offline mnist-5k subset; short presentations."""

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from brian2 import ms

from models.initialisation import initialise
from models.parameters import BPParameters, InitParameters
from models.topology import parse_topology
from protocols.config import ConfigError, load_config
from protocols.study import StudyConfig, load_pretrained_conv, run_study
from protocols.train import (TrainConfig, TrainingDiverged, TrainingSettings, make_schedule,
                             rng_for, train)

REPO = Path(__file__).resolve().parents[1]

#: the initialisation of the in-process tiny nets below that must train: at the default
#: alpha = 20 their pool1 fires no spike in a 6 ms presentation, and under the gated
#: fine-tuning (bp.silent_units = "zero", the default) such a start stops at once as 'diverged'
#: (TrainingRun.check_live_start); at alpha = 3 every hidden layer fires
LIVELY = InitParameters(alpha=3.0)

TINY = """
topology = "28x28-4C5-2P-10FC"
arm = "{arm}"
seed = 5
dataset = "mnist-5k"
out = "{out}"
{extra}

[training]
iterations = {iterations}
log_every = 4
checkpoint_every = 2
train_eval_images = 100
test_eval_images = 100
eval_duration = "8 ms"

[bp]
eta = {eta}
t_first_epoch = "10 ms"
t_later_epochs = "6 ms"
"""


def write_config(tmp_path, name="c.toml", arm="supervised", iterations=16, extra="", out=None,
                 eta=2.0):
    """The tiny study config of these tests; ``extra``: more top-level keys or tables. eta = 2
    (the default of the summed conv gradient): at 3 the supervised run fell back to chance
    by iteration 16 and the divergence guard stopped it."""
    out = out or str(tmp_path / "run")
    path = tmp_path / name
    path.write_text(TINY.format(arm=arm, out=out, iterations=iterations, extra=extra, eta=eta))
    return path


def test_schedule_excludes_pretraining_images_in_epoch_one_only():
    sched = make_schedule(1000, excluded=range(0, 1000, 4), batch=100, seed=1)
    assert sched.first_epoch_iterations == 7  # 750 images -> 7 whole batches
    assert sched.later_epoch_iterations == 10
    seen = np.concatenate([sched.batch_indices(i)[1] for i in range(7)])
    assert len(np.unique(seen)) == 700 and not np.any(seen % 4 == 0)
    epochs = [sched.batch_indices(i)[0] for i in range(7, 27)]
    assert epochs == [2] * 10 + [3] * 10
    second = np.concatenate([sched.batch_indices(i)[1] for i in range(7, 17)])
    assert len(np.unique(second)) == 1000
    # derived, not carried: the same iteration always gets the same batch
    np.testing.assert_array_equal(sched.batch_indices(12)[1], sched.batch_indices(12)[1])
    with pytest.raises(ValueError, match="excluded"):
        make_schedule(1000, excluded=[1000], batch=100, seed=1)


def _run(config, *extra, timeout=240):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "protocols.study", "--config", str(config),
                             "--no-progress", *extra], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _final(run_dir):
    frame = pd.read_csv(run_dir / "metrics.csv").drop(columns="wall_time_s")
    with np.load(run_dir / "final.npz") as f:
        weights = {k: f[k] for k in f.files}
    return frame, weights


@pytest.mark.slow  # three training processes: ~2 min on 2 cores
def test_sigkill_and_restart_gives_identical_metrics(tmp_path):
    cfg_a = write_config(tmp_path, "a.toml", out=str(tmp_path / "a"))
    cfg_b = write_config(tmp_path, "b.toml", out=str(tmp_path / "b"))
    proc = _run(cfg_a)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    # interrupted run: kill it hard once it has checkpointed past iteration 0 and is mid-run
    proc = _run(cfg_b)
    metrics = tmp_path / "b" / "metrics.csv"
    deadline = time.time() + 240
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:  # rows 0 and 4
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "b" / "final.npz").exists()
    status = json.loads((tmp_path / "b" / "status.json").read_text())
    assert status["status"] == "running"
    proc = _run(cfg_b)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    frame_a, w_a = _final(tmp_path / "a")
    frame_b, w_b = _final(tmp_path / "b")
    assert list(frame_a.iteration) == [0, 4, 8, 12, 16]
    pd.testing.assert_frame_equal(frame_a, frame_b)
    assert w_a.keys() == w_b.keys()
    for key in w_a:
        np.testing.assert_array_equal(w_a[key], w_b[key])
    assert frame_a.test_error.iloc[-1] < frame_a.test_error.iloc[0]  # it learns something
    record = json.loads((tmp_path / "a" / "config.json").read_text())
    assert record["seed"] == 5 and record["versions"]["numpy"] == np.__version__
    # the source that ran: the checkout's commit (CI runs from a clone), or None outside git
    commit = record["versions"]["git_commit"]
    assert commit is None or re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", commit), commit
    assert json.loads((tmp_path / "a" / "status.json").read_text())["status"] == "finished"


@pytest.mark.slow  # ~35 s on 2 cores
def test_in_process_resume_matches_uninterrupted(tmp_path):
    from protocols.datasets import load_dataset

    data = load_dataset("mnist-5k")
    cfg = TrainConfig(topology="28x28-3C5-2P-10FC",
                      training=TrainingSettings(iterations=6, log_every=2, train_eval_images=50,
                                                test_eval_images=50, eval_duration="5 ms"),
                      # eta 0.2: at the default 2, this 3-map net's summed conv gradient
                      # silences pool1 within a few batches and the gated run stops
                      bp=BPParameters(eta=0.2, t_first_epoch=6 * ms, t_later_epochs=4 * ms))
    params = initialise(parse_topology(cfg.topology), rng_for(0, 0), "lee", LIVELY)
    full = train(cfg, tmp_path / "full", data, params, excluded=range(3850), progress=False)
    part = train(cfg, tmp_path / "part", data, params, excluded=range(3850), progress=False,
                 stop_after=3)  # stops after iteration 3, last checkpoint at 2
    assert list(part.iteration) == [0, 2]
    rest = train(cfg, tmp_path / "part", data, None, excluded=range(3850), progress=False)
    pd.testing.assert_frame_equal(full.drop(columns="wall_time_s"),
                                  rest.drop(columns="wall_time_s"))
    assert set(full.epoch) == {1, 2}  # 150 first-epoch images: 1 iteration, then epoch 2
    # a finished run asked for more iterations continues, as if it had been that long from the start
    longer = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, iterations=8))
    extended = train(longer, tmp_path / "part", data, None, excluded=range(3850), progress=False)
    fresh = train(longer, tmp_path / "fresh", data, params, excluded=range(3850), progress=False)
    assert list(fresh.iteration) == [0, 2, 4, 6, 8]
    pd.testing.assert_frame_equal(extended.drop(columns="wall_time_s"),
                                  fresh.drop(columns="wall_time_s"))
    with pytest.raises(ValueError, match="different 'config'"):
        train(TrainConfig(topology=cfg.topology, training=TrainingSettings(iterations=7)),
              tmp_path / "full", data, params)


def test_divergence_stops_with_a_clear_status(tmp_path):
    from protocols.datasets import load_dataset

    data = load_dataset("mnist-5k")
    cfg = TrainConfig(topology="28x28-3C5-2P-10FC",
                      training=TrainingSettings(iterations=5, log_every=5, train_eval_images=20,
                                                test_eval_images=20, eval_duration="5 ms"),
                      bp=BPParameters(eta=1e38, t_first_epoch=6 * ms, t_later_epochs=4 * ms))
    params = initialise(parse_topology(cfg.topology), rng_for(0, 0), "lee", LIVELY)
    with pytest.raises(TrainingDiverged, match="diverged at iteration"):
        train(cfg, tmp_path, data, params, progress=False)
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["status"] == "diverged" and "lower bp.eta" in status["message"]
    assert (tmp_path / "metrics.csv").exists()
    # the command reports it and exits with status 3
    cfg_path = write_config(tmp_path, iterations=3, out=str(tmp_path / "cli"), eta=1e38)
    proc = _run(cfg_path)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 3 and "diverged" in err
    assert "lower bp.eta" in err  # the step's divergence, not a silent start


def test_config_errors_name_the_key(tmp_path):
    path = write_config(tmp_path, extra="learning_rate = 3")
    with pytest.raises(ConfigError, match="learning_rate"):
        load_config(path, StudyConfig)
    path = write_config(tmp_path, extra="")
    path.write_text(path.read_text().replace("iterations = 16", 'iterations = "many"'))
    with pytest.raises(ConfigError, match="training.iterations"):
        load_config(path, StudyConfig)
    path = write_config(tmp_path)
    path.write_text(path.read_text().replace('"10 ms"', '"10 Hz"'))
    with pytest.raises(ConfigError, match="t_first_epoch"):
        load_config(path, StudyConfig)
    path = write_config(tmp_path)
    path.write_text(path.read_text().replace("28x28-4C5-2P-10FC", "28x28-4C5-5P-10FC"))
    with pytest.raises(ConfigError, match="pooling must tile"):
        load_config(path, StudyConfig)
    proc = _run(write_config(tmp_path, extra="colour = 'red'"))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "colour" in err


def test_missing_or_incompatible_pretraining_fails_before_training(tmp_path):
    run = tmp_path / "run"
    cfg = load_config(write_config(tmp_path, arm="pretrained",
                                   extra=f'pretrained = "{tmp_path / "nope.npz"}"'), StudyConfig)
    with pytest.raises(ConfigError, match="does not exist"):
        run_study(cfg, progress=False)
    bad = tmp_path / "bad.npz"
    np.savez(bad, conv1_kernels=np.zeros((4, 1, 3, 3)), conv1_thresholds=np.zeros(4),
             image_indices=np.arange(10))
    cfg = load_config(write_config(tmp_path, arm="pretrained", extra=f'pretrained = "{bad}"'),
                      StudyConfig)
    with pytest.raises(ConfigError, match=r"conv1_kernels .* shape \(4, 1, 3, 3\)"):
        run_study(cfg, progress=False)
    missing = tmp_path / "missing.npz"
    np.savez(missing, conv1_kernels=np.zeros((4, 1, 5, 5)))
    with pytest.raises(ConfigError, match="no 'conv1_thresholds'"):
        load_pretrained_conv(missing, "28x28-4C5-2P-10FC")
    assert not run.exists(), "nothing may be written before the checks pass"


def test_pretrained_arm_uses_kernels_and_excludes_their_images(tmp_path):
    rng = np.random.default_rng(0)
    good = tmp_path / "pretrained.npz"
    kernels = rng.uniform(-0.3, 0.3, (4, 1, 5, 5)).astype(np.float32)
    np.savez(good, conv1_kernels=kernels, conv1_thresholds=np.full(4, 0.7),
             image_indices=np.arange(3800))
    cfg = load_config(write_config(tmp_path, arm="pretrained", iterations=2,
                                   extra=f'pretrained = "{good}"'), StudyConfig)
    frame = run_study(cfg, progress=False)
    with np.load(tmp_path / "run" / "initial.npz") as init:
        np.testing.assert_array_equal(init["conv1_kernels"], kernels)
        np.testing.assert_allclose(init["conv1_thresholds"], 0.7)
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    assert record["excluded_images"] == 3800 and record["first_epoch_iterations"] == 2
    assert record["arm"] == "pretrained" and list(frame.iteration) == [0, 2]


def test_array_module_seam_runs_the_same_training(tmp_path):
    """The loop through the array-module path (backend 'xp': what CuPy runs) trains the same
    network as the compiled CPU loop (float64, where both are exact)."""
    from protocols.datasets import load_dataset

    data = load_dataset("mnist-5k")
    frames, weights = {}, {}
    for backend in ("numba", "xp"):
        cfg = TrainConfig(topology="28x28-3C5-2P-10FC",
                          training=TrainingSettings(iterations=4, log_every=2,
                                                    train_eval_images=40, test_eval_images=40,
                                                    eval_duration="8 ms", dtype="float64",
                                                    backend=backend),
                          bp=BPParameters(t_first_epoch=8 * ms, t_later_epochs=6 * ms))
        params = initialise(parse_topology(cfg.topology), rng_for(0, 0))
        frames[backend] = train(cfg, tmp_path / backend, data, params, progress=False)
        with np.load(tmp_path / backend / "final.npz") as f:
            weights[backend] = {k: f[k] for k in f.files}
    pd.testing.assert_frame_equal(frames["numba"].drop(columns="wall_time_s"),
                                  frames["xp"].drop(columns="wall_time_s"))
    for key, value in weights["numba"].items():
        np.testing.assert_allclose(weights["xp"][key], value, rtol=1e-9, atol=1e-12)
    # where it runs is not part of the science: a run may resume on another backend
    record = json.loads((tmp_path / "xp" / "config.json").read_text())
    assert record["config"]["training"]["backend"] == "xp"


def test_cupy_without_cupy_is_a_clear_error():
    try:
        import cupy  # noqa: F401
        pytest.skip("CuPy is installed here; the error path is for machines without it")
    except ImportError:
        pass
    from protocols.train import array_module

    with pytest.raises(ValueError, match="pip install cupy"):
        array_module("cupy")
    with pytest.raises(ValueError, match="backend 'numba' runs on the CPU"):
        TrainingSettings(array_module="cupy", backend="numba")


def test_training_holds_blas_to_its_thread_setting(tmp_path, monkeypatch):
    """``training.blas_threads`` is in force while the trainer runs (the numba forward pass
    has the cores; spinning BLAS threads halved its speed), 0 leaves BLAS alone, and a run
    recorded before the option existed resumes under any setting."""
    from threadpoolctl import threadpool_info

    import protocols.train as train_module

    def blas_threads():
        return sorted({p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"})

    seen = []
    monkeypatch.setattr(train_module, "_train", lambda *a, **k: seen.append(blas_threads()))
    outside = blas_threads()
    for n in (1, 2):
        train(TrainConfig(training=TrainingSettings(blas_threads=n)), tmp_path / str(n), None)
        assert seen[-1] == [n]
    train(TrainConfig(training=TrainingSettings(blas_threads=0)), tmp_path / "0", None)
    assert seen[-1] == outside
    assert blas_threads() == outside
    with pytest.raises(ValueError, match="blas_threads"):
        TrainingSettings(blas_threads=-1)
    from protocols.config import config_to_dict

    old = config_to_dict(TrainConfig())
    del old["training"]["blas_threads"]
    assert train_module._comparable(old) == train_module._comparable(
        config_to_dict(TrainConfig(training=TrainingSettings(blas_threads=2))))


def test_input_rng_is_a_recorded_option_of_the_run(tmp_path):
    """training.input_rng = 'splitmix64' trains from the counter-based draw (deterministic, not
    PCG64's spikes), is recorded, cannot change on resume, and records made before the option
    existed read as 'pcg64'."""
    from protocols import train as train_module
    from protocols.config import config_to_dict
    from protocols.datasets import load_dataset
    from protocols.encoding import counter_key, poisson_spikes_counter

    data = load_dataset("mnist-5k")
    params = initialise(parse_topology("28x28-3C5-2P-10FC"), rng_for(0, 0), "lee", LIVELY)

    def config(rng: str, iterations: int = 3) -> TrainConfig:
        return TrainConfig(topology="28x28-3C5-2P-10FC", seed=4,
                           training=TrainingSettings(iterations=iterations, log_every=3,
                                                     train_eval_images=30, test_eval_images=30,
                                                     eval_duration="6 ms", input_rng=rng),
                           bp=BPParameters(t_first_epoch=6 * ms, t_later_epochs=6 * ms))

    runs = {name: train(config(rng), tmp_path / name, data, params, progress=False)
            for name, rng in (("a", "splitmix64"), ("b", "splitmix64"), ("pcg", "pcg64"))}
    pd.testing.assert_frame_equal(runs["a"].drop(columns="wall_time_s"),
                                  runs["b"].drop(columns="wall_time_s"))
    with np.load(tmp_path / "a" / "final.npz") as a, np.load(tmp_path / "pcg" / "final.npz") as p:
        assert any(not np.array_equal(a[k], p[k]) for k in a.files)
    run = train_module.TrainingRun(config("splitmix64"), tmp_path / "c", data, params)
    run.begin()
    epoch, T, x, _ = run.batch(2)
    idx = run.schedule.batch_indices(2)[1]
    np.testing.assert_array_equal(x, poisson_spikes_counter(data.train_images[idx], T * 1 * ms,
                                                            counter_key(4, 2, 2)))
    record = json.loads((tmp_path / "a" / "config.json").read_text())
    assert record["config"]["training"]["input_rng"] == "splitmix64"
    with pytest.raises(ValueError, match="different 'config'"):
        train(config("pcg64", iterations=6), tmp_path / "a", data, None, progress=False)
    old = config_to_dict(TrainConfig())
    del old["training"]["input_rng"]
    assert train_module._comparable(old) == train_module._comparable(config_to_dict(TrainConfig()))
    with pytest.raises(ValueError, match="input_rng"):
        TrainingSettings(input_rng="mt19937")


def test_a_silent_start_under_the_gate_stops_with_its_reason(tmp_path):
    """bp.silent_units = 'zero' with a hidden layer silent on the first mini-batch: no weight
    can change, so the run stops at once (status 'diverged', the layer and the fix named);
    the same start with 'pass' trains, and with threshold homeostasis it is allowed to try."""
    from protocols.datasets import load_dataset
    from models.parameters import InitParameters

    data = load_dataset("mnist-5k")
    layers = parse_topology("28x28-3C5-2P-10FC")
    silent = initialise(layers, rng_for(0, 0), "lee", InitParameters(alpha=400.0))

    def config(**bp) -> TrainConfig:
        return TrainConfig(topology="28x28-3C5-2P-10FC",
                           training=TrainingSettings(iterations=2, log_every=2,
                                                     train_eval_images=20, test_eval_images=20,
                                                     eval_duration="5 ms"),
                           bp=BPParameters(t_first_epoch=6 * ms, t_later_epochs=6 * ms, **bp))

    with pytest.raises(TrainingDiverged, match="conv1 fired no spike") as err:
        train(config(silent_units="zero"), tmp_path / "gate", data, silent, progress=False)
    assert "initialisation.alpha" in str(err.value) and "bp.eta" not in str(err.value)
    status = json.loads((tmp_path / "gate" / "status.json").read_text())
    assert status["status"] == "diverged" and status["iteration"] == 0
    for name, bp in (("pass", {"silent_units": "pass"}),
                     ("homeo", {"silent_units": "zero", "threshold_homeostasis": 0.01})):
        train(config(**bp), tmp_path / name, data, silent, progress=False)
        assert json.loads((tmp_path / name / "status.json").read_text())["status"] == "finished"
    lively = initialise(layers, rng_for(0, 0), "lee", InitParameters(alpha=3.0))
    train(config(silent_units="zero"), tmp_path / "lively", data, lively, progress=False)
    assert json.loads((tmp_path / "lively" / "status.json").read_text())["status"] == "finished"


def test_a_layer_falling_silent_later_stops_the_run_too(tmp_path):
    """Under the gate a hidden layer silent on a later mini-batch stops the run with a collapse
    message (iteration and fix named). Made deterministic with black images: every image but
    those of the first mini-batch is black, so the second mini-batch silences every layer."""
    from types import SimpleNamespace

    from models.parameters import InitParameters
    from protocols.datasets import load_dataset
    from protocols.train import make_schedule

    real = load_dataset("mnist-5k")
    n = 40
    cfg = TrainConfig(topology="28x28-3C5-2P-10FC", seed=2,
                      training=TrainingSettings(iterations=4, log_every=4, train_eval_images=10,
                                                test_eval_images=10, eval_duration="6 ms"),
                      bp=BPParameters(batch_size=10, t_first_epoch=8 * ms,
                                      t_later_epochs=8 * ms, silent_units="zero"))
    first = make_schedule(n, (), 10, cfg.seed).batch_indices(0)[1]
    images = np.zeros((n, 28, 28), np.uint8)
    images[first] = real.train_images[:10]
    data = SimpleNamespace(train_images=images, train_labels=real.train_labels[:n],
                           test_images=real.test_images, test_labels=real.test_labels)
    params = initialise(parse_topology(cfg.topology), rng_for(0, 0), "lee",
                        InitParameters(alpha=3.0))
    with pytest.raises(TrainingDiverged, match="a silent layer: hidden layer conv1 fired no "
                                               "spike on mini-batch 2") as err:
        train(cfg, tmp_path / "gate", data, params, progress=False)
    assert "smaller bp.eta" in str(err.value) and "threshold_homeostasis" in str(err.value)
    status = json.loads((tmp_path / "gate" / "status.json").read_text())
    assert status["status"] == "diverged" and status["iteration"] == 2
    # without the gate the same run goes on (silent units still pass a gradient)
    pass_cfg = dataclasses.replace(cfg, bp=dataclasses.replace(cfg.bp, silent_units="pass"))
    train(pass_cfg, tmp_path / "pass", data, params, progress=False)
    assert json.loads((tmp_path / "pass" / "status.json").read_text())["status"] == "finished"


def test_a_test_subset_is_a_fair_sample_the_same_for_every_seed(tmp_path, monkeypatch):
    """test_eval_images < the split evaluates a fixed seeded sample (test_subset = 'sample', the
    default), not the split's first images: on mnist-5k, sorted by digit, the first 50 are all
    zeros. The sample is the same for every seed; 'first' keeps the rule of older runs, and an
    old record reads as 'first' (it resumes) unless it evaluated the whole split."""
    from protocols import train as train_module
    from protocols.config import config_to_dict
    from protocols.datasets import load_dataset

    data = load_dataset("mnist-5k")
    seen = {}

    def spy(layers, params, images, labels, *args, **kwargs):
        seen.setdefault(key, []).append(np.asarray(labels).copy())
        if len(seen[key]) == 2:  # the training sample, then the test set
            raise RuntimeError("stop after the first evaluation")
        return 0.5, 1.0

    monkeypatch.setattr(train_module, "evaluate", spy)
    for key, (rule, seed) in {"sample0": ("sample", 0), "sample1": ("sample", 1),
                              "first": ("first", 0)}.items():
        cfg = TrainConfig(topology="28x28-3C5-2P-10FC", seed=seed,
                          training=TrainingSettings(iterations=1, train_eval_images=20,
                                                    test_eval_images=50, test_subset=rule))
        with pytest.raises(RuntimeError, match="stop after"):
            train(cfg, tmp_path / key, data, initialise(parse_topology(cfg.topology),
                                                          rng_for(seed, 0)), progress=False)
    test_labels = {key: calls[1] for key, calls in seen.items()}
    assert set(test_labels["first"]) == {0}
    assert len(set(test_labels["sample0"])) == 10  # every digit, in about equal numbers
    assert np.bincount(test_labels["sample0"]).max() <= 10
    np.testing.assert_array_equal(test_labels["sample0"], test_labels["sample1"])
    with pytest.raises(ValueError, match="test_subset"):
        TrainingSettings(test_subset="random")

    old = config_to_dict(TrainConfig(training=TrainingSettings(test_eval_images=50)))
    del old["training"]["test_subset"]  # as recorded before the option existed
    first = TrainConfig(training=TrainingSettings(test_eval_images=50, test_subset="first"))
    assert train_module._comparable(old) == train_module._comparable(config_to_dict(first))
    assert train_module._comparable(old) != train_module._comparable(config_to_dict(
        TrainConfig(training=TrainingSettings(test_eval_images=50))))
    whole = config_to_dict(TrainConfig())
    del whole["training"]["test_subset"]  # all test images: either rule is the same run
    assert train_module._comparable(whole) == train_module._comparable(
        config_to_dict(TrainConfig()))


def test_a_resumed_run_keeps_where_each_stretch_ran(tmp_path):
    """config.json's 'segments' lists every stretch of a run (start iteration, versions, command,
    array module, backend): resuming elsewhere adds one and keeps the earlier ones; a record
    written before segments existed becomes one segment of unknown start."""
    from protocols.datasets import load_dataset

    data = load_dataset("mnist-5k")

    def cfg(iterations, backend):
        return TrainConfig(topology="28x28-3C5-2P-10FC",
                           training=TrainingSettings(iterations=iterations, log_every=2,
                                                     train_eval_images=20, test_eval_images=20,
                                                     eval_duration="5 ms", backend=backend),
                           bp=BPParameters(eta=0.2, t_first_epoch=6 * ms, t_later_epochs=4 * ms))

    params = initialise(parse_topology("28x28-3C5-2P-10FC"), rng_for(0, 0), "lee", LIVELY)
    train(cfg(4, "numba"), tmp_path, data, params, progress=False, stop_after=2)
    train(cfg(4, "xp"), tmp_path, data, None, progress=False)
    record = json.loads((tmp_path / "config.json").read_text())
    starts = [(s["from_iteration"], s["backend"]) for s in record["segments"]]
    assert starts == [(0, "numba"), (2, "xp")]
    assert record["segments"][-1]["versions"] == record["versions"]
    del record["segments"]  # as written before segments existed
    (tmp_path / "config.json").write_text(json.dumps(record))
    train(cfg(6, "numba"), tmp_path, data, None, progress=False)
    record = json.loads((tmp_path / "config.json").read_text())
    assert [(s["from_iteration"], s["backend"]) for s in record["segments"]] == [
        (None, "xp"), (4, "numba")]


def test_an_extended_run_holds_no_final_weights_until_it_finishes_again(tmp_path):
    """Extending a finished run removes its final.npz (and an archived final_conv.npz): an
    interrupted extension must not leave the shorter run's weights posing as its end."""
    from protocols.datasets import load_dataset

    data = load_dataset("mnist-5k")
    run = TrainConfig(topology="28x28-3C5-2P-10FC",
                      training=TrainingSettings(iterations=2, log_every=1, train_eval_images=20,
                                                test_eval_images=20, eval_duration="5 ms"),
                      bp=BPParameters(t_first_epoch=6 * ms, t_later_epochs=4 * ms, eta=0.5))
    params = initialise(parse_topology(run.topology), rng_for(0, 0), "lee", LIVELY)
    train(run, tmp_path, data, params, progress=False)
    assert (tmp_path / "final.npz").is_file()
    (tmp_path / "final_conv.npz").write_bytes((tmp_path / "final.npz").read_bytes())
    longer = dataclasses.replace(run, training=dataclasses.replace(run.training, iterations=4))
    train(longer, tmp_path, data, None, progress=False, stop_after=1)
    assert not (tmp_path / "final.npz").exists() and not (tmp_path / "final_conv.npz").exists()
    train(longer, tmp_path, data, None, progress=False)
    assert (tmp_path / "final.npz").is_file()
