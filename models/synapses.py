r"""Synapses of the study: shared-kernel convolutions with STDP, pooling, fully connected.

Shared kernels (docs/method.md §3.2): each conv layer has one *kernel group*, a NeuronGroup with one unit per
kernel entry ``(m, c, dy, dx)`` holding ``k``. The layer's Synapses object declares
``w : 1 (linked)`` and links it to ``k`` through the synaptic integer index ``kidx``, so every
position of a map reads (and STDP writes) the same entry. The forward current of unit
``(m, y, x)`` is therefore the 2-D *correlation*

.. math::
    I[m, y, x] = \sum_c \sum_{dy, dx} K[m, c, dy, dx]\, s[c, y + dy, x + dx].

STDP (plastic layers only) [paper + recon]: at a post-synaptic spike each synapse of the firing
unit computes

.. math::
    \Delta w = \eta\,(x_{pre} - \chi_{offset})(w_{max} - w)(w - w_{min}),\qquad
    x_{pre} = e^{-(t - t^{last}_{pre})/\tau_{pre}}

(the trace resets to 1 at a pre-spike and decays with tau_pre; a pre-spike in the same step gives
:math:`x_{pre} = 1`). With ``offset = "window_mean"`` [recon] the constant
:math:`\chi_{offset}` is replaced by :math:`\lambda\langle x_{pre}\rangle`, the mean trace over the
firing unit's :math:`C_{in} k^2` inputs at that step times ``window_scale`` :math:`\lambda`
(1: the updates of one spike sum to zero before the soft bounds). The updates are *accumulated* into ``acc`` of the kernel group; after all
spikes of the step, the kernel applies ``k += acc / n`` with ``n`` the number of positions of the
map that fired in this step (``averaging="spiking"``, the paper's "averaged STDP updates") or the
number of positions of the map (``averaging="all"``). All updates of one step use the kernel of
the previous step. The averaging runs as a ``run_regularly`` operation, which every device
(runtime and cpp_standalone) executes.
"""

from __future__ import annotations

import numpy as np
from brian2 import NeuronGroup, Synapses, linked_var

from models.parameters import STDPParameters
from models.topology import ConvLayer, FCLayer, PoolLayer


