"""Shared fixtures: real MNIST when the user points at it, and a clean Brian2 device per test."""

import os
from pathlib import Path

import pytest


@pytest.fixture
def mnist_dir() -> Path:
    """The folder of the real MNIST IDX files (``$MNIST_DIR``); the test skips without it."""
    value = os.environ.get("MNIST_DIR")
    if not value or not Path(value).is_dir():
        pytest.skip("set MNIST_DIR to the folder of the four MNIST IDX files (CI does)")
    return Path(value)


@pytest.fixture(autouse=True)
def brian2_device_teardown():
    """Reset Brian2's device after each test, as brian2/conftest.py does for standalone runs."""
    yield
    import sys

    if "brian2" in sys.modules:
        from brian2 import device, set_device

        device.reinit()
        device.activate()
        set_device("runtime")
