"""A population of fine-tuning runs (protocols/population.py) trains every member as its single
run would: same metrics and weights, a diverging member stops alone, a killed population
resumes every member from its checkpoint. Tiny nets on the offline mnist-5k subset."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from brian2 import ms

from models.initialisation import initialise
from models.parameters import BPParameters
from models.topology import parse_topology
from protocols.population import Member, train_population
from protocols.runstate import GuardSettings
from protocols.train import TrainConfig, TrainingDiverged, TrainingSettings, rng_for, train
from test_train import LIVELY  # noqa: E402 (tests/ on sys.path)

TOPOLOGY = "28x28-3C5-2P-10FC"


@pytest.fixture(scope="module")
def data():
    from protocols.datasets import load_dataset

    return load_dataset("mnist-5k")


def config(seed: int, backend: str, eta: float = 0.5, iterations: int = 4,
           input_rng: str = "pcg64", chance_guard: bool = True) -> TrainConfig:
    return TrainConfig(topology=TOPOLOGY, seed=seed,
                       guard=GuardSettings() if chance_guard else GuardSettings(
                           chance_evaluations=0),
                       training=TrainingSettings(iterations=iterations, log_every=2,
                                                 checkpoint_every=2, train_eval_images=30,
                                                 test_eval_images=30, eval_duration="5 ms",
                                                 backend=backend, input_rng=input_rng),
                       bp=BPParameters(eta=eta, t_first_epoch=6 * ms, t_later_epochs=4 * ms))


def members(tmp_path, backend: str, etas=(0.2, 0.2, 0.5), iterations: int = 4,
            chance_guard: bool = True) -> list:
    """Three members: seeds 0, 1, 2; the last with another eta and the pre-trained arm's
    shorter first epoch (so that its presentations are shorter from iteration 1 on: the
    population runs it in a group of its own). The etas suit the summed conv gradient (the
    default conv_reduction) on this 3-map net with 4-6 ms presentations: at eta 1-2 its pool1
    falls silent within a few batches, and the gated run stops there (TrainingRun.check_alive);
    with the 3 and 10 chosen for the averaged gradient, a member of 40 iterations fell back to
    chance (the guard stopped it). These nets hover near chance (training error 0.77-1.0 over
    40 iterations at eta 0.05-0.2), so a long population that tests resuming, not learning,
    turns the chance guard off (``chance_guard=False``)."""
    out = []
    for seed, eta in enumerate(etas):
        # alive at the start (LIVELY): at alpha = 20 pool1 is silent, which stops a run at once
        params = initialise(parse_topology(TOPOLOGY), rng_for(seed, 0), "lee", LIVELY)
        excluded = range(3850) if seed == 2 else ()
        out.append(Member(config(seed, backend, eta, iterations, chance_guard=chance_guard),
                          tmp_path / f"m{seed}", params,
                          excluded, {"arm": "test"}))
    return out


def alone(m: Member, folder, data) -> pd.DataFrame:
    """The member trained by itself, by the single-run trainer, in ``folder``."""
    return train(m.cfg, folder, data, m.initial_params, m.excluded, m.extra_record,
                 progress=False)


def weights(folder, name="final.npz") -> dict:
    with np.load(folder / name) as f:
        return {k: f[k] for k in f.files}


def assert_same_run(frame, folder, reference_frame, reference_folder):
    """Same metrics (wall_time_s aside), bit for bit, and the same initial and final weights."""
    pd.testing.assert_frame_equal(frame.drop(columns="wall_time_s"),
                                  reference_frame.drop(columns="wall_time_s"), check_exact=True)
    for name in ("initial.npz", "final.npz"):
        a, b = weights(folder, name), weights(reference_folder, name)
        assert a.keys() == b.keys()
        for key in a:
            assert np.array_equal(a[key], b[key]), (folder, name, key)
    for name in ("config.json", "status.json"):
        a = json.loads((folder / name).read_text())
        b = json.loads((reference_folder / name).read_text())
        for key in ("pid", "host", "time", "started", "process_start"):
            a.pop(key, None), b.pop(key, None)
        if name == "config.json":  # a resumed member has one segment per stretch; the
            segments = a.pop("segments"), b.pop("segments")  # reference ran in one
            assert segments[0][0]["from_iteration"] == 0 == segments[1][0]["from_iteration"]
            assert segments[0][-1]["versions"] == segments[1][-1]["versions"]
        assert a == b, name


def assert_each_as_alone(ms_, results, tmp_path, data):
    """Every member finished, with the metrics, weights and records of its single run."""
    assert [r.status for r in results] == ["finished"] * len(ms_)
    for m, r in zip(ms_, results):
        ref = alone(m, tmp_path / f"alone-{m.run_dir.name}", data)
        assert_same_run(r.metrics, m.run_dir, ref, tmp_path / f"alone-{m.run_dir.name}")


@pytest.mark.parametrize("backend", ["numba", "xp"])
def test_population_equals_runs_one_by_one(tmp_path, data, backend):
    """numba: members one after the other; xp: one batched pass per layer. Both exact on the
    CPU: every member's matrix products have its single run's shapes and layout."""
    ms_ = members(tmp_path, backend)
    assert_each_as_alone(ms_, train_population(ms_, data, progress=False), tmp_path, data)
    finals = [weights(m.run_dir)["fc1_weights"] for m in ms_]
    # the members did learn different things (no weights shared or mixed up)
    assert not np.array_equal(finals[0], finals[1]) and not np.array_equal(finals[1], finals[2])


def test_members_draw_their_own_input_generator(tmp_path, data):
    """Members with the counter-based input draw (computed in the array module, as on a GPU)
    beside one with the host PCG64 draw: each equals its single run, bit for bit."""
    ms_ = [Member(config(seed, "xp", input_rng=rng), tmp_path / f"m{seed}",
                  initialise(parse_topology(TOPOLOGY), rng_for(seed, 0), "lee", LIVELY), (),
                  {"arm": "test"})
           for seed, rng in enumerate(("splitmix64", "pcg64", "splitmix64"))]
    assert_each_as_alone(ms_, train_population(ms_, data, progress=False), tmp_path, data)


def lively_population(R: int = 3, B: int = 7, T: int = 12):
    """(layers, params of R members, input (T, R, B, 28, 28), labels) of a two-conv, two-FC
    net whose every layer fires: weights livelier than the initialisation, thresholds lower,
    each member its own."""
    layers = parse_topology("28x28-4C5-2P-6C3-2P-12FC-10FC")
    params = []
    for seed in range(R):
        p = initialise(layers, rng_for(seed, 0))
        for q in p:
            if q is not None:
                q.weights = q.weights * 4 + abs(q.weights)
                q.thresholds = q.thresholds * (0.7 - 0.1 * seed)
        params.append(p)
    rng = np.random.default_rng(0)
    x = rng.random((T, R, B, 28, 28)) < 0.3
    return layers, params, x, [rng.integers(0, 10, B) for _ in range(R)]


@pytest.mark.parametrize("derivative", ["lee2018", "lee2020"])
def test_batched_passes_equal_each_members_own(derivative):
    """forward_population and backward_population on a two-conv, two-FC net, in chunks smaller
    than the batch: each member's counts, traces and gradients are its single pass's."""
    from models.batched import forward
    from models.batched_population import forward_population, member
    from protocols.bp import backward
    from protocols.bp_population import backward_population

    layers, params, x, labels = lively_population()
    R = len(params)
    bp = BPParameters(derivative=derivative, silent_units="zero")
    fwd = forward_population(layers, params, x, tau_p=20.0, chunk=3)
    grads, stats = backward_population(layers, params, fwd, labels, bp)
    for r in range(R):
        one = forward(layers, params[r], x[:, r], tau_p=20.0, backend="xp", keep_spikes=False,
                      chunk=3)
        mine = member(fwd, r, R)
        for name in ("count_cl", "trace_p_cl", "trace_m_cl"):
            for a, b in zip(getattr(one, name), getattr(mine, name)):
                assert np.array_equal(a, b), (r, name)
        assert all(float(c.sum()) > 0 for c in one.count_cl)
        g1, s1 = backward(layers, params[r], one, labels[r], bp)
        for a, b in zip(g1, grads[r]):
            assert (a is None and b is None) or np.array_equal(a, b)
        assert s1.loss == stats[r].loss
        assert np.array_equal(s1.predictions, stats[r].predictions)


def test_fused_kernel_plumbing_with_the_kernel_emulated(monkeypatch):
    """On CuPy the recurrence of all members runs as one fused kernel over flat (T, units)
    arrays with one threshold per unit; with the kernel emulated by the array loop on NumPy,
    every member's counts and traces are still its own single pass's."""
    import models.batched as batched
    import models.batched_cuda as cuda
    from models.batched import forward
    from models.batched_population import forward_population, member

    def lif(current, th, decay, subtract, out, count, trace_m, decay_p=None, trace_p=None):
        assert all(a is None or a.flags.c_contiguous
                   for a in (current, th, out, count, trace_m, trace_p))
        assert th.size == current.shape[1] * current.shape[2]
        batched.lif_run(current, th, decay, subtract, out, count, trace_m, decay_p, trace_p)

    def traces(s, decay_m, decay_p, count, trace_m, trace_p):
        batched._traces_from_spikes(s, decay_m, decay_p, count, trace_m, trace_p, np, False)

    monkeypatch.setattr(cuda, "lif_run_cuda", lif)
    monkeypatch.setattr(cuda, "traces_cuda", traces)
    layers, params, x, _ = lively_population()
    fwd = forward_population(layers, params, x, tau_p=20.0, chunk=3, use_cuda=True,
                             hidden_traces=False)
    for r in range(len(params)):
        one = forward(layers, params[r], x[:, r], tau_p=20.0, backend="xp", keep_spikes=False,
                      chunk=3, hidden_traces=False)
        for name in ("count_cl", "trace_p_cl", "trace_m_cl"):
            for a, b in zip(getattr(one, name), getattr(member(fwd, r, len(params)), name)):
                assert (a is None and b is None) or np.array_equal(a, b), (r, name)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["xp", "auto"])
def test_population_on_cupy_equals_numpy_runs(tmp_path, data, backend):
    """On a GPU (skipped without one) a population gives each member's NumPy single run, within
    rounding (float64: cuBLAS's batched products may sum in another order)."""
    from test_cupy import require_cupy

    require_cupy()
    gpu = []
    for m in members(tmp_path, backend):
        training = dataclasses.replace(m.cfg.training, dtype="float64", array_module="cupy")
        gpu.append(dataclasses.replace(m, cfg=dataclasses.replace(m.cfg, training=training)))
    results = train_population(gpu, data, progress=False)
    assert [r.status for r in results] == ["finished"] * 3
    for m, r in zip(gpu, results):
        cpu = dataclasses.replace(m, cfg=dataclasses.replace(m.cfg, training=dataclasses.replace(
            m.cfg.training, array_module="numpy", backend="xp")))
        ref = alone(cpu, tmp_path / f"cpu-{m.run_dir.name}", data)
        pd.testing.assert_frame_equal(r.metrics.drop(columns="wall_time_s"),
                                      ref.drop(columns="wall_time_s"))
        a, b = weights(m.run_dir), weights(tmp_path / f"cpu-{m.run_dir.name}")
        for key in a:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-9, atol=1e-12)


