"""The ``sagegan`` command: train, segment and evaluate from a terminal.

Bad input exits with status 2 and a one-line reason (no traceback) and leaves no partial
output; an interrupted run (Ctrl-C) exits with status 130.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class _Fail(Exception):
    """A user-facing error: printed as one line."""


def _progress_bar(total: int | None, desc: str):
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit="step",
        dynamic_ncols=True,
        file=sys.stderr,
        disable=None if os.environ.get("SAGEGAN_PROGRESS") != "1" else False,
    )


def _drive(gen, bar, on_event=None):
    """Run an engine generator, advancing a tqdm bar; return the generator's result."""
    try:
        while True:
            try:
                ev = next(gen)
            except StopIteration as stop:
                return stop.value
            if ev.total and bar.total != ev.total:
                bar.total = ev.total
            bar.n = ev.step
            if on_event is not None:
                on_event(ev, bar)
            bar.refresh()
    finally:
        gen.close()
        bar.close()


# --------------------------------------------------------------------------- train
def _load_pairs(images_dir: str, masks_dir: str):
    from napari_sagegan.io.images import find_pairs, read_image, read_labels

    pairs = find_pairs(images_dir, masks_dir)
    images, labels = [], []
    for img_path, mask_path in pairs:
        image = read_image(img_path)
        if image.ndim != 2:
            raise _Fail(f"{img_path} has shape {image.shape}; training needs 2-D images")
        mask = read_labels(mask_path)
        if mask.shape != image.shape:
            raise _Fail(
                f"{mask_path.name} has shape {mask.shape} but its image {img_path.name} has "
                f"shape {image.shape}; a mask must match its image pixel for pixel"
            )
        images.append(image)
        labels.append(mask)
    return images, labels


def cmd_train(args: argparse.Namespace) -> int:
    from napari_sagegan.engine.config import TrainConfig, preset

    out = Path(args.out)
    if out.exists() and out.is_dir():
        raise _Fail(f"--out {out} is a folder; give a file name such as {out / 'model.pt'}")
    if not out.parent.exists():
        raise _Fail(f"the folder of --out ({out.parent}) does not exist; create it first")
    max_minutes = args.max_minutes
    epochs = args.epochs
    if max_minutes is None and epochs is None:
        max_minutes = 60.0
        print(
            "sagegan: no --epochs or --max-minutes given: training for at most 60 minutes",
            file=sys.stderr,
        )
    optional = {
        "batch_size": args.batch_size,
        "patch_size": args.patch_size,
        "scale_jitter": args.scale_jitter,
    }
    config = TrainConfig(
        epochs=epochs or 500,
        max_minutes=max_minutes,
        seed=args.seed,
        lr=args.lr,
        loss=args.loss,
        val_fraction=args.val_fraction,
        steps_per_epoch=args.steps_per_epoch,
        target_diameter=args.target_diameter or None,
        **{k: v for k, v in optional.items() if v is not None},
    )
    arch = preset(args.preset)
    images, labels = _load_pairs(args.images, args.masks)

    from napari_sagegan.engine.train.segmenter import SegmenterTrainer

    trainer = SegmenterTrainer(
        images,
        labels,
        config,
        arch=arch,
        init=args.init,
        resume=args.resume,
        out=out,
        device=args.device,
    )
    print(
        f"sagegan: training on {len(trainer.train_images)} images, validating on "
        f"{len(trainer.val_images)}, device {trainer.device_name}, "
        f"{trainer.steps_per_epoch} steps per epoch",
        file=sys.stderr,
    )
    bar = _progress_bar(None, "train")

    def on_event(ev, bar):
        if ev.stage == "train":
            bar.set_postfix(epoch=ev.data["epoch"], loss=f"{ev.data['loss']:.4f}", refresh=False)
        else:
            bar.write(ev.message, file=sys.stderr)

    try:
        result = _drive(trainer.run(), bar, on_event)
    except KeyboardInterrupt:
        if out.exists():
            print(f"sagegan: interrupted; the best model so far is in {out}", file=sys.stderr)
        else:
            print(
                "sagegan: interrupted before any model was validated; nothing written",
                file=sys.stderr,
            )
        return EXIT_INTERRUPTED
    if not out.exists():  # e.g. no validation round happened: write the final model
        trainer.save(
            out, state=trainer.best_state, epoch=trainer.start_epoch, metrics=result.best_metrics
        )
    scores = ", ".join(
        f"{k} {v:.3f}"
        for k, v in result.best_metrics.items()
        if k in ("dice", "f1@0.5", "f1@0.5:0.9")
    )
    print(
        f"sagegan: wrote {out} (best validation: {scores or 'n/a'}; stopped by {result.stopped_by})"
    )
    return 0


