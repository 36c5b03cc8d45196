"""``sagegan segment``: instance label TIFFs (and particle CSVs) from micrographs.

Writes ``OUT/<stem>.tif`` per input (calibrated when the pixel size is known), with
``--csv`` ``OUT/<stem>.csv`` + ``OUT/<stem>.summary.json``, and ``OUT/segment_report.json``
(per image: the particle diameter used and where it came from, the resampling factor, the
thresholds, the particle count, the pixel size, the annotations left out, the count of
non-finite pixels). Everything is staged and moved into place at the end. The work is
:func:`napari_sagegan.api.segment`'s. ``--channel N`` picks the channel of multi-channel
images (refused without it).

On stderr, per image: the particle size used; a warning when pixels were NaN or infinite
(treated as missing); a warning when its estimate is uncertain
(with the flags that give the size); the burned-in annotations left out; and, for an
image without a pixel size, the scale bar found and the pixel size its label proposes
(with the flag that applies it: never applied by itself).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from napari_sagegan.cli._common import (
    DEVICES,
    Bar,
    check_pixel_size,
    folder_stems,
    say,
    spare_inputs,
)
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
        help="also write DIR/<stem>.csv (one row per particle, with the network's confidence "
        "in it) and a summary JSON",
    )
    s.add_argument(
        "--pixel-size",
        type=float,
        default=None,
        metavar="NM",
        help="pixel size in nm for --csv and --diameter-nm (default: read from the image file)",
    )
    s.add_argument(
        "--channel",
        type=int,
        default=None,
        metavar="N",
        help="the channel to use in multi-channel images (an ImageJ CYX hyperstack, a TIFF with "
        "several samples per pixel that are not RGB, one of R, G, B), 0 for the first; such "
        "images are refused without it",
    )
    s.set_defaults(func=run)
    return s


def notes(r: Any) -> list[str]:
    """The lines ``segment`` prints about one :class:`~napari_sagegan.api.Segmented` besides
    its size: an uncertain size estimate, the annotations left out, a scale bar's pixel
    size."""
    lines = []
    missing = r.describe_nonfinite()
    if missing:
        lines.append(f"warning: {missing}")
    s = r.scale
    if s is not None and s.uncertain:
        if s.diameter is not None:
            found = f"the particle size estimate ({s.diameter:.3g} px) is uncertain"
        else:
            found = "no particle size could be estimated"
        found += f" (confidence {s.confidence:.2f}"
        others = [f"{d:.3g}" for d in s.alternatives if d]
        if others:
            found += f"; other candidates: {', '.join(others)} px"
        lines.append(
            f"warning: {r.name}: {found}): check the outlines, and give the typical particle "
            "diameter with --diameter PX or --diameter-nm NM"
        )
    excluded = r.describe_excluded()
    if excluded:
        lines.append(f"{r.name}: {excluded}")
    bar = r.scale_bar
    if bar is not None:
        line = f"{r.name}: no pixel size, but a scale bar of {bar.length_px:.0f} px was found"
        if bar.pixel_size_nm:
            line += (
                f", labelled {bar.length_nm:g} nm: the pixel size would be "
                f"{bar.pixel_size_nm:.4g} nm; if that is right, run again with "
                f"--pixel-size {bar.pixel_size_nm:.4g}"
            )
        else:
            line += (
                "; its label was not read (Tesseract OCR reads it when installed): divide "
                "the length it shows (nm) by the bar's length and give --pixel-size NM"
            )
        lines.append(line)
    return lines


def run(args: argparse.Namespace) -> int:
    """Run ``sagegan segment``; returns the exit status (0)."""
    from napari_sagegan.api.segment import output_names

    check_pixel_size(args.pixel_size)
    names = output_names(folder_stems(args.inputs), args.csv)
    spare_inputs([*args.inputs, args.model], args.out, names)
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
        channel=args.channel,
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
            for line in notes(r):
                say(line)

    try:
        results = run_to_end(gen, show)
    finally:
        for bar in bars:
            bar.close()
    out = Path(args.out)
    for r in results:
        print(f"{r.name}: {r.n_particles} particles -> {out / (Path(r.name).stem + '.tif')}")
    return 0
