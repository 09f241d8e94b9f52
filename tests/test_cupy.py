"""The trainer's array-module seam on a GPU: CuPy gives the NumPy results (skipped without a GPU)."""

import numpy as np
import pytest
from brian2 import ms

from models.batched import forward
from models.initialisation import initialise
from models.parameters import BPParameters, InitParameters, LIFParameters
from models.topology import parse_topology
from protocols.bp import backward, tau_steps
from protocols.encoding import poisson_spikes

pytestmark = pytest.mark.gpu


def require_cupy():
    """CuPy with a usable CUDA GPU, else skip the calling test (also used by test_lif_backends)."""
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed (pip install cupy-cuda12x)")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("CuPy is installed but no CUDA GPU is visible")
    except cupy.cuda.runtime.CUDARuntimeError as err:
        pytest.skip(f"CuPy is installed but CUDA is unusable here: {err}")
    return cupy


@pytest.mark.parametrize("backend", ["xp", "auto"])
def test_forward_and_backward_on_cupy_equal_numpy(backend):
    """On CuPy, the array-op loop ('xp') and the fused recurrence ('auto') give NumPy's spikes,
    counts and traces exactly, and the backward pass its gradients (float64)."""
    cupy = require_cupy()
    layers = parse_topology("12x12-4C3-2P-6FC-3FC")
    params = initialise(layers, np.random.default_rng(0), "lee", InitParameters(alpha=1.0),
                        dtype=np.float64)
    images = np.random.default_rng(1).integers(0, 256, (7, 1, 12, 12), dtype=np.uint8)
    spikes = poisson_spikes(images, 30 * ms, np.random.default_rng(2))
    labels = np.array([0, 1, 2, 0, 1, 2, 0])
    bp = BPParameters()
    tau_p = tau_steps(bp.tau_p, LIFParameters().dt)

    ref = forward(layers, params, spikes, dtype=np.float64, tau_p=tau_p, backend="xp")
    gpu_params = [None if p is None else type(p)(cupy.asarray(p.weights), cupy.asarray(p.thresholds))
                  for p in params]
    gpu = forward(layers, gpu_params, cupy.asarray(spikes), xp=cupy, dtype=np.float64,
                  tau_p=tau_p, backend=backend)
    assert float(ref.count[-1].sum()) > 0  # the output layer spikes
    for index in range(len(layers)):
        np.testing.assert_array_equal(cupy.asnumpy(gpu.spikes[index]), ref.spikes[index])
        for name in ("count", "trace_m", "trace_p"):
            np.testing.assert_array_equal(cupy.asnumpy(getattr(gpu, name)[index]),
                                          getattr(ref, name)[index], err_msg=name)

    grads, _ = backward(layers, params, ref, labels, bp)
    gpu_grads, _ = backward(layers, gpu_params, gpu, cupy.asarray(labels), bp, xp=cupy)
    for g, h in zip(grads, gpu_grads):
        if g is not None:
            np.testing.assert_allclose(cupy.asnumpy(h), g, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reset", ["zero", "subtract"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_cuda_recurrence_equals_array_loop(reset, dtype):
    """The fused kernel (models.batched_cuda) gives the array loop's spikes, counts and traces
    bit for bit from the same currents: multiply and add rounded separately, as NumPy does."""
    from models.batched import _traces_from_spikes, lif_run
    from models.batched_cuda import lif_run_cuda, traces_cuda

    cupy = require_cupy()
    rng = np.random.default_rng(3)
    T, B, N = 40, 6, 257
    current = (rng.random((T, B, N)) * 0.6).astype(dtype)
    th = (0.5 + rng.random(N)).astype(dtype)
    decay, decay_p = dtype(np.exp(-1 / 20)), dtype(np.exp(-1 / 7))
    subtract = reset == "subtract"
    # out (T, B, N) bool, count, trace_m, trace_p (B, N)
    ref = [np.empty((T, B, N), bool)] + [np.empty((B, N), dtype) for _ in range(3)]
    lif_run(current, th, decay, subtract, *ref[:3], decay_p, ref[3])
    gpu = [cupy.empty((T, B, N), bool)] + [cupy.empty((B, N), dtype) for _ in range(3)]
    lif_run_cuda(cupy.asarray(current), cupy.asarray(th), decay, subtract, *gpu[:3], decay_p,
                 gpu[3])
    assert 0 < ref[0].mean() < 0.5
    for name, a, b in zip(("spikes", "count", "trace_m", "trace_p"), gpu, ref):
        np.testing.assert_array_equal(cupy.asnumpy(a), b, err_msg=name)

    spikes = ref[0]
    ref_tr = [np.empty((B, N), dtype) for _ in range(3)]
    _traces_from_spikes(spikes, decay, decay_p, *ref_tr, np, False)
    gpu_tr = [cupy.empty((B, N), dtype) for _ in range(3)]
    traces_cuda(cupy.asarray(spikes), decay, decay_p, *gpu_tr)
    for a, b in zip(gpu_tr, ref_tr):
        np.testing.assert_array_equal(cupy.asnumpy(a), b)


@pytest.mark.parametrize("backend", ["xp", "auto"])
def test_training_loop_on_cupy_equals_numpy(tmp_path, backend):
    """A few iterations of protocols.train with array_module='cupy' give the NumPy run, through
    the array-op loop and through the fused kernels."""
    import pandas as pd

    from protocols.datasets import load_dataset
    from protocols.train import TrainConfig, TrainingSettings, rng_for, train

    require_cupy()
    data = load_dataset("mnist-5k")
    frames = {}
    for module in ("numpy", "cupy"):
        cfg = TrainConfig(topology="28x28-3C5-2P-10FC",
                          training=TrainingSettings(iterations=4, log_every=2,
                                                    train_eval_images=40, test_eval_images=40,
                                                    eval_duration="8 ms", dtype="float64",
                                                    array_module=module,
                                                    backend="xp" if module == "numpy" else backend),
                          bp=BPParameters(t_first_epoch=8 * ms, t_later_epochs=6 * ms))
        params = initialise(parse_topology(cfg.topology), rng_for(0, 0))
        frames[module] = train(cfg, tmp_path / module, data, params, progress=False)
    pd.testing.assert_frame_equal(frames["numpy"].drop(columns="wall_time_s"),
                                  frames["cupy"].drop(columns="wall_time_s"))


def test_counter_draw_on_cupy_equals_numpy():
    """The counter-based input draw gives the same spikes on the GPU as on the CPU, bit for bit
    (integer arithmetic modulo 2^64 and a float32-exact uniform)."""
    cupy = require_cupy()
    from models.parameters import InputParameters, LIFParameters
    from protocols.encoding import counter_key, poisson_spikes_counter

    images = np.random.default_rng(4).integers(0, 256, (20, 1, 28, 28), dtype=np.uint8)
    key = counter_key(3, 2, 11)
    cpu = poisson_spikes_counter(images, 50 * ms, key)
    gpu = poisson_spikes_counter(cupy.asarray(images), 50 * ms, key, xp=cupy)
    # the CPU draw is the Bernoulli draw it claims: its spike rate is the pixels' mean
    # probability (784,000 draws: standard error 0.0006)
    p_max = float(InputParameters().max_rate * LIFParameters().dt)
    p_expected = float(images.mean()) / 255.0 * p_max
    assert isinstance(gpu, cupy.ndarray) and abs(float(cpu.mean()) - p_expected) < 0.005
    np.testing.assert_array_equal(cupy.asnumpy(gpu), cpu)
