"""GeNN export (docs/gpu.md): the generated brian2genn project, what GeNN computes, and a real
GeNN build on its CPU backend.

The export runs in the GeNN environment (brian2genn 1.7 needs Brian2 2.5), in a subprocess:
``bash envs/make-genn-env.sh`` creates ``.venv-genn`` (with a GeNN when given GENN_PATH or a
GeNN 4.x tarball); ``$LEE2018_GENN_PYTHON`` names another interpreter. This file itself runs in
the main environment (the tiny run is trained by ``protocols.train``); ``.ci/gpu-codegen`` runs
it with ``LEE2018_GENN_PYTHON`` set. The schedule tests need only Brian2: the exported network on
Brian2's runtime device with GeNN's order of operations must give the trainer's spikes, delayed
one step per layer.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHALLOW = "28x28-36C5-2P-10FC"
#: the tiny trained net of the end-to-end tests, and its membrane constant (default: 20 ms)
TINY = "28x28-6C5-2P-10FC"
TINY_TAU_M_MS = 10


def _python_with(module: str, env_var: str, venv: str):
    if os.environ.get(env_var):
        return os.environ[env_var]
    try:
        __import__(module)
        return sys.executable
    except ImportError:
        pass
    candidate = REPO / venv / "bin" / "python"
    return str(candidate) if candidate.exists() else None


GENN_PYTHON = _python_with("brian2genn", "LEE2018_GENN_PYTHON", ".venv-genn")
needs_genn = pytest.mark.skipif(
    GENN_PYTHON is None,
    reason="no brian2genn environment: run `bash envs/make-genn-env.sh` (creates .venv-genn) or "
           "set LEE2018_GENN_PYTHON; `bash .ci/gpu-codegen` runs these tests")


def _genn_root(python: str | None) -> str | None:
    """The GeNN protocols.export_genn would build with in ``python``'s environment (GENN_PATH,
    else ``<env>/genn`` with its CPU backend built), or None."""
    if python is None:
        return None
    if os.environ.get("GENN_PATH"):
        return os.environ["GENN_PATH"]
    prefix = subprocess.run([python, "-c", "import sys; print(sys.prefix)"], capture_output=True,
                            text=True).stdout.strip()
    root = Path(prefix, "genn")
    ready = (root / "bin" / "genn-buildmodel.sh").is_file() and \
        (root / "lib" / "libgenn_single_threaded_cpu_backend.a").is_file()
    return str(root) if ready else None


GENN_ROOT = _genn_root(GENN_PYTHON)
#: .ci/gpu-codegen sets this when it was given a GeNN: the GeNN build test then fails, not skips
GENN_REQUIRED = os.environ.get("LEE2018_GENN_REQUIRED") == "1"
NO_GENN = ("no GeNN to build with: `GENN_TARBALL=/path/to/genn-4.9.0.tar.gz bash "
           "envs/make-genn-env.sh` builds one into .venv-genn from a GeNN 4.x source tarball "
           "(CI is given one), or `GENN_PATH=<GeNN 4.x checkout or conda "
           "install> bash envs/make-genn-env.sh` links yours; docs/gpu.md")
needs_genn_build = pytest.mark.skipif(GENN_ROOT is None and not GENN_REQUIRED, reason=NO_GENN)


def train_tiny_run(run_dir: Path, tau_m_ms: float = TINY_TAU_M_MS, topology: str = TINY,
                   iterations: int = 10):
    """Train a tiny net with ``protocols.train`` (tau_m = 10 ms, not the default 20 ms) on the
    5k-MNIST subset; returns ``(run_dir, cfg)``. ~10 s on 2 cores."""
    import dataclasses

    try:
        from brian2 import ms

        from models.initialisation import initialise
        from models.parameters import BPParameters, LIFParameters
        from models.topology import parse_topology
        from protocols.datasets import load_dataset
        from protocols.train import TrainConfig, TrainingSettings, rng_for, train
    except ImportError as err:
        pytest.skip(f"the trainer is not importable here ({err}): run this file with the main "
                    f"environment's python (LEE2018_GENN_PYTHON names the GeNN one)")
    cfg = TrainConfig(
        topology=topology, seed=1,
        training=TrainingSettings(iterations=iterations, log_every=iterations,
                                  train_eval_images=100, test_eval_images=100),
        bp=dataclasses.replace(BPParameters(), batch_size=20, t_first_epoch=30 * ms,
                               t_later_epochs=30 * ms),
        lif=LIFParameters(tau_m=tau_m_ms * ms))
    params = initialise(parse_topology(topology), rng_for(1, 0), scheme="lee", dtype=np.float32)
    train(cfg, run_dir, load_dataset("mnist-5k"), initial_params=params, progress=False)
    assert (run_dir / "final.npz").is_file() and (run_dir / "config.json").is_file()
    return run_dir, cfg


_TINY_RUNS: dict = {}


def shared_tiny_run(tmp_path_factory):
    """One tiny trained run per test session (this file's and test_export_cuda.py's tests)."""
    if "run" not in _TINY_RUNS:
        _TINY_RUNS["run"] = train_tiny_run(tmp_path_factory.mktemp("run") / "tiny")
    return _TINY_RUNS["run"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return shared_tiny_run(tmp_path_factory)


def trainer_outputs_of(run_dir: Path, cfg, n_images: int, duration_ms: int, seed: int,
                       lif=None):
    """The trainer's own forward pass (float64) on the export's input spikes: counts ``(N, 10)``
    and predictions, with the training configuration ``cfg`` (or another membrane ``lif``)."""
    from brian2 import ms

    from models.batched import forward, params_from_arrays
    from models.topology import parse_topology
    from protocols.bp import predict, tau_steps
    from protocols.export_genn import draw_presentation

    layers = parse_topology(cfg.topology)
    with np.load(run_dir / "final.npz") as data:
        params = params_from_arrays(layers, {k: data[k] for k in data.files}, dtype=np.float64)
    pres = draw_presentation("mnist-5k", n_images, duration_ms * ms, seed, len(layers) - 1,
                             max_rate=cfg.input.max_rate, lif=cfg.lif)
    lif = cfg.lif if lif is None else lif
    out = forward(layers, params, pres.spikes, lif, cfg.pooling, dtype=np.float64,
                  tau_p=tau_steps(cfg.bp.tau_p, lif.dt), keep_spikes=False,
                  record_trace_m=False, backend="xp")
    counts = np.asarray(out.count[-1]).reshape(n_images, -1).astype(np.int64)
    trace = np.asarray(out.trace_p[-1]).reshape(n_images, -1)
    return counts, np.asarray(predict(counts, trace)).tolist(), pres.labels.tolist()


def export_cli(python: str, *args: str, env: dict | None = None, timeout: int = 900):
    cmd = [python, "-m", "protocols.export_genn", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def main_error(capsys, *args: str, module: str = "protocols.export_genn") -> str:
    """The error of the export command run in this process: exit 2 and one line on stderr."""
    import importlib

    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def one_line_error(result) -> str:
    """The export's error: exit status 2 and one line on stderr (no traceback)."""
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    err = result.stderr.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


