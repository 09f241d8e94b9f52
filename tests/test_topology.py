"""Topology strings parse into the paper's shapes; malformed ones are explained."""

import pytest

from models.topology import DEEP, SHALLOW, TopologyError, parse_topology


def test_shallow_and_deep_shapes():
    assert [l.shape for l in parse_topology(SHALLOW)] == [
        (1, 28, 28), (36, 24, 24), (36, 12, 12), (10, 1, 1)]
    deep = parse_topology(DEEP)
    assert [l.kind for l in deep] == ["input", "conv", "pool", "conv", "pool", "fc", "fc"]
    assert deep[3].shape == (50, 8, 8) and deep[3].fan_in == 5 * 5 * 20
    assert deep[5].fan_in == 50 * 4 * 4 and deep[6].fan_in == 200


def test_other_strings_and_channels():
    layers = parse_topology("32x32x3-8C3-2P-4FC")
    assert layers[1].shape == (8, 30, 30) and layers[1].fan_in == 27


@pytest.mark.parametrize("text, message", [
    ("", "non-empty"),
    ("28-36C5-10FC", "input size"),
    ("28x28", "no layers"),
    ("28x28-36C5-2P", "must end with a fully-connected"),
    ("28x28-36X5-10FC", "not a layer"),
    ("28x28-36C30-10FC", "larger than its input"),
    ("28x28-36C4-2P-10FC", "must tile"),
    ("28x28-10FC-36C5-10FC", "cannot follow a fully-connected"),
])
def test_malformed_strings_are_explained(text, message):
    with pytest.raises(TopologyError, match=message):
        parse_topology(text)
