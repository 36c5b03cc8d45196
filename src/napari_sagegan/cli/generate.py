"""``sagegan generate``: synthetic image/mask pairs from a generator trained by ``augment``.

::

    sagegan generate --generator G.pt --out DIR --n N [--masks DIR | --layout lattice ...]

writes ``OUT/images/synth_0001.tif`` + ``OUT/masks/synth_0001.tif``, ... (staged, moved
into place at the end). The work is :func:`napari_sagegan.api.generate`'s.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from napari_sagegan.cli._common import DEVICES, drive, spare_inputs

#: What the flags may be: (lowest, highest) whole numbers.
N_RANGE, SIZE_RANGE, SEED_RANGE = (1, 100_000), (32, 8192), (0, 2**32 - 1)


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``generate`` on the ``sagegan`` sub-parsers."""
    g = sub.add_parser("generate", help="synthetic image/mask pairs from a trained generator")
    g.add_argument(
        "--generator",
        required=True,
        help="generator.pt written by augment, or 'default' (the bundled generator)",
    )
    g.add_argument("--out", required=True, help="new (or empty) output folder")
    g.add_argument(
        "--n", type=int, required=True, help=f"number of pairs ({N_RANGE[0]} to {N_RANGE[1]})"
    )
    g.add_argument("--masks", default=None, help="folder of masks to draw layouts from")
    g.add_argument(
        "--layout",
        default=None,
        choices=["real", "paste", "lattice", "hex", "square"],
        help="real/paste need --masks; lattice/hex/square use the training statistics "
        "(default: real with --masks, else lattice)",
    )
    g.add_argument(
        "--size",
        type=int,
        default=None,
        help=f"side of generated masks, px ({SIZE_RANGE[0]} to {SIZE_RANGE[1]}; default: the "
        "training masks' size)",
    )
    g.add_argument("--seed", type=int, default=0, help="random seed (0 to 2**32 - 1)")
    g.add_argument("--device", default="auto", choices=DEVICES)
    g.set_defaults(func=run)
    return g


def run(args: argparse.Namespace) -> int:
    """Run ``sagegan generate``; returns the exit status (0)."""
    check_flags(args)
    names = [f"{d}/synth_{i:04d}.tif" for d in ("images", "masks") for i in range(1, args.n + 1)]
    spare_inputs([args.generator, args.masks], args.out, names)
    from napari_sagegan import api

    gen = api.generate(
        args.generator, args.n, masks=args.masks, layout=args.layout, size=args.size,
        seed=args.seed, device=args.device, out=args.out,
    )  # fmt: skip
    pairs = drive(gen, "generate")
    out = Path(args.out)
    layout = args.layout or ("real" if args.masks else "lattice")
    n_particles = int(np.mean([int(lab.max()) for _, lab in pairs]))
    print(
        f"sagegan: wrote {len(pairs)} pairs ({layout} layout, about {n_particles} particles "
        f"each) to {out / 'images'} and {out / 'masks'}"
    )
    return 0


def check_flags(args: argparse.Namespace) -> None:
    """Refuse (``ValueError``, one line) a ``--n``, ``--size`` or ``--seed`` out of range."""
    for flag, value, (lo, hi), what in (
        ("--n", args.n, N_RANGE, "the number of pairs to generate"),
        ("--size", args.size, SIZE_RANGE, "the side of the generated masks in pixels"),
        ("--seed", args.seed, SEED_RANGE, "a random seed"),
    ):
        if value is not None and not lo <= value <= hi:
            raise ValueError(f"{flag} is {what}: a whole number from {lo} to {hi}, got {value}")
