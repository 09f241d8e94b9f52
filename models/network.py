"""Brian2 network of a topology string, scheduled to match the batched trainer step for step.

Within one step of dt (docs/method.md §2, the contract with ``models/batched.py``):

1. ``groups`` slot: every membrane decays, ``v ← e^{-dt/τm} v`` (method ``exact``); homeostatic
   offsets decay, ``θ ← e^{-dt/τθ} θ``;
2. ``thresholds`` slot, layer by layer in topology order (``order = 10·layer + …``): the input
   emits this step's spikes; then for each layer the incoming pathway adds this step's
   pre-synaptic spikes (no delay), the layer's threshold is tested, and — for the one plastic
   layer — homeostasis counts the spikes, STDP accumulates its updates and the kernel applies
   their per-map average. A spike therefore crosses every layer in the step it is emitted;
3. ``resets`` slot: every unit that fired is reset (to 0, or by subtracting its threshold
   ``v_th + θ`` as tested in slot 2);
4. ``end`` slot: homeostasis raises θ of the plastic layer's maps by Δθ per spike of this step,
   after the reset, so that the reset subtracts the threshold that was tested.

Public entry points: :func:`build_network` (any topology, optional plastic conv layer) and
:func:`brian2_layer_spikes` (run one spike train through a frozen network and return every
layer's spikes as ``(T, C, H, W)`` bool arrays — the reference for the batched trainer).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
from brian2 import (Network, SpikeGeneratorGroup, SpikeMonitor, TimedArray, ms,
                    second)
from brian2.units.fundamentalunits import Quantity

from models import neurons, synapses
from models.devices import StandaloneProgram, is_standalone, use_device
from models.parameters import (HomeostasisParameters, LIFParameters, ParameterError,
                               PoolingParameters, STDPParameters)
from models.topology import ConvLayer, PoolLayer, TopologyError, parse_topology

#: name of the TimedArray that drives the input in ``input_mode="stimulus"``
STIMULUS = "stimulus"


class NetworkError(ValueError):
    """Weights, thresholds or inputs that do not fit the topology."""


@dataclass
class SpikingNetwork:
    """A built Brian2 network and handles to its parts (indices follow ``parse_topology``)."""

    topology: str
    layers: list
    net: Network
    groups: list  # NeuronGroup (or SpikeGeneratorGroup for the input) per layer
    monitors: list  # SpikeMonitor per layer, or None
    kernels: dict = field(default_factory=dict)  # conv layer index -> kernel NeuronGroup
    maps: dict = field(default_factory=dict)  # plastic layer index -> map NeuronGroup
    stimulus: TimedArray | None = None
    plastic_layer: int | None = None
    lif: LIFParameters = field(default_factory=LIFParameters)

    def kernel_array(self, index: int) -> np.ndarray:
        """Current kernels of conv layer ``index`` as ``(n_maps, C_in, k, k)``."""
        layer = self.layers[index]
        return np.asarray(self.kernels[index].k[:]).reshape(
            layer.n_maps, layer.in_shape[0], layer.kernel, layer.kernel).copy()

    def theta_array(self) -> np.ndarray:
        """Homeostatic offsets of the plastic layer's maps."""
        return np.asarray(self.maps[self.plastic_layer].theta[:]).copy()

    def spike_arrays(self, n_steps: int) -> list:
        """Recorded spikes of every monitored layer as bool ``(T, C, H, W)`` (None if unmonitored)."""
        dt = float(self.lif.dt / second)
        out = []
        for layer, mon in zip(self.layers, self.monitors):
            if mon is None:
                out.append(None)
                continue
            arr = np.zeros((n_steps, int(np.prod(layer.shape))), dtype=bool)
            steps = np.rint(np.asarray(mon.t_[:]) / dt).astype(np.int64)
            arr[steps, np.asarray(mon.i[:])] = True
            out.append(arr.reshape((n_steps, *layer.shape)))
        return out


def _as_list(values, n_layers: int, what: str) -> list:
    if values is None:
        return [None] * n_layers
    if isinstance(values, Mapping):
        bad = [k for k in values if not isinstance(k, int) or not 0 <= k < n_layers]
        if bad:
            raise NetworkError(f"{what}: keys {bad} are not layer indices 0..{n_layers - 1}")
        return [values.get(i) for i in range(n_layers)]
    values = list(values)
    if len(values) not in (n_layers,):
        raise NetworkError(f"{what}: expected one entry per layer ({n_layers}), got {len(values)}")
    return values


