"""Throughput of the batched spike-based BP trainer, beside the machine's float32 matmul rate.

For the shallow (28x28-36C5-2P-10FC) and deep (28x28-20C5-2P-50C5-2P-200FC-10FC) nets, one
training iteration = Poisson encoding + spiking forward pass + backward pass + SGD step on a
mini-batch of 100 real MNIST images at T = 50 steps (the later-epoch presentation). Reported:

* images/s of training, and the time per phase (encode, forward, backward, sgd);
* achieved **dense-equivalent** GFLOP/s: the floating-point operations a dense implementation
  would do (2 per multiply-add of every synapse at every step in the forward pass; the weight
  gradients and back-propagated errors once per presentation in the backward pass), divided by
  the measured time. The forward pass here is event-driven (a presynaptic spike adds its weight
  row; a silent input costs nothing), so it can beat a dense implementation's FLOP rate;
* the spike rates of every layer: the event-driven forward pass costs more the more spikes,
  so the numbers belong to the weights measured (``--weights`` of a trained run, or the Lee
  initialisation); the SGD step is computed and applied with η = 0 so the network stays fixed;
* the float32 matmul rate of the same machine in the same run (2048×2048 sgemm, numpy's BLAS)
  and the ratio.

``--population N``: N runs (initialisations of seeds 0..N-1) in lock-step through the batched
array path of protocols/population.py (each member's own batch of ``--batch`` images); the
images/s and GFLOP/s are the population's aggregate, beside the same sgemm rate.

Run::

    python benchmarks/bench_trainer.py [--iterations 10] [--batch 100] [--steps 50] [--json out.json]
        [--array-module cupy] [--blas-threads 1] [--population 20]
        [--topology T --weights runs/x/final.npz ...]

MNIST is read through protocols.datasets (set MNIST_DIR); ``--synthetic`` uses random images of
MNIST-like mean intensity (0.13) instead. Numbers taken while other processes load the CPU are
pessimistic: the load average is printed with the results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.batched import forward, params_from_arrays, params_to_arrays  # noqa: E402
from models.initialisation import initialise  # noqa: E402
from models.parameters import BPParameters, LIFParameters  # noqa: E402
from models.topology import DEEP, SHALLOW, ConvLayer, FCLayer, PoolLayer, parse_topology  # noqa: E402
from protocols.bp import backward, sgd_step, tau_steps  # noqa: E402
from protocols.records import versions  # noqa: E402
from protocols.train import TrainConfig, TrainingSettings, blas_limit, draw_input  # noqa: E402
from benchmarks.reference import sgemm_gflops  # noqa: E402


def dense_flops(layers, T: int, batch: int) -> dict:
    """Dense-equivalent FLOPs of one iteration (forward over T steps, backward once)."""
    fwd = bwd = 0
    for i, layer in enumerate(layers[1:], start=1):
        units = int(np.prod(layer.shape))
        if isinstance(layer, (ConvLayer, FCLayer)):
            macs = units * layer.fan_in
            fwd += 2 * macs * T * batch
            bwd += 2 * macs * batch * (2 if i > 1 else 1)  # weight gradient (+ error to layer below)
        elif isinstance(layer, PoolLayer):
            fwd += 2 * units * layer.size**2 * T * batch
    return {"forward": fwd, "backward": bwd, "total": fwd + bwd}


def bench(topology: str, images, labels, iterations: int, batch: int, steps: int,
          weights: str | None = None, xp=np,
          blas_threads: int = TrainingSettings().blas_threads, population: int = 1,
          input_rng: str = TrainingSettings().input_rng) -> dict:
    """One net's throughput; BLAS held to ``blas_threads`` as the trainer holds it
    (``training.blas_threads``; 0: the BLAS library's own setting). ``population`` > 1: that
    many runs in lock-step (:mod:`protocols.population`'s batched array path), each with its
    own initialisation (seed r) or the same ``weights``; the rates are the population's.
    ``input_rng``: the input draw timed as the encode phase (``training.input_rng``)."""
    with blas_limit(blas_threads):
        if population > 1:
            r = _bench_population(topology, images, labels, iterations, batch, steps, weights,
                                  xp, population, input_rng)
        else:
            r = _bench(topology, images, labels, iterations, batch, steps, weights, xp,
                       input_rng)
    r["blas_threads"] = blas_threads
    r["input_rng"] = input_rng
    return r


def _initial_params(layers, rng: np.random.Generator, weights: str | None, xp) -> list:
    """Lee initialisation drawn from ``rng``, or the trained ``weights`` file, in ``xp``."""
    params = initialise(layers, rng)
    if weights and weights != "init":
        with np.load(weights, allow_pickle=False) as data:
            params = params_from_arrays(layers, {k: data[k] for k in data.files})
    return params_from_arrays(layers, params_to_arrays(layers, params), xp=xp)


def _input_config(seed: int, input_rng: str) -> TrainConfig:
    """The configuration whose input draw (protocols.train.draw_input) a benchmark times."""
    return TrainConfig(seed=seed, training=TrainingSettings(input_rng=input_rng))


def _summary(topology: str, layers, phases: dict, iterations: int, batch: int, steps: int,
             images_per_iteration: int, counts) -> dict:
    """Throughput, time per phase and dense-equivalent rates of ``iterations`` timed
    iterations; ``counts``: the last iteration's spike counts per layer (input first)."""
    total = sum(phases.values())
    flops = dense_flops(layers, steps, images_per_iteration)
    per_iter = total / iterations
    return {
        "topology": topology,
        "iterations": iterations,
        "batch": batch,
        "steps": steps,
        "s_per_iteration": per_iter,
        "images_per_s": images_per_iteration / per_iter,
        "phase_s_per_iteration": {k: v / iterations for k, v in phases.items()},
        "phase_fraction": {k: v / total for k, v in phases.items()},
        "dense_gflop_per_iteration": flops["total"] / 1e9,
        "dense_gflops_achieved": flops["total"] / per_iter / 1e9,
        "forward_dense_gflops_achieved": flops["forward"] / (phases["forward"] / iterations) / 1e9,
        # float() copies from a GPU
        "spike_rate_per_layer_per_step": [float(c.mean()) / steps for c in counts[1:]],
    }


def _bench_population(topology: str, images, labels, iterations: int, batch: int, steps: int,
                      weights: str | None, xp, population: int, input_rng: str) -> dict:
    from models.batched_population import forward_population
    from protocols.bp_population import backward_population

    layers = parse_topology(topology)
    members = [_initial_params(layers, np.random.default_rng(r), weights, xp)
               for r in range(population)]
    inputs = [_input_config(r, input_rng) for r in range(population)]
    rng = np.random.default_rng(0)
    sync = xp.cuda.Device().synchronize if xp is not np else (lambda: None)
    bp = BPParameters()
    lif = LIFParameters()
    tau_p = tau_steps(bp.tau_p, lif.dt)
    phases = {"encode": 0.0, "forward": 0.0, "backward": 0.0, "sgd": 0.0}
    for it in range(iterations + 1):  # iteration 0 warms up
        idx = [rng.integers(0, len(labels), batch) for _ in range(population)]
        t0 = time.perf_counter()
        x = xp.stack([draw_input(cfg, images[i], steps, (2, it), xp)
                      for cfg, i in zip(inputs, idx)], axis=1)
        y = [xp.asarray(labels[i]) for i in idx]
        sync()
        t1 = time.perf_counter()
        out = forward_population(layers, members, x, lif, xp=xp, tau_p=tau_p,
                                 record_trace_m=bp.derivative == "lee2020")
        sync()
        t2 = time.perf_counter()
        grads, _ = backward_population(layers, members, out, y, bp, lif, xp=xp)
        sync()
        t3 = time.perf_counter()
        for params, g in zip(members, grads):  # eta = 0, as in _bench
            sgd_step(params, g, 0.0)
        sync()
        t4 = time.perf_counter()
        if it == 0:
            continue
        for key, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            phases[key] += dt
    return {**_summary(topology, layers, phases, iterations, batch, steps, population * batch,
                       out.count_cl), "population": population}


def _bench(topology: str, images, labels, iterations: int, batch: int, steps: int,
           weights: str | None, xp, input_rng: str) -> dict:
    layers = parse_topology(topology)
    rng = np.random.default_rng(0)  # the initial weights, then the images of each iteration
    params = _initial_params(layers, rng, weights, xp)
    cfg = _input_config(0, input_rng)
    sync = xp.cuda.Device().synchronize if xp is not np else (lambda: None)
    bp = BPParameters()
    lif = LIFParameters()
    tau_p = tau_steps(bp.tau_p, lif.dt)
    phases = {"encode": 0.0, "forward": 0.0, "backward": 0.0, "sgd": 0.0}
    for it in range(iterations + 1):  # iteration 0 warms up (numba compilation, caches)
        idx = rng.integers(0, len(labels), batch)
        t0 = time.perf_counter()
        x = draw_input(cfg, images[idx], steps, (2, it), xp)  # as protocols.train draws it
        y = xp.asarray(labels[idx])
        sync()
        t1 = time.perf_counter()
        out = forward(layers, params, x, tau_p=tau_p, keep_spikes=False, xp=xp,
                      record_trace_m=bp.derivative == "lee2020")  # as protocols.train
        sync()
        t2 = time.perf_counter()
        grads, _ = backward(layers, params, out, y, bp, xp=xp)
        sync()
        t3 = time.perf_counter()
        # the step is applied with eta = 0: same work, but the network (and so its spike
        # counts, which set the cost of the event-driven forward pass) stays the one measured
        sgd_step(params, grads, 0.0)
        sync()
        t4 = time.perf_counter()
        if it == 0:
            continue
        for key, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            phases[key] += dt
    return _summary(topology, layers, phases, iterations, batch, steps, batch, out.count)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--topology", action="append", help="default: shallow and deep")
    parser.add_argument("--synthetic", action="store_true", help="random images, no MNIST")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--weights", action="append",
                        help="trained weights (final.npz / checkpoint.npz of a run), one per "
                             "--topology; 'init' or default: the Lee initialisation")
    parser.add_argument("--blas-threads", type=int, default=TrainingSettings().blas_threads,
                        help="BLAS threads during the benchmark, as the trainer's "
                             "training.blas_threads (default %(default)s; 0: the BLAS "
                             "library's own setting)")
    parser.add_argument("--array-module", choices=("numpy", "cupy"), default="numpy",
                        help="where the trainer's arrays live (cupy: on the GPU, with the fused "
                             "CUDA recurrence; the reference is then the GPU's float32 sgemm)")
    parser.add_argument("--population", type=int, default=1,
                        help="runs trained in lock-step (protocols/population.py's batched "
                             "array path); images/s is then the population's aggregate")
    parser.add_argument("--input-rng", choices=("pcg64", "splitmix64"),
                        default=TrainingSettings().input_rng,
                        help="the input draw, as training.input_rng (splitmix64: computed in the "
                             "array module, on the GPU with cupy)")
    args = parser.parse_args(argv)

    if args.synthetic:
        rng = np.random.default_rng(1)
        images = (rng.random((1000, 28, 28)) < 0.13).astype(np.uint8) * 255
        labels = rng.integers(0, 10, 1000)
        source = "synthetic"
    else:
        from protocols.datasets import load_dataset

        data = load_dataset("mnist")
        images, labels, source = data.train_images, np.asarray(data.train_labels), data.source
    if args.array_module == "cupy":
        from benchmarks.reference import cupy_sgemm_gflops
        from protocols.train import array_module, gpu_versions

        xp, reference, reference_name = array_module("cupy"), cupy_sgemm_gflops, "GPU sgemm 8192"
    else:
        xp, reference, reference_name = np, sgemm_gflops, "sgemm 2048"
    load_before = os.getloadavg()
    gemm = reference()
    results = []
    topologies = args.topology or [SHALLOW, DEEP]
    weights = args.weights or [None] * len(topologies)
    if len(weights) != len(topologies):
        parser.error("give one --weights per --topology")
    for topo, w in zip(topologies, weights):
        r = bench(topo, images, labels, args.iterations, args.batch, args.steps, w, xp=xp,
                  blas_threads=args.blas_threads, population=args.population,
                  input_rng=args.input_rng)
        r["array_module"] = args.array_module
        r["weights"] = w if w and w != "init" else "initialisation"
        r["ratio_to_sgemm"] = r["dense_gflops_achieved"] / gemm
        results.append(r)
    gemm_after = reference()
    import numba

    machine = {"platform": platform.platform(), "cpus": os.cpu_count(),
               "numba_threads": numba.get_num_threads(),
               "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    if xp is not np:
        machine.update(gpu_versions(xp))  # CuPy, CUDA runtime, GPU name
    record = {
        "command": "python benchmarks/bench_trainer.py " + " ".join(argv if argv is not None
                                                                   else sys.argv[1:]),
        "versions": versions(),  # with the git commit of the code that ran
        "machine": machine,
        "data": source,
        "reference": reference_name,
        "sgemm_gflops": {"before": gemm, "after": gemm_after},
        "results": results,
    }
    print(f"float32 {reference_name}: {gemm:.1f} GFLOP/s before, {gemm_after:.1f} after; "
          f"load average {load_before[0]:.2f} -> {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    for r in results:
        ph = ", ".join(f"{k} {v * 1000:.1f} ms ({r['phase_fraction'][k]:.0%})"
                       for k, v in r["phase_s_per_iteration"].items())
        who = f"a population of {r['population']} runs, " if r.get("population") else ""
        per = f"{r['population']} x {r['batch']}" if r.get("population") else f"{r['batch']}"
        print(f"{r['topology']}: {who}{r['images_per_s']:.0f} images/s "
              f"({r['s_per_iteration'] * 1000:.0f} ms per iteration of {per} at T = "
              f"{r['steps']}); dense-equivalent {r['dense_gflops_achieved']:.1f} GFLOP/s = "
              f"{r['ratio_to_sgemm']:.1%} of the reference (forward alone "
              f"{r['forward_dense_gflops_achieved']:.1f} GFLOP/s)\n    per phase: {ph}\n"
              f"    weights: {r['weights']}; input draw: {r['input_rng']}; spikes per unit per "
              f"step by layer: "
              + ", ".join(f"{x:.4f}" for x in r["spike_rate_per_layer_per_step"]))
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
