"""Train (or continue training) the bundled default model, evaluate it, and package it.

Usage::

    python scripts/train_default_model.py --minutes 40 [--resume runs/accuracy/default.pt]
        [--work runs/default] [--seed 0]

Recipe: the ``default`` preset (Attention U-Net, base 16, depth 4, distance head), trained on
the EMPS training split (../shared/data/emps-train) minus the fixed seeded 20 % held out by
every benchmark (benchmarks/emps.py), of which a seeded 5 % is used for model selection.
The best checkpoint is evaluated on the held-out images (never trained or tuned on) next to
the Otsu + watershed baseline, written in float16 to src/napari_sagegan/models/default.pt,
and the numbers go into docs/model-card.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import emps  # noqa: E402
from bench_accuracy import evaluate_model, otsu_watershed  # noqa: E402
from bench_scale import training_data  # noqa: E402
from napari_sagegan.engine.analysis.metrics import evaluate_pair, mean_metrics  # noqa: E402
from napari_sagegan.engine.checkpoint import build_segmenter, load_checkpoint, save_checkpoint  # noqa: E402
from napari_sagegan.engine.config import InferConfig, TrainConfig, preset  # noqa: E402
from napari_sagegan.engine.infer.segment import Segmenter  # noqa: E402
from napari_sagegan.engine.train.segmenter import SegmenterTrainer  # noqa: E402
from napari_sagegan.util.files import atomic_write_text  # noqa: E402

PACKAGED = ROOT / "src" / "napari_sagegan" / "models" / "default.pt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=40.0)
    ap.add_argument("--resume", default=None, help="continue from this checkpoint")
    ap.add_argument(
        "--package-only",
        action="store_true",
        help="no training: package and evaluate the --resume checkpoint as it is",
    )
    ap.add_argument("--work", default="runs/default")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument(
        "--synthetic",
        type=int,
        default=0,
        help="add N generated image/label pairs (engine/synthetic.py) to training",
    )
    ap.add_argument("--steps-per-epoch", type=int, default=100)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ckpt_path = work / "default.pt"
    train, holdout = emps.load()
    images, labels = training_data(train, args.synthetic, args.seed)  # as bench_scale's arms
    infer = InferConfig()
    config = TrainConfig(
        max_minutes=args.minutes,
        seed=args.seed,
        val_fraction=0.05,
        lr=args.lr,
        steps_per_epoch=args.steps_per_epoch,
        epochs=10_000,
        num_threads=args.threads,
    )
    if args.package_only:
        if not args.resume:
            raise SystemExit("--package-only needs --resume CHECKPOINT")
        ckpt_path = Path(args.resume)
    else:
        trainer = SegmenterTrainer(
            images,
            labels,
            config,
            arch=preset("default"),
            resume=args.resume,
            out=ckpt_path,
            device="cpu",
            infer=infer,
        )
        t0 = time.perf_counter()
        for ev in trainer.run():
            if ev.stage == "validate":
                print(f"{ev.message} ({(time.perf_counter() - t0) / 60:.1f} min)", flush=True)

    ckpt = load_checkpoint(ckpt_path)
    model = build_segmenter(ckpt)
    PACKAGED.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(
        PACKAGED,
        model,
        arch=model.config,
        train=ckpt["train"],
        infer=ckpt["infer"],
        seed=ckpt["seed"],
        epoch=ckpt["epoch"],
        step=ckpt["step"],
        metrics=ckpt["metrics"],
        half=True,
        extra={
            "data": "EMPS training split minus the fixed 20 % hold-out "
            "(Yildirim & Cole 2021, annotations MIT)"
        },
    )
    seg = Segmenter.load(PACKAGED, device="cpu")
    res, speed = evaluate_model(seg, holdout, infer)
    otsu = mean_metrics([evaluate_pair(otsu_watershed(im), gt) for _s, im, gt in holdout])
    rows = [
        ("napari-sagegan default model (per-image scale), distance-seeded split", res["split"]),
        ("same network, binary + EDT watershed", res["watershed"]),
        ("Otsu + watershed", otsu),
    ]
    table = "| method | Dice | F1@0.5 | F1@0.5:0.9 | precision@0.5 | recall@0.5 |\n|---|---|---|---|---|---|\n"
    table += "\n".join(
        f"| {n} | {m['dice']:.3f} | {m['f1@0.5']:.3f} | {m['f1@0.5:0.9']:.3f} | "
        f"{m['precision@0.5']:.3f} | {m['recall@0.5']:.3f} |"
        for n, m in rows
    )
    print(table)
    size_mb = PACKAGED.stat().st_size / 1e6
    cmd = (
        f"python scripts/train_default_model.py --minutes {args.minutes} --seed {args.seed} "
        f"--lr {args.lr}"
    )
    if args.resume:
        cmd += f" --resume {args.resume}"
    if args.package_only:
        cmd += " --package-only"
    if args.synthetic:
        cmd += f" --synthetic {args.synthetic}"
    synth_note = (
        f"Plus {args.synthetic} generated image/label pairs (256 px, TEM / SEM / HAADF layouts "
        f"from `engine/synthetic.py`, seed {args.seed}). "
        if args.synthetic
        else ""
    )
    card = f"""# Model card: the bundled default segmenter

