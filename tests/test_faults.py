"""Faults and bad input (issue 19): Ctrl-C in pre-training and fine-tuning, two processes on one
run folder, divergence beyond NaN, a shorter run than the folder holds, corrupt run files, and a
report over broken runs. Each fault ends in a clean resume or one line naming the file and the
fix; none in exit 0 with a wrong artefact. Tiny nets on the offline mnist-5k subset."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from brian2 import ms

from models.initialisation import initialise
from models.parameters import BPParameters
from models.topology import parse_topology
from protocols.train import TrainConfig, TrainingDiverged, TrainingSettings, rng_for, train
from test_train import LIVELY  # noqa: E402 (tests/ on sys.path)
from test_train import write_config as write_study_config  # noqa: E402

# what this module tests of protocols.runstate and protocols.records is imported in each test, so
# that each one fails on its own where the behaviour is missing

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "results" / "example" / "runs" / "28x28-36C5-2P-10FC" / "lee"

#: the faults tests pre-train on the runtime device (Ctrl-C lands inside a Brian2 run) and briefly
RUNTIME_PRETRAINING = """pretrain_device = "runtime"

[pretraining]
n_images = 400
batch_images = 20
"""


def write_config(tmp_path, out, arm="supervised", iterations=40, eta=2.0, name="c.toml"):
    """test_train's tiny study config with RUNTIME_PRETRAINING."""
    return write_study_config(tmp_path, name=name, arm=arm, iterations=iterations,
                              extra=RUNTIME_PRETRAINING, out=str(out), eta=eta)


class Command:
    """``python -m protocols.study`` in a subprocess with its own temp folder; stderr is read as
    it comes, so that a test can wait for a phase message."""

    def __init__(self, tmp_path, config, *extra):
        self.tmp = tmp_path / "tmpdir"
        self.tmp.mkdir(exist_ok=True)
        env = dict(os.environ, PYTHONPATH=str(REPO), TMPDIR=str(self.tmp))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "protocols.study", "--config", str(config), "--no-progress",
             *extra], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        self.err_lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stderr:
            self.err_lines.append(line)

    def wait_for(self, text: str, timeout=300, or_file=None, after_s=10.0) -> None:
        """Until stderr has ``text`` (or ``after_s`` after ``or_file`` appeared)."""
        deadline = time.time() + timeout
        seen = None
        while time.time() < deadline:
            if any(text in line for line in self.err_lines):
                return
            if or_file is not None and seen is None and Path(or_file).exists():
                seen = time.time()
            if seen is not None and time.time() > seen + after_s:
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"never printed {text!r}: {''.join(self.err_lines)}")

    def finish(self, timeout=300) -> tuple[int, str]:
        self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        self.proc.stdout.close()
        return self.proc.returncode, "".join(self.err_lines)

    def debug_files(self) -> list[str]:
        return sorted(p.name for p in self.tmp.iterdir() if p.name.startswith("brian_"))


def run(tmp_path, config, *extra) -> tuple[int, str, Command]:
    command = Command(tmp_path, config, *extra)
    code, err = command.finish()
    return code, err, command


def status(run_dir) -> dict:
    return json.loads((Path(run_dir) / "status.json").read_text())


