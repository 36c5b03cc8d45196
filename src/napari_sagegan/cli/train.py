"""``sagegan train``: train or fine-tune a segmenter on folders of images and masks.

Writes the best model (by validation instance F1) to ``--out`` at every improvement; Ctrl-C
keeps the best so far. The work is :func:`napari_sagegan.api.fine_tune`'s.
"""

from __future__ import annotations

import argparse
import contextlib
import re
from collections.abc import Iterable, Iterator
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
    "val_fraction": "fraction of the pairs kept for validation (with fewer than 8 pairs: "
    "of each image's area, see --holdout)",
    "holdout": "validate on whole held-out images, or on a held-out band of every image "
    "(auto: a band with fewer than 8 pairs)",
    "recipe": "few-shot fine-tuning recipe (auto: when fine-tuning from --init on at most "
    "10 pairs)",
    "rehearsal": "generated pairs mixed into training so other sizes and contrasts are not "
    "forgotten (the few-shot recipe uses 4)",
    "steps_per_epoch": "optimisation steps per epoch (0: one pass over the images' area)",
    "blend": "after a fine-tune, also try the weights this far from the starting model to "
    "the fine-tuned one (0.5: halfway; 0: do not)",
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
    t.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out whatever it holds (default: an existing model is "
        "replaced only by one that scores better on the same validation images)",
    )
    t.add_argument("--preset", default="default", help="architecture: default, paper or tiny")
    t.add_argument("--max-minutes", type=float, default=None, help="wall-clock budget")
    t.add_argument("--epochs", type=int, default=None, help="maximum epochs (default 500)")
    t.add_argument("--device", default="auto", choices=DEVICES)
    t.add_argument(
        "--channel",
        type=int,
        default=None,
        metavar="N",
        help="the channel to train on in multi-channel images (an ImageJ CYX hyperstack, a "
        "TIFF with several samples per pixel that are not RGB, one of R, G, B), 0 for the "
        "first; such images are refused without it",
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
        "--diameter",
        type=float,
        default=None,
        metavar="PX",
        help="typical particle diameter of the training images in pixels, if you know it: "
        "they are resampled to the network scale by it (default: each mask's median "
        "equivalent diameter, which binary masks of touching particles overestimate)",
    )
    config_flags(
        t, TrainConfig(), FLAGS, loss={"choices": ["focal_tversky", "ce_dice"]},
        holdout={"choices": ["auto", "parts", "images"]},
        recipe={"choices": ["auto", "few-shot", "none"]},
    )  # fmt: skip
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
    from napari_sagegan.cli._common import spare_inputs

    spare_inputs([args.images, args.masks], args.out)  # never a model over a training image
    if args.diameter is not None and not (args.diameter >= 1.0):
        raise ValueError(
            f"--diameter is the typical particle diameter in pixels and must be at least 1, "
            f"got {args.diameter}"
        )
    from pathlib import Path

    from napari_sagegan import api
    from napari_sagegan.cli._common import EXIT_TERMINATED, Terminated
    from napari_sagegan.engine.config import TrainConfig
    from napari_sagegan.engine.train.distributed import (
        PeerStopped,
        exit_now,
        is_follower,
        launch_env,
    )
    from napari_sagegan.util.progress import run_to_end

    # under torchrun, the ranks other than 0 train in silence (rank 0 reports and writes)
    follower, several = is_follower(), launch_env()[1] > 1
    max_minutes, epochs = args.max_minutes, args.epochs
    if max_minutes is None and epochs is None:
        max_minutes = 60.0
        if not follower:
            say("no --epochs or --max-minutes given: training for at most 60 minutes")
    with flag_names([*FLAGS, "epochs", "max_minutes", "target_diameter"]):
        config = TrainConfig(
            epochs=500 if epochs is None else epochs,
            max_minutes=max_minutes,
            target_diameter=args.target_diameter or None,
            calibrate=args.calibrate,
            **config_values(args, FLAGS),
        )
    out = Path(args.out)
    run_state: dict[str, Any] = {}

    def on_event(ev: Any, bar: Any) -> None:
        if ev.stage == "prepare":
            if "trainer" in ev.data:
                run_state["trainer"] = ev.data["trainer"]
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
        resume=args.resume, out=out, device=args.device, channel=args.channel,
        overwrite=args.overwrite, diameter=args.diameter,
    )  # fmt: skip
    try:
        trained = run_to_end(gen) if follower else drive(gen, "train", on_event)
    except KeyboardInterrupt as err:
        if not follower:
            say(f"interrupted; {_what_was_written(run_state.get('trainer'), out)}")
        if several:  # every rank stops now (see exit_now)
            exit_now(EXIT_TERMINATED if isinstance(err, Terminated) else EXIT_INTERRUPTED)
        return EXIT_INTERRUPTED
    except PeerStopped as err:  # another process of a torchrun launch stopped
        say(str(err) if follower else f"{err}; {_what_was_written(run_state.get('trainer'), out)}")
        exit_now(1)
        return 1  # not reached
    except ValueError:  # TrainingDiverged among them: say what stays on disk
        trainer = run_state.get("trainer")
        if trainer is not None and trainer.written is not None:
            say(f"the best model before the error is in {out}")
        raise
    if follower:
        return 0
    result = trained.result
    if result.skipped_steps:
        say(
            f"skipped {result.skipped_steps} steps whose loss or weights were not finite "
            "(NaN or infinite)"
        )
    if result.kept is not None:
        old, new = result.kept["metrics"], result.kept["new_metrics"]
        why = (
            f"it scores {_scores(old)} on the validation images, the new model "
            f"{_scores(new) or 'n/a'}"
            if old
            else "there are no validation images to show that the new model is better"
        )
        print(f"sagegan: kept the existing {out}: {why}; --overwrite replaces it anyway")
        return 0
    if result.decision is not None and "base_recalibrated" in result.decision:
        from napari_sagegan.engine.train.segmenter import describe_outcome

        print(f"sagegan: {describe_outcome(result.decision)}")
    if result.checkpoint is None:
        print(f"sagegan: nothing written to {out}")
        return 0
    print(
        f"sagegan: wrote {out} (best validation: {_scores(result.best_metrics) or 'n/a'}; "
        f"stopped by {result.stopped_by})"
    )
    return 0


def _scores(metrics: dict[str, float]) -> str:
    return ", ".join(
        f"{k} {v:.3f}" for k, v in metrics.items() if k in ("dice", "f1@0.5", "f1@0.5:0.9")
    )


def _what_was_written(trainer: Any, out: Any) -> str:
    """For an interrupted run: only a file this run wrote is announced."""
    if trainer is not None and trainer.written is not None:
        return f"the best model so far is in {out}"
    if trainer is not None and trainer.existing is not None:
        return f"{out} was left as it was (this run had not beaten it)"
    return "nothing written"


@contextlib.contextmanager
def flag_names(fields: Iterable[str]) -> Iterator[None]:
    """Re-raise a config's ``ValueError`` with the names of ``fields`` written as the
    command's flags (``lr`` -> ``--lr``, ``max_minutes`` -> ``--max-minutes``)."""
    try:
        yield
    except ValueError as err:
        names = {f: "--" + f.replace("_", "-") for f in fields}
        pattern = r"\b(" + "|".join(sorted(map(re.escape, names), key=len, reverse=True)) + r")\b"
        raise ValueError(re.sub(pattern, lambda m: names[m.group(1)], str(err))) from None