def _unit_thresholds(layer, value, index: int) -> np.ndarray:
    """Per-unit thresholds from a per-map (conv) or per-unit/scalar (FC) value."""
    n_units = int(np.prod(layer.shape))
    if value is None:
        raise NetworkError(f"layer {index} ({layer.kind}) needs a threshold")
    value = np.asarray(value, dtype=float)
    if isinstance(layer, ConvLayer):
        if value.ndim == 0:
            value = np.full(layer.n_maps, float(value))
        if value.shape != (layer.n_maps,):
            raise NetworkError(f"layer {index} (conv): thresholds must be a scalar or "
                               f"({layer.n_maps},) per map, got shape {value.shape}")
        return np.repeat(value, layer.shape[1] * layer.shape[2])
    if value.ndim == 0 or value.shape == (n_units,):
        return np.broadcast_to(value, (n_units,)).copy()
    raise NetworkError(f"layer {index} (fc): thresholds must be a scalar or ({n_units},), "
                       f"got shape {value.shape}")


def _per_conv_layer(values, layers, index: int):
    """The entry of a per-conv-layer list for conv layer ``index``: by conv-layer rank, the
    last entry for layers beyond the list."""
    rank = sum(isinstance(layer, ConvLayer) for layer in layers[1:index])
    return values[min(rank, len(values) - 1)]


def _stdp_offset(stdp, layers, index: int) -> str:
    """STDPParameters.offset of conv layer ``index``."""
    return _per_conv_layer(stdp.offset if stdp is not None else ("constant",), layers, index)


def _schedule(obj, order: int) -> None:
    obj.when = "thresholds"
    obj.order = order


def spikes_to_indices(spikes: np.ndarray, dt: Quantity):
    """(T, C, H, W) bool → SpikeGeneratorGroup indices and times (flattened C, H, W)."""
    steps, flat = np.nonzero(spikes.reshape(spikes.shape[0], -1))
    return flat.astype(np.int32), steps * dt


