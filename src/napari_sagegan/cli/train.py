"""``sagegan train``: train or fine-tune a segmenter on folders of images and masks.

Writes the best model (by validation instance F1) to ``--out`` at every improvement; Ctrl-C
keeps the best so far. The work is :func:`napari_sagegan.api.fine_tune`'s.
"""

from __future__ import annotations

import argparse
from typing import Any

from napari_sagegan.cli._common import DEVICES, config_flags, config_values, drive, say

EXIT_INTERRUPTED = 130

#: TrainConfig fields with a flag of their own (the type and the default come from it).
FLAGS = {
    "seed": "random seed",
    "batch_size": "patches per step",
    "patch_size": "patch side in network pixels",
    "scale_jitter": "zoom patches by a random factor in [1/J, J]",
    "lr": "learning rate",
    "loss": "training loss",
    "tversky_fp": "Tversky weight of false positives (the authors': 0.3)",
    "tversky_fn": "Tversky weight of false negatives (the authors': 0.7)",
    "val_fraction": "fraction of the pairs kept for validation",
    "steps_per_epoch": "optimisation steps per epoch (0: one pass over the images' area)",
}


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``train`` on the ``sagegan`` sub-parsers."""
    from napari_sagegan.engine.config import TrainConfig

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
    t.add_argument("--device", default="auto", choices=DEVICES)
    t.add_argument(
        "--target-diameter",
        type=float,
        default=32.0,
        metavar="PX",
        help="train at this particle diameter: each image is resampled so its particles' "
        "median diameter is PX pixels (default 32; 0: train at the images' own scale). "
        "Ignored when fine-tuning or resuming: a model keeps its own",
    )
    config_flags(t, TrainConfig(), FLAGS, loss={"choices": ["focal_tversky", "ce_dice"]})
    t.add_argument(
        "--no-calibrate",
        dest="calibrate",
        action="store_false",
        help="keep the thresholds as they are after training (default: choose them on the "
        "validation images so that particle sizes are unbiased, and store them in the model)",
    )
    t.set_defaults(func=run)
    return t


def run(args: argparse.Namespace) -> int:
    """Run ``sagegan train``; returns the exit status."""
    from pathlib import Path

    from napari_sagegan import api
    from napari_sagegan.engine.config import TrainConfig

    max_minutes, epochs = args.max_minutes, args.epochs
    if max_minutes is None and epochs is None:
        max_minutes = 60.0
        say("no --epochs or --max-minutes given: training for at most 60 minutes")
    config = TrainConfig(
        epochs=epochs or 500,
        max_minutes=max_minutes,
        target_diameter=args.target_diameter or None,
        calibrate=args.calibrate,
        **config_values(args, FLAGS),
    )
    out = Path(args.out)

    def on_event(ev: Any, bar: Any) -> None:
        if ev.stage == "prepare":
            if ev.step:
                say(ev.message)
        elif ev.stage == "train":
            bar.tqdm.set_postfix(
                epoch=ev.data["epoch"], loss=f"{ev.data['loss']:.4f}", refresh=False
            )
        elif ev.stage == "calibrate":
            if ev.data:  # the chosen operating point (the grid's steps stay quiet)
                bar.write(ev.message)
        else:
            bar.write(ev.message)

    gen = api.fine_tune(
        folder=(args.images, args.masks), init=args.init, config=config, arch=args.preset,
        resume=args.resume, out=out, device=args.device,
    )  # fmt: skip
    try:
        trained = drive(gen, "train", on_event)
    except KeyboardInterrupt:
        if out.exists():
            say(f"interrupted; the best model so far is in {out}")
        else:
            say("interrupted before any model was validated; nothing written")
        return EXIT_INTERRUPTED
    result = trained.result
    scores = ", ".join(
        f"{k} {v:.3f}"
        for k, v in result.best_metrics.items()
        if k in ("dice", "f1@0.5", "f1@0.5:0.9")
    )
    print(
        f"sagegan: wrote {out} (best validation: {scores or 'n/a'}; stopped by {result.stopped_by})"
    )
    return 0
