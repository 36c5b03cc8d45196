"""``sagegan augment``: SAGE-GAN phase 2 from a terminal.

::

    sagegan augment --images DIR --masks DIR --seg MODEL.pt|default --out DIR [--n N]
                    [--init-generator G.pt|default|none]
                    [--max-minutes M] [--layout real|paste|lattice] [--seed S]

trains phase 2 (the segmenter inside a CycleGAN with a mask -> image generator) and writes
``OUT/segmenter.pt`` (usable by ``sagegan segment --model``), ``OUT/generator.pt`` and ``N``
synthetic pairs ``OUT/images/synth_0001.tif`` + ``OUT/masks/synth_0001.tif``. Everything is
written into a hidden staging folder beside ``OUT`` and moved into place at the end: bad
input, an error or Ctrl-C leave no partial output. The work is
:func:`napari_sagegan.api.augment`'s.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from napari_sagegan.cli._common import DEVICES, config_flags, config_values, drive, say

#: GanConfig fields with a flag of their own (defaults: ``GanConfig.short()``).
FLAGS = {
    "epochs": "maximum epochs",
    "seed": "random seed",
    "patch_size": "patch side, pixels",
    "batch_size": "patches per step",
    "steps_per_epoch": "optimisation steps per epoch",
    "gen_base_channels": "generator base channels",
}


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``augment`` on the ``sagegan`` sub-parsers."""
    from napari_sagegan.engine.config import GanConfig

    a = sub.add_parser(
        "augment",
        help="SAGE-GAN phase 2: train the segmenter with a mask->image generator, write "
        "synthetic pairs",
    )
    a.add_argument("--images", required=True, help="folder of training images")
    a.add_argument("--masks", required=True, help="folder of masks matched to images by stem")
    a.add_argument("--seg", required=True, help="phase-1 segmenter MODEL.pt or 'default'")
    a.add_argument("--out", required=True, help="new (or empty) output folder")
    a.add_argument(
        "--init-generator",
        default="default",
        metavar="G.pt|default|none",
        help="generator to start from: 'default' (the bundled one, pre-trained on many "
        "micrographs, when this installation has one), a generator.pt, or 'none' for random "
        "weights (then --gen-channels sets its size) (default: default)",
    )
    a.add_argument("--n", type=int, default=20, help="synthetic pairs to write (default 20)")
    a.add_argument("--max-minutes", type=float, default=30.0, help="wall-clock budget (30)")
    a.add_argument("--layout", default="real", choices=["real", "paste", "lattice"])
    a.add_argument("--device", default="auto", choices=DEVICES)
    a.add_argument(
        "--overwrite",
        action="store_true",
        help="accept an --out folder that is not empty: its segmenter.pt, generator.pt, "
        "images/ and masks/ are replaced (all or nothing)",
    )
    config_flags(a, GanConfig.short(), FLAGS, gen_base_channels={"flag": "--gen-channels"})
    a.set_defaults(func=run)
    return a


def run(args: argparse.Namespace) -> int:
    """Run ``sagegan augment``; returns the exit status (0)."""
    from napari_sagegan.cli._common import spare_inputs

    pairs = [f"{d}/synth_{i:04d}.tif" for d in ("images", "masks") for i in range(1, args.n + 1)]
    init_generator = None if args.init_generator.lower() == "none" else args.init_generator
    inputs = [args.images, args.masks, args.seg]
    if init_generator not in (None, "default"):
        inputs.append(init_generator)
    spare_inputs(inputs, args.out, ["segmenter.pt", "generator.pt", *pairs])
    from napari_sagegan import api
    from napari_sagegan.cli.train import flag_names
    from napari_sagegan.engine.config import GanConfig

    with flag_names([*FLAGS, "max_minutes"]):
        config = GanConfig.short(max_minutes=args.max_minutes, **config_values(args, FLAGS))

    def on_event(ev: Any, bar: Any) -> None:
        if ev.stage == "prepare" and ev.step:
            say(ev.message)
        elif ev.stage == "train":
            bar.tqdm.set_postfix(
                epoch=ev.data["epoch"], loss=f"{ev.data['loss']:.2f}", refresh=False
            )
        elif ev.stage == "validate":
            bar.write(ev.message)

    gen = api.augment(
        folder=(args.images, args.masks), seg=args.seg, init_generator=init_generator,
        config=config, n=args.n,
        layout=args.layout, out=args.out, device=args.device, overwrite=args.overwrite,
    )  # fmt: skip
    done = drive(gen, "augment", on_event)  # Ctrl-C: nothing written
    out, m = Path(args.out), done.result.best_metrics
    score = (
        f"val Dice {m['dice']:.3f}, F1@0.5 {m['f1@0.5']:.3f}" if "dice" in m else "no validation"
    )
    ssim = done.result.generator_metrics.get("ssim", float("nan"))
    print(
        f"sagegan: wrote {out / 'segmenter.pt'} ({score}), {out / 'generator.pt'} "
        f"(val SSIM {ssim:.3f}) and {args.n} pairs under {out}"
    )
    return 0
