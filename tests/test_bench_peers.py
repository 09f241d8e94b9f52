"""benchmarks/bench_peers.py: the snnTorch / SpikingJelly / BindsNET models are our network.

The peer libraries live in their own environment (``bash envs/make-env.sh peers``;
docs/benchmarks.md); in an environment without them these tests skip and say so, except the
FLOP count, which needs none of them.
"""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import bench_peers as bp  # noqa: E402  (imports nothing heavy at module level)

PEER_ENV = "the peer libraries live in their own env: bash envs/make-env.sh peers"


@pytest.fixture(scope="module")
def peers():
    for name in ("torch", "snntorch", "spikingjelly"):
        pytest.importorskip(name, reason=f"{name} is not importable; {PEER_ENV}")
    import torch

    torch.set_num_threads(2)
    return torch


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_bptt_flops_forward_equals_our_dense_forward():
    from benchmarks.bench_trainer import dense_flops

    for topo in bp.NETS.values():
        layers, _ = bp.our_network(topo)
        ours, bptt = dense_flops(layers, 50, 100), bp.bptt_flops(layers, 50, 100)
        assert bptt["forward"] == ours["forward"]
        # BPTT's backward is ours (once per presentation) at each of the T steps, plus pooling's
        pool = sum(2 * int(np.prod(layer.shape)) * layer.size**2 * 50 * 100
                   for layer in layers if layer.kind == "pool")
        assert bptt["backward"] == 50 * ours["backward"] + pool


@pytest.mark.parametrize("library", ["snntorch", "spikingjelly"])
@pytest.mark.parametrize("net", ["shallow", "deep"])
def test_peer_models_have_our_layer_shapes(peers, library, net):
    topo = bp.NETS[net]
    build = bp.build_snntorch if library == "snntorch" else bp.build_spikingjelly
    model = build(topo)
    shapes = [tuple(p.shape) for p in model.parameters()]
    _, params = bp.our_network(topo)
    ours = [p.weights.shape for p in params if p is not None]
    assert shapes == [tuple(s) for s in ours]
    if net == "shallow":
        assert shapes == [(36, 1, 5, 5), (10, 36 * 12 * 12)]
    assert sum(int(np.prod(s)) for s in shapes) == sum(int(np.prod(s)) for s in ours)
    # no biases, no trainable thresholds or time constants: the same trainable parameters
    assert len(shapes) == len(ours)


@pytest.mark.parametrize("library", ["snntorch", "spikingjelly"])
def test_peer_models_spike_like_our_trainer(peers, library):
    """Same weights, thresholds and input spikes: the output spike counts equal ours."""
    torch = peers
    from brian2 import ms

    from models.batched import forward
    from protocols.encoding import poisson_spikes

    topo = bp.NETS["shallow"]
    layers, params = bp.our_network(topo)
    rng = np.random.default_rng(3)
    images = (rng.random((4, 28, 28)) < 0.2).astype(np.uint8) * 255
    x = poisson_spikes(images, 30 * ms, np.random.default_rng(0))
    ours = forward(layers, params, x, keep_spikes=False)
    model = (bp.build_snntorch if library == "snntorch" else bp.build_spikingjelly)(topo)
    if library == "spikingjelly":
        from spikingjelly.activation_based import functional

        functional.reset_net(model)
    with torch.no_grad():
        spk = model(torch.from_numpy(x.astype(np.float32)).unsqueeze(2))
    counts = spk.sum(0).numpy()
    assert ours.count[1].sum() > 0, "the conv layer must be active for the test to mean much"
    # float32 sums in another order may flip a unit sitting exactly at threshold: allow 1 spike
    assert np.abs(counts - ours.count[-1].reshape(counts.shape)).sum() <= 1


@pytest.mark.parametrize("library", ["snntorch", "spikingjelly"])
def test_one_training_step_changes_the_weights(peers, library):
    rng = np.random.default_rng(0)
    images = (rng.random((4, 28, 28)) * 255).astype(np.uint8)
    labels = rng.integers(0, 10, 4)
    trainer = bp.PeerTrainer(library, bp.NETS["shallow"], lr=1e-3)
    before = _weights(trainer.model)
    loss = trainer.step(images, labels, T=5)
    after = _weights(trainer.model)
    assert np.isfinite(loss)
    for name in before:
        assert not bool((before[name] == after[name]).all()), f"{library}: {name} unchanged"


@pytest.mark.parametrize("rule", ["weight_dependent", "postpre"])
def test_bindsnet_conv_stdp_runs(peers, rule):
    import importlib.util

    if importlib.util.find_spec("bindsnet") is None:
        pytest.skip(f"bindsnet is not installed; {PEER_ENV}")
    rng = np.random.default_rng(0)
    images = (rng.random((4, 28, 28)) < 0.3).astype(np.uint8) * 255
    r = bp.bench_bindsnet_stdp(images, 2, warmup=2, rule=rule)
    assert r["images_per_s"] > 0
    assert r["kernel_change_max"] > 0
