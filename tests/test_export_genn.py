"""GeNN export (docs/gpu.md): the generated brian2genn project, and what GeNN computes.

The generation tests run the export in the GeNN environment (brian2genn 1.7 needs Brian2 2.5):
``bash envs/make-genn-env.sh`` creates ``.venv-genn``; ``$LEE2018_GENN_PYTHON`` names another
interpreter; ``.ci/gpu-codegen`` creates it and runs this file inside it. The schedule test needs
only Brian2 and runs in every environment: the exported network on Brian2's runtime device with
GeNN's order of operations must give the trainer's spikes, delayed one step per layer.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHALLOW = "28x28-36C5-2P-10FC"


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


@needs_genn
def test_prints_build_instructions_without_genn(project, tmp_path):
    out, stdout = project
    assert "GeNN not found" in stdout
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
