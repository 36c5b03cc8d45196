"""Does SAGE-GAN phase 2 help? Few-shot EMPS training at equal wall-clock budget.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_gan.py --size 10 --minutes 4 --out-dir runs/gan
    OMP_NUM_THREADS=1 python benchmarks/bench_gan.py --size 30 --minutes 4 --out-dir runs/gan
    OMP_NUM_THREADS=1 python benchmarks/bench_gan.py --size 10 --eval-p1 --out-dir runs/gan
    python benchmarks/bench_gan.py --report --out-dir runs/gan      # table + figure -> docs

For a few-shot training set of ``--size`` EMPS pairs (a seeded draw from the 80 % training
part; 20 % of it used for model selection) and a budget of ``B = --minutes`` per arm, trains
from scratch (preset ``default``):

(a) phase 1 only, no augmentation, for B;
(b) phase 1 with the classical augmentation (flips, crops, intensity, blur, noise, CLAHE,
    sharpening, polarity), for B;
(c) phase 1 (as b) for B/2, then SAGE-GAN phase 2 for B/2;
(d) phase 1 (the same B/2 model as c), phase 2 for B/4, then ``--size`` synthetic pairs
    from G (half transformed training masks, half pasted real particles) and fine-tuning
    on real + synthetic pairs for the rest of B (generation time included).

Every arm is then scored on the fixed EMPS hold-out (``benchmarks/emps.py``: seeded 20 %,
never trained or tuned on), on its first ``--holdout`` images: Dice, F1@0.5, F1@0.5:0.9.
SSIM of ``G(m)`` against the paired real image is measured on centre crops of the same
hold-out images at the network scale. One torch thread (the CPU is shared).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import emps  # noqa: E402
from _common import ROOT, machine, markdown_table, write_section  # noqa: E402
from napari_sagegan.engine.analysis.metrics import evaluate_pair, mean_metrics  # noqa: E402
from napari_sagegan.engine.checkpoint import Checkpoint  # noqa: E402
from napari_sagegan.engine.config import GanConfig, TrainConfig, preset  # noqa: E402
from napari_sagegan.engine.data.intensity import normalize  # noqa: E402
from napari_sagegan.engine.data.pairs import TrainingPairs, split_indices  # noqa: E402
from napari_sagegan.engine.infer.segment import Segmenter  # noqa: E402
from napari_sagegan.engine.synthetic.layouts import make_masks, synthesize_pairs, to_uint8  # noqa: E402
from napari_sagegan.engine.train.gan import GanTrainer  # noqa: E402
from napari_sagegan.engine.train.losses import ssim_index  # noqa: E402
from napari_sagegan.engine.train.segmenter import SegmenterTrainer  # noqa: E402
from napari_sagegan.util.progress import run_to_end  # noqa: E402

ARMS = {
    "a": "phase 1 only (no augmentation)",
    "b": "phase 1 + classical augmentation",
    "c": "phase 1 + SAGE-GAN phase 2",
    "d": "segmenter retrained on real + generated pairs",
}


def few_shot(train, size: int, seed: int):
    order = np.random.default_rng(seed).permutation(len(train))[:size]
    return [train[i] for i in sorted(order)]


def phase1(images, labels, minutes: float, out: Path, *, augment: bool, seed: int, lr: float):
    cfg = TrainConfig(
        max_minutes=minutes,
        epochs=100_000,
        steps_per_epoch=20,
        lr=lr,
        seed=seed,
        augment_p=0.5 if augment else 0.0,
        val_fraction=0.2,
    )
    tr = SegmenterTrainer(images, labels, cfg, arch=preset("default"), out=out, device="cpu")
    res = run_to_end(tr.run())
    if not out.exists():
        tr.save(out, state=tr.best_state, epoch=0, metrics=res.best_metrics)
    return tr


def phase2(images, labels, seg_path: Path, minutes: float, out_dir: Path, seed: int, lr: float):
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = GanConfig.short(max_minutes=minutes, epochs=100_000, seed=seed, lr=lr, patch_size=128)
    tr = GanTrainer(images, labels, cfg, seg=seg_path, out=out_dir, device="cpu")
    res = run_to_end(tr.run())
    return tr, res


def evaluate(path: Path, holdout) -> dict:
    seg = Segmenter.load(path, device="cpu")
    cfg = seg.default_infer_config()
    rows = []
    for _stem, image, gt in holdout:
        labels = run_to_end(seg.segment(image, cfg)).labels
        rows.append(evaluate_pair(labels, gt))
    return mean_metrics(rows)


@torch.no_grad()
def generator_ssim(trainer: GanTrainer, gen, holdout, crop: int = 128):
    """Mean SSIM of G(m) vs the real image on hold-out centre crops at the network scale;
    and, for reference, of a flat image at the crop's mean grey."""
    imgs = [p[1] for p in holdout]
    labs = [p[2] for p in holdout]
    scaled = TrainingPairs(imgs, labs, [], []).at_scale(trainer.seg_config.target_diameter)
    imgs, labs = scaled.train_images, scaled.train_labels
    g = torch.Generator().manual_seed(0)
    vals, flat, samples = [], [], []
    for im, lab in zip(imgs, labs):
        im, lab = np.asarray(im), np.asarray(lab)
        if min(im.shape) < crop:
            continue
        y0, x0 = (im.shape[0] - crop) // 2, (im.shape[1] - crop) // 2
        x = torch.from_numpy(np.ascontiguousarray(normalize(im)[y0 : y0 + crop, x0 : x0 + crop]))
        m = torch.from_numpy((lab[y0 : y0 + crop, x0 : x0 + crop] > 0).astype(np.float32))
        z = torch.randn(1, gen.config.z_dim, generator=g)
        fake = gen(m[None, None], z).clamp(-1, 1)
        vals.append(float(ssim_index(fake, x[None, None])[0]))
        grey = torch.full_like(x, float(x.mean()))[None, None]
        flat.append(float(ssim_index(grey, x[None, None])[0]))
        if len(samples) < 4:
            z2 = torch.randn(1, gen.config.z_dim, generator=g)
            fake2 = gen(m[None, None], z2).clamp(-1, 1)
            samples.append((x.numpy(), m.numpy(), fake[0, 0].numpy(), fake2[0, 0].numpy()))
    return float(np.mean(vals)), float(np.mean(flat)), len(vals), samples


