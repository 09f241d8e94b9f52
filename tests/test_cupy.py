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


def _cupy():
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed (pip install cupy-cuda12x)")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("CuPy is installed but no CUDA GPU is visible")
    except cupy.cuda.runtime.CUDARuntimeError as err:
        pytest.skip(f"CuPy is installed but CUDA is unusable here: {err}")
    return cupy


def test_forward_and_backward_on_cupy_equal_numpy():
    cupy = _cupy()
    layers = parse_topology("12x12-4C3-2P-6FC-3FC")
    params = initialise(layers, np.random.default_rng(0), "lee", InitParameters(alpha=2.0),
                        dtype=np.float64)
    images = np.random.default_rng(1).integers(0, 256, (5, 1, 12, 12), dtype=np.uint8)
    spikes = poisson_spikes(images, 20 * ms, np.random.default_rng(2))
    labels = np.array([0, 1, 2, 0, 1])
    bp = BPParameters()
    tau_p = tau_steps(bp.tau_p, LIFParameters().dt)

    ref = forward(layers, params, spikes, dtype=np.float64, tau_p=tau_p, backend="xp")
    gpu_params = [None if p is None else type(p)(cupy.asarray(p.weights), cupy.asarray(p.thresholds))
                  for p in params]
    gpu = forward(layers, gpu_params, cupy.asarray(spikes), xp=cupy, dtype=np.float64,
                  tau_p=tau_p, backend="xp")
    for index in range(len(layers)):
        np.testing.assert_array_equal(cupy.asnumpy(gpu.spikes[index]), ref.spikes[index])

    grads, _ = backward(layers, params, ref, labels, bp)
    gpu_grads, _ = backward(layers, gpu_params, gpu, cupy.asarray(labels), bp, xp=cupy)
    for g, h in zip(grads, gpu_grads):
        if g is not None:
            np.testing.assert_allclose(cupy.asnumpy(h), g, rtol=1e-10, atol=1e-12)


def test_training_loop_on_cupy_equals_numpy(tmp_path):
    """A few iterations of protocols.train with array_module='cupy' give the NumPy run."""
    import pandas as pd

    from protocols.datasets import load_dataset
    from protocols.train import TrainConfig, TrainingSettings, rng_for, train

    _cupy()
    data = load_dataset("mnist-5k")
    frames = {}
    for module in ("numpy", "cupy"):
        cfg = TrainConfig(topology="28x28-3C5-2P-10FC",
                          training=TrainingSettings(iterations=4, log_every=2,
                                                    train_eval_images=40, test_eval_images=40,
                                                    eval_duration="8 ms", dtype="float64",
                                                    array_module=module, backend="xp"),
                          bp=BPParameters(t_first_epoch=8 * ms, t_later_epochs=6 * ms))
        params = initialise(parse_topology(cfg.topology), rng_for(0, 0))
        frames[module] = train(cfg, tmp_path / module, data, params, progress=False)
    pd.testing.assert_frame_equal(frames["numpy"].drop(columns="wall_time_s"),
                                  frames["cupy"].drop(columns="wall_time_s"))
