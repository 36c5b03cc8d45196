"""The main job on generated sample data: segment, measure, draw, score and report.

Usage::

    python scripts/demo.py [--out demo_output] [--size 512] [--kinds KIND,...]
                           [--model default|MODEL.pt] [--train-minutes M] [--seed S]

1. Generates EM-like sample images with exact labels (``engine/synthetic.py``) and writes
   them as ImageJ-calibrated TIFFs (each kind has its own pixel size in nm), with the exact
   labels beside them.
2. Optionally (``--train-minutes M``) fine-tunes the model for M minutes on other generated
   pairs with ``sagegan train --init``.
3. Segments the images with ``sagegan segment --csv`` (the bundled default model unless
   ``--model`` says otherwise): a label TIFF, a particle CSV and a summary JSON per image,
   with sizes in nm from the TIFFs' calibration.
4. Draws an overlay PNG per image (particle outlines on the micrograph) and a size
   histogram, scores the labels against the exact ones with ``sagegan evaluate``, and
   writes ``report.md``.

Everything is written inside ``--out`` and nothing is downloaded. Bad arguments stop with
a one-line error (exit status 2).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np

# nm per pixel of each sample kind: particles of the sizes those micrographs usually show.
PIXEL_SIZE_NM = {
    "tem_hex": 0.5,  # 10-14 px -> 5-7 nm, a close-packed Au monolayer
    "tem_dispersed": 0.75,  # 14-22 px -> 10-16 nm
    "sem_agglomerate": 2.0,  # ~25 px -> ~50 nm
    "sem_sparse": 2.5,  # ~40 px -> ~100 nm
    "haadf_square": 0.4,  # 10-16 px -> 4-6 nm
}
MARKER = ".sagegan-demo"
# What a run writes inside --out; a later run into the same folder replaces exactly these.
OUTPUTS = (
    "images",
    "truth",
    "labels",
    "overlays",
    "train",
    "metrics.json",
    "size_histogram.png",
    "report.md",
)
#: Outline colours (RGB): particles in the size statistics, and those touching the border.
MEASURED_RGB = (255, 60, 0)
BORDER_RGB = (0, 190, 255)


class DemoError(Exception):
    """A one-line reason to stop."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + message
        raise DemoError(message)


def build_parser() -> argparse.ArgumentParser:
    from napari_sagegan.engine.synthetic.render import SAMPLE_KINDS

    p = _Parser(
        prog="demo.py",
        description="Segment, measure and score generated EM sample images (the README's "
        "first command).",
    )
    p.add_argument("--out", default="demo_output", help="output folder (default: demo_output)")
    p.add_argument("--size", type=int, default=512, help="image side in pixels (64-4096)")
    p.add_argument(
        "--kinds",
        default=",".join(SAMPLE_KINDS),
        help=f"comma-separated sample kinds (default: all of {', '.join(SAMPLE_KINDS)})",
    )
    p.add_argument(
        "--model", default="default", help="'default' (bundled model) or a MODEL.pt file"
    )
    p.add_argument(
        "--train-minutes",
        type=float,
        default=0.0,
        metavar="M",
        help="first fine-tune --model for M minutes on other generated pairs (default: 0, "
        "segment with --model as it is)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the sample images")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from napari_sagegan.engine.synthetic.render import SAMPLE_KINDS

    args = build_parser().parse_args(argv)
    if not 64 <= args.size <= 4096:
        raise DemoError(f"--size must be between 64 and 4096 pixels, got {args.size}")
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    bad = [k for k in kinds if k not in SAMPLE_KINDS]
    if not kinds or bad:
        raise DemoError(
            f"unknown sample kind {bad[0]!r}; choose from {', '.join(SAMPLE_KINDS)}"
            if bad
            else "--kinds is empty"
        )
    args.kinds = list(dict.fromkeys(kinds))
    if not (math.isfinite(args.train_minutes) and 0 <= args.train_minutes <= 24 * 60):
        raise DemoError(f"--train-minutes must be between 0 and 1440, got {args.train_minutes}")
    if args.seed < 0:
        raise DemoError(f"--seed must be >= 0, got {args.seed}")
    if args.model != "default":
        model = Path(args.model).expanduser()
        if not model.is_file():
            raise DemoError(f"--model {model} is not a file (give a MODEL.pt or 'default')")
        args.model = str(model.resolve())
    return args