def run_size(args) -> None:
    torch.set_num_threads(1)
    out_dir = Path(args.out_dir) / f"n{args.size}"
    out_dir.mkdir(parents=True, exist_ok=True)
    train, holdout = emps.load()
    holdout = holdout[: args.holdout]
    shot = few_shot(train, args.size, args.seed)
    images = [p[1] for p in shot]
    labels = [p[2] for p in shot]
    B = args.minutes
    times, ckpts = {}, {}
    t = time.perf_counter()
    phase1(images, labels, B, out_dir / "a.pt", augment=False, seed=args.seed, lr=args.lr)
    times["a"] = time.perf_counter() - t
    ckpts["a"] = out_dir / "a.pt"
    t = time.perf_counter()
    phase1(images, labels, B, out_dir / "b.pt", augment=True, seed=args.seed, lr=args.lr)
    times["b"] = time.perf_counter() - t
    ckpts["b"] = out_dir / "b.pt"
    t = time.perf_counter()
    phase1(images, labels, B / 2, out_dir / "p1.pt", augment=True, seed=args.seed, lr=args.lr)
    t_p1 = time.perf_counter() - t
    t = time.perf_counter()
    gan_c, res_c = phase2(
        images, labels, out_dir / "p1.pt", B / 2, out_dir / "c", args.seed, args.gan_lr
    )
    times["c"] = t_p1 + time.perf_counter() - t
    ckpts["c"] = out_dir / "c" / "segmenter.pt"
    # (d): phase 2 for B/4, generate, fine-tune on real + synthetic for the rest
    t = time.perf_counter()
    gan_d, res_d = phase2(
        images, labels, out_dir / "p1.pt", B / 4, out_dir / "d_gan", args.seed, args.gan_lr
    )
    src = gan_d.train_labels
    half = max(1, args.size // 2)
    shape = tuple(int(s) for s in np.median([m.shape for m in src], axis=0))
    masks = make_masks(src, half, layout="real", seed=args.seed) + make_masks(
        src, args.size - half, layout="paste", seed=args.seed + 1, shape=shape
    )
    pairs = run_to_end(synthesize_pairs(res_d.generator, masks, seed=args.seed, device="cpu"))
    t_gen = time.perf_counter() - t
    tr_idx, val_idx = split_indices(len(images), 0.2, args.seed)
    left = max(0.25, B * 0.5 - t_gen / 60.0)
    cfg = TrainConfig(
        max_minutes=left,
        epochs=100_000,
        steps_per_epoch=20,
        lr=args.lr / 2,
        seed=args.seed,
        augment_p=0.5,
    )
    tr = SegmenterTrainer(
        [images[i] for i in tr_idx] + [to_uint8(p[0]) for p in pairs],
        [labels[i] for i in tr_idx] + [p[1] for p in pairs],
        cfg,
        init=out_dir / "d_gan" / "segmenter.pt",
        out=out_dir / "d.pt",
        device="cpu",
        val_images=[images[i] for i in val_idx],
        val_labels=[labels[i] for i in val_idx],
    )
    run_to_end(tr.run())
    if not (out_dir / "d.pt").exists():
        tr.save(out_dir / "d.pt", state=tr.best_state, epoch=0, metrics=tr.best_metrics)
    times["d"] = time.perf_counter() - t + t_p1
    ckpts["d"] = out_dir / "d.pt"
    print("training done", {k: round(v / 60, 2) for k, v in times.items()}, flush=True)

    results = {}
    for arm, path in ckpts.items():
        t = time.perf_counter()
        m = evaluate(path, holdout)
        results[arm] = {k: m[k] for k in ("dice", "f1@0.5", "f1@0.5:0.9")}
        results[arm]["minutes"] = times[arm] / 60.0
        print(arm, results[arm], f"eval {time.perf_counter() - t:.0f} s", flush=True)
    ssim_c, ssim_flat, n_ssim, samples = generator_ssim(gan_c, res_c.generator, holdout)
    ssim_d = generator_ssim(gan_d, res_d.generator, holdout)[0]
    np.savez_compressed(out_dir / "samples.npz", *[np.stack(s) for s in samples])
    summary = {
        "size": args.size,
        "minutes": B,
        "holdout": len(holdout),
        "results": results,
        "ssim_c": ssim_c,
        "ssim_d": ssim_d,
        "ssim_flat": ssim_flat,
        "n_ssim": n_ssim,
        "gan_steps_c": gan_c.step,
        "gan_steps_d": gan_d.step,
        "val_c": {k: res_c.best_metrics.get(k) for k in ("dice", "f1@0.5")},
        "p1_val": gan_c.history[0].get("val_f1@0.5") if gan_c.history else None,
        "c_epoch_selected": Checkpoint.load(ckpts["c"]).epoch,
        "n_synthetic": len(pairs),
        "machine": machine(),
        "gan_lr": args.gan_lr,
        "lr": args.lr,
    }
    (Path(args.out_dir) / f"results_n{args.size}.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2), flush=True)


def report(args) -> None:
    out_dir = Path(args.out_dir)
    runs = sorted(
        (json.loads(p.read_text()) for p in out_dir.glob("results_n*.json")),
        key=lambda r: r["size"],
    )
    if not runs:
        raise SystemExit(f"no results_n*.json in {out_dir}")
    rows = []
    names = {**ARMS, "p1": "reference: the B/2 phase-1 model that (c) and (d) start from"}
    for r in runs:
        for arm in ("a", "b", "p1", "c", "d"):
            if arm not in r["results"]:
                continue
            m = r["results"][arm]
            label = names[arm] if arm == "p1" else f"({arm}) {names[arm]}"
            rows.append([r["size"], label, m["minutes"], m["dice"], m["f1@0.5"], m["f1@0.5:0.9"]])
    table = markdown_table(
        ["train pairs", "arm", "minutes (wall)", "Dice", "F1@0.5", "F1@0.5:0.9"], rows
    )
    ssim_rows = [
        [
            r["size"],
            r["gan_steps_c"],
            r["ssim_c"],
            r["gan_steps_d"],
            r["ssim_d"],
            r["ssim_flat"],
            r["n_ssim"],
        ]
        for r in runs
    ]
    ssim_table = markdown_table(
        [
            "train pairs",
            "GAN steps (c)",
            "SSIM G(m) (c)",
            "GAN steps (d)",
            "SSIM G(m) (d)",
            "SSIM flat grey (reference)",
            "crops",
        ],
        ssim_rows,
    )
    fig = _figure(out_dir, runs[-1]["size"])
    r0 = runs[0]
    body = f"""## SAGE-GAN phase 2 on few-shot EMPS (does it help?)

Command (one process per training-set size, one torch thread each, run side by side on this
2-core machine that another job was also using, so the wall-clock budgets bought fewer steps
than an idle machine would):

```
OMP_NUM_THREADS=1 python benchmarks/bench_gan.py --size 10 --minutes {r0["minutes"]:g} --holdout {r0["holdout"]} --out-dir {args.out_dir}
OMP_NUM_THREADS=1 python benchmarks/bench_gan.py --size 30 --minutes {r0["minutes"]:g} --holdout {r0["holdout"]} --out-dir {args.out_dir}
OMP_NUM_THREADS=1 python benchmarks/bench_gan.py --size 10 --eval-p1 --out-dir {args.out_dir}
OMP_NUM_THREADS=1 python benchmarks/bench_gan.py --size 30 --eval-p1 --out-dir {args.out_dir}
python benchmarks/bench_gan.py --report --out-dir {args.out_dir}
```

Data: few-shot draws (seed 0) of 10 and 30 pairs from the EMPS training part; 20 % of each
draw is used for model selection. Scores on the first {r0["holdout"]} images of the fixed
EMPS hold-out (seeded 20 %, never trained or tuned on; a subset to fit the time). Preset
`default` from scratch, Adam lr {r0["lr"]:g} for phase 1 (lr {r0["gan_lr"]:g} for phase 2), budget
B = {r0["minutes"]:g} min per arm: (a) phase 1 alone for B; (b) phase 1 with the classical
augmentation for B; (c) phase 1 (as b) for B/2 then phase 2 for B/2 (`GanConfig.short`:
20-step epochs, G frozen 2 epochs, mix ratio +0.1 per epoch to 0.6, authors' loss weights,
128 px patches, batch 2); (d) the same B/2 phase-1 model, phase 2 for B/4, as many
synthetic pairs as real ones (half transformed training masks, half pasted real particles)
and fine-tuning (lr halved) on real + synthetic pairs for the rest of B, generation
included. The reference row is the B/2 phase-1 model itself (its minutes are the budget).
{r0["machine"]}.

{table}

Generator quality: SSIM of G(m) against the paired real image on {r0["n_ssim"]} hold-out
centre crops (128 px, network scale, one latent each); a flat image at each crop's mean grey
is the reference an untrained generator can reach.

{ssim_table}

![real vs synthetic pairs]({fig})

*Real hold-out crop, its mask, and G(mask) for two latents (generator of arm c,
{runs[-1]["size"]} training pairs).*
"""
    body += "\n" + verdict(runs)
    write_section("bench-gan", body)
    print(body)


def verdict(runs) -> str:
    lines = ["F1@0.5 of the phase-2 arms against the better of (a) and (b), same size:", ""]
    for r in runs:
        res = r["results"]
        best_base = max(res["a"]["f1@0.5"], res["b"]["f1@0.5"])
        for arm in ("c", "d"):
            diff = res[arm]["f1@0.5"] - best_base
            lines.append(
                f"- {r['size']} pairs, ({arm}): {res[arm]['f1@0.5']:.3f} vs {best_base:.3f} "
                f"({diff:+.3f}); Dice {res[arm]['dice']:.3f} vs "
                f"{max(res['a']['dice'], res['b']['dice']):.3f}."
            )
    for r in runs:
        res = r["results"]
        if "p1" in res:
            kept = r.get("c_epoch_selected") == 0
            lines.append(
                f"- {r['size']} pairs, (c) against its own starting point (the B/2 phase-1 "
                f"model): F1@0.5 {res['p1']['f1@0.5']:.3f} -> {res['c']['f1@0.5']:.3f}"
                + (
                    " (no phase-2 checkpoint beat the phase-1 model on validation, so it was kept)"
                    if kept
                    else f" (validation F1 {r['p1_val']:.3f} -> {r['val_c']['f1@0.5']:.3f} "
                    "on the few-shot validation images)"
                )
                + "."
            )
    spread = [abs(r["results"]["a"]["f1@0.5"] - r["results"]["b"]["f1@0.5"]) for r in runs]
    untrained = all(r["ssim_c"] < r["ssim_flat"] for r in runs)
    lines += [
        "",
        "**Verdict: at this budget, SAGE-GAN phase 2 is not shown to help.** "
        + (
            f"The generator had not learned to draw micrographs: after about "
            f"{runs[0]['gan_steps_c']} GAN iterations its SSIM against the paired real image "
            "is below that of a flat grey image, and the figure shows it. "
            if untrained
            else ""
        )
        + "Differences between arms are of the size of the difference between (a) and (b) "
        f"themselves (up to {max(spread):.2f} in F1@0.5, with opposite signs at the two sizes): "
        "single-seed, minutes-long runs on a shared CPU are dominated by noise, so no arm's "
        "lead here is evidence. Where (d) scored higher it trained on pairs whose images are "
        "poor (see the SSIM), so any gain cannot be credited to realistic synthesis; more "
        "masks and a second, lower-lr training stage are the likelier cause.",
        "",
        "What was tried: the authors' loss weights with the schedule shortened for minutes "
        "(`GanConfig.short`), phase-2 lr 2e-4, 128 px patches, the offline multi-scale SSIM "
        "perceptual term, phase 2 started from a B/2 phase-1 model, synthetic masks from "
        "transformed and pasted real particles. Not tried (time): GPU-length training (the "
        "authors train hundreds of epochs), several seeds, lattice layouts (EMPS is mostly "
        "not ordered). `bench_gan.py` runs unchanged on a GPU machine with a larger "
        "`--minutes`; that is the test that could show a benefit.",
    ]
    return "\n".join(lines) + "\n"


def _figure(out_dir: Path, size: int) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = np.load(out_dir / f"n{size}" / "samples.npz")
    samples = [data[k] for k in sorted(data.files, key=lambda s: int(s.split("_")[1]))]
    fig, axes = plt.subplots(len(samples), 4, figsize=(8, 2 * len(samples)))
    titles = ["real", "mask", "G(mask, z1)", "G(mask, z2)"]
    for i, s in enumerate(samples):
        for j in range(4):
            ax = axes[i, j] if len(samples) > 1 else axes[j]
            ax.imshow(s[j], cmap="gray", vmin=-1 if j != 1 else 0, vmax=1)
            ax.set_axis_off()
            if i == 0:
                ax.set_title(titles[j], fontsize=9)
    fig.tight_layout()
    path = ROOT / "docs" / "images" / "gan_pairs.png"
    fig.savefig(path, dpi=80)
    return "images/gan_pairs.png"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=10, help="few-shot training pairs")
    ap.add_argument("--minutes", type=float, default=4.0, help="budget B per arm")
    ap.add_argument("--holdout", type=int, default=30, help="hold-out images scored")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--gan-lr", type=float, default=2e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default="runs/gan")
    ap.add_argument("--report", action="store_true")
    ap.add_argument(
        "--eval-p1",
        action="store_true",
        help="also score the B/2 phase-1 model that (c) and (d) start from (adds it to the JSON)",
    )
    args = ap.parse_args()
    if args.report:
        report(args)
    elif args.eval_p1:
        torch.set_num_threads(1)
        path = Path(args.out_dir) / f"results_n{args.size}.json"
        summary = json.loads(path.read_text())
        holdout = emps.load()[1][: summary["holdout"]]
        m = evaluate(Path(args.out_dir) / f"n{args.size}" / "p1.pt", holdout)
        summary["results"]["p1"] = {k: m[k] for k in ("dice", "f1@0.5", "f1@0.5:0.9")}
        summary["results"]["p1"]["minutes"] = summary["minutes"] / 2
        path.write_text(json.dumps(summary, indent=2))
        print(summary["results"]["p1"])
    else:
        run_size(args)


if __name__ == "__main__":
    main()