def test_population_with_per_member_thresholds_and_step_options(tmp_path, data):
    """The lee2020 derivative reads each member's own thresholds, which threshold homeostasis
    moves per member; weight decay and the conv eta scale differ between members."""
    ms_ = []
    for k, m in enumerate(members(tmp_path, "xp")):
        bp = dataclasses.replace(m.cfg.bp, derivative="lee2020", silent_units="zero",
                                 threshold_homeostasis=0.2, weight_decay=1e-3 * k,
                                 conv_eta_scale=1.0 + k)
        ms_.append(dataclasses.replace(m, cfg=dataclasses.replace(m.cfg, bp=bp)))
    assert_each_as_alone(ms_, train_population(ms_, data, progress=False), tmp_path, data)
    for m in ms_:
        assert not np.array_equal(weights(m.run_dir)["conv1_thresholds"],
                                  weights(m.run_dir, "initial.npz")["conv1_thresholds"])


def test_a_diverging_member_stops_alone(tmp_path, data):
    ms_ = members(tmp_path, "xp", etas=(0.5, 1e38, 0.5))
    results = train_population(ms_, data, progress=False)
    assert [r.status for r in results] == ["finished", "diverged", "finished"]
    status = json.loads((ms_[1].run_dir / "status.json").read_text())
    assert status["status"] == "diverged" and "lower bp.eta" in status["message"]
    with pytest.raises(TrainingDiverged, match=status["message"].split(":")[0]):
        alone(ms_[1], tmp_path / "alone-diverging", data)
    assert json.loads((tmp_path / "alone-diverging" / "status.json").read_text())["message"] \
        == status["message"].replace(str(ms_[1].run_dir), str(tmp_path / "alone-diverging"))
    for k in (0, 2):
        ref = alone(ms_[k], tmp_path / f"alone-{k}", data)
        assert_same_run(results[k].metrics, ms_[k].run_dir, ref, tmp_path / f"alone-{k}")