def prepare_out(out: Path) -> None:
    """Make ``out`` ready: create it, or clear what an earlier demo run wrote there.

    A folder that is not empty and was not written by the demo is refused, so that nothing
    of the user's is overwritten.
    """
    if out.exists() and not out.is_dir():
        raise DemoError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).exists():
        raise DemoError(
            f"--out {out} is not empty and was not written by the demo; "
            "choose a new or empty folder"
        )
    if not out.parent.is_dir():
        raise DemoError(f"the folder holding --out ({out.parent}) does not exist")
    out.mkdir(exist_ok=True)
    (out / MARKER).write_text("written by scripts/demo.py; a new demo run replaces it\n")
    for name in OUTPUTS:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def write_samples(kinds: list[str], size: int, seed: int, images: Path, truth: Path) -> None:
    """Write each sample as an ImageJ TIFF calibrated in nm, and its exact labels."""
    import tifffile

    from napari_sagegan.engine.synthetic.render import make_sample
    from napari_sagegan.io.export import write_labels_tiff

    images.mkdir()
    truth.mkdir()
    for i, kind in enumerate(kinds):
        image, labels = make_sample(kind, shape=(size, size), seed=seed + i)
        px = PIXEL_SIZE_NM[kind]
        tifffile.imwrite(
            images / f"{kind}.tif",
            image,
            imagej=True,
            resolution=(1.0 / px, 1.0 / px),
            metadata={"unit": "nm"},
        )
        write_labels_tiff(truth / f"{kind}.tif", labels)


def train(model: str, minutes: float, out: Path, seed: int) -> str:
    """Fine-tune ``model`` on 48 other generated pairs for ``minutes``; return the new file."""
    import tifffile

    from napari_sagegan.cli import main as sagegan
    from napari_sagegan.engine.synthetic.render import make_training_set
    from napari_sagegan.io.export import write_labels_tiff

    tr_img, tr_lab = out / "train" / "images", out / "train" / "masks"
    tr_img.mkdir(parents=True)
    tr_lab.mkdir()
    for i, (img, lab) in enumerate(make_training_set(48, shape=(256, 256), seed=seed + 100)):
        tifffile.imwrite(tr_img / f"t{i:03d}.tif", img)
        write_labels_tiff(tr_lab / f"t{i:03d}.tif", lab)
    target = out / "train" / "model.pt"
    print(f"demo: fine-tuning the model on 48 generated pairs for {minutes:g} min")
    rc = sagegan(
        ["train", "--images", str(tr_img), "--masks", str(tr_lab), "--out", str(target)]
        + ["--init", model, "--max-minutes", str(minutes), "--seed", str(seed)]
        + ["--patch-size", "128", "--batch-size", "8", "--lr", "1e-3"]
        + ["--steps-per-epoch", "50"]
    )
    if rc:
        raise SystemExit(rc)
    return str(target)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Grayscale image to uint8 for display (0.5-99.5 percentile stretch)."""
    if image.dtype == np.uint8:
        return image
    lo, hi = np.percentile(image, (0.5, 99.5))
    scaled = (image.astype(np.float32) - lo) / max(float(hi - lo), 1e-12)
    return (np.clip(scaled, 0, 1) * 255).astype(np.uint8)


def overlay(image: np.ndarray, labels: np.ndarray, border_ids: np.ndarray) -> np.ndarray:
    """RGB uint8 (Y, X, 3): the micrograph with each particle's outline in colour."""
    from skimage.segmentation import find_boundaries

    rgb = np.repeat(to_uint8(image)[..., None], 3, axis=2)
    edges = find_boundaries(labels, mode="inner")
    on_border = np.isin(labels, border_ids) & edges
    rgb[edges & ~on_border] = MEASURED_RGB
    rgb[on_border] = BORDER_RGB
    return rgb


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _mean_std(mean: float | None, std: float | None) -> str:
    return "n/a" if mean is None else f"{_fmt(mean)} ± {_fmt(std)}"