def run_export(out: Path, *extra: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "GENN_PATH"}  # generate only
    cmd = [GENN_PYTHON, "-m", "protocols.export_genn", "--init", "lee", "--seed", "1",
           "--n-images", "3", "--duration", "20 ms", "--no-build", "--out", str(out), *extra]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    out = tmp_path_factory.mktemp("genn") / "shallow"
    stdout = run_export(out)
    return out, stdout


def populations(model_cpp: str):
    neurons = dict(re.findall(r'addNeuronPopulation<[^>]*>\("(\w+)", (\d+)', model_cpp))
    synapses = re.findall(r'addSynapsePopulation<(\w+)WEIGHTUPDATE, \w+POSTSYN>\(\s*"(\w+)"',
                          model_cpp)
    return {k: int(v) for k, v in neurons.items()}, [name for _, name in synapses]


def int32_count(path: Path) -> int:
    return path.stat().st_size // np.dtype(np.int32).itemsize


@pytest.mark.genn
@needs_genn
def test_generated_model_has_every_layer_with_its_size(project):
    out, _ = project
    model = (out / "magicnetwork_model.cpp").read_text()
    neurons, synapses = populations(model)
    assert neurons == {"layer0_input": 784, "layer1_conv": 36 * 24 * 24,
                       "layer2_pool": 36 * 12 * 12, "layer3_fc": 10}
    assert sorted(synapses) == ["layer1_conv_in", "layer2_pool_in", "layer3_fc_in"]
    assert "model.setDT(0.001);" in model
    assert "model.setPrecision(GENN_DOUBLE);" in model
    # every pathway only adds to the post-synaptic membrane
    assert model.count("$(v) += $(inSyn); $(inSyn)= 0;") == 3