def test_killed_population_resumes_every_member(tmp_path, data):
    ms_ = members(tmp_path, "xp", iterations=5)
    # stopped after iteration 3, as if killed: the last checkpoints are at iteration 2
    stopped = train_population(ms_, data, progress=False, stop_after=3)
    assert [r.status for r in stopped] == ["stopped"] * 3
    assert not any((m.run_dir / "final.npz").exists() for m in ms_)
    assert all(int(np.load(m.run_dir / "checkpoint.npz")["iteration"]) == 2 for m in ms_)
    # a member's folder is a single run's: one member goes on alone to iteration 4, so the
    # population resumes its members from different iterations
    train(ms_[0].cfg, ms_[0].run_dir, data, None, ms_[0].excluded, ms_[0].extra_record,
          progress=False, stop_after=2)
    assert int(np.load(ms_[0].run_dir / "checkpoint.npz")["iteration"]) == 4
    resumed = train_population([dataclasses.replace(m, initial_params=None) for m in ms_],
                               data, progress=False)
    assert_each_as_alone(ms_, resumed, tmp_path, data)
    again = train_population(ms_, data, progress=False)
    assert all(r.status == "finished" and "already finished" in r.message for r in again)


KILLED = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from protocols.datasets import load_dataset
from protocols.population import train_population
from test_population import members
train_population(members(Path({tmp!r}), "xp", iterations=40, chance_guard=False),
                 load_dataset("mnist-5k"), progress=False)
