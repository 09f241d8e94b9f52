r"""Export a trained network as a brian2cuda (``cuda_standalone``) project (docs/gpu.md).

Run (in the brian2cuda environment, ``bash envs/make-cuda-env.sh`` creates ``.venv-cuda``)::

    .venv-cuda/bin/python -m protocols.export_cuda --run runs/x [--weights checkpoint.npz] \
        [--n-images 100] [--compile] [--compare] --out runs/cuda_shallow
    .venv-cuda/bin/python -m protocols.export_cuda --init lee --plastic --out runs/cuda_stdp

``--run`` takes a trainer's run folder: the network is built with the topology, LIF membrane
(tau_m, dt, reset), pooling, input rate and tau_p recorded in its ``config.json``, from its
``final.npz``; weights without that record, or that do not fit it, are refused
(:func:`protocols.export_genn.read_run`). ``--compare`` adds the trainer's forward pass on the
same input spikes to the manifest after a run (``trainer_comparison``).

Unlike brian2genn, brian2cuda runs on Brian2 >= 2.9, so the network is the package's own
:func:`models.network.build_network`: shared kernels as *linked* synaptic variables, the
schedule of docs/method.md §2 through ``when``/``order`` (a spike crosses every layer in the step it is
emitted: no lag, identical to the trainer), input from a SpikeGeneratorGroup playing pre-drawn
Poisson spikes of N images one after another, and the per-presentation reset of
``build_network(presentation=T)`` (a ``run_regularly`` at the start of each image). With a GPU
(``nvidia-smi`` lists one) the project is compiled, run, and the output spike counts are read
back into an accuracy; without one, code is generated, and ``--compile`` also compiles it with
nvcc (it cannot run).

``--plastic`` generates the STDP pre-training network of conv layer 1 instead (plastic shared
kernels, homeostasis, TimedArray input) so that its generated kernels can be inspected: every
STDP update ``acc_k += ...`` of a synapse writes the *shared* kernel entry ``acc[kidx]``, which
many synapses of a post-synaptic spike address at once. brian2cuda detects the repeated index
(``kidx`` is neither the synapse nor a unique neuron index) and emits ``_brian_atomicAdd``
for it (see docs/gpu.md); :func:`atomic_writes` lists them from the generated code.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from models.topology import ConvLayer
from protocols.export_genn import (ExportError, Presentation, RunRecord, _duration,
                                   add_common_arguments, compare_with_trainer, draw_presentation,
                                   record_and_params, score, slot_counts)


def gpu_available() -> bool:
    """True when ``nvidia-smi`` runs and lists at least one GPU."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return False
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def cuda_path() -> str | None:
    """``$CUDA_PATH``, else ``/usr/local/cuda`` when it holds nvcc."""
    if os.environ.get("CUDA_PATH"):
        return os.environ["CUDA_PATH"]
    if os.path.isfile("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    return None


def curand_dirs(project: Path) -> tuple[str, str] | None:
    """Include and library folder of cuRAND when the CUDA toolkit lacks it, else None.

    A toolkit installed with nvcc only has no ``curand.h``; the PyPI wheel ``nvidia-curand``
    (in envs/cuda-requirements.txt) ships the header and ``libcurand.so.10``. The generated
    makefile links ``-lcurand``, so a ``libcurand.so`` link to it is made inside the project.
    """
    path = cuda_path()
    if path is not None and os.path.isfile(os.path.join(path, "include", "curand.h")):
        return None
    try:
        import nvidia
    except ImportError:
        return None
    for root in map(Path, nvidia.__path__):
        for header in sorted(root.glob("*/include/curand.h")):
            libs = sorted(header.parent.parent.glob("lib/libcurand.so*"))
            if not libs:
                continue
            link_dir = project / "curand_lib"
            link_dir.mkdir(parents=True, exist_ok=True)
            link = link_dir / "libcurand.so"
            if not link.exists():
                link.symlink_to(libs[0])
            return str(header.parent), str(link_dir)
    return None


def configure(project: Path, compute_capability: float, gpu: bool) -> None:
    """brian2cuda preferences: without a GPU, no detection and a fixed compute capability."""
    from brian2 import prefs

    path = cuda_path()
    if path is not None:
        prefs.devices.cuda_standalone.cuda_backend.cuda_path = path
    curand = curand_dirs(project)
    if curand is not None:
        prefs.codegen.cpp.include_dirs = [*prefs.codegen.cpp.include_dirs, curand[0]]
        prefs.codegen.cpp.library_dirs = [*prefs.codegen.cpp.library_dirs, curand[1]]
        prefs.codegen.cpp.runtime_library_dirs = [*prefs.codegen.cpp.runtime_library_dirs,
                                                  curand[1]]
    if not gpu:
        prefs.devices.cuda_standalone.cuda_backend.detect_gpus = False
        prefs.devices.cuda_standalone.cuda_backend.gpu_id = 0
        prefs.devices.cuda_standalone.cuda_backend.compute_capability = float(compute_capability)


def nvcc_major() -> int | None:
    """Major version of the CUDA compiler brian2cuda will use, or None without nvcc."""
    path = cuda_path()
    nvcc = os.path.join(path, "bin", "nvcc") if path else shutil.which("nvcc")
    if not nvcc or not os.path.exists(nvcc):
        return None
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    match = re.search(r"release (\d+)\.", out)
    return int(match[1]) if match else None


def patch_makefile(project: Path) -> bool:
    """brian2cuda 1.0b1 compiles with ``-std=c++11``; CUDA >= 12's Thrust/CUB need C++17.

    Rewrites the generated makefile to C++17 for nvcc >= 12; returns whether it changed it.
    """
    major = nvcc_major()
    if major is None or major < 12:
        return False
    makefile = project / "makefile"
    text = makefile.read_text()
    patched = text.replace("-std=c++11", "-std=c++17")
    makefile.write_text(patched)
    return patched != text


def compile_project(project: Path) -> float:
    """``make -jN`` in the project (brian2's own step, after :func:`patch_makefile`)."""
    t0 = time.perf_counter()
    result = subprocess.run(["make", f"-j{os.cpu_count() or 1}"], cwd=project,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise ExportError(f"compiling {project} failed (make exit {result.returncode}):\n"
                          f"{result.stdout[-3000:]}{result.stderr[-3000:]}")
    return time.perf_counter() - t0


def atomic_writes(project: str | os.PathLike) -> dict:
    """Atomic operations per generated source file: ``{file: [target array, ...]}``."""
    found = {}
    for path in sorted(Path(project, "code_objects").glob("*.cu")):
        text = path.read_text()
        hits = re.findall(r"_brian_atomic\w+\(&(\w+)\[", text)
        if hits:
            found[path.name] = sorted(set(hits))
    return found


def stacked_input(presentation: Presentation) -> np.ndarray:
    """``(N·T, C, H, W)`` bool: the images' spike trains one after another (no gap)."""
    s = np.moveaxis(presentation.spikes, 1, 0)
    return s.reshape(-1, *s.shape[2:])


def export(record: RunRecord, layers, params, presentation: Presentation, out, *,
           plastic: bool = False, compile: bool = False, run: bool | None = None,
           compute_capability: float = 8.0, source: str = "", seed: int = 0,
           compare: bool = False) -> dict:
    """Write (and optionally compile / run) the brian2cuda project; return its manifest.

    ``record``: the run's parameters (:func:`protocols.export_genn.read_run`, or
    ``default_record`` for a fresh initialisation); ``compare``: after a run, add the trainer's
    forward pass on the same spikes (``trainer_comparison``).
    """
    import brian2
    import brian2cuda  # noqa: F401  (registers 'cuda_standalone')
    from brian2 import NeuronGroup, defaultclock, device, second

    from models.devices import use_device
    from models.network import build_network

    out = Path(out).resolve()
    if out.exists() and any(out.iterdir()):
        if not (out / "manifest.json").is_file():
            raise ExportError(f"{out} exists and is not an export project; choose another --out")
        shutil.rmtree(out)
    gpu = gpu_available()
    if run is None:
        run = gpu
    if run and not gpu:
        raise ExportError("running a cuda_standalone project needs a GPU (nvidia-smi lists none)")
    topology, lif, pool = record.topology, record.lif, record.pool
    use_device("cuda_standalone", directory=str(out))
    configure(out, compute_capability, gpu)
    weights = [p.weights if p is not None else None for p in params]
    thresholds = [p.thresholds if p is not None else None for p in params]
    steps = presentation.n_images * presentation.steps
    if plastic:
        if not isinstance(layers[1], ConvLayer):
            raise ExportError("--plastic needs a conv layer after the input")
        sn = build_network(topology, weights, thresholds, input_mode="stimulus",
                           stimulus_steps=steps, presentation=presentation.steps * lif.dt,
                           plastic_layer=1, up_to=1, lif=lif, pool=pool, monitor=[1])
    else:
        sn = build_network(topology, weights, thresholds,
                           input_spikes=stacked_input(presentation),
                           presentation=presentation.steps * lif.dt, lif=lif, pool=pool,
                           monitor=[len(layers) - 1])
    # brian2cuda 1.0b1's synapse kernels read `defaultclock.timestep` even when no object uses
    # defaultclock (build_network gives every group a clock of lif.dt): anchor one on it
    defaultclock.dt = lif.dt
    sn.net.add(NeuronGroup(1, "", name="defaultclock_anchor"))
    t0 = time.perf_counter()
    sn.net.run(steps * lif.dt)
    device.build(directory=str(out), compile=False, run=False, with_output=True)
    generate_s = time.perf_counter() - t0
    patched = patch_makefile(out)
    compile_s = compile_project(out) if (compile or run) else None
    if run:
        device.run(directory=str(out), with_output=True)
    elapsed = time.perf_counter() - t0
    last = len(sn.layers) - 1
    mon = sn.monitors[last]
    manifest = {
        "topology": topology, "source": source, "seed": seed, "plastic": plastic,
        "dt_s": float(lif.dt / second),
        "tau_m_s": float(lif.tau_m / second),
        "reset": lif.reset,
        "tau_p_steps": record.tau_p_steps,
        "record": record.describe(),
        "layers": [{"name": g.name, "kind": layer.kind, "shape": list(layer.shape)}
                   for g, layer in zip(sn.groups, sn.layers)],
        "timeline": {"n_images": presentation.n_images,
                     "presentation_steps": presentation.steps, "gap_steps": 0,
                     "total_steps": steps, "input_spikes": int(presentation.spikes.sum())},
        "dataset": presentation.dataset, "split": presentation.split,
        "image_indices": presentation.image_indices.tolist(),
        "labels": presentation.labels.tolist(),
        "compute_capability": None if gpu else compute_capability,
        "compiled": bool(compile or run), "ran": bool(run),
        "atomic_writes": atomic_writes(out),
        "versions": {"python": sys.version.split()[0], "brian2": brian2.__version__,
                     "brian2cuda": getattr(brian2cuda, "__version__", "?"),
                     "numpy": np.__version__},
        "makefile_cxx17": patched,
        "generate_s": round(generate_s, 3),
        "compile_s": None if compile_s is None else round(compile_s, 1),
        "generate_compile_run_s": round(elapsed, 3),
    }
    if run and not plastic:
        st = np.rint(np.asarray(mon.t[:] / lif.dt)).astype(np.int64)
        counts, trace = slot_counts(np.asarray(mon.i[:]), st, int(np.prod(layers[-1].shape)),
                                    presentation.steps, 0, presentation.n_images, 0,
                                    record.tau_p_steps)
        manifest["result"] = {**score(counts, trace, presentation.labels),
                              "counts": counts.tolist()}
        if compare:
            manifest["trainer_comparison"] = compare_with_trainer(
                counts, trace, layers, params, presentation, record)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m protocols.export_cuda",
                                     description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--plastic", action="store_true",
                        help="generate the STDP pre-training network of conv layer 1 instead")
    parser.add_argument("--compile", action="store_true",
                        help="compile with nvcc even without a GPU (it cannot run)")
    parser.add_argument("--no-run", action="store_true", help="do not run even with a GPU")
    parser.add_argument("--compute-capability", type=float, default=8.0,
                        help="target when no GPU is detected (default 8.0)")
    args = parser.parse_args(argv)
    if not args.out:
        parser.error("--out is required (the project directory to write)")
    try:
        record, layers, params, source = record_and_params(args)
        try:
            import brian2cuda  # noqa: F401
        except ImportError:
            raise ExportError("brian2cuda is not importable in this environment: run "
                              "`bash envs/make-cuda-env.sh` and use .venv-cuda/bin/python"
                              ) from None
        pres = draw_presentation(args.dataset, args.n_images, _duration(args.duration),
                                 args.seed, 0, split=args.split, first=args.first_image,
                                 max_rate=record.input.max_rate, lif=record.lif,
                                 channels=layers[0].shape[0])
        t0 = time.perf_counter()
        manifest = export(record, layers, params, pres, args.out, plastic=args.plastic,
                          compile=args.compile, run=False if args.no_run else None,
                          compute_capability=args.compute_capability, source=source,
                          seed=args.seed, compare=args.compare)
    except ExportError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    summary = {k: manifest[k] for k in ("layers", "timeline", "compiled", "ran",
                                        "atomic_writes")}
    summary["project"] = str(Path(args.out).resolve())
    summary["export_wall_s"] = round(time.perf_counter() - t0, 2)
    if "result" in manifest:
        summary["accuracy"] = manifest["result"]["accuracy"]
    if "trainer_comparison" in manifest:
        summary["trainer_comparison"] = {k: v for k, v in manifest["trainer_comparison"].items()
                                         if k != "trainer_predictions"}
    print(json.dumps(summary, indent=1))
    if not manifest["ran"]:
        print(f"\nNo GPU here: {'compiled' if manifest['compiled'] else 'generated'} only. "
              f"On a machine with a GPU: cd {summary['project']} && make && ./main "
              f"(or re-run this command there: it compiles, runs and reads back the counts).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