def one_line(err: str, prefix: str) -> str:
    """The command's error: exactly one line starting with ``prefix``, no traceback."""
    lines = [line for line in err.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1 and "Traceback" not in err and "Brian 2" not in err, err
    return lines[0]


# ----------------------------------------------------------------------------------------------
# Interrupts


@pytest.mark.slow  # a subprocess that pre-trains: 30-70 s on 2 cores
def test_ctrl_c_during_runtime_pretraining_writes_nothing_and_says_how_to_resume(tmp_path):
    out = tmp_path / "run"
    command = Command(tmp_path, write_config(tmp_path, out, arm="pretrained"))
    # the message, or 60 s after the pre-training config appeared (a loaded machine can take
    # that long to compile and start the batch loop; 10 s was too short under a full CI load)
    command.wait_for("pre-training layer conv1", or_file=out / "pretrain" / "pretrain.toml",
                     after_s=60.0)
    time.sleep(1.5)  # inside the batch loop of the runtime device
    command.proc.send_signal(signal.SIGINT)
    code, err = command.finish()
    assert code == 130, err
    line = one_line(err, "interrupted:")
    assert "conv1" in line and "rerun the same command" in line
    assert not (out / "pretrain" / "pretrained.npz").exists()
    assert not (out / "pretrain" / "pretrained.json").exists()
    record = status(out)
    assert record["status"] == "interrupted" and "pre-training" in record["message"]
    assert not (out / "run.lock").exists()
    assert command.debug_files() == []


@pytest.mark.slow  # two subprocess runs: 30-70 s on 2 cores
def test_ctrl_c_during_finetuning_marks_the_run_interrupted_and_it_resumes(tmp_path):
    out = tmp_path / "run"
    config = write_config(tmp_path, out, iterations=24)
    command = Command(tmp_path, config)
    deadline = time.time() + 240
    while not ((out / "metrics.csv").exists() and
               len((out / "metrics.csv").read_text().splitlines()) >= 3):  # rows 0 and 4
        assert time.time() < deadline and command.proc.poll() is None
        time.sleep(0.05)
    command.proc.send_signal(signal.SIGINT)
    code, err = command.finish()
    assert code == 130, err
    line = one_line(err, "interrupted:")
    assert "fine-tuning interrupted at iteration" in line and "resume" in line
    assert "loading data" in err and "fine-tuning" in err  # each phase says what it does
    record = status(out)
    # the last checkpoint: 2 when the signal came between row 4 and its checkpoint
    assert record["status"] == "interrupted" and record["iteration"] >= 2
    assert not (out / "final.npz").exists() and not (out / "run.lock").exists()
    assert command.debug_files() == []
    # the same command resumes and finishes, quietly with --quiet
    code, err, _ = run(tmp_path, config, "--quiet")
    # Brian2 itself notes at import when the user's compiled-code cache passed 1 GB; that is
    # about the machine, not this command's output
    err = re.sub(r"INFO\s+Cache size for target .*?\[brian2\]\n", "", err, flags=re.S)
    assert code == 0 and err == "", err
    assert status(out)["status"] == "finished" and (out / "final.npz").exists()
    assert list(pd.read_csv(out / "metrics.csv").iteration) == [0, 4, 8, 12, 16, 20, 24]


# ----------------------------------------------------------------------------------------------
# One process per run folder


@pytest.mark.slow  # three subprocess runs: 30-70 s on 2 cores
def test_a_second_process_refuses_and_a_dead_ones_lock_is_taken_over(tmp_path):
    out = tmp_path / "run"
    config = write_config(tmp_path, out, iterations=400)
    first = Command(tmp_path, config)
    try:
        deadline = time.time() + 240
        while not (out / "metrics.csv").exists():
            assert time.time() < deadline and first.proc.poll() is None
            time.sleep(0.05)
        assert status(out)["status"] == "running" and status(out).get("pid") == first.proc.pid
        code, err, _ = run(tmp_path, config, "--stop-after", "1")
        assert code == 2, err
        line = one_line(err, "run folder error:")
        assert f"process {first.proc.pid}" in line and "another --out" in line
    finally:
        first.proc.send_signal(signal.SIGKILL)
        first.finish()
    assert (out / "run.lock").exists() and status(out)["status"] == "running"  # left behind
    code, err, _ = run(tmp_path, config, "--stop-after", "1")
    assert code == 0, err
    assert not (out / "run.lock").exists()


def test_lock_is_reentrant_in_a_process_and_names_its_holder(tmp_path):
    from protocols.runstate import RunLock

    with RunLock(tmp_path) as lock:
        with RunLock(tmp_path):
            pass
        assert (tmp_path / "run.lock").exists()
        holder = json.loads((tmp_path / "run.lock").read_text())
        assert holder["pid"] == os.getpid()
    assert not (tmp_path / "run.lock").exists() and lock.count == 0
    # a lock of a process that has ended is stale
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (tmp_path / "run.lock").write_text(json.dumps({"pid": int(dead), "host": os.uname()[1]}))
    with RunLock(tmp_path):
        assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()


# ----------------------------------------------------------------------------------------------
# In-process training: length, divergence


def _tiny(iterations=4, eta=3.0, guard=None):
    from protocols.datasets import load_dataset

    cfg = TrainConfig(topology="28x28-3C5-2P-10FC", **({"guard": guard} if guard else {}),
                      training=TrainingSettings(iterations=iterations, log_every=2,
                                                train_eval_images=20, test_eval_images=20,
                                                eval_duration="5 ms"),
                      bp=BPParameters(eta=eta, t_first_epoch=6 * ms, t_later_epochs=4 * ms))
    # alive at the start (LIVELY): a silent pool1 would stop every run at iteration 0
    params = initialise(parse_topology(cfg.topology), rng_for(0, 0), "lee", LIVELY)
    return cfg, load_dataset("mnist-5k"), params


def test_a_shorter_run_than_the_folder_holds_is_refused_and_nothing_rewritten(tmp_path):
    cfg, data, params = _tiny(iterations=4)
    train(cfg, tmp_path, data, params, progress=False)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    shorter = TrainConfig(**{**cfg.__dict__, "training": TrainingSettings(
        **{**cfg.training.__dict__, "iterations": 2})})
    with pytest.raises(ValueError, match=r"already holds 4 iterations, more than the 2"):
        train(shorter, tmp_path, data, None, progress=False)
    # the same length again: nothing to do, nothing rewritten
    frame = train(cfg, tmp_path, data, None, progress=False)
    assert list(frame.iteration) == [0, 2, 4]
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert status(tmp_path)["iteration"] == 4


def test_weights_beyond_the_bound_stop_the_run_as_diverged(tmp_path):
    cfg, data, params = _tiny(iterations=4, eta=1e6)
    with pytest.raises(TrainingDiverged, match="max_abs_weight") as info:
        train(cfg, tmp_path / "a", data, params, progress=False)
    assert "--out" in str(info.value) and "lower bp.eta" in str(info.value)
    record = status(tmp_path / "a")
    assert record["status"] == "diverged" and "max_abs_weight" in record["reason"]
    assert not (tmp_path / "a" / "final.npz").exists()
    # a rerun with a lower eta in the same folder: refused, told to use a new folder
    lower, _, _ = _tiny(iterations=4, eta=3.0)
    with pytest.raises(ValueError, match=r"diverged .* new run folder \(--out NEW\)"):
        train(lower, tmp_path / "a", data, params, progress=False)
    # the guard is configurable: off, the same run is not stopped for its weights
    from protocols.runstate import GuardSettings

    off, _, _ = _tiny(iterations=2, eta=1e6, guard=GuardSettings(max_abs_weight=0,
                                                                 chance_evaluations=0))
    train(off, tmp_path / "b", data, params, progress=False)
    assert status(tmp_path / "b")["status"] == "finished"


def test_error_at_chance_after_learning_counts_as_divergence():
    from protocols.runstate import DivergenceGuard, GuardSettings

    guard = DivergenceGuard(GuardSettings(chance_error=0.85, chance_evaluations=3))
    assert [guard.evaluation(e) for e in (0.9, 0.9, 0.9, 0.9)] == [None] * 4  # never learnt
    assert guard.evaluation(0.4) is None
    assert guard.evaluation(0.9) is None and guard.evaluation(0.95) is None
    assert "at chance" in guard.evaluation(0.9)
    resumed = DivergenceGuard(GuardSettings(), rows=[{"train_error": e} for e in (0.9, 0.3, 0.9)])
    assert resumed.evaluation(0.9) is None and resumed.evaluation(0.9) is not None


# ----------------------------------------------------------------------------------------------
# Corrupt files and bad input: one line naming the file and the fix, exit 2


@pytest.mark.slow  # six subprocess starts: 30-70 s on 2 cores
def test_corrupt_run_files_and_bad_paths_are_one_line_errors(tmp_path):
    out = tmp_path / "run"
    config = write_config(tmp_path, out, iterations=8)
    code, err, _ = run(tmp_path, config, "--stop-after", "2")
    assert code == 0, err
    good = (out / "checkpoint.npz").read_bytes()
    cases = {
        "truncated checkpoint": ("checkpoint.npz", good[:300]),
        "random checkpoint": ("checkpoint.npz", np.random.default_rng(0).bytes(3000)),
        "corrupt config.json": ("config.json", b'{"config": '),
    }
    for name, (file, content) in cases.items():
        saved = (out / file).read_bytes()
        (out / file).write_bytes(content)
        code, err, command = run(tmp_path, config)
        (out / file).write_bytes(saved)
        assert code == 2, (name, err)
        line = one_line(err, "run folder error:")
        assert str(out / file) in line and "--out" in line, (name, line)
        assert "pickle" not in line.replace("holds a pickle", ""), line
        if file.endswith(".npz"):
            assert "corrupt or not an npz file" in line
        assert command.debug_files() == [], name
    assert status(out)["status"] == "running" and status(out)["message"].startswith("training")
    # an unknown dataset, an output folder that cannot be made: before any work
    bad = tmp_path / "bad.toml"
    bad.write_text(config.read_text().replace('"mnist-5k"', '"mnist-6k"'))
    code, err, command = run(tmp_path, bad)
    assert code == 2 and "mnist-6k" in one_line(err, "configuration error:")
    (tmp_path / "file").write_text("")
    code, err, command = run(tmp_path, config, "--out", str(tmp_path / "file" / "run"))
    assert code == 2 and str(tmp_path / "file" / "run") in one_line(err, "run folder error:")
    assert command.debug_files() == []


def test_npz_errors_never_suggest_loading_pickles(tmp_path):
    import pickle

    from protocols.config import ConfigError
    from protocols.records import NpzError, load_npz
    from protocols.study import load_pretrained_conv

    np.savez(tmp_path / "good.npz", a=np.arange(3))
    good = (tmp_path / "good.npz").read_bytes()
    files = {"truncated.npz": good[:40], "random.npz": np.random.default_rng(1).bytes(500),
             "pickle.npz": pickle.dumps({"a": 1})}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(NpzError) as info:
            load_npz(tmp_path / name)
        text = str(info.value)
        assert str(tmp_path / name) in text and "corrupt or not an npz file" in text
        assert "allow_pickle" not in text and "unsafe" not in text
        with pytest.raises(ConfigError, match="corrupt or not an npz file"):
            load_pretrained_conv(tmp_path / name, "28x28-4C5-2P-10FC")
    assert load_npz(tmp_path / "good.npz")["a"].tolist() == [0, 1, 2]


# ----------------------------------------------------------------------------------------------
# The report over broken runs


def test_report_leaves_out_broken_runs_and_says_why(tmp_path, capsys):
    from analysis.report import main as report_main

    root = tmp_path / "runs"
    for arm in ("pretrained", "supervised"):
        for seed in (0, 1):
            shutil.copytree(EXAMPLE / arm / f"seed{seed}", root / arm / f"seed{seed}",
                            ignore=shutil.ignore_patterns("pretrain"))
    broken = root / "broken"
    for name in ("diverged", "interrupted", "bad_metrics", "no_metrics", "bad_config"):
        shutil.copytree(EXAMPLE / "supervised" / "seed0", broken / name)
    (broken / "diverged" / "status.json").write_text(json.dumps(
        {"status": "diverged", "iteration": 30, "reason": "a weight reached 1e4",
         "message": "training diverged"}))
    metrics = pd.read_csv(broken / "interrupted" / "metrics.csv")
    metrics[metrics.iteration <= 100].to_csv(broken / "interrupted" / "metrics.csv", index=False)
    (broken / "interrupted" / "status.json").write_text(json.dumps(
        {"status": "interrupted", "iteration": 100, "message": "interrupted"}))
    (broken / "bad_metrics" / "metrics.csv").write_bytes(b"\x00\x01garbage\n1,2\n")
    (broken / "no_metrics" / "metrics.csv").unlink()
    (broken / "bad_config" / "config.json").write_text("{")

    assert report_main([str(root), "--out", str(tmp_path / "out"), "--at", "100"]) == 0
    err = capsys.readouterr().err
    left = pd.read_csv(tmp_path / "out" / "left_out.csv").set_index("run")
    assert dict(left.status) == {"broken/bad_config": "unreadable",
                                 "broken/bad_metrics": "unreadable",
                                 "broken/diverged": "diverged",
                                 "broken/interrupted": "interrupted",
                                 "broken/no_metrics": "unreadable"}
    assert str(broken / "bad_config" / "config.json") in left.loc["broken/bad_config", "reason"]
    assert str(broken / "no_metrics" / "metrics.csv") in left.loc["broken/no_metrics", "reason"]
    assert "1e4" in left.loc["broken/diverged", "reason"]
    assert "broken/bad_metrics" in err and "left out 5" in err
    summary = pd.read_csv(tmp_path / "out" / "error_summary.csv")
    assert set(summary.n_seeds) == {2}  # the finished runs only

    # with unfinished runs: the interrupted one too, every run cut at iteration 100
    assert report_main([str(root), "--out", str(tmp_path / "out2"), "--at", "100",
                        "--include-unfinished"]) == 0
    summary = pd.read_csv(tmp_path / "out2" / "error_summary.csv").set_index("arm")
    assert summary.loc["supervised", "n_seeds"] == 3 and summary.loc["pretrained", "n_seeds"] == 2
    crossings = pd.read_csv(tmp_path / "out2" / "iterations_to_threshold.csv")
    assert len(crossings) == 5
    # matched seeds only: seed 1's runs are listed as not selected, and the interrupted run (a
    # seed-0 copy) no longer sets the common iteration when it is not a selected seed's
    assert report_main([str(root), "--out", str(tmp_path / "out4"), "--at", "100", "200",
                        "--seeds", "1", "--include-unfinished"]) == 0
    summary = pd.read_csv(tmp_path / "out4" / "error_summary.csv")
    assert set(summary.n_seeds) == {1} and sorted(summary.iteration) == [100, 100, 200, 200]
    left = pd.read_csv(tmp_path / "out4" / "left_out.csv").set_index("run")
    assert {r for r, st in left.status.items() if st == "not selected"} == {
        "pretrained/seed0", "supervised/seed0", "broken/interrupted", "broken/diverged"}
    crossings = pd.read_csv(tmp_path / "out4" / "iterations_to_threshold.csv")
    assert sorted(crossings.seed) == [1, 1]
    # nothing to report: one line, exit 2
    assert report_main([str(broken), "--out", str(tmp_path / "out3")]) == 2
    assert "no finished runs" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Records and the command line


def test_records_carry_the_package_version_without_installed_metadata(monkeypatch):
    import importlib.metadata as metadata

    from protocols.records import versions

    real = metadata.version

    def version(name):
        if name == "lee2018-snn":
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(metadata, "version", version)
    record = versions()
    assert record["lee2018-snn"] and record["lee2018-snn"][0].isdigit()


def test_help_names_the_command_and_every_option(capsys):
    from protocols.study import main

    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert text.startswith("usage: python -m protocols.study")
    options = text[text.index("options:"):]
    for option in ("--config", "--seed", "--out", "--iterations", "--pretrained", "--data-dir",
                   "--no-progress", "--quiet"):
        line = next(line for line in options.splitlines() if option in line)
        rest = line.split(option, 1)[1].strip()
        # help text on the option's own line, or on the next one
        following = options.splitlines()[options.splitlines().index(line) + 1].strip()
        assert (rest and not rest.startswith("-") and not rest.isupper()) or \
            (following and not following.startswith("-")), (option, line)


@pytest.mark.slow  # Brian2's Cython build: 30-70 s on 2 cores
def test_a_brian2_run_shorter_than_its_duration_is_an_error(monkeypatch):
    from protocols import pretrain as pt

    cfg = pt.PretrainConfig(topology="28x28-2C5-2P-10FC", device="runtime",
                            pretraining=pt.PretrainingParameters(n_images=4, batch_images=2))
    images = np.random.default_rng(0).integers(0, 255, (4, 28, 28), dtype=np.uint8)

    def half_run(sn, duration):
        sn.groups[0].t_start = sn.net.t
        sn.net.run(duration / 2)

    monkeypatch.setattr(pt, "_runtime_run", half_run)
    with pytest.raises(pt.SimulationIncomplete, match=r"simulated 50\.0% of its 50\. ms"):
        pt.pretrain_layer(cfg.topology, 1, {}, images, np.random.default_rng(0), cfg,
                          progress=False)


def test_a_full_disk_names_the_file_and_the_fix(tmp_path, monkeypatch, capsys):
    import errno

    from protocols import records
    from protocols.runstate import cli

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(records.os, "fsync", full)
    target = tmp_path / "checkpoint.npz"
    assert cli(lambda argv: records.atomic_savez(target, {"a": np.arange(3)})) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"file error: {target}: No space left on device; free disk space, then rerun "
                   f"the same command to resume")
    assert list(tmp_path.iterdir()) == []  # no temporary file left