def conv_connectivity(layer: ConvLayer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pre index, post index and kernel index of every synapse of a conv layer.

    Units are flattened in (channel, y, x) order; kernel entries in (m, c, dy, dx) order,
    i.e. ``kernels.ravel()`` for a kernel array of shape (n_maps, C_in, k, k).
    """
    c_in, h, w = layer.in_shape
    m_out, ho, wo = layer.shape
    k = layer.kernel
    m, c, dy, dx, y, x = np.meshgrid(
        np.arange(m_out), np.arange(c_in), np.arange(k), np.arange(k),
        np.arange(ho), np.arange(wo), indexing="ij",
    )
    pre = (c * h + (y + dy)) * w + (x + dx)
    post = (m * ho + y) * wo + x
    kidx = ((m * c_in + c) * k + dy) * k + dx
    return (pre.ravel().astype(np.int32), post.ravel().astype(np.int32),
            kidx.ravel().astype(np.int32))


def pool_connectivity(layer: PoolLayer) -> tuple[np.ndarray, np.ndarray]:
    """Pre and post index of every synapse of a non-overlapping pooling layer."""
    c, h, w = layer.in_shape
    s = layer.size
    ch, y, x = np.meshgrid(np.arange(c), np.arange(h), np.arange(w), indexing="ij")
    pre = (ch * h + y) * w + x
    post = (ch * (h // s) + y // s) * (w // s) + x // s
    return pre.ravel().astype(np.int32), post.ravel().astype(np.int32)


#: kernel group: one unit per shared kernel entry
KERNEL_EQS = """
k : 1
"""
#: plastic kernel: acc collects this step's STDP updates, nspk_map = spikes of its map this step
PLASTIC_KERNEL_EQS = KERNEL_EQS + """
acc : 1
nspk_map : 1 (linked)
"""


def kernel_group(layer: ConvLayer, kernels: np.ndarray, dt, name: str,
                 plastic: bool = False) -> NeuronGroup:
    """The NeuronGroup holding a conv layer's shared kernel ``(n_maps, C_in, k, k)``."""
    shape = (layer.n_maps, layer.in_shape[0], layer.kernel, layer.kernel)
    kernels = np.asarray(kernels, dtype=float)
    if kernels.shape != shape:
        raise ValueError(f"{name}: kernels must have shape {shape} (n_maps, C_in, k, k), "
                         f"got {kernels.shape}")
    if not np.all(np.isfinite(kernels)):
        raise ValueError(f"{name}: kernels contain NaN or infinite values")
    group = NeuronGroup(int(np.prod(shape)), PLASTIC_KERNEL_EQS if plastic else KERNEL_EQS,
                        dt=dt, name=name)
    group.k = kernels.ravel()
    return group


def conv_synapses(
    source,
    target: NeuronGroup,
    layer: ConvLayer,
    kernel: NeuronGroup,
    name: str,
    stdp: STDPParameters | None = None,
    offset: str = "constant",
    window_scale: float = 1.0,
) -> Synapses:
    """Shared-kernel correlation from ``source`` (C_in·H·W units) to ``target`` (maps·Ho·Wo).

    With ``stdp`` the synapses also learn (the source must record ``lastspike``); the kernel
    group then needs :func:`kernel_averaging` scheduled after the post-synaptic pathway.
    ``offset`` "window_mean" replaces chi_offset by the mean x_pre over the firing unit's
    C_in·k·k inputs: a first post pathway ``gather`` sums them into ``xsum`` of the target (which
    needs ``lif_group(..., window_trace=True)``), the pathway ``post`` then learns; schedule
    ``gather`` before ``post``. ``window_scale`` multiplies that mean (chi = λ⟨x_pre⟩).
    """
    pre, post, kidx = conv_connectivity(layer)
    model = "kidx : integer (constant)\nw : 1 (linked)\n"
    on_post = None
    namespace = {}
    if stdp is not None:
        if offset not in ("constant", "window_mean"):
            raise ValueError(f"offset must be 'constant' or 'window_mean', got {offset!r}")
        model += "acc_k : 1 (linked)\n"
        trace = "exp(-(t - lastspike_pre) / tau_pre)"
        subtract = ("chi_offset" if offset == "constant"
                    else "window_scale * xsum_post / n_window")
        on_post = (f"acc_k += eta_stdp * ({trace} - {subtract}) * (w_max - w) * (w - w_min)")
        if offset == "window_mean":
            on_post = {"gather": f"xsum_post += {trace}", "post": on_post}
        namespace = {"eta_stdp": stdp.eta, "tau_pre": stdp.tau_pre,
                     "chi_offset": stdp.chi_offset, "w_max": stdp.w_max, "w_min": stdp.w_min,
                     "n_window": float(layer.fan_in), "window_scale": float(window_scale)}
    syn = Synapses(source, target, model=model, on_pre="v_post += w", on_post=on_post,
                   namespace=namespace, dt=target.clock.dt, name=name)
    syn.connect(i=pre, j=post)
    syn.kidx = kidx
    syn.w = linked_var(kernel, "k", index="kidx")
    if stdp is not None:
        syn.acc_k = linked_var(kernel, "acc", index="kidx")
    return syn


def kernel_averaging(kernel: NeuronGroup, maps: NeuronGroup, layer: ConvLayer,
                     stdp: STDPParameters, when: str, order: int):
    """Apply this step's accumulated kernel updates, averaged per map (see module docstring)."""
    entries = layer.in_shape[0] * layer.kernel * layer.kernel
    kernel.nspk_map = linked_var(maps, "nspk",
                                 index=np.repeat(np.arange(layer.n_maps), entries).astype(np.int64))
    if stdp.averaging == "spiking":
        code = "k += acc / clip(nspk_map, 1, inf)\nacc = 0"
    else:
        positions = layer.shape[1] * layer.shape[2]
        code = f"k += acc / {float(positions)!r}\nacc = 0"
    return kernel.run_regularly(code, when=when, order=order, name=kernel.name + "_average")


def homeostasis_synapses(units: NeuronGroup, maps: NeuronGroup, layer: ConvLayer,
                         name: str) -> Synapses:
    """Every spike of map m counts in nspk_m (pathway ``pre``) and adds dtheta_spike to theta_m
    (pathway ``raise_theta``).

    Two pathways so that they can run at different times of the step: the count is needed by
    the STDP average within the threshold slot; the increment must come after the units' reset,
    so that a reset by subtraction removes the threshold that was tested (``v_th + theta``
    before this step's increment; see ``LIFParameters.reset``). Schedule both (see
    :func:`models.network.build_network`).
    """
    positions = layer.shape[1] * layer.shape[2]
    syn = Synapses(units, maps, on_pre={"pre": "nspk_post += 1",
                                        "raise_theta": "theta_post += dtheta_spike_post"},
                   dt=units.clock.dt, name=name)
    syn.connect(i=np.arange(layer.n_maps * positions, dtype=np.int32),
                j=np.repeat(np.arange(layer.n_maps), positions).astype(np.int32))
    return syn


def pool_synapses(source, target: NeuronGroup, layer: PoolLayer, weight: float,
                  name: str) -> Synapses:
    """Fixed pooling: every unit of a size×size window adds ``weight`` to its pooling unit."""
    pre, post = pool_connectivity(layer)
    syn = Synapses(source, target, on_pre=f"v_post += {float(weight)!r}",
                   dt=target.clock.dt, name=name)
    syn.connect(i=pre, j=post)
    return syn


def fc_synapses(source, target: NeuronGroup, layer: FCLayer, weights: np.ndarray,
                name: str) -> Synapses:
    """All-to-all synapses with weights ``(n_out, n_in)``, n_in flattened in (C, H, W) order."""
    n_in = layer.fan_in
    weights = np.asarray(weights, dtype=float)
    if weights.shape != (layer.n, n_in):
        raise ValueError(f"{name}: weights must have shape {(layer.n, n_in)} (n_out, n_in), "
                         f"got {weights.shape}")
    syn = Synapses(source, target, model="w : 1", on_pre="v_post += w",
                   dt=target.clock.dt, name=name)
    j, i = np.meshgrid(np.arange(layer.n), np.arange(n_in), indexing="ij")
    syn.connect(i=i.ravel().astype(np.int32), j=j.ravel().astype(np.int32))
    syn.w = weights.ravel()
    return syn
