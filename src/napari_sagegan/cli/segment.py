"""``sagegan segment``: instance label TIFFs (and particle CSVs) from micrographs.

Writes ``OUT/<stem>.tif`` per input (calibrated when the pixel size is known), with
``--csv`` ``OUT/<stem>.csv`` + ``OUT/<stem>.summary.json``, and ``OUT/segment_report.json``
(per image: the particle diameter used and where it came from, the resampling factor, the
thresholds, the minimum particle confidence and how many particles it left out, the
particle count, the pixel size, the annotations left out, the count of non-finite
pixels). Everything is staged and moved into place at the end. The work is
:func:`napari_sagegan.api.segment`'s. ``--channel N`` picks the channel of multi-channel
images (refused without it).

On stderr, per image: the particle size used; a warning when pixels were NaN or infinite
(treated as missing); a warning when its estimate is uncertain
(with the flags that give the size); the burned-in annotations left out; and, for an
image without a pixel size, the scale bar found and the pixel size its label proposes
(with the flag that applies it: never applied by itself).

With ``--workers N`` (a LocalCluster of N processes on this machine) or ``--scheduler
ADDRESS`` (a running dask.distributed cluster) the images are segmented by
:func:`napari_sagegan.api.segment_distributed` instead: the same files, each image's written
as it finishes, a re-run skips the images already done, a failing image is reported (and
in the report's ``errors``) without stopping the others: the exit status is then 1.

With ``--block-size PX`` each input (a TIFF or a ``.zarr`` folder, larger than memory) is
segmented block by block by :func:`napari_sagegan.api.blocks.segment_blocks_into` into
``OUT/<stem>.zarr`` (``--block-format tiff``: a tiled ``OUT/<stem>.tif``) and
``OUT/segment_report.json``, on the cluster with ``--scheduler`` / ``--workers``. Without
it, a TIFF / zarr input whose decoded size exceeds ``--memory-limit`` (default a quarter of
the memory) is refused with a message naming ``--block-size`` (not switched to blocks by
itself: the block path writes other files and has no ``--csv``).
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
    s.add_argument(
        "--engine",
        default=None,
        choices=["auto", "torch", "onnxruntime", "openvino"],
        help="what runs the network on the CPU (onnxruntime / openvino: the optional extras "
        "onnx / openvino; a missing one falls back to torch with a warning; default: torch)",
    )
    s.add_argument(
        "--precision",
        default=None,
        choices=["auto", "fp32", "bf16", "fp16"],
        help="what the network computes in (torch engine; default auto: float16 on a CUDA "
        "GPU, bfloat16 on a CPU with native bfloat16 such as AVX512-BF16, else float32)",
    )
    s.add_argument(
        "--tile-size",
        type=int,
        default=None,
        metavar="PX",
        help="memory per tile: tiles hold at most PX x PX network pixels, shaped to the image "
        "(default 1024, or 1280 where the network computes in 16 bits: the same memory); "
        "lower it if segmenting runs out of memory",
    )
    s.add_argument("--batch-size", type=int, default=None)
    s.add_argument("--threshold", type=float, default=None, help="particle probability")
    s.add_argument("--no-split", action="store_true", help="do not split touching particles")
    s.add_argument(
        "--min-confidence",
        type=float,
        default=None,
        metavar="C",
        help="leave out the particles the network is less sure of than C, in [0, 1) "
        "(default: the model's calibrated value; 0 keeps every particle)",
    )
    s.add_argument(
        "--tta",
        type=int,
        default=None,
        choices=[1, 2, 4, 8],
        metavar="VIEWS",
        help="test-time augmentation: average the network's maps over VIEWS views of each "
        "tile (2: and its left-right mirror image; 4: every mirror image; 8: and their "
        "transposes), VIEWS network passes each: fewer missed and false particles for more "
        "time (docs/benchmarks.md); default 1, none",
    )
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
    dist = s.add_argument_group(
        "scale out (needs dask.distributed: pip install 'napari-sagegan[distributed]')"
    )
    where = dist.add_mutually_exclusive_group()
    where.add_argument(
        "--scheduler",
        default=None,
        metavar="ADDRESS",
        help="segment on a running dask.distributed cluster (tcp://host:8786); the workers "
        "must see the inputs and --out at the same paths; a re-run skips the images done",
    )
    where.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="segment on N worker processes on this machine (a dask LocalCluster), one image "
        "at a time each; a re-run skips the images done",
    )
    dist.add_argument(
        "--threads-per-worker",
        type=int,
        default=None,
        metavar="T",
        help="torch threads per image (default 1); with --scheduler a worker segments as "
        "many images at once as it has dask threads (dask worker --nthreads)",
    )
    big = s.add_argument_group(
        "images larger than memory (needs zarr and dask: pip install 'napari-sagegan[large]')"
    )
    big.add_argument(
        "--block-size",
        type=int,
        default=None,
        metavar="PX",
        help="segment each input (a TIFF or a .zarr folder) block by block, PX pixels a side "
        "plus an overlap, stitching particles across the borders, into DIR/<stem>.zarr (or "
        "a tiled DIR/<stem>.tif); memory grows with PX, not with the image",
    )
    big.add_argument(
        "--block-format",
        choices=["zarr", "tiff"],
        default=None,
        help="with --block-size: write DIR/<stem>.zarr (default) or a tiled DIR/<stem>.tif",
    )
    big.add_argument(
        "--block-overlap",
        type=int,
        default=None,
        metavar="PX",
        help="with --block-size: margin around each block (default: three particle "
        "diameters, at least the network's receptive radius)",
    )
    big.add_argument(
        "--memory-limit",
        type=float,
        default=None,
        metavar="MB",
        help="without --block-size, refuse TIFF / zarr inputs whose decoded size exceeds MB "
        "(default: a quarter of this machine's memory) and name --block-size instead",
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
    unsure = r.describe_unsure()
    if unsure:
        lines.append(unsure)
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


def say_result(r: Any) -> None:
    """Print what ``segment`` says about one finished image: its particle size and
    :func:`notes`."""
    if r.scale is not None and r.scale.diameter is not None:
        say(f"{r.name}: {r.scale.describe(r.pixel_size.nm)}")
    for line in notes(r):
        say(line)


def image_bar(bars: list[Bar], data: dict[str, Any]) -> Bar:
    """The progress bar of the image ``data`` describes (``index``, ``n_images``,
    ``image``), opened (and the previous one closed) when it is a new one."""
    index = data.get("index", 0)
    if len(bars) <= index:
        if bars:
            bars[-1].close()
        bars.append(Bar(f"[{index + 1}/{data.get('n_images', 1)}] {data['image']}"))
    return bars[-1]


def drive(gen: Any, show: Any, bars: list[Bar]) -> Any:
    """Run a progress generator to its end through ``show``; the bars are closed however
    it ends."""
    try:
        return run_to_end(gen, show)
    finally:
        for bar in bars:
            bar.close()


def run(args: argparse.Namespace) -> int:
    """Run ``sagegan segment``; returns the exit status (0)."""
    from napari_sagegan.api.segment import output_names

    check_pixel_size(args.pixel_size)
    if args.block_size is not None:
        return run_blocks(args)
    refuse_oversized(args)
    names = output_names(folder_stems(args.inputs), args.csv)
    spare_inputs([*args.inputs, args.model], args.out, names)
    from napari_sagegan import api

    infer = {
        "tile_size": args.tile_size,
        "threshold": args.threshold,
        "batch_size": args.batch_size,
        "split": False if args.no_split else None,
        "auto_scale": False if args.no_auto_scale else None,
        "engine": args.engine,
        "precision": args.precision,
        "tta": args.tta,
        "min_confidence": args.min_confidence,
    }
    if args.scheduler is not None or args.workers is not None:
        return run_distributed(args, infer)
    if args.threads_per_worker is not None:
        raise ValueError("--threads-per-worker needs --workers N or --scheduler ADDRESS")
    gen = api.segment(
        args.inputs,
        model=args.model,
        device=args.device,
        diameter=args.diameter,
        diameter_nm=args.diameter_nm,
        pixel_size=args.pixel_size,
        infer=infer,
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
            image_bar(bars, d).show(ev, total=d["image_total"], step=d["image_step"])
        elif ev.stage == "image":
            say_result(ev.data["result"])

    results = drive(gen, show, bars)
    out = Path(args.out)
    for r in results:
        print(f"{r.name}: {r.n_particles} particles -> {out / (Path(r.name).stem + '.tif')}")
    return 0


def run_distributed(args: argparse.Namespace, infer: dict[str, Any]) -> int:
    """``sagegan segment --workers N | --scheduler ADDRESS``: 0, or 1 when an image failed."""
    from napari_sagegan.api.distributed import require_distributed, segment_distributed
    from napari_sagegan.api.segment import REPORT_NAME

    try:
        require_distributed()
    except ImportError as err:
        say(f"error: {err}")
        return 2  # as for bad input: nothing was done
    gen = segment_distributed(
        args.inputs,
        out=args.out,
        scheduler=args.scheduler,
        workers=args.workers,
        threads_per_worker=args.threads_per_worker,
        model=args.model,
        device=args.device,
        diameter=args.diameter,
        diameter_nm=args.diameter_nm,
        pixel_size=args.pixel_size,
        infer=infer,
        csv=args.csv,
        channel=args.channel,
    )
    bars: list[Bar] = []

    def show(ev: Any) -> None:
        if ev.stage == "prepare":
            say(ev.message)
            bars.append(Bar("images", total=ev.total))
            return
        if ev.stage == "image":
            say_result(ev.data["result"])
        elif ev.stage == "failed":
            say(f"error: {ev.message}")
        bars[-1].show(ev)

    results = drive(gen, show, bars)
    out = Path(args.out)
    for r in results:
        if r["status"] != "failed":
            before = " (segmented before: skipped)" if r["status"] == "skipped" else ""
            tif = out / (Path(r["file"]).stem + ".tif")
            print(f"{r['file']}: {r['n_particles']} particles -> {tif}{before}")
    failed = [r for r in results if r["status"] == "failed"]
    if failed:
        say(
            f"{len(failed)} of {len(results)} image(s) failed (listed under 'errors' in "
            f"{out / REPORT_NAME}); fix them and run the same command again to redo only those"
        )
        return 1
    return 0


# --------------------------------------------------------------------------- blocks


def refuse_oversized(args: argparse.Namespace) -> None:
    """Without ``--block-size``: refuse (``ValueError``) a TIFF / zarr input whose decoded
    size exceeds ``--memory-limit`` (default a quarter of the memory), naming
    ``--block-size``; loading it whole would exhaust the memory."""
    if args.block_format is not None or args.block_overlap is not None:
        raise ValueError("--block-format and --block-overlap need --block-size PX")
    from napari_sagegan.api.blocks import default_memory_limit, oversized

    if args.memory_limit is not None and not args.memory_limit > 0:
        raise ValueError(f"--memory-limit is in MB and must be positive, got {args.memory_limit}")
    limit = default_memory_limit() if args.memory_limit is None else args.memory_limit * 1e6
    big = oversized(args.inputs, int(limit))
    if big:
        path, n = big[0]
        raise ValueError(
            f"{path} would take {n / 1e6:.0f} MB decoded, more than the memory limit of "
            f"{limit / 1e6:.0f} MB: segment it block by block with --block-size PX (e.g. "
            "--block-size 2048), or raise --memory-limit MB"
        )


def run_blocks(args: argparse.Namespace) -> int:
    """``sagegan segment --block-size PX``: each input block by block into
    ``DIR/<stem>.zarr`` (or ``.tif``) and ``DIR/segment_report.json``; returns 0."""
    if args.csv:
        raise ValueError(
            "--csv is not available with --block-size (the particle table of an image "
            "larger than memory is not computed yet); leave out --csv"
        )
    if args.channel is not None:
        raise ValueError("--channel is not available with --block-size: give 2-D grey inputs")
    if args.threads_per_worker is not None and args.workers is None:
        raise ValueError("--threads-per-worker needs --workers N")
    from napari_sagegan.api import blocks

    fmt = args.block_format or "zarr"
    gen = blocks.segment_blocks_into(
        args.inputs,
        out=args.out,
        block_format=fmt,
        block_size=args.block_size,
        overlap=args.block_overlap,
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
            "engine": args.engine,
            "precision": args.precision,
            "tta": args.tta,
            "min_confidence": args.min_confidence,
        },
        scheduler=args.scheduler,
        workers=args.workers,
        threads_per_worker=args.threads_per_worker,
    )
    bars: list[Bar] = []

    def show(ev: Any) -> None:
        if ev.stage == "prepare":
            say(ev.message)
        elif ev.stage in ("blocks", "scale"):
            bar = image_bar(bars, ev.data)
            if ev.stage == "blocks":
                bar.show(ev)
        elif ev.stage == "image":
            r = ev.data["result"]
            say(f"{r.name}: {r.n_blocks} blocks of {r.block_size} px (overlap {r.overlap} px)")
            say_result(r)

    results = drive(gen, show, bars)
    for r in results:
        print(f"{r.name}: {r.n_particles} particles -> {r.output}")
    return 0
