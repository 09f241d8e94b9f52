"""Side by side with snnTorch, SpikingJelly and BindsNET (issue #7), in one process.

Runs inside the peer environment (``bash envs/make-env.sh peers``; docs/benchmarks.md), with the
same number of threads for everything (``--threads``, default 2: OMP/MKL/OpenBLAS/numba
variables are set before numpy, numba or torch are imported, and ``torch.set_num_threads``).

Default mode, training speed: for the shallow (28x28-36C5-2P-10FC) and deep
(28x28-20C5-2P-50C5-2P-200FC-10FC) nets at T = 50 steps of 1 ms, batch 100, float32, the time
of one training iteration (after warm-up) of

* **ours**: ``benchmarks.bench_trainer.bench`` (Poisson encoding, event-driven spiking forward
  pass, rate-based backward pass, SGD step);
* **snnTorch**: the same layers (``nn.Conv2d``/``nn.Linear`` without bias, ``snn.Leaky`` with
  beta = exp(-dt/tau_m), reset to zero without delay, our thresholds; pooling = ``nn.AvgPool2d``
  (0.25 per input for 2x2) + ``snn.Leaky`` with threshold 0.8, as our fixed pooling LIF units),
  rate-coded input (``spikegen.rate``, P(spike) = intensity as ours at 1000 Hz), BPTT through
  all T steps with ``surrogate.fast_sigmoid``, ``functional.ce_rate_loss``, an Adam step;
* **SpikingJelly**: the same net in multi-step mode (``layer.*`` + ``neuron.LIFNode`` with
  ``v_reset = 0``, ``decay_input = False`` and tau chosen so that 1 - 1/tau = exp(-dt/tau_m),
  ``surrogate.ATan``, ``detach_reset`` as snnTorch's), the same input, loss (rate cross-entropy,
  vectorised) and optimizer, ``functional.reset_net`` every iteration.

The peers start from our Lee initialisation (the same weights and thresholds as ``bench``), so
all three simulate the same network. Printed: images/s, ms per iteration and per phase,
ours/peer (images/s ratio: > 1 means ours is faster), each implementation's dense-equivalent
GFLOP/s (see ``bptt_flops`` and ``bench_trainer.dense_flops``) and its fraction of the
machine's float32 sgemm rate (numpy's BLAS, ``benchmarks.reference``, 2048x2048, measured
before and after; torch's sgemm is printed too).

``--stdp``: convolutional STDP on the shallow net's first layer (1 x 28x28 input, 36 maps 5x5,
stride 1), 25 ms per image at dt = 1 ms, Poisson input at our pre-training rate (250 Hz at
intensity 1): ours (``benchmarks.bench_stdp.bench_layer``, Brian2 cpp_standalone, build time
separate) vs BindsNET (``Conv2dConnection`` with ``WeightDependentPostPre``, batch 1).

``--time-to-error 0.02``: trains the snnTorch shallow net (its usual recipe: Adam, rate-coded
input, T = 50, batch 100; ``--ttt-init torch`` = PyTorch's default initialisation and
threshold 1) with the same evaluation schedule as our study configs (all 10,000 test images
and 1,000 training images every ``--eval-every`` iterations, also at 0), until the test error
is <= the threshold, ``--max-minutes`` or ``--max-iterations``; writes the curve to ``--curve``
(columns as our metrics.csv) and prints wall time and iteration when first reached. Our arms'
time comes from finished study runs: ``--ours-run runs/study_shallow_supervised_seed0`` (their
metrics.csv, plus pretrain/pretrained.json's wall_s for the pre-trained arm).

Run::

    MNIST_DIR=/path/to/mnist python benchmarks/bench_peers.py [--iterations 10] [--nets shallow deep]
        [--json out.json] [--threads 2] [--synthetic]
    MNIST_DIR=... python benchmarks/bench_peers.py --stdp [--stdp-images 200]
    MNIST_DIR=... python benchmarks/bench_peers.py --time-to-error 0.02 --max-minutes 120 \\
        --curve snntorch_curve.csv --ours-run runs/study_shallow_supervised_seed0 ...
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import os
import platform
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

NETS = {"shallow": "28x28-36C5-2P-10FC", "deep": "28x28-20C5-2P-50C5-2P-200FC-10FC"}
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                    "NUMBA_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")


# ---------------------------------------------------------------------------------------------
# environment


def configure_threads(n: int) -> dict:
    """Use ``n`` threads in every library: the environment variables must be set before numpy,
    numba and torch are imported (``main`` does it first); torch is told again once imported."""
    for var in THREAD_VARIABLES:
        os.environ[var] = str(n)
    return {var: os.environ[var] for var in THREAD_VARIABLES}


def torch_threads(n: int):
    import torch

    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # only possible before the first parallel work
        pass
    return torch


def import_bindsnet_core():
    """``bindsnet.network`` and ``bindsnet.learning`` without ``bindsnet/__init__.py``.

    BindsNET's package ``__init__`` imports every subpackage, so ``import bindsnet`` needs
    torchvision (datasets, analysis), gymnasium and ale_py (environment) and opencv, none of
    which the STDP benchmark uses and the first of which cannot be installed beside torch
    2.13 CPU here (envs/peers-requirements.txt). The package is registered as an empty module
    with BindsNET's own search path; its submodules are then ordinary imports.
    """
    if "bindsnet" not in sys.modules:
        spec = importlib.util.find_spec("bindsnet")
        if spec is None:
            raise ImportError("bindsnet is not installed (bash envs/make-env.sh peers)")
        package = types.ModuleType("bindsnet")
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = spec
        package.__file__ = spec.origin
        sys.modules["bindsnet"] = package
    import bindsnet.network  # first: bindsnet.learning <-> bindsnet.network import each other
    import bindsnet.learning
    import bindsnet.network.monitors
    import bindsnet.network.nodes
    import bindsnet.network.topology

    return bindsnet


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for name in ("torch", "snntorch", "spikingjelly", "bindsnet", "numpy", "numba", "brian2"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def load_images(synthetic: bool, n_synthetic: int = 2000):
    """(train images, train labels, test images, test labels, source); uint8 images."""
    import numpy as np

    if synthetic:
        rng = np.random.default_rng(1)
        make = lambda n: (rng.random((n, 28, 28)) < 0.13).astype(np.uint8) * 255  # noqa: E731
        return (make(n_synthetic), rng.integers(0, 10, n_synthetic), make(n_synthetic // 2),
                rng.integers(0, 10, n_synthetic // 2), "synthetic")
    from protocols.datasets import load_dataset

    data = load_dataset("mnist")
    return (data.train_images, np.asarray(data.train_labels), data.test_images,
            np.asarray(data.test_labels), data.source)


# ---------------------------------------------------------------------------------------------
# the same network in snnTorch and SpikingJelly


def our_network(topology: str, seed: int = 0):
    """Layers and the Lee initialisation exactly as ``bench_trainer.bench`` draws them."""
    import numpy as np

    from models.initialisation import initialise
    from models.topology import parse_topology

    layers = parse_topology(topology)
    return layers, initialise(layers, np.random.default_rng(seed))


def _constants():
    from models.parameters import InputParameters, LIFParameters, PoolingParameters

    lif = LIFParameters()
    return {"decay": lif.decay, "pool_weight": PoolingParameters().weight,
            "pool_th": PoolingParameters().v_th,
            "p_max": float(InputParameters().max_rate * lif.dt), "reset": lif.reset}


def _threshold(th, conv: bool):
    """A layer's threshold for the peers: a float when every map has the same (Lee init),
    else a tensor that broadcasts over (batch, maps[, y, x])."""
    import numpy as np

    th = np.asarray(th, dtype=np.float32)
    if np.all(th == th.flat[0]):
        return float(th.flat[0])
    import torch

    return torch.from_numpy(th.reshape((-1, 1, 1) if conv else (-1,)).copy())


def _synapse_modules(layers, params, init: str, step_mode: str | None = None):
    """(synapse module, threshold) per non-input layer; ``step_mode`` for SpikingJelly."""
    import torch
    from torch import nn

    from models.topology import ConvLayer, FCLayer, PoolLayer

    c = _constants()
    if step_mode is not None:
        from spikingjelly.activation_based import layer as sj
        Conv2d, Linear, AvgPool2d, Flatten = sj.Conv2d, sj.Linear, sj.AvgPool2d, sj.Flatten
    else:
        Conv2d, Linear, AvgPool2d, Flatten = nn.Conv2d, nn.Linear, nn.AvgPool2d, nn.Flatten
    out = []
    for i, layer in enumerate(layers[1:], start=1):
        if isinstance(layer, ConvLayer):
            syn = Conv2d(layer.in_shape[0], layer.n_maps, layer.kernel, bias=False)
        elif isinstance(layer, PoolLayer):
            scale = c["pool_weight"] * layer.size**2  # AvgPool2d gives weight 1/size^2
            syn = AvgPool2d(layer.size)
            if abs(scale - 1) > 1e-12:
                raise NotImplementedError("pooling weight other than 1/size^2")
            out.append((syn, c["pool_th"]))
            continue
        elif isinstance(layer, FCLayer):
            lin = Linear(layer.fan_in, layer.n, bias=False)
            prev = layers[i - 1]
            syn = lin if isinstance(prev, FCLayer) else nn.Sequential(Flatten(), lin)
        else:
            raise TypeError(f"unexpected layer {layer!r}")
        weight = syn.weight if not isinstance(syn, nn.Sequential) else syn[1].weight
        if init == "lee":
            with torch.no_grad():
                weight.copy_(torch.from_numpy(params[i].weights.reshape(weight.shape)))
            th = _threshold(params[i].thresholds, isinstance(layer, ConvLayer))
        elif init == "torch":
            th = 1.0  # the libraries' default threshold with PyTorch's default weights
        else:
            raise ValueError(f"init must be 'lee' or 'torch', got {init!r}")
        out.append((syn, th))
    return out


def build_snntorch(topology: str, init: str = "lee", seed: int = 0, slope: float = 25.0):
    """snnTorch model of ``topology``: ``model(x_seq [T, B, C, H, W]) -> spikes [T, B, n_out]``."""
    import snntorch as snn
    import torch
    from snntorch import surrogate
    from torch import nn

    layers, params = our_network(topology, seed)
    torch.manual_seed(seed)
    c = _constants()
    grad = surrogate.fast_sigmoid(slope=slope)
    reset = "zero" if c["reset"] == "zero" else "subtract"

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            pairs = _synapse_modules(layers, params, init)
            self.syn = nn.ModuleList(p[0] for p in pairs)
            self.lif = nn.ModuleList(
                snn.Leaky(beta=c["decay"], threshold=th, spike_grad=grad,
                          reset_mechanism=reset, reset_delay=False) for _, th in pairs)

        def forward(self, x_seq):
            mem = [lif.reset_mem() for lif in self.lif]
            out = []
            for t in range(x_seq.shape[0]):
                h = x_seq[t]
                for j, (syn, lif) in enumerate(zip(self.syn, self.lif)):
                    h, mem[j] = lif(syn(h), mem[j])
                out.append(h)
            return torch.stack(out)

    return Net()


def sj_tau() -> float:
    """SpikingJelly's tau with ``decay_input=False``: v <- (1 - 1/tau) v + x = exp(-dt/tau_m) v + x."""
    return 1.0 / (1.0 - _constants()["decay"])


