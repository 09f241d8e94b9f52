"""Where Brian2 runs the network: the device is an option, the model code does not fork per device.

===================  ==========================================================================
``runtime``          Brian2's runtime mode with Cython code generation (the default).
``cpp_standalone``   one C++ program; built once, re-run on new images and weights with
                     ``device.run(run_args=...)`` (:class:`StandaloneProgram`), never recompiled.
``genn``             brian2genn (GPU through GeNN); lives in its own environment (docs/gpu.md) and
                     cannot express shared kernels or TimedArray input.
``cuda_standalone``  brian2cuda; generates and compiles CUDA code, needs a GPU to run.
===================  ==========================================================================
"""

from __future__ import annotations

import importlib
import os
import tempfile

from brian2 import get_device, prefs, set_device

DEVICES = ("runtime", "cpp_standalone", "genn", "cuda_standalone")

#: devices that build one program and run it as a whole (no Python between steps)
STANDALONE = ("cpp_standalone", "genn", "cuda_standalone")

_BACKEND_PACKAGE = {"genn": "brian2genn", "cuda_standalone": "brian2cuda"}


class DeviceError(ValueError):
    """An unknown device, or one whose backend package is not installed."""


def check_device(name: str) -> str:
    """Return ``name`` if it is a known device, else raise :class:`DeviceError`."""
    if name not in DEVICES:
        raise DeviceError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)}")
    return name


def use_device(name: str, directory: str | None = None, threads: int | None = None) -> str:
    """Make ``name`` Brian2's current device; return the standalone project directory (or '').

    Standalone devices are set with ``build_on_run=False``: the caller builds once through
    :class:`StandaloneProgram`. ``threads`` sets OpenMP threads for cpp_standalone (None: 0,
    i.e. single-threaded code, which on 2 cores is the fastest for these small layers).
    """
    check_device(name)
    if name == "runtime":
        set_device("runtime")
        prefs.codegen.target = "cython"
        return ""
    if name in _BACKEND_PACKAGE:
        package = _BACKEND_PACKAGE[name]
        try:
            importlib.import_module(package)
        except ImportError as err:
            raise DeviceError(
                f"device {name!r} needs the package {package!r}, which is not importable here "
                f"({err}); see docs/gpu.md (brian2genn needs its own environment with brian2 2.5)"
            ) from None
    if directory is None:
        directory = tempfile.mkdtemp(prefix=f"lee2018_{name}_")
    os.makedirs(directory, exist_ok=True)
    _fresh(name)
    kwargs = {"directory": directory, "build_on_run": False}
    set_device(name, **kwargs)
    if name == "cpp_standalone":
        prefs.devices.cpp_standalone.openmp_threads = int(threads or 0)
    # Brian2's default is a bare ``make -j``: one compiler (g++, or nvcc for cuda_standalone)
    # per source file at once (~40 of ~100 MB each for a conv layer), which on a small machine
    # with several builds running (sweep workers, parallel tests) drives the load past 70 and
    # can exhaust memory
    prefs.devices.cpp_standalone.extra_make_args_unix = [f"-j{os.cpu_count() or 1}"]
    return directory


def _fresh(name: str) -> None:
    """Clear a standalone device that already built a program in this process (Brian2 refuses
    to build a second one until the device is re-initialised): e.g. pre-training's second conv
    layer after its first, each one program."""
    from brian2.devices.device import all_devices

    existing = all_devices.get(name)
    if existing is not None and getattr(existing, "has_been_run", False):
        existing.reinit()


def is_standalone() -> bool:
    """True when the current Brian2 device builds a standalone program."""
    return type(get_device()).__name__ != "RuntimeDevice"


class StandaloneProgram:
    """A standalone program built once and re-run with new values (no recompilation).

    >>> prog = StandaloneProgram(net, duration)          # doctest: +SKIP
    >>> prog.build()                                     # compile once (seconds)
    >>> prog.run({kernel.k: new_kernels, stimulus: new_spike_table})   # fast, repeatable
    """

    def __init__(self, net, duration):
        self.net = net
        self.duration = duration
        self.built = False

    def build(self) -> None:
        """Generate and compile the program (one ``net.run`` is recorded, nothing is run)."""
        if self.built:
            raise RuntimeError("StandaloneProgram.build() called twice; it builds only once")
        self.net.run(self.duration)
        device = get_device()
        device.build(directory=device.project_dir, compile=True, run=False, with_output=False)
        self.built = True

    def run(self, run_args: dict | None = None) -> None:
        """Run the built program from t = 0, with initial values/tables from ``run_args``."""
        if not self.built:
            raise RuntimeError("StandaloneProgram.run() before build()")
        get_device().run(run_args=run_args or {}, with_output=False)
