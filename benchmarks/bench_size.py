"""Sizes a microscopist can trust: the particle-size estimate, the size bias and the
accuracy on articles the model never saw.

Usage::

    python benchmarks/bench_size.py [--model default|MODEL.pt] [--quick] [--no-write]

What it measures, in one run, for one model:

* **Size estimate** against the ground-truth median particle diameter, on the fixed
  leave-source-out EMPS validation (45 images of 44 articles, benchmarks/emps.py) and on
  generated exact-label images of every modality (bright-field TEM, SEM, HAADF-STEM;
  dispersed, agglomerated, ordered) with particles of 6 to 300 px: the fraction of images
  within 25 % and within 2x, for the classical estimate alone and for the network's scale
  search (engine/infer/autoscale.py), with the worst cases listed.
* **Accuracy and size bias** on the same validation, against Otsu + watershed run by this
  script: pooled F1@0.5, mean Dice and the size bias (median over the particles matched at
  IoU 0.5 of sqrt(predicted area / true area)), with the size found by the network, by the
  classical estimate alone, and given (the true median diameter).
* **Robustness to a wrong size**: F1@0.5 with the diameter given deliberately wrong
  (x0.5, x0.7, x1, x1.4, x2 the true one).

Writes the section ``size`` of docs/benchmarks.md (unless ``--no-write``).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import emps  # noqa: E402
from _common import machine, markdown_table, write_section  # noqa: E402
from bench_accuracy import otsu_watershed  # noqa: E402
from napari_sagegan.engine.analysis.metrics import evaluate_pair, size_ratios  # noqa: E402
from napari_sagegan.engine.infer.scale import estimate_diameter, median_diameter  # noqa: E402
from napari_sagegan.engine.infer.segment import Segmenter  # noqa: E402
from napari_sagegan.util.progress import run_to_end  # noqa: E402

#: Generated check images: preset kinds and particle diameters (px).
GEN_KINDS = ("tem_dispersed", "sem_agglomerate", "haadf_square", "tem_hex")
GEN_SIZES = (6, 10, 16, 25, 40, 64, 100, 160, 250, 300)
WRONG = (0.5, 0.7, 1.0, 1.4, 2.0)


def generated_set(quick: bool = False):
    """``(name, image, labels)`` for every kind and size (fewer with ``quick``)."""
    from napari_sagegan.engine.synthetic.render import make_sample

    sizes = GEN_SIZES[::3] if quick else GEN_SIZES
    out = []
    for k, kind in enumerate(GEN_KINDS):
        for j, d in enumerate(sizes):
            side = int(min(2048, max(256, 12 * d)))
            img, lab = make_sample(
                kind, shape=(side, side), seed=100 + 10 * k + j, diameter=float(d)
            )
            out.append((f"{kind}@{d}px", img, lab))
    return out


def pooled(results) -> dict[str, float]:
    """F1@0.5 pooled over all particles and averaged over images, mean Dice and the size
    bias over ``(pred, gt)`` pairs. (Pooled F1 is dominated by the images with hundreds of
    particles; the mean over images weighs every micrograph alike.)"""
    tp = fp = fn = 0
    dice, ratios, f1s = [], [], []
    for pred, gt in results:
        m = evaluate_pair(pred, gt)
        f1s.append(m["f1@0.5"])
        n_tp = round(m["recall@0.5"] * m["n_gt"])
        tp, fp, fn = tp + n_tp, fp + m["n_pred"] - n_tp, fn + m["n_gt"] - n_tp
        dice.append(m["dice"])
        ratios.append(size_ratios(pred, gt))
    r = np.concatenate(ratios) if ratios else np.zeros(0)
    return {
        "f1": 2 * tp / (2 * tp + fp + fn) if (tp + fp + fn) else 1.0,
        "f1_mean": float(np.mean(f1s)) if f1s else float("nan"),
        "dice": float(np.mean(dice)) if dice else float("nan"),
        "size_bias": float(np.median(r)) if r.size else float("nan"),
        "n": len(dice),
    }


def _pct(p: dict) -> str:
    return f"{100 * (p['size_bias'] - 1):+.1f} %"


def run_pipeline(seg: Segmenter, pairs, mode: str, mult: float = 1.0):
    """Segment every ``(name, image, gt)``: ``mode`` = "network" (the default pipeline),
    "classical" (classical estimate only) or "given" (true diameter x ``mult``).
    Returns ``(results, infos, seconds)``."""
    base = seg.default_infer_config()
    results, infos = [], []
    t0 = time.perf_counter()
    for _name, img, gt in pairs:
        if mode == "network":
            cfg = base
        elif mode == "classical":
            cfg = base.replace(scale_search=False)
        else:
            cfg = base.replace(diameter=(median_diameter(gt) or 32.0) * mult)
        res = run_to_end(seg.segment(img, cfg))
        results.append((res.labels, gt))
        infos.append(res)
    return results, infos, time.perf_counter() - t0


def estimates(seg: Segmenter, pairs):
    """Per image: (name, true, classical, network, confidence)."""
    rows = []
    for name, img, gt in pairs:
        true = median_diameter(gt)
        classical = estimate_diameter(np.asarray(img, np.float32))
        info = run_to_end(seg.estimate_scale(img))
        rows.append((name, true, classical, info.diameter, info.confidence))
    return rows


def _within(est, true, tol):
    return est is not None and true and abs(math.log(est / true)) <= math.log(tol)


def estimate_summary(rows, label: str):
    n = len(rows)
    table = []
    for what, k in (("classical estimate", 2), ("network scale search", 3)):
        w25 = sum(1 for r in rows if r[1] and r[k] and abs(r[k] / r[1] - 1) <= 0.25)
        w2 = sum(1 for r in rows if _within(r[k], r[1], 2.0))
        table.append([label, what, n, f"{w25 / n:.0%}", f"{w2 / n:.0%}"])
    worst = sorted(rows, key=lambda r: -abs(math.log((r[3] or 1e-3) / r[1])) if r[1] else 0)[:5]
    return table, worst


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--quick", action="store_true", help="a few images only (a smoke run)")
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    seg = Segmenter.load(args.model, device="cpu")
    _train, val = emps.load_lso(limit=6 if args.quick else None)
    gen = generated_set(args.quick)
    t0 = time.perf_counter()

    est_val = estimates(seg, val)
    est_gen = estimates(seg, gen)
    t_val, worst_val = estimate_summary(est_val, "EMPS leave-source-out")
    t_gen, worst_gen = estimate_summary(est_gen, "generated, 6-300 px")
    print(
        markdown_table(["data", "estimator", "images", "within 25 %", "within 2x"], t_val + t_gen)
    )

    acc_rows = []
    excluded = 0
    for mode, label in (
        ("network", "size found by the network (default)"),
        ("classical", "classical size estimate only"),
        ("given", "true size given"),
    ):
        res, infos, secs = run_pipeline(seg, val, mode)
        if mode == "network":
            excluded = sum(len(r.excluded) for r in infos)
        p = pooled(res)
        acc_rows.append([f"model, {label}", p["f1_mean"], p["f1"], p["dice"], _pct(p)])
    otsu = pooled([(otsu_watershed(img), gt) for _n, img, gt in val])
    acc_rows.append(["Otsu + watershed", otsu["f1_mean"], otsu["f1"], otsu["dice"], _pct(otsu)])
    gres, _infos, _s = run_pipeline(seg, gen, "network")
    g = pooled(gres)
    acc_rows.append(
        ["model on the generated images (size found)", g["f1_mean"], g["f1"], g["dice"], _pct(g)]
    )
    acc_head = ["method", "F1@0.5 (mean of images)", "F1@0.5 (pooled)", "Dice", "size bias"]
    print(markdown_table(acc_head, acc_rows))

    curve = []
    for mult in WRONG:
        res, _i, _s = run_pipeline(seg, val, "given", mult)
        p = pooled(res)
        curve.append([f"x{mult:g}", p["f1_mean"], p["f1"]])
    curve_head = ["diameter given", "F1@0.5 (mean of images)", "F1@0.5 (pooled)"]
    print(markdown_table(curve_head, curve))
    minutes = (time.perf_counter() - t0) / 60

    def worst_lines(rows):
        return "\n".join(
            f"  - {n}: true {t:.0f} px, classical {'-' if c is None else f'{c:.0f}'} px, "
            f"network {'-' if d is None else f'{d:.0f}'} px (confidence {conf:.2f})"
            for n, t, c, d, conf in rows
        )

    body = f"""## Particle size, size bias and unseen articles

