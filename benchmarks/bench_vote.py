"""How the candidate particle sizes vote, and what the vote costs (issues 12 and 18).

Usage::

    python benchmarks/bench_vote.py [--quick] [--no-write] [--margins 0,0.02,0.05]

With the size found by the network, :class:`~napari_sagegan.engine.infer.segment.Segmenter`
segments the image at each distinct candidate size (the scale ladder's answer, its
next-best rungs, the classical estimate) when the ladder's confidence is under
``InferConfig.vote_below``, and keeps the size whose particles the network is most confident
in (by more than ``segment.VOTE_MARGIN``). ``InferConfig.vote_stop`` skips the other sizes
when the network's mean confidence in the first pass's particles reaches it.

This script runs the default pipeline (``Segmenter.segment`` with the bundled model, size
found) under several vote settings, every setting on each image in turn, on two sets:

* **tuning**: 40 EMPS images outside the leave-source-out validation, the first image of
  each of the first 40 articles (by DOI): where the settings are chosen;
* **check**: the 45 leave-source-out validation images (benchmarks/emps.py): where the
  choice is checked on articles neither the model nor the choice saw.

It reports, per set and setting, F1@0.5 (mean over images and pooled), mean Dice, the
size bias, the fraction of images whose size used is within 25 % of the true median
diameter, the fraction of images that voted, seconds per image and the time relative to
no vote in the same run; then, simulated from the records of the settings that never stop,
what stopping at a first-pass confidence of 0.4-0.7 would give. ``--margins`` also runs the whole-image vote at other values of
``VOTE_MARGIN``. Writes the section ``bench-vote`` of docs/benchmarks.md unless
``--no-write``.
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
from bench_size import pooled  # noqa: E402
from napari_sagegan.engine.infer import segment as segment_mod  # noqa: E402
from napari_sagegan.engine.infer.scale import median_diameter  # noqa: E402
from napari_sagegan.engine.infer.segment import Segmenter  # noqa: E402
from napari_sagegan.util.progress import run_to_end  # noqa: E402

#: (label, vote_below, vote_stop, margin or None for the module's).
SETTINGS = (
    ("no vote", 0.0, 1.01, None),
    ("vote below 0.7, whole image (before vote_stop)", 0.7, 1.01, None),
    ("vote below 0.7, first pass >= 0.6 stops it (default)", 0.7, 0.6, None),
    ("always vote, whole image", 1.01, 1.01, None),
)


def tuning_set(limit: int | None = None):
    """The first image of each of the first 40 articles outside the LSO validation."""
    train, _ = emps.load_lso()
    doi = emps.articles()
    seen: dict[str, tuple] = {}
    for stem, img, lab in sorted(train, key=lambda t: t[0]):
        seen.setdefault(doi[stem], (stem, img, lab))
    picked = [seen[a] for a in sorted(seen)][:40]
    return picked[:limit] if limit else picked


def run(seg: Segmenter, pairs, settings):
    """Per setting, per image (every setting on each image in turn): a dict of the labels,
    the truth, the size used and the true one, whether it voted, the seconds and the mean
    particle confidence of the first pass (the ladder's answer) when it voted."""
    base = seg.default_infer_config()
    out: dict[str, list[dict]] = {s[0]: [] for s in settings}
    default_margin = segment_mod.VOTE_MARGIN
    planes: list[tuple] = []  # the passes of one segment call (counted, not changed)
    firsts: list[float] = []  # the first pass's score in each vote
    plane, vote = seg._plane, segment_mod._vote

    def counted(*a, **k):
        planes.append(a[0].shape)
        return plane(*a, **k)

    def recorded(passes):
        firsts.append(passes[0][0])
        return vote(passes)

    seg._plane, segment_mod._vote = counted, recorded
    try:
        for _stem, img, gt in pairs:
            for label, below, stop, margin in settings:
                cfg = base.replace(vote_below=below, vote_stop=stop)
                segment_mod.VOTE_MARGIN = default_margin if margin is None else margin
                planes.clear()
                firsts.clear()
                t0 = time.perf_counter()
                res = run_to_end(seg.segment(img, cfg))
                dt = time.perf_counter() - t0
                segment_mod.VOTE_MARGIN = default_margin
                voted = len(planes) > 1  # passes beyond the one at the size used
                out[label].append(
                    {
                        "labels": res.labels, "gt": gt, "secs": dt, "voted": voted,
                        "size": res.scale.diameter if res.scale else None,
                        "true": median_diameter(gt),
                        "first": firsts[0] if voted and firsts else None,
                    }
                )  # fmt: skip
    finally:
        seg._plane, segment_mod._vote = plane, vote
    return out


def _row(name: str, label: str, recs: list[dict], t_none: float) -> list[str]:
    p = pooled([(r["labels"], r["gt"]) for r in recs])

    def within(tol: float) -> str:
        ok = [
            r["size"] is not None
            and r["true"]
            and abs(math.log(r["size"] / r["true"])) <= math.log(tol)
            for r in recs
        ]
        return f"{np.mean(ok):.0%}"

    secs = sum(r["secs"] for r in recs)
    return [
        name, label, f"{p['f1_mean']:.3f}", f"{p['f1']:.3f}", f"{p['dice']:.3f}",
        f"{100 * (p['size_bias'] - 1):+.1f} %", within(1.25), within(2.0),
        f"{np.mean([r['voted'] for r in recs]):.0%}", f"{secs / len(recs):.2f}",
        f"{secs / t_none:.2f}",
    ]  # fmt: skip


#: First-pass confidences at which a simulated vote stops (see :func:`table`).
STOP_AT = (0.4, 0.5, 0.6, 0.7)


def table(name: str, out, settings):
    """A row per setting; then, simulated from the records of "no vote" and of the
    settings that vote, the same vote skipped on the images whose first pass (at the
    ladder's answer) already had a mean particle confidence of at least c: those images
    take the no-vote result and time."""
    none = out[settings[0][0]]
    t_none = sum(r["secs"] for r in none)
    rows = [_row(name, label, out[label], t_none) for label, *_ in settings]
    for label, below, stop, margin in settings:
        if below <= 0 or stop <= 1 or margin is not None:
            continue
        for c in STOP_AT:
            recs = [
                dict(n, voted=False) if r["first"] is None or r["first"] >= c else r
                for r, n in zip(out[label], none)
            ]
            rows.append(
                _row(name, f"{label}; first pass >= {c:g} stops it (simulated)", recs, t_none)
            )
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="6 images per set (a smoke run)")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--margins", default="", help="comma-separated VOTE_MARGIN values to add")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = list(SETTINGS)
    for m in filter(None, args.margins.split(",")):
        settings.append((f"vote below 0.7, margin {float(m):g}", 0.7, 0.6, float(m)))
    limit = 6 if args.quick else None
    seg = Segmenter.load("default", device="cpu")
    t0 = time.time()
    sets = [("tuning (40 EMPS training articles)", tuning_set(limit))]
    _, val = emps.load_lso(limit)
    sets.append(("check (45 LSO validation images)", val))
    rows = []
    for name, pairs in sets:
        out = run(seg, pairs, settings)
        part = table(name, out, settings)
        print(markdown_table(HEAD, part), flush=True)
        rows += part
    minutes = (time.time() - t0) / 60
    cmd = "python benchmarks/bench_vote.py" + (" --quick" if args.quick else "")
    if args.margins:
        cmd += f" --margins {args.margins}"
    text = (
        "## How the candidate sizes vote (issues 12 and 18)\n\n"
        f"Command: `{cmd}` ({machine()}; {minutes:.1f} min). The bundled model, size found "
        "by the network (`Segmenter.segment` defaults but for the vote's settings), every "
        'setting on each image in turn. "within 25 %": the size used against the true '
        'median diameter; "voted": images segmented at more than one size (the ladder\'s '
        "confidence under `vote_below`, more than one distinct candidate, and the first pass "
        'under `vote_stop`); "simulated": the records of the setting named, with the images '
        "whose first pass (at the ladder's answer) reached the stated particle confidence "
        'given the result and time of "no vote"; "x time": seconds '
        "against no vote in the same run. The margin is `segment.VOTE_MARGIN` "
        f"({segment_mod.VOTE_MARGIN:g}) unless stated.\n\n" + markdown_table(HEAD, rows)
    )
    print(text)
    if not args.no_write:
        write_section("bench-vote", text)


HEAD = [
    "set", "setting", "F1@0.5 mean", "F1@0.5 pooled", "Dice", "size bias", "within 25 %", "within 2x",
    "voted", "s / image", "x time",
]  # fmt: skip


if __name__ == "__main__":
    main()
