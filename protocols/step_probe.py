"""How far would one SGD step move each layer? A probe of the step balance at the start of a run.

For a study (or sweep) configuration, builds the run's initial weights exactly as the study does
(seeded initialisation, pre-trained conv layers from ``--pretrained``, ``[initialisation]``
options), then takes the first ``--batches`` mini-batches of the run's schedule (same images, same
Poisson draws, same presentation length) and reports, for each, the relative step
‖η ΔW‖ / ‖W‖ of every trainable layer *from the initial weights* (the steps are not applied) and
every layer's spikes per image. This is the ``{layer}_rel_step`` diagnostic of ``metrics.csv``
(protocols/diagnostics.py) before any training, in seconds instead of a run.

Run::

    python -m protocols.step_probe --config configs/ablation/sum_gate.toml --arm pretrained \\
        --pretrained runs/x/pretrain/pretrained.npz [--seed 0] [--batches 3] \\
        [--set initialisation.pretrained_scale=init_rms] [--json out.json]

A sweep configuration contributes its ``[study]`` table and its first topology and init.
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from pathlib import Path

import numpy as np


def _parse_value(text: str):
    """A TOML literal (number, bool, quoted string), else the text as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def study_config(path: str | Path, overrides: list[str] = (), **top):
    """The StudyConfig of a study or sweep TOML, with ``section.key=value`` overrides and
    top-level replacements (arm, seed, pretrained)."""
    from protocols.config import ConfigError, load_config
    from protocols.study import StudyConfig

    try:
        raw = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"{path}: cannot read the TOML ({err})") from None
    if "study" in raw:  # a sweep: its shared settings and the first point of its grid
        study = dict(raw["study"])
        study.setdefault("topology", (raw.get("topologies") or [None])[0])
        study.setdefault("init", (raw.get("inits") or [None])[0])
        raw = {k: v for k, v in study.items() if v is not None}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: give section.key=value, e.g. "
                              f"initialisation.pretrained_scale=init_rms")
        *sections, name = key.split(".")
        table = raw
        for section in sections:
            table = table.setdefault(section, {})
        table[name] = _parse_value(value)
    raw.update({k: v for k, v in top.items() if v is not None})
    raw["out"] = raw.get("out", "unused")
    return load_config(raw, StudyConfig)


def probe(cfg, data, pretrained_file: str | None = None, batches: int = 3) -> list[dict]:
    """One row per batch: relative step per trainable layer and spikes per image per layer."""
    from models.batched import forward
    from models.topology import parse_topology
    from protocols.bp import backward, layer_learning_rates, sgd_step, tau_steps
    from protocols.diagnostics import layer_labels
    from protocols.encoding import n_steps
    from protocols.study import initial_parameters, load_pretrained_conv, train_config
    from protocols.train import draw_input, make_schedule

    layers = parse_topology(cfg.topology)
    pretrained, excluded = (load_pretrained_conv(pretrained_file, cfg.topology)
                            if pretrained_file else (None, np.zeros(0, dtype=np.int64)))
    tcfg = train_config(cfg)
    dtype = np.dtype(tcfg.training.dtype)
    schedule = make_schedule(len(data.train_labels), excluded, cfg.bp.batch_size, cfg.seed)
    etas = layer_learning_rates(layers, cfg.bp, pretrained is not None)
    tau_p = tau_steps(cfg.bp.tau_p, cfg.lif.dt)
    labels = layer_labels(layers)
    rows = []
    for b in range(batches):
        params = initial_parameters(cfg, pretrained, dtype)  # every step from the start
        epoch, idx = schedule.batch_indices(b)
        T = n_steps(cfg.bp.t_first_epoch if epoch == 1 else cfg.bp.t_later_epochs, cfg.lif.dt)
        x = draw_input(tcfg, data.train_images[idx], T, (2, b))  # the run's own input
        y = np.asarray(data.train_labels)[idx]
        out = forward(layers, params, x, cfg.lif, cfg.pooling, dtype=dtype, tau_p=tau_p,
                      keep_spikes=False, backend=tcfg.training.backend,
                      record_trace_m=cfg.bp.derivative == "lee2020")
        grads, _ = backward(layers, params, out, y, cfg.bp, cfg.lif, cfg.pooling)
        steps = sgd_step(params, grads, etas, cfg.bp.weight_decay)
        row = {"batch": b}
        for label, step, count in zip(labels, steps, out.count):
            if label is None:
                continue
            if step is not None:
                row[f"{label}_rel_step"] = step
            row[f"{label}_spikes"] = float(count.sum()) / len(y)
        rows.append(row)
    return rows


def main(argv=None) -> int:
    from protocols.runstate import cli

    return cli(_main, argv)


def _main(argv=None) -> int:
    import pandas as pd

    from protocols.datasets import load_dataset

    parser = argparse.ArgumentParser(prog="python -m protocols.step_probe",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="study or sweep TOML")
    parser.add_argument("--arm", choices=("supervised", "pretrained"))
    parser.add_argument("--seed", type=int)
    parser.add_argument("--pretrained", help="pretrained.npz of a pre-training (arm pretrained)")
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one option, e.g. bp.conv_reduction=sum")
    parser.add_argument("--data-dir", help="dataset folder (default: protocols.datasets rules)")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    from protocols.config import ConfigError

    if args.batches < 1:
        raise ConfigError("--batches must be at least 1")
    cfg = study_config(args.config, args.set, arm=args.arm, seed=args.seed,
                       pretrained=args.pretrained)
    if cfg.arm == "pretrained" and not cfg.pretrained:
        raise ConfigError("arm 'pretrained' needs --pretrained PATH (a pretrained.npz): the probe "
                          "does not pre-train")
    data = load_dataset(cfg.dataset, args.data_dir)
    rows = probe(cfg, data, cfg.pretrained or None, args.batches)
    frame = pd.DataFrame(rows)
    print(f"{cfg.topology}, arm {cfg.arm}, seed {cfg.seed}: the first {args.batches} batches, "
          f"each step from the initial weights")
    print(frame.to_markdown(index=False, floatfmt=".4g"))
    if args.json:
        from protocols.records import atomic_write_json

        atomic_write_json(args.json, {"config": args.config, "set": args.set, "arm": cfg.arm,
                                      "seed": cfg.seed, "pretrained": cfg.pretrained,
                                      "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