`src/napari_sagegan/models/default.pt` ({size_mb:.1f} MB, float16 weights), used by
`--model default`, `Segmenter.load("default")` and the widgets' default.

* **Architecture:** Attention U-Net, preset `default` (base 16 channels, depth 4, 1.97 M
  parameters) with the boundary-aware distance head ([method](method.md)).
* **Data:** the EMPS training split (B. Yildirim, J. M. Cole, "Bayesian Particle Instance
  Segmentation for Electron Microscopy Image Quantification", J. Chem. Inf. Model. 61, 1136,
  2021; annotations under the MIT licence), read from `../shared/data/emps-train`: 366 real
  SEM/TEM micrographs. A fixed seeded 20 % ({len(holdout)} images, seed {emps.HOLDOUT_SEED}) is
  held out and never trained or tuned on; of the other {len(train)}, a seeded 5 % picks the
  best checkpoint. {synth_note}No other data set was used.
* **Recipe:** `TrainConfig` defaults (focal + Tversky + distance loss; every training
  image resampled so its particles' median diameter is
  {ckpt["train"].get("target_diameter")} px, patches zoomed by a random factor in
  [1/{ckpt["train"].get("scale_jitter")}, {ckpt["train"].get("scale_jitter")}]; batch
  {ckpt["train"].get("batch_size")} of {ckpt["train"].get("patch_size")}-px patches;
  augmentation with polarity inversion) but Adam at lr {args.lr}, seed {args.seed}, on this
  machine's CPU ({ckpt["step"]} optimisation steps, best at epoch {ckpt["epoch"]} of
  {args.steps_per_epoch} steps).
* **Command:** `{cmd}` (the resumed checkpoint, if any, came from
  `python benchmarks/bench_scale.py --train scaled`, see [benchmarks](benchmarks.md)).
* **Held-out accuracy** (the {len(holdout)} images; each image's particle size estimated and
  the image resampled to the network scale, tiled inference, threshold 0.5; CPU speed
  {speed:.2f} MP/s):

{table}

* **Limits:** trained on a CPU for under an hour: it is a starting point to fine-tune on your
  own corrected images (`sagegan train --init default`), not a final model. EMPS images are
  crops of published figures; micrographs from other microscopes, very small particles
  (a few pixels across) and HAADF-STEM are under-represented.
"""
    atomic_write_text(ROOT / "docs" / "model-card.md", card)
    print(f"wrote {PACKAGED} ({size_mb:.1f} MB) and docs/model-card.md")


if __name__ == "__main__":
    main()
