"""Markers of the notebooks nbmake executes: every notebook is ``notebooks``; the slow ones
are ``slow`` too, so ``python -m pytest -m "not slow"`` stays a quick loop."""

import pytest

#: notebooks that take more than ~20 s on 2 cores
SLOW = {
    "03_conv_layer_learns_kernels.ipynb",  # pre-trains a conv layer on 300 digits
    "04_layerwise_pretraining.ipynb",  # pre-trains both conv layers of the deep net
    "05_spike_bp.ipynb",  # fine-tunes a small net for 200 iterations
    "07_export_gpu.ipynb",  # runs the exported shallow net on 10 digits
}


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items):
    for item in items:
        if item.path.suffix == ".ipynb":
            item.add_marker(pytest.mark.notebooks)
            if item.path.name in SLOW:
                item.add_marker(pytest.mark.slow)
