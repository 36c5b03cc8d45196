"""``sagegan segment``: instance label TIFFs (and particle CSVs) from micrographs.

Writes ``OUT/<stem>.tif`` per input (calibrated when the pixel size is known), with
``--csv`` ``OUT/<stem>.csv`` + ``OUT/<stem>.summary.json``, and ``OUT/segment_report.json``
(per image: the particle diameter used and where it came from, the resampling factor, the
thresholds, the particle count, the pixel size). Everything is staged and moved into place
at the end. The work is :func:`napari_sagegan.api.segment`'s.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from napari_sagegan.cli._common import DEVICES, Bar, say
from napari_sagegan.util.progress import run_to_end


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``segment`` on the ``sagegan`` sub-parsers."""
    s = sub.add_parser("segment", help="segment images into instance label TIFFs")
    s.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders")
    s.add_argument("--out", required=True, help="output folder for <stem>.tif label images")
    s.add_argument("--model", default="default", help="MODEL.pt or 'default' (bundled)")
    s.add_argument("--device", default="auto", choices=DEVICES)
    s.add_argument("--tile-size", type=int, default=None)
    s.add_argument("--batch-size", type=int, default=None)
    s.add_argument("--threshold", type=float, default=None, help="particle probability")
    s.add_argument("--no-split", action="store_true", help="do not split touching particles")
    s.add_argument(
        "--diameter",
        type=float,
        default=None,
        metavar="PX",
        help="typical particle diameter in pixels, if you know it (default: estimated per image)",
    )
    s.add_argument(
        "--diameter-nm",
        type=float,
        default=None,
        metavar="NM",
        help="typical particle diameter in nm (needs --pixel-size or a pixel size in the file)",
    )
    s.add_argument(
        "--no-auto-scale",
        action="store_true",
        help="segment every image at its own scale (no particle size estimate)",
    )
    s.add_argument(
        "--csv",
        action="store_true",
        help="also write DIR/<stem>.csv (one row per particle) and a summary JSON",
    )
    s.add_argument(
        "--pixel-size",
        type=float,
        default=None,
        metavar="NM",
        help="pixel size in nm for --csv and --diameter-nm (default: read from the image file)",
    )
    s.set_defaults(func=run)
    return s


def run(args: argparse.Namespace) -> int:
    """Run ``sagegan segment``; returns the exit status (0)."""
    from napari_sagegan import api

    gen = api.segment(
        args.inputs,
        model=args.model,
        device=args.device,
        diameter=args.diameter,
        diameter_nm=args.diameter_nm,
        pixel_size=args.pixel_size,
        infer={
            "tile_size": args.tile_size,
            "threshold": args.threshold,
            "batch_size": args.batch_size,
            "split": False if args.no_split else None,
            "auto_scale": False if args.no_auto_scale else None,
        },
        out=args.out,
        csv=args.csv,
        keep_labels=False,
    )
    bars: list[Bar] = []

    def show(ev: Any) -> None:
        if ev.stage == "prepare":
            say(ev.message)
        elif ev.stage == "tiles":
            d = ev.data
            if len(bars) <= d["index"]:
                if bars:
                    bars[-1].close()
                bars.append(Bar(f"[{d['index'] + 1}/{d['n_images']}] {d['image']}"))
            bars[-1].show(ev, total=d["image_total"], step=d["image_step"])
        elif ev.stage == "image":
            r = ev.data["result"]
            if r.scale is not None and r.scale.diameter is not None:
                say(f"{r.name}: {r.scale.describe(r.pixel_size.nm)}")

    try:
        results = run_to_end(gen, show)
    finally:
        for bar in bars:
            bar.close()
    out = Path(args.out)
    for r in results:
        print(f"{r.name}: {r.n_particles} particles -> {out / (Path(r.name).stem + '.tif')}")
    return 0
