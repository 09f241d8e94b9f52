"""The batched trainer simulates the same network as Brian2: identical spikes, layer by layer.

docs/method.md §2 asks that one set of equations drive both. Here the shallow net of the paper, with
Lee-initialised weights scaled so that every layer fires, receives the same Poisson spikes of real
MNIST digits in Brian2 (runtime device) and in ``models.batched.forward`` (float64, both the
compiled and the plain array backend).
"""

import numpy as np
import pytest
from brian2 import ms

from models.batched import forward
from models.initialisation import initialise
from models.network import brian2_layer_spikes
from models.parameters import InitParameters
from models.topology import SHALLOW, parse_topology
from protocols.datasets import load_dataset
from protocols.encoding import poisson_spikes

# ~7 min on 2 cores: the whole shallow net in Brian2 for 3 digits × 2 backends
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shallow_case():
    layers = parse_topology(SHALLOW)
    # alpha = 2: thresholds low enough that conv, pooling and output layers all spike
    params = initialise(layers, np.random.default_rng(7), "lee", InitParameters(alpha=2.0),
                        dtype=np.float64)
    images = load_dataset("mnist-5k").test_images[[3, 512, 901]]
    spikes = poisson_spikes(images[:, None], 30 * ms, np.random.default_rng(11))
    return layers, params, spikes


@pytest.mark.parametrize("backend", ["auto", "xp"])
def test_trainer_spikes_equal_brian2_spikes_layer_by_layer(shallow_case, backend):
    layers, params, spikes = shallow_case
    batched = forward(layers, params, spikes, dtype=np.float64, backend=backend)
    weights = [None if p is None else p.weights for p in params]
    thresholds = [None if p is None else p.thresholds for p in params]
    for image in range(spikes.shape[1]):
        reference = brian2_layer_spikes(SHALLOW, weights, thresholds, spikes[:, image])
        for index, layer in enumerate(layers):
            ours = batched.spikes[index][:, image].reshape(reference[index].shape)
            assert ours.sum() > 0, f"layer {index} ({layer.kind}) is silent: the test needs spikes"
            np.testing.assert_array_equal(ours, reference[index],
                                          err_msg=f"image {image}, layer {index} ({layer.kind})")
