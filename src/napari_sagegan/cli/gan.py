"""``sagegan augment`` and ``sagegan generate``: SAGE-GAN phase 2 from a terminal.

::

    sagegan augment --images DIR --masks DIR --seg MODEL.pt|default --out DIR [--n N]
                    [--max-minutes M] [--layout real|paste|lattice] [--seed S]
    sagegan generate --generator G.pt --out DIR --n N [--masks DIR | --layout lattice ...]

``augment`` trains phase 2 (the segmenter inside a CycleGAN with a mask -> image generator)
and writes ``OUT/segmenter.pt`` (usable by ``sagegan segment --model``), ``OUT/generator.pt``
and ``N`` synthetic pairs ``OUT/images/synth_0001.tif`` + ``OUT/masks/synth_0001.tif``.
Everything is written into a hidden staging folder beside ``OUT`` and moved into place at the
end: bad input, an error or Ctrl-C leave no partial output.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


def _check_out(out: str) -> Path:
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise ValueError(
            f"--out {out_dir} is not empty; give a new or empty folder so nothing is overwritten"
        )
    parent = out_dir.parent if str(out_dir.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"the folder holding --out ({parent}) does not exist")
    return out_dir


def _write_pairs(folder: Path, pairs, prefix: str = "synth") -> None:
    from napari_sagegan.engine.synthetic.layouts import to_uint8
    from napari_sagegan.io.images import write_labels_tif
    from napari_sagegan.util.files import atomic_path

    (folder / "images").mkdir(exist_ok=True)
    (folder / "masks").mkdir(exist_ok=True)
    import tifffile

    for i, (image, labels) in enumerate(pairs, 1):
        name = f"{prefix}_{i:04d}.tif"
        with atomic_path(folder / "images" / name) as tmp:
            tifffile.imwrite(tmp, to_uint8(image))
        write_labels_tif(folder / "masks" / name, labels)


def _publish(staging: Path, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in sorted(staging.iterdir()):
        os.replace(f, out_dir / f.name)


def _generate(gen, masks, seed: int, device: str):
    from napari_sagegan.cli import _drive, _progress_bar
    from napari_sagegan.engine.synthetic.layouts import synthesize_pairs

    return _drive(
        synthesize_pairs(gen, masks, seed=seed, device=device), _progress_bar(None, "generate")
    )


def cmd_augment(args: argparse.Namespace) -> int:
    from napari_sagegan.cli import _drive, _load_pairs, _progress_bar

    if args.n < 0:
        raise ValueError(f"--n must be 0 or more, got {args.n}")
    out_dir = _check_out(args.out)
    images, labels = _load_pairs(args.images, args.masks)
    if not images:
        raise ValueError(f"no image/mask pairs found in {args.images} and {args.masks}")
    from napari_sagegan.engine.checkpoint import load_checkpoint
    from napari_sagegan.engine.synthetic.layouts import make_masks
    from napari_sagegan.engine.train.gan import GanConfig, GanTrainer

    seg = load_checkpoint(args.seg, kind="segmenter")  # "default": the bundled model
    config = GanConfig.short(
        max_minutes=args.max_minutes,
        epochs=args.epochs,
        seed=args.seed,
        patch_size=args.patch_size,
        batch_size=args.batch_size,
        steps_per_epoch=args.steps_per_epoch,
        gen_base_channels=args.gen_channels,
    )
    parent = out_dir.parent if str(out_dir.parent) else Path(".")
    staging = Path(tempfile.mkdtemp(prefix=".sagegan-augment-", dir=parent))
    try:
        trainer = GanTrainer(images, labels, config, seg=seg, out=staging, device=args.device)
        print(
            f"sagegan: phase 2 on {len(trainer.seg.train_images)} images, validating on "
            f"{len(trainer.seg.val_images)}, device {trainer.seg.device_name}",
            file=sys.stderr,
        )
        bar = _progress_bar(None, "augment")

        def on_event(ev: Any, bar: Any) -> None:
            if ev.stage == "train":
                bar.set_postfix(
                    epoch=ev.data["epoch"], loss=f"{ev.data['loss']:.2f}", refresh=False
                )
            elif ev.stage == "validate":
                bar.write(ev.message, file=sys.stderr)

        result = _drive(trainer.run(), bar, on_event)  # Ctrl-C: staging removed below
        (staging / "gan_state.pt").unlink(missing_ok=True)
        if args.n:
            masks = make_masks(trainer.seg.train_labels, args.n, layout=args.layout, seed=args.seed)
            pairs = _generate(result.generator, masks, args.seed, args.device)
            _write_pairs(staging, pairs)
        _publish(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    m = result.best_metrics
    score = (
        f"val Dice {m['dice']:.3f}, F1@0.5 {m['f1@0.5']:.3f}" if "dice" in m else "no validation"
    )
    print(
        f"sagegan: wrote {out_dir / 'segmenter.pt'} ({score}), {out_dir / 'generator.pt'} "
        f"(val SSIM {result.generator_metrics.get('ssim', float('nan')):.3f}) and {args.n} "
        f"pairs under {out_dir}"
    )
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from napari_sagegan.engine.synthetic.layouts import LAYOUTS, make_masks
    from napari_sagegan.engine.train.gan import load_generator

    if args.n < 1:
        raise ValueError(f"--n must be at least 1, got {args.n}")
    out_dir = _check_out(args.out)
    gen, ckpt = load_generator(args.generator)
    source = None
    if args.masks:
        from napari_sagegan.io.images import list_images, read_labels

        source = [read_labels(p) for p in list_images(args.masks)]
        if not source:
            raise ValueError(f"no mask files in {args.masks}")
    layout = args.layout or ("real" if source is not None else "lattice")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown --layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    stats = None if source is not None else (ckpt.get("extra") or {}).get("mask_stats")
    if source is None and stats is None:
        raise ValueError(f"{args.generator} stores no mask statistics; give --masks DIR")
    shape = (args.size, args.size) if args.size else None
    masks = make_masks(source, args.n, layout=layout, shape=shape, stats=stats, seed=args.seed)
    pairs = _generate(gen, masks, args.seed, args.device)
    parent = out_dir.parent if str(out_dir.parent) else Path(".")
    staging = Path(tempfile.mkdtemp(prefix=".sagegan-generate-", dir=parent))
    try:
        _write_pairs(staging, pairs)
        _publish(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    n_particles = int(np.mean([int(lab.max()) for _, lab in pairs]))
    print(
        f"sagegan: wrote {len(pairs)} pairs ({layout} layout, about {n_particles} particles "
        f"each) to {out_dir / 'images'} and {out_dir / 'masks'}"
    )
    return 0


def add_gan_parsers(sub: Any) -> None:
    """Register ``augment`` and ``generate`` on the ``sagegan`` sub-parsers."""
    a = sub.add_parser(
        "augment",
        help="SAGE-GAN phase 2: train the segmenter with a mask->image generator, write "
        "synthetic pairs",
    )
    a.add_argument("--images", required=True, help="folder of training images")
    a.add_argument("--masks", required=True, help="folder of masks matched to images by stem")
    a.add_argument("--seg", required=True, help="phase-1 segmenter MODEL.pt or 'default'")
    a.add_argument("--out", required=True, help="new (or empty) output folder")
    a.add_argument("--n", type=int, default=20, help="synthetic pairs to write (default 20)")
    a.add_argument("--max-minutes", type=float, default=30.0, help="wall-clock budget (30)")
    a.add_argument("--epochs", type=int, default=200, help="maximum epochs of 20 steps")
    a.add_argument("--layout", default="real", choices=["real", "paste", "lattice"])
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    a.add_argument("--patch-size", type=int, default=128)
    a.add_argument("--batch-size", type=int, default=2)
    a.add_argument("--steps-per-epoch", type=int, default=20)
    a.add_argument("--gen-channels", type=int, default=16, help="generator base channels")
    a.set_defaults(func=cmd_augment)

    g = sub.add_parser("generate", help="synthetic image/mask pairs from a trained generator")
    g.add_argument("--generator", required=True, help="generator.pt written by augment")
    g.add_argument("--out", required=True, help="new (or empty) output folder")
    g.add_argument("--n", type=int, required=True, help="number of pairs")
    g.add_argument("--masks", default=None, help="folder of masks to draw layouts from")
    g.add_argument(
        "--layout",
        default=None,
        choices=["real", "paste", "lattice", "hex", "square"],
        help="real/paste need --masks; lattice/hex/square use the training statistics "
        "(default: real with --masks, else lattice)",
    )
    g.add_argument("--size", type=int, default=None, help="side of generated masks, px")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    g.set_defaults(func=cmd_generate)