@pytest.mark.genn
@needs_genn
def test_synapse_counts_and_copied_kernels(project):
    out, _ = project
    static = out / "static_arrays"
    # conv: 25 per unit; pool: 4 per pooling unit (5184 units); FC: 5184 x 10
    expected = {"layer1_conv_in": 36 * 576 * 25, "layer2_pool_in": 4 * 5184,
                "layer3_fc_in": 51840}
    for name, n in expected.items():
        assert int32_count(static / f"_static_array__array_{name}_sources") == n
        assert int32_count(static / f"_static_array__array_{name}_targets") == n
    # the shared kernel is copied into every synapse's weight, scaled by 1/decay
    from models.initialisation import initialise
    from models.parameters import LIFParameters
    from models.synapses import conv_connectivity
    from models.topology import parse_topology

    layers = parse_topology(SHALLOW)
    params = initialise(layers, np.random.default_rng(1), dtype=np.float64)
    pre, post, kidx = conv_connectivity(layers[1])
    w = np.fromfile(static / "_static_array__dynamic_array_layer1_conv_in_w", dtype=np.float64)
    np.testing.assert_allclose(w, params[1].weights.ravel()[kidx] / LIFParameters().decay,
                               rtol=1e-12)
    np.testing.assert_array_equal(
        np.fromfile(static / "_static_array__array_layer1_conv_in_sources", dtype=np.int32), pre)
    vth = np.fromfile(static / "_static_array__array_layer1_conv_v_th", dtype=np.float64)
    np.testing.assert_allclose(vth, np.repeat(params[1].thresholds, 576))


@pytest.mark.genn
@needs_genn
def test_input_timeline_and_per_image_reset(project):
    out, _ = project
    manifest = json.loads((out / "manifest.json").read_text())
    tl = manifest["timeline"]
    assert (tl["n_images"], tl["presentation_steps"], tl["gap_steps"]) == (3, 20, 3)
    assert manifest["output"]["lag_steps"] == 3 and len(manifest["labels"]) == 3
    static = out / "static_arrays"
    idx = np.fromfile(static / "_static_array__dynamic_array_layer0_input_neuron_index",
                      dtype=np.int32)
    times = np.fromfile(static / "_static_array__dynamic_array_layer0_input_spike_time",
                        dtype=np.float64)
    from brian2 import ms

    from protocols.export_genn import draw_presentation

    pres = draw_presentation("mnist-5k", 3, 20 * ms, seed=1, gap=3)
    ref_idx, ref_steps = pres.timeline()
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_array_equal(np.rint(times / 1e-3).astype(np.int64), ref_steps)
    assert tl["input_spikes"] == len(idx) > 0
    # the membrane reset of every layer runs at the start of each 23-step slot
    engine = (out / "engine.cpp").read_text()
    for layer in ("layer1_conv", "layer2_pool", "layer3_fc"):
        assert f"_run_{layer}_run_regularly_codeobject();" in engine
    assert engine.count("if (i % 23 == 0)") == 6  # 3 operations + 3 pushes of v
    # the result files named in the manifest are the monitor's output arrays
    objects = (out / "objects.cpp").read_text()
    for name in manifest["output"]["result_files"].values():
        assert name in objects