def size_histograms(rows: list[dict], path: Path) -> None:
    """One panel per image: the measured equivalent diameters against the exact ones."""
    from matplotlib.figure import Figure

    n = len(rows)
    cols = min(n, 3)
    nrows = math.ceil(n / cols)
    fig = Figure(figsize=(4.2 * cols, 3.0 * nrows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, cols)).ravel()
    for ax, row in zip(axes, rows):
        pred, true = row["diameters"], row["true_diameters"]
        both = np.concatenate([pred, true])
        bins = np.histogram_bin_edges(both, bins=20) if both.size else 10
        ax.hist(true, bins=bins, histtype="step", color="black", linewidth=1.2, label="exact")
        ax.hist(pred, bins=bins, alpha=0.7, color="tab:orange", label="segmented")
        ax.set_title(f"{row['name']} ({row['pixel_size']:g} nm/px)", fontsize=10)
        ax.set_xlabel(f"equivalent diameter ({row['unit']})")
        ax.set_ylabel("particles")
        ax.legend(fontsize=8)
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.savefig(path, dpi=100)


def collect(kind: str, out: Path) -> dict:
    """Per-image numbers: the CSV and summary of ``sagegan segment --csv``, the metrics, and
    the same measurements of the exact labels."""
    import pandas as pd

    from napari_sagegan.engine.analysis.measure import measure
    from napari_sagegan.io.images import read_image, read_labels

    labels_dir = out / "labels"
    table = pd.read_csv(labels_dir / f"{kind}.csv")
    summary = json.loads((labels_dir / f"{kind}.summary.json").read_text())["files"][0]
    s, unit = summary["summary"], summary["unit"]
    image = read_image(out / "images" / f"{kind}.tif")
    labels = read_labels(labels_dir / f"{kind}.tif")
    border_ids = table.loc[table["touches_border"].astype(bool), "label"].to_numpy()
    rgb = overlay(image, labels, border_ids)
    from skimage.io import imsave

    imsave(out / "overlays" / f"{kind}.png", rgb, check_contrast=False)
    truth = measure(read_labels(out / "truth" / f"{kind}.tif"), None, summary["pixel_size_nm"])
    t = truth.table
    key = f"equivalent_diameter_{unit}"
    return {
        "name": kind,
        "pixel_size": summary["pixel_size_nm"],
        "unit": unit,
        "count": s["n_particles"],
        "border": s["n_touching_border"],
        "mean": s.get(f"{key}_mean"),
        "std": s.get(f"{key}_std"),
        "d10": s.get(f"{key}_d10"),
        "d50": s.get(f"{key}_d50"),
        "d90": s.get(f"{key}_d90"),
        "true_count": truth.summary["n_particles"],
        "true_d50": truth.summary.get(f"{key}_d50"),
        "diameters": table.loc[~table["touches_border"].astype(bool), key].to_numpy(float),
        "true_diameters": t.loc[~t["touches_border"].astype(bool), key].to_numpy(float),
    }