def build_network(
    topology: str,
    weights=None,
    thresholds=None,
    *,
    input_spikes: np.ndarray | None = None,
    input_mode: str = "spikes",
    stimulus_steps: int | None = None,
    presentation: Quantity | None = None,
    plastic_layer: int | None = None,
    up_to: int | None = None,
    lif: LIFParameters = LIFParameters(),
    pool: PoolingParameters = PoolingParameters(),
    stdp: STDPParameters = STDPParameters(),
    homeostasis: HomeostasisParameters = HomeostasisParameters(),
    monitor: bool | Sequence[int] = True,
) -> SpikingNetwork:
    """Build the Brian2 network of ``topology`` on the current device.

    Parameters
    ----------
    weights, thresholds
        One entry per layer of ``parse_topology(topology)`` (list, or dict layer index → value).
        Conv: kernels ``(n_maps, C_in, k, k)`` and thresholds scalar or ``(n_maps,)``;
        FC: weights ``(n_out, n_in)`` and thresholds scalar or ``(n_out,)``; others: None.
        For the plastic layer the threshold is the *base* v_th; theta starts at 0.
    input_mode
        ``"spikes"``: a SpikeGeneratorGroup playing ``input_spikes`` (T, C, H, W) bool.
        ``"stimulus"``: a NeuronGroup reading the TimedArray ``stimulus`` of shape
        ``(stimulus_steps, C·H·W)``; replace its values (runtime) or pass them in ``run_args``
        (standalone) to present new images without rebuilding.
    presentation
        If given, every membrane (and pre-synaptic trace) is reset to 0 at the start of each
        presentation window, so consecutive images do not interact.
    plastic_layer
        Index of the one conv layer that learns with STDP + homeostasis; None: frozen network.
    up_to
        Build layers ``0..up_to`` only (pre-training needs nothing above the plastic layer).
    monitor
        True: a SpikeMonitor on every layer; False: none; a sequence: these layer indices.
    """
    layers = parse_topology(topology)
    last = len(layers) - 1 if up_to is None else up_to
    if not 0 < last < len(layers):
        raise NetworkError(f"up_to = {up_to} is not a layer index 1..{len(layers) - 1}")
    full = len(layers)
    layers = layers[: last + 1]
    weights = _as_list(weights, full, "weights")[: last + 1]
    thresholds = _as_list(thresholds, full, "thresholds")[: last + 1]
    if input_mode not in ("spikes", "stimulus"):
        raise NetworkError(f"input_mode = {input_mode!r} is not one of spikes, stimulus")
    if plastic_layer is not None:
        if not (0 < plastic_layer < len(layers) and isinstance(layers[plastic_layer], ConvLayer)):
            raise NetworkError(f"plastic_layer = {plastic_layer} is not a conv layer of "
                               f"{topology!r} (within up_to = {last})")
        if plastic_layer == 1 and input_mode != "stimulus":
            raise NetworkError("STDP on the first conv layer reads the input's last spike "
                               "times: use input_mode='stimulus'")
    if presentation is not None and not isinstance(presentation, Quantity):
        raise ParameterError(f"presentation needs a time unit, e.g. 25*ms; got {presentation!r}")
    if isinstance(monitor, bool):
        monitored = set(range(len(layers))) if monitor else set()
    else:
        monitored = set(monitor)

    dt = lif.dt
    objects = []
    groups, monitors = [], []
    kernels, maps = {}, {}
    stimulus = None
    shape_in = layers[0].shape
    n_in = int(np.prod(shape_in))
    track = {plastic_layer - 1} if plastic_layer is not None else set()

    # --- input layer (order 0) ---
    if input_mode == "spikes":
        if input_spikes is None:
            raise NetworkError("input_mode='spikes' needs input_spikes (T, C, H, W) bool")
        input_spikes = np.asarray(input_spikes)
        if input_spikes.ndim == 3 and shape_in[0] == 1:
            input_spikes = input_spikes[:, None]
        if input_spikes.ndim != 4 or input_spikes.shape[1:] != shape_in:
            raise NetworkError(f"input_spikes must have shape (T, {', '.join(map(str, shape_in))})"
                               f" for {topology!r}, got {input_spikes.shape}")
        idx, times = spikes_to_indices(input_spikes.astype(bool), dt)
        inp = SpikeGeneratorGroup(n_in, idx, times, dt=dt, name="layer0_input",
                                  when="thresholds", order=0)
    else:
        if stimulus_steps is None or stimulus_steps < 1:
            raise NetworkError("input_mode='stimulus' needs stimulus_steps >= 1")
        stimulus = TimedArray(np.zeros((stimulus_steps, n_in)), dt=dt, name=STIMULUS)
        inp = neurons.stimulus_input_group(n_in, STIMULUS, dt, "layer0_input")
        inp.namespace[STIMULUS] = stimulus
        _schedule(inp.thresholder["spike"], 0)
    groups.append(inp)
    objects.append(inp)

    # --- hidden and output layers ---
    for index in range(1, len(layers)):
        layer = layers[index]
        base = 10 * index
        n = int(np.prod(layer.shape))
        plastic = index == plastic_layer
        name = f"layer{index}_{layer.kind}"
        if isinstance(layer, PoolLayer):
            group = neurons.pooling_group(n, lif, pool, name, track_lastspike=index in track)
            syn = synapses.pool_synapses(groups[-1], group, layer, pool.weight, f"{name}_in")
        else:
            vth = _unit_thresholds(layer, thresholds[index], index)
            offset = _stdp_offset(stdp, layers, index) if plastic else "constant"
            group = neurons.lif_group(n, lif, vth, name, with_theta=plastic,
                                      track_lastspike=index in track,
                                      window_trace=offset == "window_mean")
            w = weights[index]
            if w is None:
                raise NetworkError(f"layer {index} ({layer.kind}) of {topology!r} needs weights")
            if isinstance(layer, ConvLayer):
                kernel = synapses.kernel_group(layer, w, dt, f"{name}_kernel", plastic=plastic)
                kernels[index] = kernel
                objects.append(kernel)
                syn = synapses.conv_synapses(
                    groups[-1], group, layer, kernel, f"{name}_in",
                    stdp=stdp if plastic else None, offset=offset,
                    window_scale=_per_conv_layer(stdp.window_scale, layers, index)
                    if plastic else 1.0)
            else:
                syn = synapses.fc_synapses(groups[-1], group, layer, w, f"{name}_in")
        _schedule(syn.pre, base)
        _schedule(group.thresholder["spike"], base + 1)
        objects += [group, syn]
        if plastic:
            mgroup = neurons.map_group(layer.n_maps, homeostasis, dt, f"{name}_maps")
            neurons.link_theta(group, mgroup,
                               np.repeat(np.arange(layer.n_maps), layer.shape[1] * layer.shape[2]))
            hsyn = synapses.homeostasis_synapses(group, mgroup, layer, f"{name}_homeostasis")
            _schedule(hsyn.pre, base + 2)
            # theta rises after the reset: a subtract reset removes the tested threshold
            hsyn.raise_theta.when, hsyn.raise_theta.order = "end", base + 2
            if offset == "window_mean":  # the traces' sum first, then the updates that use it
                _schedule(syn.gather, base + 3)
            _schedule(syn.post, base + 4)
            avg = synapses.kernel_averaging(kernels[index], mgroup, layer, stdp, "thresholds",
                                            base + 5)
            clear = mgroup.run_regularly("nspk = 0", when="thresholds", order=base + 6,
                                         name=f"{name}_maps_clear")
            maps[index] = mgroup
            objects += [mgroup, hsyn, avg, clear]
        groups.append(group)

    # --- per-presentation reset of membranes and traces ---
    if presentation is not None:
        for index, group in enumerate(groups):
            if index == 0 and input_mode == "spikes":
                continue
            code = "" if index == 0 else "v = 0\n"
            if index == 0 or (index - 1) in track or index in track:
                code += "lastspike = -1e4 * second\n"
            if code:
                objects.append(group.run_regularly(code, dt=presentation, when="start",
                                                   name=f"{group.name}_present_reset"))

    for index, group in enumerate(groups):
        if index in monitored:
            mon = SpikeMonitor(group, name=f"{group.name}_spikes")
            monitors.append(mon)
            objects.append(mon)
        else:
            monitors.append(None)

    net = Network(*objects)
    return SpikingNetwork(topology, layers, net, groups, monitors, kernels, maps, stimulus,
                          plastic_layer, lif)


