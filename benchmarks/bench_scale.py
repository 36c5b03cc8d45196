"""Per-image scale and polarity handling: with vs without, at equal training budget.

Usage::

    # the two arms can train at the same time (one CPU thread each)
    python benchmarks/bench_scale.py --train baseline --minutes 15 &
    python benchmarks/bench_scale.py --train scaled --minutes 15 &
    wait
    python benchmarks/bench_scale.py --evaluate          # writes docs/benchmarks.md

Both arms train the default preset on the same data (the EMPS training part, 80 %, plus
``--synthetic`` generated pairs), with the same seed, learning rate and wall-clock budget:

* ``baseline``: images at their own scale, no polarity inversion, 256-px patches (the
  recipe before per-image scale handling);
* ``scaled``: every training image resampled so its particles' median diameter is 32 px,
  patches zoomed by a random factor in [1/1.5, 1.5], polarity inversion as augmentation,
  128-px patches.

Evaluation on the fixed 20 % EMPS hold-out (never trained or tuned on): Dice, F1@0.5 and
F1@0.5:0.9 overall, per ground-truth median particle diameter bin and per contrast (dark or
bright particles); the scaled model with its automatic size estimate (classical, then
re-measured by a first network pass), with the classical estimate only, and with the true
median diameter given (an oracle: what a user who types the diameter gets); and the size
estimate's error against the true median diameter.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import emps  # noqa: E402
from _common import machine, markdown_table, write_section  # noqa: E402
from bench_accuracy import otsu_watershed  # noqa: E402
from napari_sagegan.engine.analysis.metrics import evaluate_pair, mean_metrics  # noqa: E402
from napari_sagegan.engine.config import InferConfig, TrainConfig, preset  # noqa: E402
from napari_sagegan.engine.infer.scale import estimate_diameter, median_diameter  # noqa: E402
from napari_sagegan.engine.infer.segment import Segmenter  # noqa: E402
from napari_sagegan.engine.train.segmenter import SegmenterTrainer  # noqa: E402

ARMS = {
    "baseline": dict(target_diameter=None, invert=False, patch_size=256, batch_size=4),
    "scaled": dict(target_diameter=32.0, invert=True, patch_size=128, batch_size=8),
}
BINS = [(0, 12, "< 12 px"), (12, 40, "12-40 px"), (40, 120, "40-120 px"), (120, 1e9, "> 120 px")]


def training_data(train, n_synthetic: int, seed: int):
    """The EMPS training pairs ``(stem, image, labels)`` plus ``n_synthetic`` generated ones,
    as (images, labels) lists: the data of both arms and of the bundled model."""
    images = [p[1] for p in train]
    labels = [p[2] for p in train]
    if n_synthetic:
        from napari_sagegan.engine.synthetic.render import make_training_set

        for image, lab in make_training_set(n_synthetic, shape=(256, 256), seed=seed):
            images.append(image)
            labels.append(lab)
    return images, labels


def train(arm: str, args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    images, labels = training_data(emps.load()[0], args.synthetic, args.seed)
    out = Path(args.out_dir) / f"{arm}.pt"
    out.parent.mkdir(parents=True, exist_ok=True)
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
            **ARMS[arm],
        ),
        arch=preset("default"),
        out=out,
        device="cpu",
    )
    t0 = time.perf_counter()
    for ev in trainer.run():
        if ev.stage == "validate":
            print(f"[{arm}] {ev.message} ({(time.perf_counter() - t0) / 60:.1f} min)", flush=True)
    print(f"[{arm}] {trainer.step} steps in {(time.perf_counter() - t0) / 60:.1f} min", flush=True)


def polarity(image: np.ndarray, gt: np.ndarray) -> str:
    fg = gt > 0
    return "dark" if image[fg].mean() < image[~fg].mean() else "bright"


def summarise(rows: list[dict], holdout_info: list[dict]) -> dict:
    out = {"all": mean_metrics(rows)}
    for lo, hi, name in BINS:
        sel = [r for r, h in zip(rows, holdout_info) if lo <= h["diameter"] < hi]
        out[name] = mean_metrics(sel) if sel else None
    for pol in ("dark", "bright"):
        sel = [r for r, h in zip(rows, holdout_info) if h["polarity"] == pol]
        out[pol] = mean_metrics(sel) if sel else None
    return out


def size_error(estimates: list[float | None], truths: list[float]) -> dict:
    err = np.array(
        [abs(math.log(e / t)) if e else math.inf for e, t in zip(estimates, truths)], float
    )
    return {
        "median error %": float((math.exp(np.median(err)) - 1) * 100),
        "within 20 %": float(np.mean(err <= math.log(1.2))),
        "within 50 %": float(np.mean(err <= math.log(1.5))),
        "within 2x": float(np.mean(err <= math.log(2.0))),
    }


def evaluate(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    _, holdout = emps.load()
    info = [
        {"diameter": median_diameter(gt) or 0.0, "polarity": polarity(im, gt)}
        for _s, im, gt in holdout
    ]
    out_dir = Path(args.out_dir)
    results: dict[str, dict] = {}
    classical, refined = [], []
    t0 = time.perf_counter()
    results["Otsu + watershed"] = summarise(
        [evaluate_pair(otsu_watershed(im), gt) for _s, im, gt in holdout], info
    )
    base = Segmenter.load(out_dir / "baseline.pt", device="cpu")
    results["baseline model, own scale"] = summarise(
        [evaluate_pair(base.segment_sync(im).labels, gt) for _s, im, gt in holdout], info
    )
    print(f"baseline done ({time.perf_counter() - t0:.0f} s)", flush=True)
    scaled = Segmenter.load(out_dir / "scaled.pt", device="cpu")
    modes = {
        "scaled model, auto size (estimate + network pass)": InferConfig(),
        "scaled model, classical estimate only": InferConfig(refine_scale=False),
        "scaled model, true median diameter given": None,
    }
    for name, cfg in modes.items():
        rows = []
        for (_s, im, gt), h in zip(holdout, info):
            c = cfg if cfg is not None else InferConfig(diameter=max(h["diameter"], 1.0))
            res = scaled.segment_sync(im, c)
            rows.append(evaluate_pair(res.labels, gt))
            if cfg is not None and cfg.refine_scale:
                refined.append(res.scale.diameter if res.scale else None)
        results[name] = summarise(rows, info)
        print(f"{name} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    classical = [estimate_diameter(im) for _s, im, _g in holdout]
    truths = [max(h["diameter"], 1.0) for h in info]
    errors = {
        "classical estimate": size_error(classical, truths),
        "after the network pass": size_error(refined, truths),
    }
    (out_dir / "scale_results.json").write_text(
        json.dumps({"results": results, "errors": errors}, indent=1)
    )
    write_doc(results, errors, info, args, out_dir)


def evaluate_default(args) -> None:
    """The bundled default model on the hold-out, per size bin and contrast."""
    import torch

    torch.set_num_threads(args.threads)
    _, holdout = emps.load()
    info = [
        {"diameter": median_diameter(gt) or 0.0, "polarity": polarity(im, gt)}
        for _s, im, gt in holdout
    ]
    seg = Segmenter.load("default", device="cpu")
    config = seg.default_infer_config(refine_scale=True if args.refine else None)
    rows, sizes = [], []
    for _s, im, gt in holdout:
        res = seg.segment_sync(im, config)
        rows.append(evaluate_pair(res.labels, gt))
        sizes.append(res.scale.diameter if res.scale else None)
    r = summarise(rows, info)
    groups = ["all"] + [b[2] for b in BINS] + ["dark", "bright"]
    counts = {name: sum(lo <= h["diameter"] < hi for h in info) for lo, hi, name in BINS}
    counts.update({p: sum(h["polarity"] == p for h in info) for p in ("dark", "bright")})
    header = ["metric"] + [f"{g} (n={counts.get(g, len(info))})" for g in groups]
    table = markdown_table(
        header,
        [[k] + [_cell(r[g], k) for g in groups] for k in ("dice", "f1@0.5", "f1@0.5:0.9")],
    )
    err = size_error(sizes, [max(h["diameter"], 1.0) for h in info])
    text = (
        "### The bundled default model, per size and contrast\n\n"
        f"Machine: {machine()}. Command: `python benchmarks/bench_scale.py --evaluate-default` "
        "(the model of docs/model-card.md, as `sagegan segment` runs it: size estimated per "
        "image).\n\n"
        + table
        + f"\n\nIts size estimate: median error {err['median error %']:.0f} %, within 20 % on "
        f"{err['within 20 %']:.2f} of the images, within 2x on {err['within 2x']:.2f}.\n"
    )
    print(text)
    if args.refine:  # the variant is printed, the documented section stays the default
        return
    write_section("bench-scale-default", text)


def _cell(m: dict | None, key: str) -> str:
    return "-" if m is None else f"{m[key]:.3f}"


def write_doc(results, errors, info, args, out_dir: Path) -> None:
    counts = {name: sum(lo <= h["diameter"] < hi for h in info) for lo, hi, name in BINS}
    counts.update({p: sum(h["polarity"] == p for h in info) for p in ("dark", "bright")})
    groups = ["all"] + [b[2] for b in BINS] + ["dark", "bright"]
    header = ["method"] + [f"{g} (n={counts.get(g, len(info))})" for g in groups]
    dice = [[name] + [_cell(r[g], "dice") for g in groups] for name, r in results.items()]
    f1 = [[name] + [_cell(r[g], "f1@0.5") for g in groups] for name, r in results.items()]
    overall = markdown_table(
        ["method", "Dice", "F1@0.5", "F1@0.5:0.9"],
        [
            [name, r["all"]["dice"], r["all"]["f1@0.5"], r["all"]["f1@0.5:0.9"]]
            for name, r in results.items()
        ],
    )
    err_table = markdown_table(
        ["size estimate", "median error", "within 20 %", "within 50 %", "within 2x"],
        [
            [
                k,
                f"{v['median error %']:.0f} %",
                f"{v['within 20 %']:.2f}",
                f"{v['within 50 %']:.2f}",
                f"{v['within 2x']:.2f}",
            ]
            for k, v in errors.items()
        ],
    )
    cmd = (
        f"python benchmarks/bench_scale.py --train baseline --minutes {args.minutes} & "
        f"python benchmarks/bench_scale.py --train scaled --minutes {args.minutes} & wait; "
        "python benchmarks/bench_scale.py --evaluate"
    )
    text = (
        "## Particle scale and polarity per image\n\n"
        f"Machine: {machine()}. Command: `{cmd}` (each arm: default preset, "
        f"{args.minutes} min on one CPU thread, Adam lr {args.lr}, {args.steps_per_epoch} steps "
        f"per epoch, seed {args.seed}, EMPS training part + {args.synthetic} generated pairs; "
        "the two arms trained side by side).\n\n"
        "`baseline`: images at their own scale, no polarity inversion, 256-px patches. "
        "`scaled`: each training image resampled so its particles' median diameter is 32 px, "
        "patches zoomed by a random factor in [1/1.5, 1.5], polarity inversion augmentation, "
        "128-px patches; at inference each image's particle diameter is estimated, the image "
        "resampled to 32-px particles, and the labels mapped back.\n\n"
        f"Hold-out: the fixed 20 % of EMPS ({len(info)} images), binned by the ground truth's "
        "median particle diameter and by contrast (particles darker or brighter than the "
        "background).\n\n"
        + overall
        + "\n\nDice per group:\n\n"
        + markdown_table(header, dice)
        + "\n\nF1@0.5 per group:\n\n"
        + markdown_table(header, f1)
        + "\n\nSize estimate against the ground truth's median diameter (hold-out):\n\n"
        + err_table
        + "\n"
    )
    print(text)
    write_section("bench-scale", text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", choices=sorted(ARMS), default=None)
    ap.add_argument("--evaluate", action="store_true")
    ap.add_argument("--evaluate-default", action="store_true", help="the bundled model alone")
    ap.add_argument(
        "--refine",
        action="store_true",
        help="with --evaluate-default: add the network-measured second size pass (printed only)",
    )
    ap.add_argument("--minutes", type=float, default=15.0)
    ap.add_argument("--synthetic", type=int, default=120)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--steps-per-epoch", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out-dir", default="runs/scale")
    args = ap.parse_args()
    if args.train:
        train(args.train, args)
    if args.evaluate:
        evaluate(args)
    if args.evaluate_default:
        evaluate_default(args)
    if not (args.train or args.evaluate or args.evaluate_default):
        ap.error("give --train ARM and/or --evaluate")


if __name__ == "__main__":
    main()