# --------------------------------------------------------------------------- segment
def cmd_segment(args: argparse.Namespace) -> int:
    from napari_sagegan.io.em import EM_SUFFIXES, read_em
    from napari_sagegan.io.export import write_labels_tiff
    from napari_sagegan.io.images import IMAGE_SUFFIXES, list_images, probe_image, read_image

    files = list_images(args.inputs, IMAGE_SUFFIXES + EM_SUFFIXES)
    for f in files:  # refuse a bad input before spending time on the good ones
        if f.suffix.lower() not in EM_SUFFIXES:  # EM readers have no header-only mode
            probe_image(f)
    stems = [f.stem for f in files]
    dupes = sorted({s for s in stems if stems.count(s) > 1})
    if dupes:
        raise _Fail(
            f"several inputs share the name {dupes[0]!r}; their outputs would overwrite "
            "each other: rename them or segment them separately"
        )
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise _Fail(f"--out {out_dir} exists and is not a folder")

    from napari_sagegan.engine.config import InferConfig  # noqa: F401  (validates overrides below)
    from napari_sagegan.engine.infer.segment import Segmenter

    if args.diameter is not None and args.diameter_nm is not None:
        raise _Fail("give the particle diameter once: --diameter (pixels) or --diameter-nm")
    for flag, value in (("--diameter", args.diameter), ("--diameter-nm", args.diameter_nm)):
        if value is not None and not value > 0:
            raise _Fail(f"{flag} must be a positive particle diameter, got {value}")
    if args.pixel_size is not None and not args.pixel_size > 0:
        raise _Fail(f"--pixel-size must be a positive number of nm, got {args.pixel_size}")
    from napari_sagegan.io.em import read_pixel_size

    pixel_sizes, px_sources = {}, {}
    for f in files:  # header only for TIFFs; EM files tell theirs when they are read
        if args.pixel_size:
            pixel_sizes[f], px_sources[f] = args.pixel_size, "given"
        elif f.suffix.lower() not in EM_SUFFIXES:
            meta = read_pixel_size(f)
            pixel_sizes[f], px_sources[f] = meta.get("pixel_size"), meta.get("source")
    if args.diameter_nm is not None:
        for f in files:
            if f not in pixel_sizes:
                meta = read_pixel_size(f)
                pixel_sizes[f], px_sources[f] = meta.get("pixel_size"), meta.get("source")
        if args.diameter_nm is not None:
            unknown = [f.name for f in files if not pixel_sizes[f]]
            if unknown:
                raise _Fail(
                    f"--diameter-nm needs the pixel size, and {unknown[0]} does not record one; "
                    "give --pixel-size NM, or the diameter in pixels with --diameter"
                )

    seg = Segmenter.load(args.model, device=args.device)
    config = seg.default_infer_config(
        tile_size=args.tile_size,
        threshold=args.threshold,
        batch_size=args.batch_size,
        split=False if args.no_split else None,
        auto_scale=False if args.no_auto_scale else None,
    )
    if seg.target_diameter is None and (args.diameter or args.diameter_nm):
        import warnings

        warnings.warn(
            "this model was trained at its images' own scale (no network scale): the "
            "particle diameter is ignored; retrain it with `sagegan train` to use one",
            stacklevel=1,
        )
    print(f"sagegan: segmenting {len(files)} image(s) on {seg.device_name}", file=sys.stderr)
    parent = out_dir.parent if str(out_dir.parent) else Path(".")
    if not parent.exists():
        raise _Fail(f"the folder holding --out ({parent}) does not exist")
    staging = Path(tempfile.mkdtemp(prefix=".sagegan-", dir=parent))
    try:
        written = []
        for i, path in enumerate(files, 1):
            if path.suffix.lower() in EM_SUFFIXES:
                image, meta = read_em(path)
                if path not in pixel_sizes:
                    pixel_sizes[path], px_sources[path] = meta.get("pixel_size"), meta["source"]
            else:
                image = read_image(path)
            bar = _progress_bar(None, f"[{i}/{len(files)}] {path.name}")
            px = pixel_sizes.get(path)
            diameter = args.diameter
            if args.diameter_nm is not None:
                diameter = args.diameter_nm / px
            plane_config = dataclasses.replace(config, diameter=diameter) if diameter else config
            result = _drive(seg.segment(image, plane_config), bar)
            if result.scale is not None and result.scale.diameter is not None:
                print(f"sagegan: {path.name}: {result.scale.describe(px)}", file=sys.stderr)
            target = staging / f"{path.stem}.tif"
            # Fiji-ready labels, calibrated when the pixel size is known
            write_labels_tiff(
                target,
                result.labels,
                scale=(px, px) if px else None,  # Y, X (a stack's Z stays a slice index)
                unit="nm" if px else None,
            )
            if args.csv:
                from napari_sagegan.cli.measure import write_particle_csv

                write_particle_csv(
                    staging / f"{path.stem}.csv",
                    result.labels,
                    image,
                    px,
                    pixel_size_source=px_sources.get(path) if px else None,
                )
            n = int(result.labels.max())  # ids are consecutive and unique across slices
            written.append((path, n))
        out_dir.mkdir(parents=True, exist_ok=True)
        for f in sorted(staging.iterdir()):
            os.replace(f, out_dir / f.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for path, n in written:
        print(f"{path.name}: {n} particles -> {out_dir / (path.stem + '.tif')}")
    return 0


# --------------------------------------------------------------------------- evaluate
def cmd_evaluate(args: argparse.Namespace) -> int:
    from napari_sagegan.engine.analysis.metrics import evaluate_pair, mean_metrics
    from napari_sagegan.io.images import find_pairs, read_labels

    pairs = find_pairs(args.pred, args.gt)
    rows = {}
    for pred_path, gt_path in pairs:
        pred, gt = read_labels(pred_path), read_labels(gt_path)
        if pred.shape != gt.shape:
            raise _Fail(
                f"{pred_path.name} has shape {pred.shape} but {gt_path.name} has shape {gt.shape}"
            )
        rows[pred_path.stem] = evaluate_pair(pred, gt)
    mean = mean_metrics(list(rows.values()))
    keys = ["dice", "precision@0.5", "recall@0.5", "f1@0.5", "f1@0.5:0.9", "n_pred", "n_gt"]
    width = max(len("mean"), *(len(s) for s in rows))
    print(f"{'image':<{width}}  " + "  ".join(f"{k:>13}" for k in keys))
    for stem, m in list(rows.items()) + [("mean", mean)]:
        print(
            f"{stem:<{width}}  "
            + "  ".join(
                f"{m[k]:>13.4f}" if isinstance(m[k], float) else f"{m[k]:>13}" for k in keys
            )
        )
    if args.json:
        from napari_sagegan.util.files import atomic_write_text

        atomic_write_text(args.json, json.dumps({"per_image": rows, "mean": mean}, indent=2))
    return 0


# --------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from napari_sagegan import __version__

    p = argparse.ArgumentParser(
        prog="sagegan",
        description="Segment nanoparticles in electron micrographs (SAGE-GAN Attention U-Net).",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train or fine-tune a segmenter on image/mask folders")
    t.add_argument("--images", required=True, help="folder of images (PNG/TIFF)")
    t.add_argument(
        "--masks",
        required=True,
        help="folder of masks matched to images by file stem (instance or binary)",
    )
    t.add_argument("--out", required=True, help="checkpoint file to write (best model)")
    t.add_argument("--init", default=None, help="fine-tune from MODEL.pt or 'default'")
    t.add_argument("--resume", default=None, help="continue a run from its checkpoint")
    t.add_argument("--preset", default="default", help="architecture: default, paper or tiny")
    t.add_argument("--max-minutes", type=float, default=None, help="wall-clock budget")
    t.add_argument("--epochs", type=int, default=None, help="maximum epochs (default 500)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    t.add_argument("--batch-size", type=int, default=None, help="patches per step (default 8)")
    t.add_argument(
        "--patch-size", type=int, default=None, help="patch side in network pixels (default 128)"
    )
    t.add_argument(
        "--target-diameter",
        type=float,
        default=32.0,
        metavar="PX",
        help="train at this particle diameter: each image is resampled so its particles' "
        "median diameter is PX pixels (default 32; 0: train at the images' own scale). "
        "Ignored when fine-tuning or resuming: a model keeps its own",
    )
    t.add_argument(
        "--scale-jitter",
        type=float,
        default=None,
        help="zoom patches by a random factor in [1/J, J] (default 1.5)",
    )
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--loss", default="focal_tversky", choices=["focal_tversky", "ce_dice"])
    t.add_argument("--val-fraction", type=float, default=0.2)
    t.add_argument(
        "--steps-per-epoch",
        type=int,
        default=0,
        help="optimisation steps per epoch (0: one pass over the images' area)",
    )
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("segment", help="segment images into instance label TIFFs")
    s.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders")
    s.add_argument("--out", required=True, help="output folder for <stem>.tif label images")
    s.add_argument("--model", default="default", help="MODEL.pt or 'default' (bundled)")
    s.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
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
    s.set_defaults(func=cmd_segment)

    e = sub.add_parser("evaluate", help="compare predicted labels with ground truth")
    e.add_argument("--pred", required=True, help="folder of predicted label images")
    e.add_argument("--gt", required=True, help="folder of ground-truth label images")
    e.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    e.set_defaults(func=cmd_evaluate)

    from napari_sagegan.cli.measure import add_measure_parser

    add_measure_parser(sub)
    from napari_sagegan.cli.gan import add_gan_parsers

    add_gan_parsers(sub)
    return p


def _show_warning(message, category, filename, lineno, file=None, line=None):
    text = str(message).strip().splitlines()[0] if str(message).strip() else category.__name__
    print(f"sagegan: warning: {text}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    import warnings

    warnings.showwarning = _show_warning
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("sagegan: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (
        _Fail,
        ValueError,
        FileNotFoundError,
        IsADirectoryError,
        NotADirectoryError,
        PermissionError,
    ) as err:
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"sagegan: error: {msg}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except MemoryError:
        print(
            "sagegan: error: out of memory; try a smaller --tile-size or --batch-size",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