"""


def test_sigkilled_population_resumes_every_member(tmp_path, data):
    """SIGKILL mid-run (no chance to record anything), then the same population again: every
    member takes over its dead lock, resumes from its checkpoint and ends as its single run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    repo = Path(__file__).resolve().parents[1]
    script = KILLED.format(tests=str(repo / "tests"), tmp=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=repo,
                            env=dict(os.environ, PYTHONPATH=str(repo)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ms_ = members(tmp_path, "xp", iterations=40, chance_guard=False)

    def checkpointed(m):
        try:
            return int(np.load(m.run_dir / "checkpoint.npz")["iteration"])
        except (OSError, ValueError, KeyError):
            return -1

    deadline = time.time() + 120
    while min(checkpointed(m) for m in ms_) < 4:
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "the population made no progress"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    at = [checkpointed(m) for m in ms_]
    assert max(at) < 40, "killed too late to test a resume"
    assert all(json.loads((m.run_dir / "status.json").read_text())["status"] == "running"
               for m in ms_)
    resumed = train_population([dataclasses.replace(m, initial_params=None) for m in ms_],
                               data, progress=False)
    assert_each_as_alone(ms_, resumed, tmp_path, data)


def test_members_must_share_the_topology(tmp_path, data):
    ms_ = members(tmp_path, "xp")
    other = dataclasses.replace(ms_[1], cfg=dataclasses.replace(ms_[1].cfg,
                                                                topology="28x28-4C5-2P-10FC"))
    with pytest.raises(ValueError, match="differ in topology") as err:
        train_population([ms_[0], other], data, progress=False)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="share a run folder"):
        train_population([ms_[0], dataclasses.replace(ms_[1], run_dir=ms_[0].run_dir)], data)
    assert not any(m.run_dir.exists() for m in ms_)


SWEEP = """
seeds = [0, 1]
arms = ["supervised"]
topologies = ["28x28-3C5-2P-10FC", "28x28-4C5-2P-10FC"]
out = "{out}"
population = 4

[study]
dataset = "mnist-5k"

[study.training]
iterations = 2
log_every = 2
train_eval_images = 20
test_eval_images = 20
eval_duration = "4 ms"

[study.bp]
t_first_epoch = "4 ms"
t_later_epochs = "4 ms"

# every hidden layer fires at the start (at the default 20 pool1 is silent in 4 ms, and the
# gated fine-tuning stops such a run at iteration 0)
[study.initialisation]
alpha = 3.0
"""


def test_sweep_groups_runs_into_populations(tmp_path):
    from protocols.config import load_config
    from protocols.study import run_study
    from protocols.sweep import SweepConfig, plan, populations, run_population

    path = tmp_path / "sweep.toml"
    path.write_text(SWEEP.format(out=tmp_path / "runs"))
    cfg = load_config(path, SweepConfig)
    configs = plan(cfg)
    groups = populations(configs, cfg.population)
    assert [[c.topology for c in g] for g in groups] == [["28x28-3C5-2P-10FC"] * 2,
                                                         ["28x28-4C5-2P-10FC"] * 2]
    assert [len(g) for g in populations(configs, 1)] == [1] * 4
    # a member whose folder refuses fails alone; the others train as their single runs do
    bad = dataclasses.replace(groups[0][1], out=str(tmp_path / "taken"))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "config.json").write_text("[]")
    results = run_population([groups[0][0], bad], None)
    assert [r["status"] for r in results] == ["finished", "failed"]
    assert "not a JSON object" in results[1]["message"]
    alone = run_study(dataclasses.replace(groups[0][0], out=str(tmp_path / "alone")),
                      progress=False)
    pop = pd.read_csv(Path(groups[0][0].out) / "metrics.csv")
    pd.testing.assert_frame_equal(pop.drop(columns="wall_time_s"),
                                  pd.read_csv(tmp_path / "alone" / "metrics.csv")
                                  .drop(columns="wall_time_s"))
    assert len(alone) == 2


def test_sweep_cli_population_override(tmp_path, monkeypatch):
    import protocols.sweep as sweep_module

    seen = {}
    monkeypatch.setattr(sweep_module, "sweep",
                        lambda cfg, *a, **k: seen.update(population=cfg.population) or [])
    path = tmp_path / "sweep.toml"
    path.write_text(SWEEP.format(out=tmp_path / "runs"))
    assert sweep_module.main(["--config", str(path), "--population", "7"]) == 0
    assert seen["population"] == 7
    assert sweep_module.main(["--config", str(path), "--population", "0"]) == 2
