"""Images per second of STDP pre-training in Brian2 (cpp_standalone by default).

Measures, in one process:

* the machine's float32 matrix-product rate (GFLOP/s of a 1024×1024 @ 1024×1024 product, best
  of 5), a reference for comparing machines;
* the shallow net's conv layer (``28x28-36C5``) trained with STDP + homeostasis on real MNIST
  images, 25 ms each: build (compile) time, then images/s over ``--images`` images in runs of
  ``--batch`` images (each run a re-run of the same built program with new stimulus, kernels and
  thresholds via run_args — what protocols.pretrain does);
* the same for the deep net's two conv layers (conv 2 trained on the pooled spikes of a frozen
  conv 1).

Run::

    MNIST_DIR=/path/to/mnist python -m benchmarks.bench_stdp --images 400
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile

import numpy as np

from benchmarks.reference import sgemm_gflops


def bench_layer(topology: str, index: int, frozen: dict, images, device: str, batch: int,
                seed: int = 0) -> dict:
    from protocols.pretrain import PretrainConfig, pretrain_layer
    from models.parameters import PretrainingParameters

    cfg = PretrainConfig(topology=topology, device=device,
                         pretraining=PretrainingParameters(n_images=len(images),
                                                           batch_images=batch))
    rng = np.random.default_rng(seed)
    directory = tempfile.mkdtemp(prefix="bench_stdp_")
    result = pretrain_layer(topology, index, frozen, images, rng, cfg, progress=False,
                            directory=directory)
    from brian2 import device as b2device

    b2device.reinit()
    b2device.activate()
    return {"topology": topology, "layer": index, "device": device, "images": len(images),
            "batch": batch, "build_s": round(result["build_s"], 2),
            "run_s": round(result["run_s"], 2),
            "images_per_s": round(len(images) / result["run_s"], 1),
            "spikes_per_image": float(result["spikes_per_image"].mean()),
            "kernels": result["kernels"], "thresholds": result["thresholds"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--device", default="cpp_standalone")
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--skip-deep", action="store_true")
    args = parser.parse_args(argv)
    from protocols.datasets import load_dataset

    images = load_dataset(args.dataset).train_images[: args.images]
    report = {"machine": platform.platform(), "cpus": os.cpu_count(),
              "float32_matmul_gflops": round(sgemm_gflops(), 1)}
    print(f"float32 matmul: {report['float32_matmul_gflops']} GFLOP/s "
          f"({report['cpus']} CPUs, {report['machine']})", flush=True)
    rows = []
    shallow = bench_layer("28x28-36C5-2P-10FC", 1, {}, images, args.device, args.batch)
    rows.append(shallow)
    if not args.skip_deep:
        deep = "28x28-20C5-2P-50C5-2P-200FC-10FC"
        d1 = bench_layer(deep, 1, {}, images, args.device, args.batch)
        d2 = bench_layer(deep, 3, {1: (d1["kernels"], d1["thresholds"])}, images, args.device,
                         args.batch)
        rows += [d1, d2]
    for row in rows:
        row.pop("kernels"), row.pop("thresholds")
        print(f"{row['topology']} conv layer {row['layer']} [{row['device']}]: "
              f"build {row['build_s']} s, {row['images_per_s']} images/s "
              f"({row['images']} images in runs of {row['batch']}; "
              f"{row['spikes_per_image']:.0f} spikes/image)", flush=True)
    report["rows"] = rows
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