def brian2_layer_spikes(
    topology: str,
    weights,
    thresholds,
    input_spikes: np.ndarray,
    *,
    lif: LIFParameters = LIFParameters(),
    pool: PoolingParameters = PoolingParameters(),
    device: str = "runtime",
    input_mode: str = "spikes",
) -> list:
    """Run one input spike train through the frozen Brian2 network; return every layer's spikes.

    ``input_spikes``: bool ``(T, C, H, W)`` (time-major, one image of
    :func:`protocols.encoding.poisson_spikes`; ``(T, H, W)`` is accepted for one channel).
    ``weights``/``thresholds``: as in :func:`build_network` (thresholds are the effective ones;
    no homeostasis runs). Returns a list aligned with ``parse_topology(topology)``: entry 0 the
    input spikes as Brian2 emitted them, entry l the spikes of layer l, each bool
    ``(T, *layer.shape)`` (FC layers ``(T, n, 1, 1)``).
    """
    use_device(device)
    input_spikes = np.asarray(input_spikes, dtype=bool)
    steps = input_spikes.shape[0]
    if input_mode == "spikes":
        sn = build_network(topology, weights, thresholds, input_spikes=input_spikes, lif=lif,
                           pool=pool)
        run_args = None
    else:
        sn = build_network(topology, weights, thresholds, input_mode="stimulus",
                           stimulus_steps=steps, lif=lif, pool=pool)
        table = input_spikes.reshape(steps, -1).astype(float)
        run_args = {sn.stimulus: table}
        if not is_standalone():
            sn.stimulus.values[:] = table
    duration = steps * lif.dt
    if is_standalone():
        program = StandaloneProgram(sn.net, duration)
        program.build()
        program.run(run_args)
    else:
        sn.net.run(duration)
    return sn.spike_arrays(steps)


__all__ = ["SpikingNetwork", "NetworkError", "TopologyError", "build_network",
           "brian2_layer_spikes", "STIMULUS", "spikes_to_indices", "ms"]