def build_spikingjelly(topology: str, init: str = "lee", seed: int = 0):
    """SpikingJelly model in multi-step mode: ``model(x_seq [T, B, ...]) -> spikes [T, B, n_out]``."""
    import inspect

    import torch
    from spikingjelly.activation_based import functional, neuron, surrogate
    from torch import nn

    layers, params = our_network(topology, seed)
    torch.manual_seed(seed)
    c = _constants()
    extra = {}
    if "backend" in inspect.signature(neuron.LIFNode.__init__).parameters:
        extra["backend"] = "torch"  # SpikingJelly <= 0.0.0.0.14; 2.x picks by device
    modules = []
    for syn, th in _synapse_modules(layers, params, init, step_mode="m"):
        modules.append(syn)
        modules.append(neuron.LIFNode(
            tau=sj_tau(), decay_input=False, v_threshold=th,
            v_reset=0.0 if c["reset"] == "zero" else None,
            surrogate_function=surrogate.ATan(), detach_reset=True, step_mode="m", **extra))
    net = nn.Sequential(*modules)
    functional.set_step_mode(net, "m")
    return net


def rate_ce_loss(spk, labels):
    """snnTorch's ce_rate_loss, vectorised: mean over steps of the cross-entropy of the spikes."""
    import torch.nn.functional as F

    T = spk.shape[0]
    return F.cross_entropy(spk.flatten(0, 1), labels.repeat(T))


