"""Learned kernels of a conv layer as a grid of images, as the paper's Fig. 6.

Each tile is one map's k×k kernel (input channel ``--channel``, or the mean over input channels
with ``--channel mean``), on a symmetric diverging colour scale shared by all tiles, so that the
sign and size of weights compare across maps.

Run::

    python -m analysis.kernels runs/pretrain_shallow/pretrained.npz --layer conv1 \
        --out runs/pretrain_shallow/kernels_conv1      # writes .png and .svg
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np


def kernel_grid(kernels: np.ndarray, channel="mean", title: str | None = None,
                cmap: str = "gray", numbers: bool = False):
    """A matplotlib figure of ``kernels`` (n_maps, C_in, k, k) as a near-square grid of tiles.

    As the paper's Fig. 6: tiles side by side with thin gaps, one shared symmetric scale
    (``cmap="gray"``: black = most negative weight, mid-grey = 0, white = largest positive;
    ``"RdBu_r"`` for a diverging colour scale), a colour bar for the weight. ``numbers``: label
    each tile with its map index.
    """
    import matplotlib.pyplot as plt

    kernels = np.asarray(kernels, dtype=float)
    if kernels.ndim != 4:
        raise ValueError(f"kernels must be (n_maps, C_in, k, k), got shape {kernels.shape}")
    if channel == "mean":
        tiles = kernels.mean(axis=1)
    else:
        c = int(channel)
        if not 0 <= c < kernels.shape[1]:
            raise ValueError(f"channel {c} is not in 0..{kernels.shape[1] - 1}")
        tiles = kernels[:, c]
    n = tiles.shape[0]
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    vmax = float(np.abs(tiles).max()) or 1.0
    tile = 0.6 if n > 16 else 0.9
    fig, axes = plt.subplots(rows, cols, figsize=(tile * cols + 1.2, tile * rows + 0.5),
                             squeeze=False, gridspec_kw={"wspace": 0.06, "hspace": 0.06})
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if i < n:
            im = ax.imshow(tiles[i], cmap=cmap, vmin=-vmax, vmax=vmax)
            if numbers:
                ax.set_title(str(i), fontsize=6, pad=1)
        else:
            ax.axis("off")
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, pad=0.03, label="weight")
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.kernels",
                                     description="Draw a conv layer's kernels as a grid.")
    parser.add_argument("npz", help="pretrained.npz (or any .npz with <layer>_kernels)")
    parser.add_argument("--layer", default="conv1", help="layer name, e.g. conv1, conv2")
    parser.add_argument("--channel", default="mean",
                        help="input channel to draw, or 'mean' over channels (default)")
    parser.add_argument("--out", help="output path without extension (default: beside the npz)")
    args = parser.parse_args(argv)
    from protocols.records import NpzError, load_npz

    try:
        data = load_npz(args.npz, "give a pretrained.npz, final.npz or checkpoint.npz")
    except NpzError as err:
        raise SystemExit(f"error: {err}") from None
    key = f"{args.layer}_kernels"
    if key not in data:
        found = sorted(f for f in data if f.endswith("_kernels"))
        raise SystemExit(f"{args.npz} has no {key!r}; kernels present: {found}")
    kernels = data[key]
    out = Path(args.out) if args.out else Path(args.npz).with_name(f"kernels_{args.layer}")
    fig = kernel_grid(kernels, args.channel,
                      title=f"{args.layer} kernels ({kernels.shape[0]} maps, channel "
                            f"{args.channel})")
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out.parent / f"{out.name}.{ext}" for ext in ("png", "svg")]
    for path in paths:
        fig.savefig(path, dpi=150, bbox_inches="tight")
    print(f"wrote {paths[0]} and {paths[1]}")
    return 0


if __name__ == "__main__":
    import matplotlib

    matplotlib.use("Agg")  # the command only writes files; importing the module switches nothing
    raise SystemExit(main())