@pytest.mark.genn
@needs_genn
def test_prints_build_instructions_without_genn(project, tmp_path):
    out, stdout = project
    assert "Code generated only (--no-build). To build and run it:" in stdout
    assert f"genn-buildmodel.sh -i {out}:{out}/brianlib/randomkit magicnetwork_model.cpp" in stdout
    assert "CUDA_PATH" in stdout
    cpu = tmp_path / "cpu"
    stdout = run_export(cpu, "--cpu-only")
    assert "genn-buildmodel.sh -c -i" in stdout
    assert json.loads((cpu / "manifest.json").read_text())["use_gpu"] is False


def test_genn_schedule_equals_trainer_delayed_one_step_per_layer():
    """What GeNN computes (Brian2 runtime, GeNN's order) = models.batched.forward, shifted."""
    pytest.importorskip("brian2")
    from brian2 import ms

    from models.batched import forward
    from models.parameters import LIFParameters
    from protocols.export_genn import (draw_presentation, emulate, load_params, score,
                                       slot_counts, _tau_p_steps)
    from protocols.bp import predict

    lif = LIFParameters()
    layers, params = load_params(SHALLOW, init="lee", seed=1)
    pres = draw_presentation("mnist-5k", 3, 30 * ms, seed=2, gap=len(layers) - 1)
    parts, spikes = emulate(layers, params, pres, monitor_all=True)
    ref = forward(layers, params, pres.spikes, lif, dtype=np.float64, tau_p=_tau_p_steps(lif),
                  backend="xp")
    for lag in range(1, len(layers)):
        i, step = spikes[lag]
        image, within = np.divmod(step, pres.slot)
        assert np.all(within >= lag) and np.all(within < pres.steps + lag)
        got = np.zeros((pres.steps, pres.n_images, parts.n_units[lag]), dtype=bool)
        got[within - lag, image, i] = True
        want = np.asarray(ref.spikes[lag]).reshape(got.shape)
        assert want.sum() > 0
        np.testing.assert_array_equal(got, want)
    last = len(layers) - 1
    counts, trace = slot_counts(*spikes[last], 10, pres.steps, pres.gap, pres.n_images, last,
                                _tau_p_steps(lif))
    np.testing.assert_array_equal(counts, np.asarray(ref.count[last]).reshape(3, 10))
    np.testing.assert_allclose(trace, np.asarray(ref.trace_p[last]).reshape(3, 10), rtol=1e-9)
    assert score(counts, trace, pres.labels)["predictions"] == list(predict(counts, trace))


def test_without_decay_compensation_genn_scales_inputs():
    """Turning the 1/decay compensation off changes the spikes (GeNN decays the input once)."""
    pytest.importorskip("brian2")
    from brian2 import ms

    from protocols.export_genn import draw_presentation, emulate, load_params

    layers, params = load_params(SHALLOW, init="lee", seed=1)
    pres = draw_presentation("mnist-5k", 2, 30 * ms, seed=2, gap=3)
    with_c, s1 = emulate(layers, params, pres, monitor_all=True)
    without, s2 = emulate(layers, params, pres, monitor_all=True, decay_compensation=False)
    assert with_c.weight_scale > 1 and without.weight_scale == 1
    assert len(s2[1][0]) < len(s1[1][0])  # smaller effective inputs: fewer conv spikes


# ----------------------------------------------------------------------------------------------
# Exports read the run's own parameters (config.json beside the weights)


