r"""Random initialisation of the trainable layers (docs/method.md §5).

Both schemes draw every weight from a uniform distribution and set each layer's firing
threshold proportional to the width of that distribution [paper, §3: "the neuronal firing
thresholds are set proportional to the strength of the synaptic distribution"]:

.. math::
    w \sim U[-k, k], \qquad v_{th} = \alpha\, k

* ``lee`` (Lee, Delbruck & Pfeiffer 2016) [recon]: :math:`k = \sqrt{3 / n_{in}}`, with
  :math:`n_{in}` the fan-in (``5·5·C_in`` for a 5×5 convolution, the input size for FC);
* ``glorot`` (Glorot & Bengio 2010) [recon]: :math:`k = \sqrt{6 / (n_{in} + n_{out})}`, with
  :math:`n_{out}` the fan-out (``5·5·n_maps`` for a convolution, the layer size for FC).

α is :attr:`models.parameters.InitParameters.alpha` [choice]; the reason is given there.
Randomness comes only from the ``numpy.random.Generator`` passed in.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from models.batched import LayerParams, weight_shape
from models.parameters import InitParameters
from models.topology import ConvLayer, FCLayer, Layer

SCHEMES = ("lee", "glorot")


def init_range(layer: Layer, scheme: str) -> float:
    """Half-width k of the uniform weight distribution of ``layer`` under ``scheme``."""
    if scheme not in SCHEMES:
        raise ValueError(f"initialisation scheme must be one of {', '.join(SCHEMES)}, "
                         f"got {scheme!r}")
    n_in = layer.fan_in
    if scheme == "lee":
        return math.sqrt(3.0 / n_in)
    if isinstance(layer, ConvLayer):
        n_out = layer.kernel * layer.kernel * layer.n_maps
    else:
        n_out = layer.n
    return math.sqrt(6.0 / (n_in + n_out))


def initialise(
    layers: Sequence[Layer],
    rng: np.random.Generator,
    scheme: str = "lee",
    init: InitParameters = InitParameters(),
    dtype=np.float32,
) -> list[LayerParams | None]:
    """Weights and thresholds of every conv and FC layer; None for input and pooling layers.

    >>> from models.topology import parse_topology, SHALLOW
    >>> p = initialise(parse_topology(SHALLOW), np.random.default_rng(0))
    >>> p[1].weights.shape, p[1].thresholds.shape, p[3].weights.shape
    ((36, 1, 5, 5), (36,), (10, 5184))
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError("rng must be a numpy.random.Generator, e.g. np.random.default_rng(seed)")
    params: list[LayerParams | None] = []
    for layer in layers:
        if not isinstance(layer, (ConvLayer, FCLayer)):
            params.append(None)
            continue
        k = init_range(layer, scheme)
        shape = weight_shape(layer)
        w = rng.uniform(-k, k, size=shape).astype(dtype)
        th = np.full(shape[0], init.alpha * k, dtype=dtype)
        params.append(LayerParams(w, th))
    return params
