"""Accuracy on held-out real micrographs: presets at equal CPU budget vs Otsu + watershed.

Usage::

    python benchmarks/bench_accuracy.py --presets tiny8,default,wide32 --minutes 12 \
        --out-dir runs/accuracy [--save-default]

Trains each preset on the EMPS training part (80 %, of which a seeded 5 % is used for model
selection) for the same wall-clock budget on this CPU, then segments the fixed 20 % held-out
subset (never trained or tuned on) and reports foreground Dice, instance F1 at IoU 0.5 and
mean F1 over IoU 0.5:0.9, for three post-processings of the same network output: the
boundary-aware split (distance head seeds), binary mask + distance-transform watershed, and
plain connected components; plus a classical Otsu + watershed baseline run by the same
script, and the CPU inference speed of each preset. Writes docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from skimage.filters import threshold_otsu

sys.path.insert(0, str(Path(__file__).resolve().parent))
import emps  # noqa: E402
from _common import machine, markdown_table, write_section  # noqa: E402
from napari_sagegan.engine.analysis.metrics import evaluate_pair, mean_metrics  # noqa: E402
from napari_sagegan.engine.config import ArchConfig, InferConfig, TrainConfig, preset  # noqa: E402
from napari_sagegan.engine.data.intensity import normalize  # noqa: E402
from napari_sagegan.engine.infer.postprocess import instances_from_maps, watershed_baseline  # noqa: E402
from napari_sagegan.engine.infer.segment import Segmenter  # noqa: E402
from napari_sagegan.engine.nets.attention_unet import count_parameters  # noqa: E402
from napari_sagegan.engine.train.segmenter import SegmenterTrainer  # noqa: E402
from napari_sagegan.util.progress import run_to_end  # noqa: E402

EXTRA_PRESETS = {
    "tiny8": ArchConfig(base_channels=8, depth=4),
    "wide32": ArchConfig(base_channels=32, depth=4),
}


def arch_for(name: str) -> ArchConfig:
    return EXTRA_PRESETS[name] if name in EXTRA_PRESETS else preset(name)


def otsu_watershed(image: np.ndarray) -> np.ndarray:
    """Classical baseline: Otsu threshold (particles = the minority side), EDT watershed."""
    x = normalize(image)
    t = threshold_otsu(x)
    fg = x > t
    if fg.mean() > 0.5:
        fg = ~fg
    return watershed_baseline(fg.astype(np.float32), threshold=0.5)


def evaluate_model(seg: Segmenter, holdout, cfg: InferConfig):
    rows = {"split": [], "watershed": [], "components": []}
    seconds, mpix = 0.0, 0.0
    for _stem, image, gt in holdout:
        t = time.perf_counter()
        # a model trained at a network scale sees each image resampled to it (classical
        # size estimate); min_size is in network pixels
        factor = seg.plan_scale(image, cfg).factor
        maps = run_to_end(seg.predict_maps(image, cfg, factor=factor))
        seconds += time.perf_counter() - t
        mpix += image.size / 1e6
        min_size = max(1, round(cfg.min_size / factor**2))
        kw = dict(threshold=cfg.threshold, fill_holes=True, min_size=min_size)
        rows["split"].append(
            evaluate_pair(
                instances_from_maps(
                    maps[0], maps[1], seed_threshold=cfg.seed_threshold, split=True, **kw
                ),
                gt,
            )
        )
        rows["watershed"].append(
            evaluate_pair(
                watershed_baseline(maps[0], threshold=cfg.threshold, min_size=min_size), gt
            )
        )
        rows["components"].append(
            evaluate_pair(instances_from_maps(maps[0], None, split=False, **kw), gt)
        )
    return {k: mean_metrics(v) for k, v in rows.items()}, mpix / seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="tiny8,default,wide32")
    ap.add_argument("--minutes", type=float, default=12.0)
    ap.add_argument("--out-dir", default="runs/accuracy")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--lr",
        type=float,
        default=1e-3,
        help="Adam learning rate (1e-3: short CPU budgets from scratch)",
    )
    ap.add_argument("--steps-per-epoch", type=int, default=100)
    ap.add_argument(
        "--limit", type=int, default=None, help="use only N images per split (smoke test)"
    )
    ap.add_argument("--eval-only", action="store_true", help="reuse the checkpoints in --out-dir")
    args = ap.parse_args()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train, holdout = emps.load(args.limit)
    print(f"EMPS: {len(train)} training pairs, {len(holdout)} held out", flush=True)
    images = [p[1] for p in train]
    labels = [p[2] for p in train]
    cfg = InferConfig()

    otsu = mean_metrics([evaluate_pair(otsu_watershed(im), gt) for _s, im, gt in holdout])
    rows = []
    for name in args.presets.split(","):
        ckpt = out_dir / f"{name}.pt"
        arch = arch_for(name)
        if not args.eval_only:
            trainer = SegmenterTrainer(
                images,
                labels,
                TrainConfig(
                    max_minutes=args.minutes,
                    seed=args.seed,
                    val_fraction=0.05,
                    lr=args.lr,
                    steps_per_epoch=args.steps_per_epoch,
                    epochs=10_000,
                ),
                arch=arch,
                out=ckpt,
                device="cpu",
                infer=cfg,
            )
            t0 = time.perf_counter()
            for ev in trainer.run():
                if ev.stage == "validate":
                    print(
                        f"[{name}] {ev.message} ({(time.perf_counter() - t0) / 60:.1f} min)",
                        flush=True,
                    )
            print(f"[{name}] {trainer.step} steps", flush=True)
        seg = Segmenter.load(ckpt, device="cpu")
        res, speed = evaluate_model(seg, holdout, cfg)
        steps = seg.checkpoint.get("step", 0)
        n_params = count_parameters(seg.model)
        for mode, label in (
            ("split", "distance-seeded split (ours)"),
            ("watershed", "binary + EDT watershed"),
            ("components", "connected components"),
        ):
            m = res[mode]
            rows.append(
                [
                    name,
                    f"{n_params / 1e6:.2f} M",
                    f"{speed:.2f}",
                    steps,
                    label,
                    m["dice"],
                    m["f1@0.5"],
                    m["f1@0.5:0.9"],
                ]
            )
            print(rows[-1], flush=True)
    rows.append(
        [
            "Otsu + watershed",
            "-",
            "-",
            "-",
            "classical baseline",
            otsu["dice"],
            otsu["f1@0.5"],
            otsu["f1@0.5:0.9"],
        ]
    )
    header = [
        "model",
        "params",
        "CPU MP/s",
        "best step",
        "instances by",
        "Dice",
        "F1@0.5",
        "F1@0.5:0.9",
    ]
    table = markdown_table(header, rows)
    print(table)
    cmd = (
        f"python benchmarks/bench_accuracy.py --presets {args.presets} --minutes "
        f"{args.minutes} --steps-per-epoch {args.steps_per_epoch} --seed {args.seed} --lr {args.lr}"
    )
    write_section(
        "bench-accuracy",
        (
            "## Accuracy on held-out EMPS micrographs\n\n"
            f"Machine: {machine()}.\nCommand: `{cmd}`\n\n"
            f"Data: ../shared/data/emps-train, {len(train)} pairs for training (5 % of them for "
            f"model selection), a fixed seeded 20 % ({len(holdout)} images, seed "
            f"{emps.HOLDOUT_SEED}) held out and never trained or tuned on. Each preset trained for "
            f"{args.minutes} minutes of wall clock on this CPU, then the same network output "
            "post-processed three ways. CPU MP/s: tiled inference speed on the held-out images.\n\n"
            + table
        ),
    )


if __name__ == "__main__":
    main()