Command: `python benchmarks/bench_size.py --model {args.model}`{" --quick" if args.quick else ""}
({machine()}; {minutes:.1f} min). Model: `{args.model}` (threshold
{seg.default_infer_config().threshold:g}, seed threshold
{seg.default_infer_config().seed_threshold:g}). EMPS leave-source-out validation: {len(val)}
images of whole articles never trained or tuned on (benchmarks/emps.py); generated: {len(gen)}
exact-label images ({", ".join(GEN_KINDS)}; particles of {min(GEN_SIZES)}-{max(GEN_SIZES)} px).

Size estimate against the true median particle diameter:

{markdown_table(["data", "estimator", "images", "within 25 %", "within 2x"], t_val + t_gen)}

Worst network estimates, EMPS:
{worst_lines(worst_val)}

Worst network estimates, generated:
{worst_lines(worst_gen)}

Accuracy and size bias (F1@0.5 averaged over images and pooled over all particles, mean
Dice over images, size bias =
median sqrt(area ratio) of the particles matched at IoU 0.5; {excluded} burned-in annotations
were found and left out in the default pipeline):

{markdown_table(acc_head, acc_rows)}

F1@0.5 on the same validation with the diameter given deliberately wrong:

{markdown_table(curve_head, curve)}
"""
    print(body)
    if not args.no_write:
        write_section("size", body)


if __name__ == "__main__":
    main()
