"""One arm of the study (docs/method.md §6): optional STDP pre-training, then spike-based BP fine-tuning.

Arms [paper]:

* ``pretrained``: the conv kernels and thresholds come from greedy layer-wise STDP pre-training
  (protocols/pretrain.py), the FC layers from the random initialisation; the first epoch of
  fine-tuning leaves out the images used for pre-training.
* ``supervised``: every layer from the random initialisation (``lee`` or ``glorot``).

Run::

    python -m protocols.study --config configs/study_shallow_supervised.toml
        [--seed 3] [--out runs/x] [--iterations 3000] [--data-dir DIR] [--no-progress] [--quiet]

The same command, run again after an interruption, resumes from the last checkpoint. The run
directory is described in protocols/train.py; a pre-training run started by the study goes to
``<out>/pretrain/``, and a ``pretrained.npz`` already there is reused only when its record names
the same pre-training (``protocols.pretrain.record_differences``; otherwise a one-line error). Every configuration problem (unknown key, wrong type or unit, missing or
incompatible pre-training file), the data and the output folder are checked before any training
starts. Each phase says what it is doing on stderr (``--quiet``: nothing but errors and the
result). One process at a time works in a run folder; Ctrl-C stops cleanly, marks the run
``interrupted`` and says how to resume (see protocols/runstate.py and docs/sweeps.md, "Faults and
recovery"). Exit status: 0 finished, 2 configuration, data, run-folder or path error (one line
naming the file and the fix), 3 training diverged, 130 interrupted.
"""

from __future__ import annotations

import argparse
import math
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from models.batched import layer_names, weight_shape
from models.initialisation import init_range, initialise
from models.parameters import (BPParameters, HomeostasisParameters, InitParameters,
                               InputParameters, LIFParameters, PoolingParameters,
                               PretrainingParameters, STDPParameters)
from models.topology import SHALLOW, ConvLayer, TopologyError, parse_topology
from protocols.config import ConfigError, config_to_dict, load_config
from protocols.runstate import GuardSettings, check_writable, run_guard, say
from protocols.train import TrainConfig, TrainingDiverged, TrainingSettings, rng_for, train


@dataclass(frozen=True)
class StudyConfig:
    """A study arm (TOML: top-level keys and one table per parameter set)."""

    topology: str = SHALLOW
    arm: Literal["pretrained", "supervised"] = "supervised"
    init: Literal["lee", "glorot"] = "lee"
    seed: int = 0
    dataset: str = "mnist"
    #: run directory; "{seed}" in it is replaced by the seed
    out: str = "runs/study_seed{seed}"
    #: pre-trained kernels (pretrained.npz of protocols/pretrain.py); "" with arm 'pretrained':
    #: run the pre-training first, into <out>/pretrain/; "{seed}" is replaced by the seed
    pretrained: str = ""
    #: Brian2 device of a pre-training run started by the study
    pretrain_device: str = "cpp_standalone"
    training: TrainingSettings = field(default_factory=TrainingSettings)
    initialisation: InitParameters = field(default_factory=InitParameters)
    bp: BPParameters = field(default_factory=BPParameters)
    lif: LIFParameters = field(default_factory=LIFParameters)
    pooling: PoolingParameters = field(default_factory=PoolingParameters)
    input: InputParameters = field(default_factory=InputParameters)
    pretraining: PretrainingParameters = field(default_factory=PretrainingParameters)
    stdp: STDPParameters = field(default_factory=STDPParameters)
    homeostasis: HomeostasisParameters = field(default_factory=HomeostasisParameters)
    #: when fine-tuning counts as diverged besides NaN/inf (protocols/runstate.py)
    guard: GuardSettings = field(default_factory=GuardSettings)

    def __post_init__(self):
        from protocols.datasets import DATASETS

        try:
            parse_topology(self.topology)
        except TopologyError as err:
            raise ValueError(str(err)) from None
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset = {self.dataset!r} is not one of {', '.join(DATASETS)}")
        if self.arm == "supervised" and self.pretrained:
            raise ValueError("pretrained is given but arm = 'supervised'; use arm = 'pretrained'")


def train_config(cfg: StudyConfig) -> TrainConfig:
    return TrainConfig(topology=cfg.topology, seed=cfg.seed, training=cfg.training, bp=cfg.bp,
                       lif=cfg.lif, pooling=cfg.pooling, input=cfg.input, guard=cfg.guard,
                       pretrained_conv=cfg.arm == "pretrained")