def test_export_reads_the_runs_tau_m_and_equals_the_trainer(tiny_run, tmp_path):
    """A net trained with tau_m = 10 ms exports with 10 ms: the exported network (GeNN's
    schedule on Brian2's runtime device) gives the trainer's counts and predictions."""
    from models.parameters import LIFParameters

    run_dir, cfg = tiny_run
    n, duration, seed = 8, 30, 2
    out = tmp_path / "emulated"
    result = export_cli(sys.executable, "--run", str(run_dir), "--emulate", "--compare",
                        "--n-images", str(n), "--duration", f"{duration} ms", "--seed",
                        str(seed), "--out", str(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tau_m_s"] == pytest.approx(TINY_TAU_M_MS / 1000)
    assert manifest["topology"] == TINY
    assert manifest["record"]["run_record"] == str(run_dir / "config.json")
    assert manifest["weight_scale"] == pytest.approx(np.exp(1 / TINY_TAU_M_MS))  # 1 / decay
    counts, predictions, labels = trainer_outputs_of(run_dir, cfg, n, duration, seed)
    assert counts.sum() > 0
    np.testing.assert_array_equal(np.asarray(manifest["result"]["counts"]), counts)
    assert manifest["result"]["predictions"] == predictions
    assert manifest["labels"] == labels
    assert manifest["trainer_comparison"]["counts_equal"] is True
    # the test can tell: the same weights with the default membrane (20 ms) fire differently
    default_counts, _, _ = trainer_outputs_of(run_dir, cfg, n, duration, seed,
                                              lif=LIFParameters())
    assert not np.array_equal(default_counts, counts)


def test_weights_without_their_run_record_are_refused(tiny_run, tmp_path, capsys):
    run_dir, _ = tiny_run
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(run_dir / "final.npz", lone / "final.npz")
    out = str(tmp_path / "x")
    err = main_error(capsys, "--weights", str(lone / "final.npz"), "--emulate", "--out", out)
    assert "has no run record" in err and "config.json is missing" in err and "--run" in err
    assert "has no run record" in main_error(capsys, "--run", str(lone), "--emulate",
                                             "--out", out)
    assert "does not exist" in main_error(capsys, "--run", str(tmp_path / "nowhere"),
                                          "--emulate", "--out", out)
    assert not (tmp_path / "x").exists()


def test_a_record_of_another_topology_is_refused(tiny_run, tmp_path, capsys):
    run_dir, _ = tiny_run
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(run_dir / "final.npz", other / "final.npz")
    record = json.loads((run_dir / "config.json").read_text())
    record["config"]["topology"] = SHALLOW
    (other / "config.json").write_text(json.dumps(record))
    out = str(tmp_path / "x")
    err = main_error(capsys, "--run", str(other), "--emulate", "--out", out)
    assert f"does not fit the topology '{SHALLOW}'" in err and "config.json" in err
    err = main_error(capsys, "--run", str(run_dir), "--topology", SHALLOW, "--emulate",
                     "--out", out)
    assert f"is not the topology {TINY}" in err and "drop --topology" in err
    # a record that is not a trainer's, and one with a parameter this code cannot read
    (other / "config.json").write_text(json.dumps({"seed": 1}))
    assert "is not a trainer's run record" in main_error(capsys, "--run", str(other),
                                                         "--emulate", "--out", out)
    record["config"]["topology"] = TINY
    record["config"]["lif"]["tau_m"] = "10 mV"
    (other / "config.json").write_text(json.dumps(record))
    err = main_error(capsys, "--run", str(other), "--emulate", "--out", out)
    assert "[lif] tau_m = '10 mV' has the wrong unit" in err
    # a truncated weights file: one line naming it, not numpy's zip error
    shutil.copy(run_dir / "config.json", other / "config.json")
    (other / "final.npz").write_bytes((run_dir / "final.npz").read_bytes()[:100])
    err = main_error(capsys, "--run", str(other), "--emulate", "--out", out)
    assert "final.npz" in err and "--run RUN" in err


# ----------------------------------------------------------------------------------------------
# A real GeNN: build and run on GeNN's single-threaded CPU backend


@pytest.mark.genn
@needs_genn
def test_missing_genn_is_a_one_line_error(tmp_path):
    """--build without a GeNN (none in the environment, no GENN_PATH) or with a wrong
    GENN_PATH: one line naming the fix."""
    env = {k: v for k, v in os.environ.items() if k != "GENN_PATH"}
    # an empty HOME: Brian2 notes at import (INFO, on stderr) when the user's compiled-code
    # cache (~/.cython/brian_extensions) exceeds 1 GB, a line this test must not count
    (tmp_path / "home").mkdir()
    env["HOME"] = str(tmp_path / "home")
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if not Path(p, "genn-buildmodel.sh").exists())
    # the environment's own GeNN (<env>/genn) is hidden by pointing sys.prefix elsewhere
    code = ("import sys; sys.prefix = sys.argv[1]; from protocols.export_genn import main; "
            "sys.exit(main(sys.argv[2:]))")
    args = ["--init", "lee", "--n-images", "1", "--duration", "5 ms", "--cpu-only", "--build",
            "--out", str(tmp_path / "x")]
    result = subprocess.run([GENN_PYTHON, "-c", code, str(tmp_path), *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    err = one_line_error(result)
    assert "building needs GeNN 4.x and none was found" in err
    assert "envs/make-genn-env.sh" in err and "GENN_TARBALL" in err and "GENN_PATH" in err
    env["GENN_PATH"] = str(tmp_path)
    err = one_line_error(export_cli(GENN_PYTHON, *args, env=env))
    assert f"GENN_PATH={tmp_path} has no bin/genn-buildmodel.sh" in err
    from protocols.export_cuda import gpu_available

    if not gpu_available():  # --build for the CUDA backend on a machine without a GPU
        del env["GENN_PATH"]
        err = one_line_error(export_cli(GENN_PYTHON, *[a for a in args if a != "--cpu-only"],
                                        env=env))
        assert "CUDA backend needs a GPU" in err and "--cpu-only" in err


@pytest.mark.genn
@pytest.mark.slow
@needs_genn
@needs_genn_build
def test_genn_cpu_build_of_a_trained_net_equals_the_trainer(tiny_run, tmp_path):
    """Export the tiny trained net (tau_m = 10 ms), build it with GeNN's CPU backend, run it on
    10 MNIST test digits: output counts and predictions are the trainer's on the same spikes."""
    if GENN_ROOT is None:
        pytest.fail(f"LEE2018_GENN_REQUIRED=1 but {NO_GENN}")
    run_dir, cfg = tiny_run
    n, duration, seed = 10, 30, 3
    out = tmp_path / "genn_cpu"
    result = export_cli(GENN_PYTHON, "--run", str(run_dir), "--cpu-only", "--build",
                        "--compare", "--n-images", str(n), "--duration", f"{duration} ms",
                        "--seed", str(seed), "--out", str(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "executing genn binary on CPU" in result.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["built"] is True and manifest["use_gpu"] is False
    assert manifest["genn_version"].startswith("4.")
    assert manifest["tau_m_s"] == pytest.approx(TINY_TAU_M_MS / 1000)
    # GeNN's own output files, read back
    files = manifest["output"]["result_files"]
    assert (out / "results" / files["i"]).stat().st_size > 0
    counts, predictions, labels = trainer_outputs_of(run_dir, cfg, n, duration, seed)
    assert counts.sum() > 0
    np.testing.assert_array_equal(np.asarray(manifest["result"]["counts"]), counts)
    assert manifest["result"]["predictions"] == predictions
    assert manifest["labels"] == labels
    # --read scores the project from GeNN's files alone, the same way
    read = export_cli(sys.executable, "--read", str(out))
    assert read.returncode == 0, read.stderr[-3000:]
    assert json.loads(read.stdout)["predictions"] == predictions
    print(f"GeNN CPU: export + build + run {manifest['generate_or_build_run_s']:.1f} s, "
          f"simulation {manifest['genn_simulation_s']:.2f} s")
