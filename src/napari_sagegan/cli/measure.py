"""``sagegan measure``: particle tables and summaries from label images.

::

    sagegan measure LABELS... [--image IMG...] [--pixel-size NM] --out FILE.csv

writes one row per particle to ``FILE.csv`` and the summary statistics, the order analysis
and g(r) to ``FILE.summary.json`` beside it. Both are written atomically (a temporary file
renamed into place). The pixel size comes from ``--pixel-size``, else the label file's own
metadata, else the matching ``--image`` file's metadata (TIFF, DM3/DM4, EMD, SER, MRC), else
lengths stay in pixels; each file's choice is printed. The work is
:func:`napari_sagegan.api.measure`'s. Qt-free and torch-free.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from napari_sagegan.cli._common import PIXEL_SIZE_RANGE_NM, check_pixel_size, spare_inputs
from napari_sagegan.util.progress import run_to_end


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``measure`` sub-command to ``sagegan``'s sub-parsers."""
    p = subparsers.add_parser(
        "measure",
        help="measure particles (size, shape, order) from label images into a CSV",
        description=(
            "Measure every particle of one or more label images: area, equivalent diameter, "
            "Feret diameters, aspect ratio, circularity, solidity, mean intensity, "
            "nearest-neighbour distance, coordination and bond-orientational order (psi6, "
            "psi4). Writes FILE.csv (one row per particle) and FILE.summary.json (counts, "
            "mean, std, D10/D50/D90, number density, order parameters, g(r)). Lengths are in "
            "nm when the pixel size is known, in pixels otherwise; column names say which."
        ),
    )
    p.add_argument("labels", nargs="+", help="label images (0 = background) or binary masks")
    p.add_argument(
        "--image",
        nargs="+",
        metavar="IMG",
        help="the micrograph of each label image, in the same order: mean intensity, and the "
        "pixel size when the labels carry none (TIFF, DM3/DM4, EMD, SER, MRC)",
    )
    p.add_argument(
        "--pixel-size",
        type=float,
        metavar="NM",
        help="pixel size in nm, {:g} to {:g} (overrides what the files say)".format(
            *PIXEL_SIZE_RANGE_NM
        ),
    )
    p.add_argument("--out", required=True, metavar="FILE.csv", help="particle table to write")
    p.add_argument(
        "--channel",
        type=int,
        default=None,
        metavar="N",
        help="the channel of multi-channel --image files (an ImageJ CYX hyperstack, a TIFF "
        "with several samples per pixel that are not RGB), 0 for the first",
    )
    p.add_argument(
        "--include-border",
        action="store_true",
        help="keep particles touching the image border in the size statistics",
    )
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Run ``sagegan measure``; returns the exit status (0)."""
    from napari_sagegan import api
    from napari_sagegan.io.pixel_size import PixelSize
    from napari_sagegan.io.tables import summary_path

    given = PixelSize(args.pixel_size, "--pixel-size") if args.pixel_size is not None else None
    check_pixel_size(args.pixel_size)
    out = Path(args.out).expanduser()
    inputs = [*args.labels, *(args.image or [])]
    spare_inputs(inputs, out)
    spare_inputs(inputs, summary_path(out))
    result = run_to_end(
        api.measure(
            args.labels,
            images=args.image,
            pixel_size=given,
            include_border=args.include_border,
            out=out,
            channel=args.channel,
        ),
        lambda ev: print(ev.message),
    )
    print(f"wrote {out} ({len(result.table)} particles) and {summary_path(out)}")
    return 0