def rate_input(x, T: int, library: str):
    """Bernoulli spikes [T, B, ...] with P = x (the intensity times our p_max = 1)."""
    import torch

    if library == "snntorch":
        from snntorch import spikegen

        return spikegen.rate(x, num_steps=T)
    return (torch.rand((T,) + tuple(x.shape)) < x).to(x.dtype)


class PeerTrainer:
    """One BPTT training iteration of a peer model: encode, forward, loss + backward, Adam."""

    def __init__(self, library: str, topology: str, init: str = "lee", lr: float = 5e-4,
                 seed: int = 0):
        import torch

        self.library, self.topology = library, topology
        if library == "snntorch":
            import snntorch.functional as SF

            self.model = build_snntorch(topology, init, seed)
            self.loss_fn = SF.ce_rate_loss()
        elif library == "spikingjelly":
            from spikingjelly.activation_based import functional

            self.model = build_spikingjelly(topology, init, seed)
            self.loss_fn = rate_ce_loss
            self._reset = functional.reset_net
        else:
            raise ValueError(library)
        self.p_max = _constants()["p_max"]
        self.opt = torch.optim.Adam(self.model.parameters(), lr=lr, betas=(0.9, 0.999))
        self.phases = {"encode": 0.0, "forward": 0.0, "backward": 0.0, "step": 0.0}

    def forward(self, x_seq):
        if self.library == "spikingjelly":
            self._reset(self.model)
        return self.model(x_seq)

    def step(self, images_u8, labels, T: int, timed: bool = True) -> float:
        """One iteration on uint8 images (B, 28, 28); returns the loss."""
        import torch

        t0 = time.perf_counter()
        x = torch.from_numpy(images_u8).to(torch.float32).div_(255.0).unsqueeze(1) * self.p_max
        x_seq = rate_input(x, T, self.library)
        y = torch.from_numpy(labels.astype("int64"))
        t1 = time.perf_counter()
        self.model.train()
        spk = self.forward(x_seq)
        t2 = time.perf_counter()
        loss = self.loss_fn(spk, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        t3 = time.perf_counter()
        self.opt.step()
        t4 = time.perf_counter()
        if timed:
            for key, dt in zip(self.phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                self.phases[key] += dt
        return float(loss.detach())

    def counts(self, images_u8, T: int, batch: int = 500):
        """Output spike counts (N, n_out) without gradients."""
        import torch

        self.model.eval()
        out = []
        with torch.no_grad():
            for s in range(0, len(images_u8), batch):
                x = torch.from_numpy(images_u8[s:s + batch]).to(torch.float32).div_(255.0)
                spk = self.forward(rate_input(x.unsqueeze(1) * self.p_max, T, self.library))
                out.append(spk.sum(0))
        return torch.cat(out).numpy()


# ---------------------------------------------------------------------------------------------
# FLOPs and the sgemm yardstick


def bptt_flops(layers, T: int, batch: int) -> dict:
    """Dense FLOPs of one BPTT iteration: forward as ``dense_flops``; backward at every step the
    weight gradient and (above the first layer) the error to the layer below, 2 FLOPs per
    multiply-add each; pooling's backward as its forward."""
    import numpy as np

    from models.topology import ConvLayer, FCLayer, PoolLayer

    fwd = bwd = 0
    for i, layer in enumerate(layers[1:], start=1):
        units = int(np.prod(layer.shape))
        if isinstance(layer, (ConvLayer, FCLayer)):
            f = 2 * units * layer.fan_in * T * batch
            fwd += f
            bwd += f * (2 if i > 1 else 1)
        elif isinstance(layer, PoolLayer):
            f = 2 * units * layer.size**2 * T * batch
            fwd += f
            bwd += f
    return {"forward": fwd, "backward": bwd, "total": fwd + bwd}


def torch_sgemm_gflops(n: int = 2048, repeats: int = 5) -> float:
    import torch

    from benchmarks.reference import matmul_gflops

    g = torch.Generator().manual_seed(0)
    a = torch.rand((n, n), generator=g)
    b = torch.rand((n, n), generator=g)
    return matmul_gflops(a, b, repeats)


# ---------------------------------------------------------------------------------------------
# mode 1: one training iteration


def bench_peer(library: str, topology: str, images, labels, iterations: int, batch: int,
               steps: int, warmup: int = 1, seed: int = 0) -> dict:
    import numpy as np

    trainer = PeerTrainer(library, topology, init="lee", seed=seed)
    rng = np.random.default_rng(seed)
    for it in range(warmup + iterations):
        idx = rng.integers(0, len(labels), batch)
        trainer.step(images[idx], labels[idx], steps, timed=it >= warmup)
    total = sum(trainer.phases.values())
    per_iter = total / iterations
    layers, _ = our_network(topology)
    flops = bptt_flops(layers, steps, batch)
    return {"library": library, "topology": topology, "iterations": iterations,
            "batch": batch, "steps": steps, "s_per_iteration": per_iter,
            "images_per_s": batch / per_iter,
            "phase_s_per_iteration": {k: v / iterations for k, v in trainer.phases.items()},
            "flop_model": "BPTT, dense (bench_peers.bptt_flops)",
            "dense_gflop_per_iteration": flops["total"] / 1e9,
            "dense_gflops_achieved": flops["total"] / per_iter / 1e9}


def bench_ours(topology: str, images, labels, iterations: int, batch: int, steps: int) -> dict:
    """Ours as the trainer runs it: numba on the cores, BLAS held to the trainer's
    ``training.blas_threads`` (``bench_trainer.bench``'s default)."""
    from benchmarks.bench_trainer import bench

    r = bench(topology, images, labels, iterations, batch, steps)
    r["library"] = "ours"
    r["flop_model"] = "forward T steps + rate-based backward once (bench_trainer.dense_flops)"
    r["phase_s_per_iteration"] = dict(r["phase_s_per_iteration"])
    return r


def speed(args) -> dict:
    from benchmarks.reference import sgemm_gflops

    train_x, train_y, _, _, source = load_images(args.synthetic)
    load_before = os.getloadavg()
    gemm = {"numpy_before": sgemm_gflops(), "torch_before": torch_sgemm_gflops()}
    rows = []
    for net in args.nets:
        topo = NETS[net]
        for lib in args.libraries:
            print(f"[{net}] {lib} ...", flush=True)
            if lib == "ours":
                r = bench_ours(topo, train_x, train_y, args.iterations, args.batch, args.steps)
            else:
                r = bench_peer(lib, topo, train_x, train_y, args.iterations, args.batch,
                               args.steps, warmup=args.warmup)
            r["net"] = net
            rows.append(r)
    gemm["numpy_after"] = sgemm_gflops()
    gemm["torch_after"] = torch_sgemm_gflops()
    ref = max(gemm["numpy_before"], gemm["numpy_after"])  # best of the two: less disturbed
    for net in args.nets:
        ours = [r for r in rows if r["net"] == net and r["library"] == "ours"]
        for r in rows:
            if r["net"] != net:
                continue
            r["fraction_of_sgemm"] = r["dense_gflops_achieved"] / ref
            r["ours_over_peer"] = (ours[0]["images_per_s"] / r["images_per_s"]) if ours else None
    record = {"mode": "speed", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
              "threads": args.threads, "versions": versions(), "data": source,
              "sgemm_2048_gflops": gemm, "results": rows}
    print(f"\nfloat32 sgemm 2048x2048: numpy {gemm['numpy_before']:.1f} -> "
          f"{gemm['numpy_after']:.1f} GFLOP/s, torch {gemm['torch_before']:.1f} -> "
          f"{gemm['torch_after']:.1f} GFLOP/s; {args.threads} threads; load average "
          f"{load_before[0]:.2f} -> {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; "
          f"T = {args.steps}, batch {args.batch}, {args.iterations} timed iterations; {source}")
    head = (f"{'net':8} {'library':13} {'images/s':>9} {'ms/iter':>8} {'ours/peer':>9} "
            f"{'GFLOP/s':>8} {'%sgemm':>7}  phases (ms)")
    print(head + "\n" + "-" * len(head))
    for r in rows:
        ratio = "" if r["ours_over_peer"] is None else f"{r['ours_over_peer']:.2f}"
        ph = " ".join(f"{k} {v * 1e3:.0f}" for k, v in r["phase_s_per_iteration"].items())
        print(f"{r['net']:8} {r['library']:13} {r['images_per_s']:9.1f} "
              f"{r['s_per_iteration'] * 1e3:8.0f} {ratio:>9} {r['dense_gflops_achieved']:8.1f} "
              f"{r['fraction_of_sgemm']:7.1%}  {ph}")
    print("GFLOP/s: dense-equivalent FLOPs of each implementation's own algorithm (ours: forward "
          "over T steps + backward once; peers: BPTT, forward + backward at every step) per "
          "second; %sgemm against numpy's sgemm (the better of before and after).")
    return record


# ---------------------------------------------------------------------------------------------
# mode 2: STDP images/s


def bench_bindsnet_stdp(images, n_images: int, presentation: int = 25, seed: int = 0,
                        nodes: str = "adaptive", rule: str = "weight_dependent",
                        warmup: int = 5) -> dict:
    """BindsNET conv STDP on the shallow net's first layer, one image at a time (batch 1).

    Sizes and constants follow our pre-training (models/parameters.py): 36 maps 5x5, stride 1;
    LIF with tau_m = 20 ms, rest = reset = 0, no refractory period, threshold sqrt(3/25) (our
    initial pre-training threshold); ``nodes='adaptive'``: AdaptiveLIFNodes with our homeostasis
    step 0.01 and 1 s decay (per unit; ours is per map); traces with tau_pre = 10 ms; weights
    in [-1, 1], learning rate 0.002 for both branches; input Bernoulli with P = intensity x
    250 Hz x 1 ms per step. BindsNET's rule differs from ours in form (pre-then-post potentiation
    and post-then-pre depression, each soft-bounded), not in cost class: both update every
    kernel entry at post-synaptic spikes; BindsNET computes its dense im2col products every step.
    """
    import numpy as np
    import torch

    from models.parameters import (HomeostasisParameters, LIFParameters, PretrainingParameters,
                                   STDPParameters)

    import_bindsnet_core()
    from bindsnet.learning import PostPre, WeightDependentPostPre
    from bindsnet.network import Network
    from bindsnet.network.monitors import Monitor
    from bindsnet.network.nodes import AdaptiveLIFNodes, Input, LIFNodes
    from bindsnet.network.topology import Conv2dConnection

    from brian2 import ms

    lif, stdp, homeo, pre = (LIFParameters(), STDPParameters(), HomeostasisParameters(),
                             PretrainingParameters())
    dt_ms, tau_m, tau_pre = float(lif.dt / ms), float(lif.tau_m / ms), float(stdp.tau_pre / ms)
    p_in = float(pre.max_rate * lif.dt)
    torch.manual_seed(seed)
    k = math.sqrt(3 / 25)
    common = dict(shape=(36, 24, 24), traces=True, tc_trace=tau_pre, rest=0.0, reset=0.0,
                  thresh=k * pre.v_th_alpha, refrac=0, tc_decay=tau_m)
    if nodes == "adaptive":
        conv = AdaptiveLIFNodes(theta_plus=homeo.delta_theta,
                                tc_theta_decay=float(homeo.tau_theta / ms), **common)
    elif nodes == "lif":
        conv = LIFNodes(**common)
    else:
        raise ValueError(nodes)
    inp = Input(shape=(1, 28, 28), traces=True, tc_trace=tau_pre)
    w = (torch.rand(36, 1, 5, 5) * 2 - 1) * k
    Rule = {"weight_dependent": WeightDependentPostPre, "postpre": PostPre}[rule]
    conn = Conv2dConnection(inp, conv, kernel_size=5, stride=1, update_rule=Rule,
                            nu=(stdp.eta, stdp.eta), wmin=stdp.w_min, wmax=stdp.w_max, w=w)
    net = Network(dt=dt_ms, batch_size=1)
    net.add_layer(inp, name="X")
    net.add_layer(conv, name="Y")
    net.add_connection(conn, source="X", target="Y")
    monitor = Monitor(conv, ["s"], time=presentation)
    net.add_monitor(monitor, name="Y_s")
    w0 = conn.w.detach().clone()
    gen = torch.Generator().manual_seed(seed)
    x_all = torch.from_numpy(np.asarray(images[: warmup + n_images], dtype=np.float32) / 255.0)
    spikes = 0
    t0 = None
    for i in range(len(x_all)):
        if i == warmup:
            t0 = time.perf_counter()
        s = (torch.rand((presentation, 1, 1, 28, 28), generator=gen) < x_all[i] * p_in)
        net.run(inputs={"X": s}, time=presentation)
        if i >= warmup:
            spikes += int(monitor.get("s").sum())
        net.reset_state_variables()
    run_s = time.perf_counter() - t0
    return {"library": "bindsnet", "nodes": nodes, "rule": Rule.__name__, "images": n_images,
            "presentation_steps": presentation, "run_s": round(run_s, 3),
            "images_per_s": round(n_images / run_s, 2),
            "spikes_per_image": spikes / n_images,
            "kernel_change_max": float((conn.w - w0).abs().max()),
            "threads": torch.get_num_threads()}


def stdp(args) -> dict:
    from benchmarks.bench_stdp import bench_layer
    from benchmarks.reference import sgemm_gflops

    train_x, _, _, _, source = load_images(args.synthetic)
    n = args.stdp_images
    batch = min(100, n)  # images per Brian2 run, as bench_stdp
    if n % batch:
        raise SystemExit("--stdp-images must be a multiple of 100 (or below 100)")
    gemm = sgemm_gflops()
    b = bench_bindsnet_stdp(train_x, n, nodes=args.bindsnet_nodes)
    o = bench_layer(NETS["shallow"], 1, {}, train_x[:n], "cpp_standalone", batch)
    o.pop("kernels"), o.pop("thresholds")
    o["library"] = "ours (Brian2 cpp_standalone, single-threaded)"
    ratio = o["images_per_s"] / b["images_per_s"]
    record = {"mode": "stdp", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "loadavg": os.getloadavg()},
              "threads": args.threads, "versions": versions(), "data": source,
              "sgemm_2048_gflops": gemm, "ours": o, "bindsnet": b, "ours_over_bindsnet": ratio}
    print(f"\nconv STDP, 28x28 -> 36 maps 5x5, 25 ms per image ({source}); sgemm {gemm:.1f} "
          f"GFLOP/s; load average {os.getloadavg()[0]:.2f}")
    print(f"  ours     {o['images_per_s']:8.1f} images/s  ({o['images']} images; build "
          f"{o['build_s']} s, not included; {o['spikes_per_image']:.0f} conv spikes/image)")
    print(f"  bindsnet {b['images_per_s']:8.1f} images/s  ({b['images']} images after 5 warm-up; "
          f"{b['nodes']} nodes, {b['rule']}, {b['threads']} torch threads; "
          f"{b['spikes_per_image']:.0f} conv spikes/image)")
    print(f"  ours/bindsnet = {ratio:.2f}")
    return record


# ---------------------------------------------------------------------------------------------
# mode 3: time to a test error


def ours_time_to_error(run_dir: str, threshold: float) -> dict:
    """First evaluation of a finished (or running) study run with test error <= threshold."""
    import pandas as pd

    run = Path(run_dir)
    m = pd.read_csv(run / "metrics.csv")
    pre_s = 0.0
    pj = run / "pretrain" / "pretrained.json"
    if pj.exists():
        pre_s = float(json.loads(pj.read_text()).get("wall_s", 0.0))
    hit = m[m["test_error"] <= threshold]
    best = m.loc[m["test_error"].idxmin()]
    out = {"run": str(run), "pretrain_wall_s": pre_s, "last_iteration": int(m["iteration"].max()),
           "best_test_error": float(best["test_error"]),
           "best_at_iteration": int(best["iteration"])}
    if len(hit):
        first = hit.iloc[0]
        out.update(reached=True, iteration=int(first["iteration"]),
                   wall_s=float(first["wall_time_s"]) + pre_s)
    else:
        out.update(reached=False, iteration=None, wall_s=None)
    return out


def time_to_error(args) -> dict:
    import numpy as np

    from models.parameters import BPParameters

    train_x, train_y, test_x, test_y, source = load_images(args.synthetic)
    if args.test_images:
        test_x, test_y = test_x[: args.test_images], test_y[: args.test_images]
    rng = np.random.default_rng(args.seed)
    tr_idx = rng.choice(len(train_y), min(args.train_eval_images, len(train_y)), replace=False)
    trainer = PeerTrainer("snntorch", NETS["shallow"], init=args.ttt_init, lr=args.lr,
                          seed=args.seed)
    batch, T = args.batch, args.steps
    per_epoch = len(train_y) // batch
    rows, t_train = [], 0.0
    t0 = time.perf_counter()
    deadline = t0 + args.max_minutes * 60
    order = rng.permutation(len(train_y))
    reached = None

    def evaluate(it):
        te = float(np.mean(trainer.counts(test_x, T).argmax(1) != test_y))
        tr = float(np.mean(trainer.counts(train_x[tr_idx], T).argmax(1) != train_y[tr_idx]))
        row = {"iteration": it, "epoch": it // per_epoch + 1, "images_seen": it * batch,
               "wall_time_s": round(time.perf_counter() - t0, 3),
               "train_time_s": round(t_train, 3), "train_error": tr, "test_error": te}
        rows.append(row)
        print(f"  it {it:5d}  test error {te:.4f}  train error {tr:.4f}  "
              f"wall {row['wall_time_s']:.0f} s", flush=True)
        return row

    it = 0
    evaluate(0)
    while it < args.max_iterations and time.perf_counter() < deadline:
        pos = (it % per_epoch) * batch
        if pos == 0 and it:
            order = rng.permutation(len(train_y))
        idx = order[pos:pos + batch]
        ts = time.perf_counter()
        trainer.step(train_x[idx], train_y[idx], T)
        t_train += time.perf_counter() - ts
        it += 1
        if it % args.eval_every == 0:
            row = evaluate(it)
            if row["test_error"] <= args.time_to_error:
                reached = row
                break
    if reached is None and (not rows or rows[-1]["iteration"] != it):
        row = evaluate(it)
        reached = row if row["test_error"] <= args.time_to_error else None
    curve = Path(args.curve)
    curve.parent.mkdir(parents=True, exist_ok=True)
    with curve.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    ours = [ours_time_to_error(r, args.time_to_error) for r in args.ours_run]
    record = {"mode": "time_to_error", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "threshold": args.time_to_error, "threads": args.threads,
              "versions": versions(), "data": source,
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "loadavg": os.getloadavg()},
              "snntorch": {"init": args.ttt_init, "lr": args.lr, "batch": batch, "steps": T,
                           "eval_every": args.eval_every, "test_images": len(test_y),
                           "train_eval_images": len(tr_idx), "curve": str(curve),
                           "reached": reached is not None,
                           "iteration": reached["iteration"] if reached else None,
                           "wall_s": reached["wall_time_s"] if reached else None,
                           "train_s": reached["train_time_s"] if reached else None,
                           "stopped_at_iteration": rows[-1]["iteration"],
                           "best_test_error": min(r["test_error"] for r in rows)},
              "ours": ours,
              "note": f"our study trains at T = {BPParameters().t_first_epoch} in epoch 1 "
                      f"and {BPParameters().t_later_epochs} later; wall times include evaluation"}
    s = record["snntorch"]
    print(f"\ntime to test error <= {args.time_to_error:.2%} ({source}, {args.threads} threads):")
    print(f"  snnTorch BPTT (Adam lr {args.lr}, init {args.ttt_init}): " + (
        f"iteration {s['iteration']}, {s['wall_s']:.0f} s wall ({s['train_s']:.0f} s training)"
        if s["reached"] else
        f"not reached by iteration {s['stopped_at_iteration']} (best {s['best_test_error']:.2%})"))
    for o in ours:
        print(f"  ours {o['run']}: " + (
            f"iteration {o['iteration']}, {o['wall_s']:.0f} s wall (pre-training "
            f"{o['pretrain_wall_s']:.0f} s included)" if o["reached"] else
            f"not reached by iteration {o['last_iteration']} (best {o['best_test_error']:.2%} "
            f"at {o['best_at_iteration']})"))
    print(f"  curve: {curve}")
    return record


