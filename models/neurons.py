r"""Neuron models of the study as Brian2 equations (docs/method.md §1-3).

LIF membrane of every trainable layer and of the pooling layers [paper + recon]:

.. math::
    \tau_m \frac{dV}{dt} = -V + \sum_i w_i \sum_k \delta(t - t_k^i)

integrated with Brian2's ``exact`` method, i.e. per step of length dt
:math:`V \leftarrow e^{-dt/\tau_m} V`; the synaptic jumps :math:`V \mathrel{+}= w_i` are added by
the incoming synapses *after* the decay and *before* the threshold test of the same step, so that

.. math::
    V[t] = e^{-dt/\tau_m} V[t-1] + \sum_i w_i s_i[t], \qquad
    s[t] = [V[t] \ge v_{th} + \theta], \qquad
    \text{if } s[t]:\; V[t] \leftarrow 0 \;(\text{or } V[t] - (v_{th} + \theta))

exactly the discrete form of the batched trainer (the schedule is set in
:mod:`models.network`). A reset by subtraction removes the threshold that was tested,
:math:`v_{th} + \theta` with :math:`\theta` as it was *before* this step's homeostatic increment
(the increment below is applied after the reset); :math:`\theta = 0` outside the plastic layer,
and the trainer's thresholds are the frozen effective ones, so there it is simply
:math:`V - v_{th}` (reason: ``LIFParameters.reset``).

Feature-map-wise homeostasis [paper, docs/method.md §3.3]: every map m has one threshold offset
:math:`\theta_m` shared by all its units,

.. math::
    \theta_m[t] = e^{-dt/\tau_\theta}\,\theta_m[t-1] + \Delta\theta \cdot n_m[t]

where :math:`n_m[t]` is the number of units of map m that fired at step t ("a spike anywhere in
map m raises the threshold of every unit of map m by Δθ"; each spike counts [recon]). The map
group holds :math:`\theta_m`; the units read it through a linked variable.
"""

from __future__ import annotations

import numpy as np
from brian2 import NeuronGroup, linked_var

from models.parameters import HomeostasisParameters, LIFParameters, PoolingParameters

#: membrane of every LIF unit; ``v_th`` is the unit's base threshold (per map for conv layers)
LIF_EQS = """
dv/dt = -v / tau_m : 1
v_th : 1 (constant)
"""

#: plastic conv units additionally read their map's homeostatic offset
LIF_THETA_EQS = LIF_EQS + """
theta : 1 (linked)
"""

#: one unit per feature map: the homeostatic threshold offset and this step's spike count
MAP_EQS = """
dtheta/dt = -theta / tau_theta : 1
nspk : 1
dtheta_spike : 1 (shared)
"""

#: input units: fire when the stimulus table says so (used when inputs are re-set via run_args)
STIMULUS_INPUT_EQS = """
t_start : second (shared)
"""


def _reset(lif: LIFParameters, with_theta: bool) -> str:
    if lif.reset == "zero":
        return "v = 0"
    # theta is still the tested value here: homeostasis raises it later in the step
    # (models.network schedules the increment in the ``end`` slot, after the resets)
    return "v -= v_th + theta" if with_theta else "v -= v_th"


def lif_group(
    n: int,
    lif: LIFParameters,
    v_th,
    name: str,
    with_theta: bool = False,
    track_lastspike: bool = False,
    clock=None,
    window_trace: bool = False,
) -> NeuronGroup:
    """A group of ``n`` LIF units with per-unit base threshold ``v_th`` (scalar or ``(n,)``).

    ``with_theta`` adds a linked homeostatic offset (threshold ``v >= v_th + theta``); link it
    with :func:`link_theta`. ``track_lastspike`` records ``lastspike`` at the threshold test,
    which a downstream STDP synapse reads as its pre-synaptic trace (refractory period 0:
    the unit may fire in every step). ``clock``: run on this Brian2 ``Clock`` (e.g.
    ``defaultclock`` for brian2genn, which supports a single clock) instead of a clock of
    ``lif.dt``. ``window_trace`` adds ``xsum`` (reset to 0 with the membrane), the sum of input
    traces that STDP's ``window_mean`` offset gathers at a spike.
    """
    eqs = LIF_THETA_EQS if with_theta else LIF_EQS
    reset = _reset(lif, with_theta)
    if window_trace:  # the STDP offset's sum of input traces, gathered at this unit's spikes
        eqs += "xsum : 1\n"
        reset += "\nxsum = 0"
    threshold = "v >= v_th + theta" if with_theta else "v >= v_th"
    group = NeuronGroup(
        n,
        eqs,
        threshold=threshold,
        reset=reset,
        refractory=0 * lif.dt if track_lastspike else False,
        method="exact",
        namespace={"tau_m": lif.tau_m},
        dt=lif.dt if clock is None else None,
        clock=clock,
        name=name,
    )
    v_th = np.broadcast_to(np.asarray(v_th, dtype=float), (n,))
    group.v_th = v_th
    return group


def pooling_group(n: int, lif: LIFParameters, pool: PoolingParameters, name: str,
                  track_lastspike: bool = False, clock=None) -> NeuronGroup:
    """Fixed pooling units: the same LIF membrane with threshold ``pool.v_th`` [paper: 0.8]."""
    return lif_group(n, lif, pool.v_th, name, track_lastspike=track_lastspike, clock=clock)


def map_group(n_maps: int, homeo: HomeostasisParameters, dt, name: str) -> NeuronGroup:
    """One unit per feature map holding its homeostatic offset theta (starts at 0)."""
    group = NeuronGroup(
        n_maps,
        MAP_EQS,
        method="exact",
        namespace={"tau_theta": homeo.tau_theta},
        dt=dt,
        name=name,
    )
    group.dtheta_spike = homeo.delta_theta
    return group


def link_theta(units: NeuronGroup, maps: NeuronGroup, map_of_unit: np.ndarray) -> None:
    """Let every unit read the offset of its map (``map_of_unit[i]`` = map index of unit i)."""
    units.theta = linked_var(maps, "theta", index=np.asarray(map_of_unit, dtype=np.int64))


def stimulus_input_group(n: int, stimulus_name: str, dt, name: str) -> NeuronGroup:
    """Input units that spike when the 2-D TimedArray ``stimulus_name`` (T, n) is > 0.5.

    Used where the input must be replaced without recompiling (cpp_standalone
    ``device.run(run_args={timed_array: values})``): a SpikeGeneratorGroup's spike arrays are
    read-only and of fixed size in a built standalone program, a TimedArray's values are not.
    ``t_start`` shifts the table so the runtime device can present new images after ``t > 0``.
    """
    return NeuronGroup(
        n,
        STIMULUS_INPUT_EQS,
        threshold=f"{stimulus_name}(t - t_start, i) > 0.5",
        refractory=0 * dt,
        dt=dt,
        name=name,
    )
