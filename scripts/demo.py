"""The main job on sample data: generate, train, segment, evaluate.

Usage: python scripts/demo.py [--out demo_output] [--size 512] [--minutes 3] [--model default]

Generates EM-like sample images with exact labels (engine/synthetic.py), trains a segmenter
on separately generated pairs with `sagegan train` for a few minutes (or, with
``--model default``, uses the bundled model instead), segments the samples with
`sagegan segment` and scores them with `sagegan evaluate`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import tifffile

from napari_sagegan.cli import main as sagegan
from napari_sagegan.engine.synthetic import SAMPLE_KINDS, make_sample
from napari_sagegan.io.images import write_labels_tif


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="demo_output")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--minutes", type=float, default=3.0, help="training budget")
    ap.add_argument(
        "--model",
        default=None,
        help="segment with this model (e.g. 'default') instead of training one",
    )
    args = ap.parse_args()
    out = Path(args.out).resolve()
    images, truth, labels = out / "images", out / "truth", out / "labels"
    for d in (images, truth):
        d.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for i, kind in enumerate(SAMPLE_KINDS):
        img, lab = make_sample(kind, shape=(args.size, args.size), seed=i)
        tifffile.imwrite(images / f"{kind}.tif", img)
        write_labels_tif(truth / f"{kind}.tif", lab)
    print(f"demo: generated {len(SAMPLE_KINDS)} sample images in {images}")
    model = args.model
    if model is None:
        from napari_sagegan.engine.synthetic import make_training_set

        tr_img, tr_lab = out / "train" / "images", out / "train" / "masks"
        for d in (tr_img, tr_lab):
            d.mkdir(parents=True, exist_ok=True)
        for i, (img, lab) in enumerate(make_training_set(48, shape=(256, 256), seed=100)):
            tifffile.imwrite(tr_img / f"t{i:03d}.tif", img)
            write_labels_tif(tr_lab / f"t{i:03d}.tif", lab)
        model = str(out / "model.pt")
        print(f"demo: training a segmenter on 48 generated pairs for {args.minutes} min")
        rc = sagegan(
            [
                "train",
                "--images",
                str(tr_img),
                "--masks",
                str(tr_lab),
                "--out",
                model,
                "--max-minutes",
                str(args.minutes),
                "--patch-size",
                "128",
                "--batch-size",
                "8",
                "--lr",
                "1e-3",
                "--steps-per-epoch",
                "50",
            ]
        )
        if rc:
            return rc
    rc = sagegan(["segment", str(images), "--out", str(labels), "--model", model])
    if rc:
        return rc
    rc = sagegan(
        ["evaluate", "--pred", str(labels), "--gt", str(truth), "--json", str(out / "metrics.json")]
    )
    if rc:
        return rc
    print(
        f"demo: done in {time.perf_counter() - t0:.0f} s. Labels: {labels}, metrics: "
        f"{out / 'metrics.json'}"
    )
    print(f"demo: open them in napari with:  .venv/bin/napari {images}/*.tif {labels}/*.tif")
    return 0


if __name__ == "__main__":
    sys.exit(main())