def load_pretrained_conv(path: str | Path, topology: str) -> tuple[dict, np.ndarray]:
    """Kernels and thresholds of every conv layer from a ``pretrained.npz``, checked against the
    topology, and the indices of the images pre-training used. Raises ConfigError."""
    from protocols.records import NpzError, load_npz

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"pre-trained file {path} does not exist; run protocols.pretrain first "
                          f"or leave 'pretrained' empty to let the study run it")
    try:
        arrays = load_npz(path, "run protocols.pretrain again, or leave 'pretrained' empty to "
                                "let the study run it")
    except NpzError as err:
        raise ConfigError(f"pre-trained file {err}") from None
    layers = parse_topology(topology)
    out = {}
    for name, layer in zip(layer_names(layers), layers):
        if not isinstance(layer, ConvLayer):
            continue
        for key, shape in ((f"{name}_kernels", weight_shape(layer)),
                           (f"{name}_thresholds", (layer.n_maps,))):
            if key not in arrays:
                raise ConfigError(f"pre-trained file {path} has no {key!r} (it has "
                                  f"{', '.join(sorted(arrays))}); was it made for {topology!r}?")
            if tuple(arrays[key].shape) != shape:
                raise ConfigError(f"pre-trained {key} in {path} has shape "
                                  f"{tuple(arrays[key].shape)}; topology {topology!r} needs {shape}")
            if not np.all(np.isfinite(arrays[key])):
                raise ConfigError(f"pre-trained {key} in {path} holds NaN or infinite values")
            out[key] = arrays[key]
    used = np.asarray(arrays.get("image_indices", np.zeros(0, dtype=np.int64)), dtype=np.int64)
    return out, used


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(values: dict) -> str:
    """TOML text of a dict of scalars and one level of tables (what config_to_dict gives)."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in values.items() if not isinstance(v, dict)]
    for k, v in values.items():
        if isinstance(v, dict):
            lines += ["", f"[{k}]"] + [f"{kk} = {_toml_value(vv)}" for kk, vv in v.items()]
    return "\n".join(lines) + "\n"


def run_pretraining(cfg: StudyConfig, out: Path, data_dir: str | None, progress: bool) -> Path:
    """Pre-train with protocols.pretrain (its own command, its own record) unless already done."""
    from protocols import pretrain as pt

    target = out / "pretrain"
    npz = target / "pretrained.npz"
    pcfg = pt.PretrainConfig(topology=cfg.topology, dataset=cfg.dataset, seed=cfg.seed,
                             device=cfg.pretrain_device, out=str(target),
                             pretraining=cfg.pretraining, stdp=cfg.stdp,
                             homeostasis=cfg.homeostasis, lif=cfg.lif, pooling=cfg.pooling)
    if npz.is_file():
        # reuse only what this config would pre-train: a folder made under other [stdp] (or any
        # other pre-training) settings must not lend its kernels to this run silently
        recorded = pt.recorded_config(target)
        if recorded is None:
            say(f"reusing {npz} (no pretrained.json or pretrain.toml beside it to check "
                "against this config)")
            return npz
        differences = pt.record_differences(recorded, config_to_dict(pcfg))
        if differences:
            shown = "; ".join(differences[:3]) + ("; ..." if len(differences) > 3 else "")
            raise ConfigError(f"{npz} was pre-trained under another configuration ({shown}); "
                              f"remove {target} to pre-train again with this one, or set the "
                              "config back (or 'out' to a new folder)")
        return npz
    target.mkdir(parents=True, exist_ok=True)
    toml_path = target / "pretrain.toml"
    toml_path.write_text(to_toml(config_to_dict(pcfg)))
    argv = ["--config", str(toml_path)]
    if data_dir:
        argv += ["--data-dir", data_dir]
    if not progress:
        argv += ["--no-progress"]
    pt.command(argv)
    if not npz.is_file():
        raise RuntimeError(f"pre-training wrote no {npz}")
    return npz


def initial_parameters(cfg: StudyConfig, pretrained: dict | None, dtype=np.float32):
    """Seeded random initialisation; conv layers replaced by the pre-trained ones if given."""
    layers = parse_topology(cfg.topology)
    params = initialise(layers, rng_for(cfg.seed, 0), cfg.init, cfg.initialisation, dtype)
    if pretrained:
        for name, layer, p in zip(layer_names(layers), layers, params):
            if name and name.startswith("conv"):
                kernels = np.asarray(pretrained[f"{name}_kernels"], dtype=np.float64)
                thresholds = np.asarray(pretrained[f"{name}_thresholds"], dtype=np.float64)
                if cfg.initialisation.pretrained_scale == "init_rms":
                    rms = float(np.sqrt(np.mean(kernels ** 2)))
                    if rms > 0:
                        factor = init_range(layer, cfg.init) / math.sqrt(3.0) / rms
                        kernels, thresholds = kernels * factor, thresholds * factor
                p.weights = kernels.astype(dtype)
                p.thresholds = thresholds.astype(dtype)
    return params


def run_study(cfg: StudyConfig, data_dir: str | None = None, progress: bool = True,
              stop_after: int | None = None):
    """Pre-train if needed (arm 'pretrained'), then fine-tune; returns the metrics table."""
    from protocols.datasets import load_dataset

    cfg, pretrained, excluded, extra = check_study(cfg)
    out = Path(cfg.out)
    say(f"loading data {cfg.dataset!r}")
    data = load_dataset(cfg.dataset, data_dir)
    check_writable(out)
    with run_guard(out, "the study"):
        return _run_study(cfg, out, data, data_dir, pretrained, excluded, extra, progress,
                          stop_after)


def check_study(cfg: StudyConfig) -> tuple:
    """(cfg with "{seed}" replaced, given pre-trained conv layers or None, the images they
    used, the run record's extra entries); a given pre-training file is validated here."""
    cfg = dataclasses.replace(cfg, out=cfg.out.replace("{seed}", str(cfg.seed)),
                              pretrained=cfg.pretrained.replace("{seed}", str(cfg.seed)))
    pretrained = None
    excluded = np.zeros(0, dtype=np.int64)
    extra = {"arm": cfg.arm, "init": cfg.init, "study_config": config_to_dict(cfg)}
    # validate a given pre-training file (the data and the output folder follow) before training
    if cfg.arm == "pretrained" and cfg.pretrained:
        pretrained, excluded = load_pretrained_conv(cfg.pretrained, cfg.topology)
    return cfg, pretrained, excluded, extra


def _run_study(cfg, out, data, data_dir, pretrained, excluded, extra, progress, stop_after):
    tcfg, params, excluded = prepare_finetuning(cfg, out, data, data_dir, pretrained, excluded,
                                                extra, progress)
    return train(tcfg, out, data, params, excluded=excluded, extra_record=extra,
                 progress=progress, stop_after=stop_after)


def prepare_finetuning(cfg, out, data, data_dir, pretrained, excluded, extra, progress):
    """Pre-train first when the arm needs it and no file was given (into ``out/pretrain``);
    returns the fine-tuning config, the initial parameters and the excluded images, and adds
    the pre-training file to ``extra``. The caller holds ``out``'s lock."""
    from protocols.runstate import write_status

    if cfg.arm == "pretrained" and not cfg.pretrained:
        if not (out / "pretrain" / "pretrained.npz").is_file():
            write_status(out, "running", "pre-training", phase="pre-training")
        npz = run_pretraining(cfg, out, data_dir, progress)
        pretrained, excluded = load_pretrained_conv(npz, cfg.topology)
        extra["pretrained_file"] = str(npz)
    elif cfg.pretrained:
        extra["pretrained_file"] = str(Path(cfg.pretrained).resolve())
    if excluded.size and excluded.max() >= len(data.train_labels):
        raise ConfigError(f"pre-training used image index {excluded.max()}, beyond the "
                          f"{len(data.train_labels)} training images of {cfg.dataset!r}")
    tcfg = train_config(cfg)
    params = initial_parameters(cfg, pretrained, np.dtype(tcfg.training.dtype))
    return tcfg, params, excluded


def main(argv=None) -> int:
    """The command line; errors become one line and an exit status (protocols.runstate.cli)."""
    from protocols.runstate import cli

    return cli(_main, argv)


def _main(argv=None) -> int:
    from protocols import runstate

    parser = argparse.ArgumentParser(prog="python -m protocols.study",
                                     description=__doc__.split("\n\n")[0],
                                     epilog="Exit status: 0 finished, 2 configuration, data, "
                                            "run-folder or path error, 3 diverged, 130 "
                                            "interrupted (rerun the same command to resume).")
    parser.add_argument("--config", required=True, help="TOML file (see configs/study_*.toml)")
    parser.add_argument("--seed", type=int, help="override seed")
    parser.add_argument("--out", help="override out (run directory; one process at a time)")
    parser.add_argument("--iterations", type=int,
                        help="override training.iterations (more extends a finished run)")
    parser.add_argument("--pretrained", help="override pretrained (path to pretrained.npz)")
    parser.add_argument("--data-dir", help="dataset folder (default: protocols.datasets rules)")
    parser.add_argument("--stop-after", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars (the phase messages stay)")
    parser.add_argument("--quiet", "-q", action="store_true",
                        help="no progress bars and no phase messages: only errors and the result")
    args = parser.parse_args(argv)
    if args.quiet:
        runstate.VERBOSE = False
    cfg = load_config(args.config, StudyConfig)
    overrides = {k: getattr(args, k) for k in ("seed", "out", "pretrained")
                 if getattr(args, k) is not None}
    if args.iterations is not None:
        overrides["training"] = dataclasses.replace(cfg.training, iterations=args.iterations)
    if overrides:
        try:
            cfg = dataclasses.replace(cfg, **overrides)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    frame = run_study(cfg, args.data_dir, progress=not (args.no_progress or args.quiet),
                      stop_after=args.stop_after)
    if len(frame):
        last = frame.iloc[-1]
        out = cfg.out.replace("{seed}", str(cfg.seed))
        print(f"{out}: iteration {int(last.iteration)}, test error {last.test_error:.4f}, "
              f"test NLL {last.test_nll:.4f}")
        print(f"error curve: {', '.join(map(str, plot_error_curve(Path(out))))}")
    return 0


def plot_error_curve(run_dir: Path) -> list[Path]:
    """Draw the run's test error vs iteration into ``run_dir/error_curve.{png,svg}``."""
    from analysis.figures import error_curves, save
    from analysis.runs import load_runs

    return save(error_curves(load_runs(run_dir)), run_dir / "error_curve")


if __name__ == "__main__":
    raise SystemExit(main())