def write_report(rows: list[dict], metrics: dict, args: argparse.Namespace, path: Path) -> None:
    unit = rows[0]["unit"] if len({r["unit"] for r in rows}) == 1 else "nm or px"
    model = "the bundled default model" if args.model == "default" else f"`{args.model}`"
    if args.train_minutes:
        model += f", fine-tuned for {args.train_minutes:g} min on generated pairs"
    lines = [
        "# napari-sagegan demo report",
        "",
        f"{len(rows)} generated micrographs of {args.size} x {args.size} px (seed {args.seed}), "
        f"segmented with {model} by `sagegan segment --csv`; the pixel size of each comes "
        "from its TIFF's ImageJ calibration. *Particles* counts every particle found "
        "(in brackets: those touching the image border); the diameters (equivalent "
        f"diameter: the disc of the same area, in {unit}) leave the border particles out, as the "
        "CSV's `touches_border` column says. *Exact* columns measure the generator's true "
        "labels the same way. Dice and F1@0.5 (instance matching at IoU 0.5) come from "
        "`sagegan evaluate` against the exact labels.",
        "",
        f"| image | nm/px | particles | exact | mean ± std ({unit}) | D10 | D50 | D90 "
        "| exact D50 | Dice | F1@0.5 | overlay |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    per_image = metrics["per_image"]
    for r in rows:
        m = per_image[r["name"]]
        lines.append(
            f"| {r['name']} | {r['pixel_size']:g} | {r['count']} ({r['border']}) "
            f"| {r['true_count']} | {_mean_std(r['mean'], r['std'])} | {_fmt(r['d10'])} "
            f"| {_fmt(r['d50'])} | {_fmt(r['d90'])} | {_fmt(r['true_d50'])} "
            f"| {m['dice']:.3f} | {m['f1@0.5']:.3f} "
            f"| [overlays/{r['name']}.png](overlays/{r['name']}.png) |"
        )
    mean = metrics["mean"]
    lines += [
        f"| **mean** | | | | | | | | | {mean['dice']:.3f} | {mean['f1@0.5']:.3f} | |",
        "",
        "Overlays: outlines in orange for the measured particles, in blue for those touching "
        "the border.",
        "",
    ]
    if mean["f1@0.5"] < 0.5:
        advice = (
            f"The mean F1@0.5 of {mean['f1@0.5']:.2f} is low: the model misses, merges or "
            "splits many particles (compare the counts, and look at the overlays). The bundled "
            "model is a weak starting point (docs/model-card.md in the repository): fine-tune "
            "it on a few corrected images of your own (docs/user-guide.md, Troubleshooting)"
        )
        if not args.train_minutes:
            advice += ", or run the demo with `--train-minutes 3` to fine-tune it on generated "
            advice += "pairs first"
        lines += [advice + ".", ""]
    lines += [
        "![Equivalent diameters, segmented against exact](size_histogram.png)",
        "",
        "Files: `images/` the micrographs (calibrated TIFF), `truth/` their exact labels, "
        "`labels/<image>.tif` the instance labels (Fiji opens them), `labels/<image>.csv` "
        "one row per particle (size, shape, nearest neighbour, psi6/psi4), "
        "`labels/<image>.summary.json` the summary statistics and g(r), `metrics.json` the "
        "scores.",
        "",
    ]
    path.write_text("\n".join(lines), encoding="utf-8")


def napari_command(out: Path) -> str:
    exe = Path(sys.executable).parent / "napari"
    napari = _rel(exe) if exe.exists() else "napari"
    return f'{napari} {_rel(out)}/images/*.tif -w napari-sagegan Segment "Measure particles"'


def _rel(p: Path) -> str:
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(p)


def run(args: argparse.Namespace) -> int:
    from napari_sagegan.cli import main as sagegan

    t0 = time.perf_counter()
    out = Path(args.out).expanduser().resolve()
    prepare_out(out)
    images, truth, labels = out / "images", out / "truth", out / "labels"
    write_samples(args.kinds, args.size, args.seed, images, truth)
    print(f"demo: wrote {len(args.kinds)} sample images to {_rel(images)}")

    model = args.model
    if args.train_minutes > 0:
        model = train(model, args.train_minutes, out, args.seed)

    rc = sagegan(["segment", str(images), "--out", str(labels), "--model", model, "--csv"])
    if rc:
        return rc
    rc = sagegan(
        ["evaluate", "--pred", str(labels), "--gt", str(truth), "--json", str(out / "metrics.json")]
    )
    if rc:
        return rc
    metrics = json.loads((out / "metrics.json").read_text())
    (out / "overlays").mkdir()
    rows = [collect(kind, out) for kind in args.kinds]
    size_histograms(rows, out / "size_histogram.png")
    write_report(rows, metrics, args, out / "report.md")

    o = _rel(out)
    print(f"\ndemo: done in {time.perf_counter() - t0:.0f} s. Outputs in {o}/:")
    for path, what in (
        ("report.md", "counts, sizes in nm, Dice/F1, links to the pictures"),
        ("overlays/<image>.png", "particle outlines on each image"),
        ("size_histogram.png", "equivalent diameters, segmented vs exact"),
        ("labels/<image>.tif", "instance labels (Fiji, napari)"),
        ("labels/<image>.csv", "one row per particle; <image>.summary.json: statistics"),
        ("images/, truth/", "the sample images (calibrated TIFFs) and their exact labels"),
    ):
        print(f"  {o + '/' + path:<{len(o) + 23}} {what}")
    print("demo: look at the same images in napari, with the plugin's docks open:")
    print(f"  {napari_command(out)}")
    print(
        '  In "Segment" tick "all open images" and press Segment; in the "Measure particles" '
        "tab\n  pick a Labels layer and its Image (the pixel size comes from the TIFF) and "
        "press Measure."
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        return run(args)
    except DemoError as err:
        print(f"demo: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