# ---------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iterations", type=int, default=10, help="timed iterations per library")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations of each peer "
                   "(ours: one, inside bench_trainer.bench)")
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--steps", type=int, default=50, help="T, steps of 1 ms")
    p.add_argument("--nets", nargs="+", choices=sorted(NETS), default=["shallow", "deep"])
    p.add_argument("--libraries", nargs="+", default=["ours", "snntorch", "spikingjelly"],
                   choices=["ours", "snntorch", "spikingjelly"])
    p.add_argument("--synthetic", action="store_true", help="random images instead of MNIST")
    p.add_argument("--json", help="write the record here")
    g = p.add_argument_group("STDP (--stdp)")
    g.add_argument("--stdp", action="store_true", help="conv STDP images/s: ours vs BindsNET")
    g.add_argument("--stdp-images", type=int, default=200)
    g.add_argument("--bindsnet-nodes", choices=["adaptive", "lif"], default="adaptive")
    g = p.add_argument_group("time to error (--time-to-error)")
    g.add_argument("--time-to-error", type=float, metavar="ERROR",
                   help="train the snnTorch shallow net until test error <= ERROR")
    g.add_argument("--max-minutes", type=float, default=60.0)
    g.add_argument("--max-iterations", type=int, default=30000)
    g.add_argument("--eval-every", type=int, default=100)
    g.add_argument("--test-images", type=int, default=0, help="0: all")
    g.add_argument("--train-eval-images", type=int, default=1000)
    g.add_argument("--lr", type=float, default=5e-4)
    g.add_argument("--ttt-init", choices=["torch", "lee"], default="torch",
                   help="torch: PyTorch's default init, threshold 1 (snnTorch's usual "
                        "recipe); lee: our initialisation and thresholds")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--curve", default="snntorch_time_to_error.csv")
    g.add_argument("--ours-run", action="append", default=[],
                   help="a study run folder of ours (metrics.csv) to compare; repeatable")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    configure_threads(args.threads)  # before numpy / numba / torch are imported
    torch_threads(args.threads)
    if args.time_to_error is not None:
        record = time_to_error(args)
    elif args.stdp:
        record = stdp(args)
    else:
        record = speed(args)
    record["command"] = " ".join([Path(sys.argv[0]).name] + (argv if argv is not None
                                                             else sys.argv[1:]))
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
