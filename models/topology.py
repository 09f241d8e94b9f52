"""Network topology strings, as the paper names its nets.

``28x28-36C5-2P-10FC`` reads: a 28×28 input (one channel), a convolution with 36 maps of
5×5 kernels (stride 1, no padding), 2×2 non-overlapping pooling, a fully-connected layer of
10 units. ``28x28x3-...`` gives an input with 3 channels. Both the Brian2 network builder and
the batched trainer take their shapes from :func:`parse_topology`, so neither hard-codes a net.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Union

SHALLOW = "28x28-36C5-2P-10FC"
DEEP = "28x28-20C5-2P-50C5-2P-200FC-10FC"

#: shape of a layer's output: (channels, height, width); FC layers are (n, 1, 1)
Shape = tuple[int, int, int]


class TopologyError(ValueError):
    """A topology string that does not parse, or whose shapes do not fit."""


@dataclass(frozen=True)
class InputLayer:
    shape: Shape

    kind = "input"


@dataclass(frozen=True)
class ConvLayer:
    n_maps: int
    kernel: int
    in_shape: Shape
    shape: Shape

    kind = "conv"

    @property
    def fan_in(self) -> int:
        """Inputs seen by one unit: kernel × kernel × input channels."""
        return self.kernel * self.kernel * self.in_shape[0]


@dataclass(frozen=True)
class PoolLayer:
    size: int
    in_shape: Shape
    shape: Shape

    kind = "pool"


@dataclass(frozen=True)
class FCLayer:
    n: int
    in_shape: Shape
    shape: Shape

    kind = "fc"

    @property
    def fan_in(self) -> int:
        c, h, w = self.in_shape
        return c * h * w


Layer = Union[InputLayer, ConvLayer, PoolLayer, FCLayer]

_INPUT = re.compile(r"^(\d+)x(\d+)(?:x(\d+))?$")
_CONV = re.compile(r"^(\d+)C(\d+)$")
_POOL = re.compile(r"^(\d+)P$")
_FC = re.compile(r"^(\d+)FC$")


def parse_topology(text: str) -> list[Layer]:
    """Parse a topology string into layers with their input and output shapes.

    >>> [layer.kind for layer in parse_topology(SHALLOW)]
    ['input', 'conv', 'pool', 'fc']
    >>> parse_topology(SHALLOW)[2].shape
    (36, 12, 12)
    """
    if not isinstance(text, str) or not text.strip():
        raise TopologyError(f"topology must be a non-empty string like {SHALLOW!r}, got {text!r}")
    tokens = text.strip().split("-")
    match = _INPUT.match(tokens[0])
    if not match:
        raise TopologyError(
            f"topology {text!r}: first part {tokens[0]!r} must be the input size HxW or HxWxC, "
            f"e.g. '28x28'"
        )
    h, w, c = int(match[1]), int(match[2]), int(match[3] or 1)
    if min(h, w, c) < 1:
        raise TopologyError(f"topology {text!r}: input size must be positive, got {tokens[0]!r}")
    layers: list[Layer] = [InputLayer((c, h, w))]
    if len(tokens) < 2:
        raise TopologyError(f"topology {text!r} has no layers after the input")
    for position, token in enumerate(tokens[1:], start=2):
        shape = layers[-1].shape
        where = f"topology {text!r}, part {position} ({token!r})"
        if m := _CONV.match(token):
            n_maps, kernel = int(m[1]), int(m[2])
            if isinstance(layers[-1], FCLayer):
                raise TopologyError(f"{where}: a convolution cannot follow a fully-connected layer")
            if n_maps < 1 or kernel < 1:
                raise TopologyError(f"{where}: maps and kernel size must be positive")
            if kernel > shape[1] or kernel > shape[2]:
                raise TopologyError(
                    f"{where}: kernel {kernel}x{kernel} is larger than its input "
                    f"{shape[1]}x{shape[2]}; use a smaller kernel or a larger input"
                )
            out = (n_maps, shape[1] - kernel + 1, shape[2] - kernel + 1)
            layers.append(ConvLayer(n_maps, kernel, shape, out))
        elif m := _POOL.match(token):
            size = int(m[1])
            if isinstance(layers[-1], FCLayer):
                raise TopologyError(f"{where}: pooling cannot follow a fully-connected layer")
            if size < 1 or shape[1] % size or shape[2] % size:
                raise TopologyError(
                    f"{where}: {size}x{size} pooling must tile its {shape[1]}x{shape[2]} input "
                    f"exactly (non-overlapping windows)"
                )
            layers.append(PoolLayer(size, shape, (shape[0], shape[1] // size, shape[2] // size)))
        elif m := _FC.match(token):
            n = int(m[1])
            if n < 1:
                raise TopologyError(f"{where}: a fully-connected layer needs at least one unit")
            layers.append(FCLayer(n, shape, (n, 1, 1)))
        else:
            raise TopologyError(
                f"{where}: not a layer; expected NCk (convolution, e.g. '36C5'), "
                f"kP (pooling, e.g. '2P') or NFC (fully connected, e.g. '10FC')"
            )
    if not isinstance(layers[-1], FCLayer):
        raise TopologyError(f"topology {text!r} must end with a fully-connected output layer")
    return layers
