"""How fast does each conv layer learn, relative to the FC layers? The step balance of studies.

For every run and evaluation row, the balance of a conv layer is its mean relative step
‖ηΔW‖/‖W‖ over the interval ending at the row (the ``conv*_rel_step`` diagnostic of
``metrics.csv``) divided by the mean of the FC layers' relative steps over the same interval.
Randomly initialised conv layers and STDP pre-trained ones differ here by up to 17× (medians over runs)
(docs/finetuning.md, "A balanced step for the pre-trained conv layers"), which is what
``bp.pretrained_conv_step_balance`` acts on.

Run::

    python -m analysis.step_balance shallow=results/shallow_mnist_window18/runs \\
        deep=results/deep_mnist/runs --at 200 600 1200 3000 [--out results/x/step_balance]

prints, per study, arm, layer and iteration, the median and the range over runs (and writes
them as CSV and Markdown with ``--out``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from analysis.layer_diagnostics import layer_columns


def step_balance(table: pd.DataFrame) -> pd.DataFrame:
    """One row per run, evaluation row and conv layer: ``balance`` = the conv layer's relative
    step ÷ the mean relative step of the FC layers (rows without both are left out)."""
    steps = layer_columns(table, "rel_step")
    conv = [c for c in steps if c.startswith("conv")]
    fc = [c for c in steps if c.startswith("fc")]
    if not conv or not fc:
        raise ValueError("these runs have no conv and FC rel_step columns (made before the "
                         "diagnostics existed?)")
    keys = [k for k in ("topology", "init", "arm", "seed", "run", "iteration") if k in table]
    reference = table[fc].mean(axis=1)
    frames = [table[keys].assign(layer=c.split("_", 1)[0], balance=table[c] / reference)
              for c in conv]
    return pd.concat(frames, ignore_index=True).dropna(subset=["balance"])


def summarise(balance: pd.DataFrame, at: list[int]) -> pd.DataFrame:
    """Median, minimum and maximum over runs at the iterations ``at``, per arm and layer."""
    rows = balance[balance["iteration"].isin(at)]
    group = [k for k in ("topology", "arm", "layer", "iteration") if k in rows]
    out = rows.groupby(group, sort=True)["balance"].agg(["median", "min", "max", "count"])
    return out.rename(columns={"count": "runs"}).reset_index()


def main(argv=None) -> int:
    from protocols.runstate import cli

    return cli(_main, argv)


def _main(argv=None) -> int:
    from analysis.runs import load_runs
    from analysis.report import write_table

    parser = argparse.ArgumentParser(prog="python -m analysis.step_balance",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("studies", nargs="+", metavar="NAME=FOLDER",
                        help="a study's runs folder, with a name for the table")
    parser.add_argument("--at", nargs="+", type=int, default=[200, 600, 1200, 3000],
                        help="iterations to summarise")
    parser.add_argument("--out", help="folder for step_balance.csv / .md")
    args = parser.parse_args(argv)
    from protocols.config import ConfigError

    frames = []
    for item in args.studies:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise ConfigError(f"{item!r}: give NAME=FOLDER, e.g. shallow=results/x/runs")
        if not Path(folder).is_dir():
            raise ConfigError(f"{folder}: no such folder (a study's runs folder)")
        try:
            summary = summarise(step_balance(load_runs(folder)), args.at)
        except ValueError as err:
            raise ConfigError(f"{folder}: {err}") from None
        frames.append(summary.assign(study=name))
    table = pd.concat(frames, ignore_index=True)
    table = table[["study", *[c for c in table.columns if c != "study"]]]
    print(table.to_markdown(index=False, floatfmt=".3g"))
    if args.out:
        write_table(table, Path(args.out), "step_balance")  # makes the folder
    return 0


if __name__ == "__main__":
    sys.exit(main())
