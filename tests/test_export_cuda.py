"""brian2cuda export (docs/gpu.md): the generated cuda_standalone project, generate-only here.

Runs the export in the brian2cuda environment (Python >= 3.12, Brian2 2.10), in a subprocess:
``bash envs/make-cuda-env.sh`` creates ``.venv-cuda``; ``$LEE2018_CUDA_PYTHON`` names another
interpreter. This file runs in the main environment (the tiny run is trained by
``protocols.train``); ``.ci/gpu-codegen`` runs it with ``LEE2018_CUDA_PYTHON`` set. Compiling with
nvcc takes ~9 min on 2 cores, so the compile test runs only with ``LEE2018_CUDA_COMPILE=1``; the
run on a GPU only where ``nvidia-smi`` lists one.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_export_genn import (TINY, TINY_TAU_M_MS, main_error, shared_tiny_run,  # noqa: E402
                              trainer_outputs_of)

REPO = Path(__file__).resolve().parents[1]


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


def int32_count(path: Path) -> int:
    return path.stat().st_size // np.dtype(np.int32).itemsize


CUDA_PYTHON = _python_with("brian2cuda", "LEE2018_CUDA_PYTHON", ".venv-cuda")
needs_cuda = pytest.mark.skipif(
    CUDA_PYTHON is None,
    reason="no brian2cuda environment: run `bash envs/make-cuda-env.sh` (creates .venv-cuda) or "
           "set LEE2018_CUDA_PYTHON; `bash .ci/gpu-codegen` runs these tests")


def run_export(out: Path, *extra: str) -> dict:
    cmd = [CUDA_PYTHON, "-m", "protocols.export_cuda", "--init", "lee", "--seed", "1",
           "--n-images", "2", "--duration", "20 ms", "--no-run", "--out", str(out), *extra]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=3000)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads((out / "manifest.json").read_text())


@pytest.fixture(scope="module")
def frozen(tmp_path_factory):
    out = tmp_path_factory.mktemp("cuda") / "shallow"
    return out, run_export(out)


@pytest.fixture(scope="module")
def plastic(tmp_path_factory):
    out = tmp_path_factory.mktemp("cuda") / "stdp"
    return out, run_export(out, "--plastic")


def unit_counts(objects_cu: str) -> dict:
    return {name: int(n) for name, n in
            re.findall(r"_num__array_(layer\d_[a-z]+)_v = (\d+);", objects_cu)}


@pytest.mark.genn
@needs_cuda
def test_every_layer_with_its_size_and_synapse_counts(frozen):
    out, manifest = frozen
    assert unit_counts((out / "objects.cu").read_text()) == {
        "layer1_conv": 36 * 24 * 24, "layer2_pool": 36 * 12 * 12, "layer3_fc": 10}
    assert "_num__array_layer0_input_i = 784;" in (out / "objects.cu").read_text()
    static = out / "static_arrays"
    for name, n in {"layer1_conv_in": 36 * 576 * 25, "layer2_pool_in": 4 * 5184,
                    "layer3_fc_in": 51840}.items():
        assert int32_count(static / f"_static_array__array_{name}_sources") == n
    # shared kernel: stored once (36·25 entries), read through the synapses' kernel index
    k = np.fromfile(static / "_static_array__array_layer1_conv_kernel_k", dtype=np.float64)
    assert k.shape == (900,)
    assert int32_count(static / "_static_array__dynamic_array_layer1_conv_in_kidx") == 518400
    pre = (out / "code_objects" / "layer1_conv_in_pre_codeobject.cu").read_text()
    assert "_ptr_array_layer1_conv_kernel_k[kidx]" in pre
    assert manifest["timeline"]["total_steps"] == 40 and manifest["compiled"] is False


@pytest.mark.genn
@needs_cuda
def test_forward_pathways_add_to_the_membrane_atomically(frozen):
    _, manifest = frozen
    assert manifest["atomic_writes"] == {
        f"{layer}_in_pre_codeobject.cu": [f"_ptr_array_{layer}_v"]
        for layer in ("layer1_conv", "layer2_pool", "layer3_fc")}


@pytest.mark.genn
@needs_cuda
def test_shared_kernel_stdp_updates_use_atomics(plastic):
    """Concurrent acc_k += ... of many synapses into one kernel entry: no race, atomicAdd."""
    out, manifest = plastic
    post = (out / "code_objects" / "layer1_conv_in_post_codeobject.cu").read_text()
    assert re.search(r"_brian_atomicAdd\(&_ptr_array_layer1_conv_kernel_acc\[kidx\]", post)
    # the kernel value w is only read there; the average is applied once per step elsewhere
    assert "_ptr_array_layer1_conv_kernel_k[kidx] =" not in post
    assert manifest["atomic_writes"]["layer1_conv_in_post_codeobject.cu"] == [
        "_ptr_array_layer1_conv_kernel_acc"]
    # homeostasis: the spike count (pathway pre) and, after the reset, theta (raise_theta)
    assert manifest["atomic_writes"]["layer1_conv_homeostasis_pre_codeobject.cu"] == [
        "_ptr_array_layer1_conv_maps_nspk"]
    assert manifest["atomic_writes"]["layer1_conv_homeostasis_raise_theta_codeobject.cu"] == [
        "_ptr_array_layer1_conv_maps_theta"]


@pytest.mark.genn
@needs_cuda
@pytest.mark.skipif(os.environ.get("LEE2018_CUDA_COMPILE") != "1",
                    reason="nvcc compilation takes ~9 min on 2 cores; set LEE2018_CUDA_COMPILE=1")
def test_project_compiles_with_nvcc(tmp_path):
    out = tmp_path / "compiled"
    manifest = run_export(out, "--compile")
    assert manifest["compiled"] is True
    assert (out / "main").is_file() and os.access(out / "main", os.X_OK)


# ----------------------------------------------------------------------------------------------
# The run's own parameters


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return shared_tiny_run(tmp_path_factory)


def export_run(run_dir: Path, out: Path, *extra: str) -> dict:
    cmd = [CUDA_PYTHON, "-m", "protocols.export_cuda", "--run", str(run_dir), "--out", str(out),
           *extra]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=3000)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads((out / "manifest.json").read_text())


@pytest.mark.genn
@needs_cuda
def test_export_builds_the_runs_membrane(tiny_run, tmp_path):
    """A net trained with tau_m = 10 ms (not the default 20 ms) is generated with 10 ms."""
    run_dir, _ = tiny_run
    out = tmp_path / "tiny"
    manifest = export_run(run_dir, out, "--n-images", "2", "--duration", "20 ms", "--no-run")
    assert manifest["topology"] == TINY
    assert manifest["tau_m_s"] == pytest.approx(TINY_TAU_M_MS / 1000)
    assert manifest["record"]["run_record"] == str(run_dir / "config.json")
    for layer in ("layer1_conv", "layer2_pool", "layer3_fc"):
        code = (out / "code_objects" / f"{layer}_stateupdater_codeobject.cu").read_text()
        assert f"const double tau_m = {TINY_TAU_M_MS / 1000!r};" in code
    # the run's kernels, stored once per map: 6 maps of 5x5
    k = np.fromfile(out / "static_arrays" / "_static_array__array_layer1_conv_kernel_k",
                    dtype=np.float64)
    with np.load(run_dir / "final.npz") as data:
        np.testing.assert_allclose(k, data["conv1_kernels"].ravel(), rtol=1e-6)


def test_weights_without_their_record_or_of_another_topology_are_refused(tiny_run, tmp_path,
                                                                          capsys):
    import shutil

    run_dir, _ = tiny_run
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(run_dir / "final.npz", lone / "final.npz")
    out = str(tmp_path / "x")
    err = main_error(capsys, "--weights", str(lone / "final.npz"), "--out", out,
                     module="protocols.export_cuda")
    assert "has no run record" in err and "--run" in err
    record = json.loads((run_dir / "config.json").read_text())
    record["config"]["topology"] = "28x28-36C5-2P-10FC"
    (lone / "config.json").write_text(json.dumps(record))
    err = main_error(capsys, "--run", str(lone), "--out", out, module="protocols.export_cuda")
    assert "does not fit the topology '28x28-36C5-2P-10FC'" in err


def _gpu() -> bool:
    from protocols.export_cuda import gpu_available

    return gpu_available()


@pytest.mark.genn
@pytest.mark.gpu
@needs_cuda
@pytest.mark.skipif(not _gpu(), reason="running a cuda_standalone project needs a CUDA GPU "
                                       "(nvidia-smi lists none)")
def test_gpu_run_of_a_trained_net_equals_the_trainer(tiny_run, tmp_path):
    """On a GPU: the tiny trained net (tau_m = 10 ms) compiled, run on 10 MNIST test digits;
    output counts and predictions are the trainer's on the same spikes."""
    run_dir, cfg = tiny_run
    n, duration, seed = 10, 30, 3
    manifest = export_run(run_dir, tmp_path / "gpu", "--compare", "--n-images", str(n),
                          "--duration", f"{duration} ms", "--seed", str(seed))
    assert manifest["ran"] is True
    counts, predictions, _ = trainer_outputs_of(run_dir, cfg, n, duration, seed)
    assert counts.sum() > 0
    np.testing.assert_array_equal(np.asarray(manifest["result"]["counts"]), counts)
    assert manifest["result"]["predictions"] == predictions
