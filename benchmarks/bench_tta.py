"""Test-time views: what averaging the network's maps over mirror images gains, and costs.

Usage::

    python benchmarks/bench_tta.py [--quick] [--no-write] [--threads N]

``InferConfig.tta`` (``sagegan segment --tta VIEWS``, the Segment dock's "Test-time views")
averages the network's maps over 1, 2, 4 or 8 views of each tile (mirror images, then
transposes). With the size found by the network the candidate sizes still vote by single
passes and the winning size is segmented again with the views.

This script runs the bundled model (``Segmenter.segment``) with 1, 4 and 8 views, every
setting on each image in turn, on two sets of articles the model never trained on or was
never selected on:

* the 45 leave-source-out validation images (benchmarks/emps.py), with the size found by
  the network (the default pipeline) and with each image's true median diameter given;
* the first image of each of the first 40 other articles (bench_vote's tuning set), size
  found: EMPS images the model trained on, to see that the gain is not the LSO set's alone;

and times one large generated SEM image (2048 x 2048, size given), where the network's
passes, not the size search, take the time. It reports F1@0.5 (mean over images and
pooled), mean Dice, the size bias and the time relative to one view in the same run.
Writes the section ``bench-tta`` of docs/benchmarks.md unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import emps  # noqa: E402
from _common import machine, markdown_table, write_section  # noqa: E402
from bench_size import pooled  # noqa: E402
from bench_vote import tuning_set  # noqa: E402
from napari_sagegan.engine.infer.scale import median_diameter  # noqa: E402
from napari_sagegan.engine.infer.segment import Segmenter  # noqa: E402
from napari_sagegan.util.progress import run_to_end  # noqa: E402

VIEWS = (1, 4, 8)


def run_set(seg: Segmenter, pairs, given: bool) -> dict[int, tuple[dict, float]]:
    """Per number of views: (pooled scores, seconds), the settings interleaved per image."""
    base = seg.default_infer_config()
    results = {v: [] for v in VIEWS}
    seconds = dict.fromkeys(VIEWS, 0.0)
    for _name, img, gt in pairs:
        for v in VIEWS:
            cfg = base.replace(tta=v)
            if given:
                cfg = cfg.replace(diameter=median_diameter(gt) or 32.0)
            t0 = time.perf_counter()
            labels = run_to_end(seg.segment(img, cfg)).labels
            seconds[v] += time.perf_counter() - t0
            results[v].append((labels, gt))
    return {v: (pooled(results[v]), seconds[v]) for v in VIEWS}


def large_image_seconds(seg: Segmenter, side: int) -> dict[int, float]:
    from napari_sagegan.engine.synthetic.render import make_sample

    img, lab = make_sample("sem_agglomerate", shape=(side, side), seed=7, diameter=40.0)
    cfg = seg.default_infer_config(diameter=40.0)
    out = {}
    for v in VIEWS:
        t0 = time.perf_counter()
        run_to_end(seg.segment(img, cfg.replace(tta=v)))
        out[v] = time.perf_counter() - t0
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few images only (a smoke run)")
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    seg = Segmenter.load("default", device="cpu")
    limit = 4 if args.quick else None
    _train, lso = emps.load_lso(limit=limit)
    tuning = tuning_set(limit)
    t0 = time.perf_counter()
    sets = [
        ("leave-source-out (45), size found (default)", run_set(seg, lso, False)),
        ("leave-source-out (45), true size given", run_set(seg, lso, True)),
        ("40 training articles, size found", run_set(seg, tuning, False)),
    ]
    if args.quick:
        sets = [(label.replace("(45)", f"({len(lso)})"), r) for label, r in sets]
        sets[2] = (sets[2][0].replace("40", str(len(tuning))), sets[2][1])
    rows = []
    for label, by_views in sets:
        t_one = by_views[1][1]
        for v in VIEWS:
            p, secs = by_views[v]
            rows.append([
                label, v, p["f1_mean"], p["f1"], p["dice"],
                f"{100 * (p['size_bias'] - 1):+.1f} %", f"{secs / t_one:.2f}x",
            ])  # fmt: skip
    side = 512 if args.quick else 2048
    large = large_image_seconds(seg, side)
    rows += [
        [f"generated SEM {side} x {side}, 40-px particles, size given", v, "", "", "", "",
         f"{large[v] / large[1]:.2f}x ({large[v]:.1f} s)"]
        for v in VIEWS
    ]  # fmt: skip
    head = ["images", "views", "F1@0.5 (mean of images)", "F1@0.5 (pooled)", "Dice",
            "size bias", "time vs 1 view"]  # fmt: skip
    table = markdown_table(head, rows)
    print(table)
    minutes = (time.perf_counter() - t0) / 60
    cmd = "python benchmarks/bench_tta.py" + (" --quick" if args.quick else "")
    body = f"""## Test-time views (`InferConfig.tta`, `sagegan segment --tta`)

`{cmd}` ({minutes:.0f} min on {machine()}; the bundled model, every setting on each
image in turn). Views: 1, the tile alone; 4, and its three mirror
images; 8, and their transposes. With the size found, the candidate sizes vote by single
passes and the winner is segmented again with the views.

{table}
"""
    if not args.no_write:
        write_section("bench-tta", body)


if __name__ == "__main__":
    main()
