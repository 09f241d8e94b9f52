"""A seed × arm sweep through a local Dask cluster survives a killed worker and skips finished runs."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from protocols.config import ConfigError, load_config
from protocols.sweep import SweepConfig, plan, run_status

REPO = Path(__file__).resolve().parents[1]

TINY = """
seeds = [0, 1]
arms = ["pretrained", "supervised"]
inits = ["lee"]
topologies = ["28x28-4C5-2P-10FC"]
out = "{out}"

[study]
dataset = "mnist-5k"
pretrain_device = "runtime"

[study.pretraining]
n_images = 20
batch_images = 20

[study.training]
iterations = 40
log_every = 10
checkpoint_every = 5
train_eval_images = 100
test_eval_images = 200
"""


def _write(tmp_path) -> Path:
    path = tmp_path / "sweep.toml"
    path.write_text(TINY.format(out=tmp_path / "runs"))
    return path


def test_plan_names_one_directory_per_point(tmp_path):
    cfg = load_config(_write(tmp_path), SweepConfig)
    configs = plan(cfg)
    assert len(configs) == 4 and len({c.out for c in configs}) == 4
    assert {(c.arm, c.seed) for c in configs} == {(a, s) for a in cfg.arms for s in cfg.seeds}
    assert all(Path(c.out).parts[-4:-1][0] == "28x28-4C5-2P-10FC" for c in configs)


def test_bad_sweep_configs(tmp_path):
    with pytest.raises(ConfigError, match="arms\\[0\\] = 'both'"):
        load_config({"arms": ["both"]}, SweepConfig)
    with pytest.raises(ConfigError, match="seeds has duplicates"):
        load_config({"seeds": [1, 1]}, SweepConfig)
    with pytest.raises(ConfigError, match="unknown config key 'iterations' in \\[study\\]"):
        load_config({"study": {"iterations": 3}}, SweepConfig)


def _sweep(config: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "protocols.sweep", "--config", str(config),
                             "--workers", "2", "--threads", "1", "--no-progress"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


@pytest.mark.slow  # a Dask cluster trains 4 tiny runs twice: ~4 min on 2 cores
def test_killed_worker_and_rerun(tmp_path):
    config = _write(tmp_path)
    runs = [Path(c.out) for c in plan(load_config(config, SweepConfig))]
    sweep = _sweep(config)
    # wait until a run is under way with a checkpoint, then kill the worker process running it
    deadline = time.time() + 240
    while not any((r / "checkpoint.npz").exists() and run_status(r) == "running" for r in runs):
        assert sweep.poll() is None, sweep.stdout.read()
        assert time.time() < deadline, "no run started"
        time.sleep(0.2)
    workers = [p for p in psutil.Process(sweep.pid).children(recursive=True)
               if p.cpu_percent(interval=0.1) > 5]
    assert workers, "no busy worker process found"
    os.kill(workers[0].pid, signal.SIGKILL)
    output, _ = sweep.communicate(timeout=600)
    assert sweep.returncode == 0, output
    assert "4 finished" in output, output
    assert all(run_status(r) == "finished" for r in runs)

    mtimes = {r: (r / "metrics.csv").stat().st_mtime_ns for r in runs}
    again = subprocess.run([sys.executable, "-m", "protocols.sweep", "--config", str(config),
                            "--no-progress"], cwd=REPO, capture_output=True, text=True,
                           env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120)
    assert again.returncode == 0 and "4 skipped" in again.stdout, again.stdout + again.stderr
    assert {r: (r / "metrics.csv").stat().st_mtime_ns for r in runs} == mtimes


@pytest.mark.slow  # a Dask cluster pre-trains and starts 2 tiny runs: ~1 min on 2 cores
def test_ctrl_c_stops_every_run_at_its_checkpoint_in_one_line(tmp_path):
    # as a terminal's Ctrl-C: SIGINT to the sweep's whole process group (workers included),
    # and the sweep started the way a shell starts a background job, SIGINT ignored, where
    # Brian2's own handler used to fail ("'Handlers' object is not callable", a Brian2 "bug")
    config = tmp_path / "sweep.toml"
    config.write_text(TINY.format(out=tmp_path / "runs").replace("iterations = 40",
                                                                  "iterations = 100000"))
    runs = [Path(c.out) for c in plan(load_config(config, SweepConfig))]
    env = dict(os.environ, PYTHONPATH=str(REPO), TMPDIR=str(tmp_path))
    sweep = subprocess.Popen(
        [sys.executable, "-m", "protocols.sweep", "--config", str(config), "--workers", "2",
         "--threads", "1", "--no-progress"], cwd=REPO, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        deadline = time.time() + 480  # a cold Brian2 cache compiles the pre-training code first
        while sum((r / "checkpoint.npz").exists() and run_status(r) == "running"
                  for r in runs) < 2:
            assert sweep.poll() is None, sweep.communicate()
            assert time.time() < deadline, "two runs never got under way"
            time.sleep(0.2)
        os.killpg(sweep.pid, signal.SIGINT)
        out, err = sweep.communicate(timeout=180)
    finally:  # a sweep that did not stop must not outlive the test (it ignores SIGINT)
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
            sweep.communicate()
    assert sweep.returncode == 130, out + err
    assert "Traceback" not in err and "Brian 2" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("interrupted:")]
    assert len(lines) == 1 and "rerun the same command" in lines[0], err
    started = [r for r in runs if (r / "status.json").exists()]
    assert len(started) >= 2
    for r in started:  # each recorded where it stands, released its lock, and can resume
        assert run_status(r) == "interrupted", (r, (r / "status.json").read_text())
        assert not (r / "run.lock").exists() and not (r / "final.npz").exists()
    assert sum((r / "checkpoint.npz").exists() for r in started) >= 2
    # Brian2's bug-report banner leaves a copy of the script; a debug log alone may be left by
    # a worker the cluster's shutdown terminated
    assert not any(p.name.startswith("brian_script_") for p in tmp_path.iterdir())


def test_a_stop_request_reaches_only_the_tasks_of_its_token():
    import threading

    from protocols import runstate

    seen = {}

    def task(token, name, go):
        with runstate.stoppable(token):
            go.wait(5)
            try:
                runstate.check_interrupt()
                seen[name] = "ran on"
            except KeyboardInterrupt:
                seen[name] = "stopped"

    go = threading.Event()
    threads = [threading.Thread(target=task, args=(tok, name, go))
               for tok, name in (("sweep-a", "a1"), ("sweep-a", "a2"), ("sweep-b", "b"),
                                 (None, "plain"))]
    for t in threads:
        t.start()
    runstate.request_stop("sweep-a")
    go.set()
    for t in threads:
        t.join(5)
    assert seen == {"a1": "stopped", "a2": "stopped", "b": "ran on", "plain": "ran on"}
    runstate.check_interrupt()  # this thread runs no task: untouched


def test_run_status_tells_finished_from_extendable(tmp_path):
    import json

    assert run_status(tmp_path / "none") == "new"
    (tmp_path / "status.json").write_text(json.dumps({"status": "finished", "iteration": 600}))
    assert run_status(tmp_path) == "finished"
    assert run_status(tmp_path, 600) == "finished"
    assert run_status(tmp_path, 1200) == "extendable"


def test_cli_overrides_seeds_and_iterations(tmp_path, capsys):
    import json

    from protocols.sweep import main

    config = _write(tmp_path)
    done = tmp_path / "runs" / "28x28-4C5-2P-10FC" / "lee" / "supervised" / "seed7"
    done.mkdir(parents=True)
    (done / "status.json").write_text(json.dumps({"status": "finished", "iteration": 40}))
    assert main(["--config", str(config), "--seeds", "7", "--dry-run", "--no-estimate"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all("seed7" in line for line in lines)
    assert any(line.split()[0] == "finished" for line in lines)
    assert main(["--config", str(config), "--seeds", "7", "--iterations", "80", "--dry-run",
                 "--no-estimate"]) == 0
    statuses = sorted(line.split()[0] for line in capsys.readouterr().out.splitlines())
    assert statuses == ["extendable", "new"]
    assert main(["--config", str(config), "--seeds", "7", "7", "--dry-run"]) == 2
    assert main(["--config", str(config), "--seeds", "7", "--arms", "supervised", "--dry-run",
                 "--no-estimate"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["finished"]
    assert lines[0].endswith(str(Path("supervised") / "seed7"))


def test_cli_array_module_override_reaches_every_run(tmp_path, monkeypatch):
    import protocols.sweep as sweep_module

    seen = {}

    def fake_sweep(cfg, *args, **kwargs):
        seen["modules"] = {c.training.array_module for c in sweep_module.plan(cfg)}
        return []

    monkeypatch.setattr(sweep_module, "sweep", fake_sweep)
    config = _write(tmp_path)
    assert sweep_module.main(["--config", str(config), "--array-module", "cupy"]) == 0
    assert seen["modules"] == {"cupy"}
    assert sweep_module.main(["--config", str(config)]) == 0
    assert seen["modules"] == {"numpy"}


@pytest.mark.skipif(not Path("/proc/self/environ").is_file(), reason="needs Linux's /proc")
def test_local_workers_start_with_the_thread_counts_and_glibc_malloc_defaults(monkeypatch):
    # /proc/self/environ is the environment the worker's interpreter started with: what numpy
    # and numba saw when the worker imported them, before Dask applies LocalCluster(env=...)
    from protocols.sweep import local_client

    monkeypatch.setenv("NUMBA_NUM_THREADS", "3")  # a shell's value: --threads must still win
    keys = ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "MALLOC_TRIM_THRESHOLD_")
    before = {k: os.environ.get(k) for k in keys}
    with local_client(2, 1) as client:
        started = client.run(lambda: dict(
            line.split("=", 1) for line in open("/proc/self/environ").read().split("\0")
            if "=" in line))
    assert len(started) == 2
    for env in started.values():
        assert env.get("NUMBA_NUM_THREADS") == "1" and env.get("OMP_NUM_THREADS") == "1"
        # Dask's default 65536 turns off glibc's adaptive mmap threshold: 3x slower numpy
        assert "MALLOC_TRIM_THRESHOLD_" not in env or before["MALLOC_TRIM_THRESHOLD_"]
    assert {k: os.environ.get(k) for k in keys} == before  # this process is left as it was


def test_runs_start_in_plan_order_as_workers_free_up():
    # Dask's default worker saturation gave each 1-thread worker a second task, which waited
    # behind a long run while the other worker went on to later ones (seed 5 before seed 4)
    from protocols.sweep import TaskQueue, local_client

    def task(seconds, token):  # TaskQueue passes its token last
        started = time.time()
        time.sleep(seconds)
        return started

    with local_client(2, 1) as client:
        client.run(time.time)  # both workers up
        tasks = TaskQueue(client, task, [(f"t-{i}", (s,)) for i, s in
                                         enumerate([3.0, 0.3, 0.3, 0.3, 0.3])], window=2)
        started = {int(f.key[2:]): f.result() for f in tasks}
    assert len(started) == 5
    order = sorted(range(5), key=started.__getitem__)
    assert set(order[:2]) == {0, 1} and order[2:] == [2, 3, 4], started


def test_two_local_clusters_at_once_print_no_port_warning():
    # a --dry-run beside a running sweep, or two sweeps on one machine
    import warnings

    from protocols.sweep import local_client

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with local_client(1, 1) as first, local_client(1, 1) as second:
            assert len(first.run(os.getpid)) == 1 and len(second.run(os.getpid)) == 1
    assert not [w for w in caught if "already in use" in str(w.message)], \
        [str(w.message) for w in caught]


def test_estimate_schedules_longest_first():
    from protocols.estimate import format_duration, schedule_wall_time

    # LPT on 2 workers: 3 | 3, then 2 -> 5 | 3, 2 -> 5 | 5, 2 -> 7 | 5
    assert schedule_wall_time([2, 3, 2, 3, 2], 2) == 7
    assert schedule_wall_time([2, 3, 2, 3, 2], 1) == 12
    assert schedule_wall_time([4, 1], 8) == 4
    assert format_duration(3725) == "1 h 02 min" and format_duration(65) == "1 min 05 s"


def test_estimate_counts_only_what_is_left(tmp_path):
    import dataclasses

    from protocols.estimate import Calibration, run_seconds

    cfg = plan(load_config(_write(tmp_path), SweepConfig))[0]
    assert cfg.arm == "pretrained"
    cfg = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, iterations=40))
    cal = Calibration(s_per_iteration_first=2.0, s_per_iteration_later=1.0,
                      s_per_eval_image=0.01, pretrain_s=50.0)
    # a new run on 1,000 training images, batch 100: 10 first-epoch iterations, 30 later ones;
    # evaluations at 0, 10, 20, 30, 40 of 100 train + 200 test images; pre-training
    assert run_seconds(cfg, cal, 1000, 500) == pytest.approx(50 + 10 * 2 + 30 * 1 + 5 * 300 * 0.01)
    # resumed at iteration 20 (metrics.csv's last row) with its pre-training done
    run = Path(cfg.out)
    (run / "pretrain").mkdir(parents=True)
    (run / "pretrain" / "pretrained.npz").write_bytes(b"")
    (run / "metrics.csv").write_text("iteration,epoch\n0,1\n10,1\n20,2\n")
    assert run_seconds(cfg, cal, 1000, 500) == pytest.approx(20 * 1 + 2 * 300 * 0.01)
    (run / "metrics.csv").write_text("iteration,epoch\n0,1\n40,4\n")
    assert run_seconds(cfg, cal, 1000, 500) == 0.0


def test_dry_run_calibrates_and_estimates(tmp_path, capsys):
    from protocols.sweep import main

    config = tmp_path / "sweep.toml"
    config.write_text(TINY.format(out=tmp_path / "runs").replace(
        'arms = ["pretrained", "supervised"]', 'arms = ["supervised"]'))
    assert main(["--config", str(config), "--dry-run", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "ms per iteration" in out and "ms per evaluated image" in out
    estimate_line = [line for line in out.splitlines() if line.startswith("estimate:")]
    assert len(estimate_line) == 1 and "2 runs" in estimate_line[0]
    assert not (tmp_path / "runs").exists()  # the calibration wrote nothing into the sweep
