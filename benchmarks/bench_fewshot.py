"""Few-shot fine-tuning episodes on the EMPS articles (issue 14).

Usage::

    python benchmarks/bench_fewshot.py --articles 10 --minutes 5 [--base MODEL] [--shots 1,2]

For each of ``--articles`` articles of ../shared/data/emps-train (``sources.csv``) with at
least 3 images, and for each number of shots k (1 and 2): fine-tune the base model
(``--base``, default the bundled one) for ``--minutes`` CPU-minutes on the article's first k
images with :func:`napari_sagegan.api.fine_tune` (the few-shot recipe, the spatial hold-out,
the re-calibration and the never-worse choice, exactly as ``sagegan train --init`` and the
dock run it), then segment the article's other images and score them (instance F1 at IoU 0.5
and foreground Dice), before and after; against Otsu + watershed whose polarity and marker
distance are tuned on the same k training images. Every model is given the particle size of
the episode's training labels (the median equivalent diameter: what a user who labelled them
knows, what Re-segment uses), so that the comparison is of the segmentations, not of the size
estimate.

Caveat, printed and written with the table: the bundled model was trained on every EMPS
article except the leave-source-out validation ones (which have 1-2 images each), so the
articles with 3 or more images used here were seen in its training; ``--base`` takes a
model trained without them (``SAGEGAN_CAMPAIGN_STATE=runs/fewshot-base python
scripts/campaign.py --init scratch --exclude-fewshot 10``), and the section says which.

In parallel: ``--shard 0/2 --rows-out a.json`` and ``--shard 1/2 --rows-out b.json`` in two
processes, then ``--merge a.json b.json`` writes the section.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import emps  # noqa: E402
from _common import machine, markdown_table, write_section  # noqa: E402
from napari_sagegan import api  # noqa: E402
from napari_sagegan.engine.analysis.metrics import evaluate_pair, mean_metrics  # noqa: E402
from napari_sagegan.engine.checkpoint import Checkpoint  # noqa: E402
from napari_sagegan.engine.config import TrainConfig  # noqa: E402
from napari_sagegan.engine.data.intensity import normalize  # noqa: E402
from napari_sagegan.engine.infer.postprocess import watershed_baseline  # noqa: E402
from napari_sagegan.engine.infer.scale import median_diameter  # noqa: E402
from napari_sagegan.engine.infer.segment import Segmenter  # noqa: E402
from napari_sagegan.io.images import find_pairs, read_image, read_labels  # noqa: E402
from napari_sagegan.util.progress import run_to_end  # noqa: E402

CAVEAT = (
    "Caveat: the bundled model was trained on every EMPS article except the leave-source-out "
    "validation ones (1-2 images each), so the articles with 3 or more images used here were "
    "SEEN in its training: with the bundled base these episodes measure adaptation to images "
    "the model already knows, not to a new lab. Pass --base with a model trained without "
    "them for the honest number."
)


def episodes(n_articles: int) -> list[tuple[str, list[tuple[str, np.ndarray, np.ndarray]]]]:
    """The articles of :func:`emps.fewshot_articles` (the first ``n_articles`` by DOI with
    >= 3 images), each with its pairs ``(stem, image, labels)`` in stem order."""
    if not emps.available():
        raise SystemExit(f"EMPS data not found at {emps.EMPS}; set SAGEGAN_EMPS")
    by_article: dict[str, list] = defaultdict(list)
    doi = emps.articles()
    for ip, mp in find_pairs(emps.EMPS / "images", emps.EMPS / "masks"):
        if ip.stem in doi:
            by_article[doi[ip.stem]].append((ip, mp))
    return [
        (a, [(ip.stem, read_image(ip), read_labels(mp)) for ip, mp in sorted(by_article[a])])
        for a in emps.fewshot_articles(n_articles)
    ]


def base_note(base: Checkpoint, articles: list[str], name: str) -> str:
    """Whether the base model saw the episodes' articles: the caveat, or what it was
    trained without (``scripts/campaign.py --exclude-fewshot`` records its exclusions)."""
    excluded = set(base.extra.get("excluded_articles") or ())
    if not set(articles) <= excluded:
        return f"**{CAVEAT}**"
    m = base.metrics
    lso = (
        f" On the leave-source-out validation (true sizes given) it scores F1@0.5 "
        f"{m['lso_f1@0.5_true_size']:.3f}, Dice {m['lso_dice_true_size']:.3f}."
        if "lso_f1@0.5_true_size" in m and "lso_dice_true_size" in m
        else ""
    )
    return (
        f"The base model `{name}` was trained by the campaign's recipe "
        f"(`SAGEGAN_CAMPAIGN_STATE=... python scripts/campaign.py --init scratch "
        f"--exclude-fewshot {len(articles)}`, {base.step} optimiser steps from "
        f"random weights) without any image of these {len(articles)} articles, nor used them "
        "for selection or calibration: the episodes measure adaptation to articles the model "
        f"never saw.{lso}"
    )


def otsu(image: np.ndarray, polarity: str, min_distance: int | None, min_size: int):
    from skimage.filters import threshold_otsu

    x = normalize(image)
    fg = x > threshold_otsu(x)
    if polarity == "dark" or (polarity == "minority" and fg.mean() > 0.5):
        fg = ~fg
    return watershed_baseline(fg.astype(np.float32), threshold=0.5, min_size=min_size,
                              min_distance=min_distance)  # fmt: skip


def tuned_otsu(train, diameter: float):
    """Otsu + watershed with the polarity and marker distance that score best (F1@0.5, then
    Dice) on the training images."""
    best = None
    for polarity in ("minority", "dark", "bright"):
        for md in (None, max(1, int(diameter / 4)), max(1, int(diameter / 2))):
            ms = max(4, int(0.1 * diameter**2))
            rows = [evaluate_pair(otsu(im, polarity, md, ms), lab) for _s, im, lab in train]
            m = mean_metrics(rows)
            key = (m["f1@0.5"], m["dice"])
            if best is None or key > best[0]:
                best = (key, (polarity, md, ms))
    return best[1]


def score_model(seg: Segmenter, test, diameter: float) -> dict[str, float]:
    cfg = seg.default_infer_config().replace(diameter=float(diameter), device="cpu")
    rows = [evaluate_pair(run_to_end(seg.segment(im, cfg)).labels, lab) for _s, im, lab in test]
    return mean_metrics(rows)


def _score_weights(trainer, weights: dict, test, diameter: float) -> dict:
    from napari_sagegan.engine.nets.attention_unet import AttentionUNet

    net = AttentionUNet(trainer.arch)
    net.load_state_dict(weights["state"])
    info = {"infer": weights["infer"].to_dict(), "target_diameter": weights["target_diameter"]}
    return score_model(Segmenter(net.eval(), device="cpu", checkpoint=info), test, diameter)


def candidate_scores(trainer, test, diameter: float, decision: dict, after: dict) -> dict:
    """The article's other images scored with the fine-tuned and the blended weights and the
    re-calibrated starting model, whichever was kept (what the never-worse choice gained or
    cost); ``after`` for the one that was kept."""
    scores = {}
    pairs = (("fine_tuned", "fine-tuned"), ("blended", "blended"),
             ("recalibrated", "starting model, re-calibrated"))  # fmt: skip
    for key, name in pairs:
        weights = getattr(trainer, key, None)
        if weights is not None:
            scores[key] = (
                after if decision["kept"] == name
                else _score_weights(trainer, weights, test, diameter)
            )  # fmt: skip
    return scores


def run_episodes(args, base: Checkpoint) -> list[dict]:
    """Fine-tune ``base`` on each episode of this shard; one row per (article, k)."""
    shots = [int(s) for s in args.shots.split(",")]
    index, count = (int(v) for v in args.shard.split("/"))
    rows, n = [], 0
    for article, pairs in episodes(args.articles):
        for k in shots:
            if len(pairs) <= k:
                continue
            n += 1
            if (n - 1) % count != index:
                continue
            train, test = pairs[:k], pairs[k:]
            if args.max_test:
                test = test[: args.max_test]
            diameter = float(np.median([median_diameter(lab) or 0.0 for _s, _i, lab in train]))
            before = score_model(Segmenter(base.build(), device="cpu", checkpoint=base), test,
                                 diameter)  # fmt: skip
            params = tuned_otsu(train, diameter)
            classic = mean_metrics([evaluate_pair(otsu(im, *params), lab) for _s, im, lab in test])
            cfg = TrainConfig(max_minutes=args.minutes, epochs=10_000, batch_size=4, seed=0)
            trained = run_to_end(api.fine_tune(train, init=base, config=cfg, device="cpu"))
            ckpt = trained.trainer.best_checkpoint()
            decision = trained.result.decision or {"kept": "fine-tuned (no validation)"}
            after = score_model(Segmenter(ckpt.build(), device="cpu", checkpoint=ckpt), test,
                                diameter)  # fmt: skip
            others = candidate_scores(trained.trainer, test, diameter, decision, after)
            rows.append({
                "article": article, "k": k, "n_test": len(test), "kept": decision["kept"],
                "otsu": classic, "before": before, "after": after, **others,
                "band_particles": decision.get("validation_particles"),
                "margin": decision.get("margin"),
                "band": {key: {m: decision[key][m] for m in ("f1@0.5", "dice")}
                         for key in ("base", "base_recalibrated", "blended", "fine_tuned")
                         if key in decision},
            })  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    return rows


#: Other rules the never-worse choice could follow, replayed from each episode's scores
#: (on the band: what the rule sees; on the other images: what it would have got). Each
#: maps a row to the candidate it keeps: "before" (the starting model at its own
#: thresholds), "recalibrated", "blended" or "fine_tuned".
RULES = {
    "always the starting model": lambda r: "before",
    "always the fine-tuned model": lambda r: "fine_tuned",
    "always the blended weights": lambda r: "blended",
    "the blended weights unless worse on the band": lambda r: (
        "blended" if _band(r, "blended") >= _band(r, "base") else "before"
    ),
    "the best on the band (ties: the starting model)": lambda r: max(
        (("base", "before"), ("base_recalibrated", "recalibrated"), ("blended", "blended"),
         ("fine_tuned", "fine_tuned")),
        key=lambda kv: (_band(r, kv[0]), kv[0] == "base"),
    )[1],
}  # fmt: skip


def _band(r: dict, key: str) -> tuple[float, float]:
    m = r.get("band", {}).get(key)
    return (m["f1@0.5"], m["dice"]) if m else (-1.0, -1.0)


def replay(rows: list[dict]) -> str:
    """A table of :data:`RULES` replayed on ``rows``: per number of shots, the mean F1@0.5
    on the other images and on how many articles it is below the starting model."""
    table = []
    for name, rule in RULES.items():
        line = [name]
        for k in sorted({r["k"] for r in rows}):
            sel = [r for r in rows if r["k"] == k and "blended" in r and "recalibrated" in r]
            if not sel:
                line += ["", ""]
                continue
            got = [r[rule(r)]["f1@0.5"] for r in sel]
            worse = sum(g < r["before"]["f1@0.5"] for g, r in zip(got, sel))
            line += [float(np.mean(got)), f"{worse} of {len(sel)}"]
        table.append(line)
    head = ["rule"]
    for k in sorted({r["k"] for r in rows}):
        shots = f"{k} shot{'s' if k > 1 else ''}"
        head += [f"{shots}: mean F1@0.5", f"{shots}: worse than the starting model"]
    return markdown_table(head, table)


def report(rows: list[dict], args, minutes: float, note: str) -> str:
    """The markdown section of the episodes ``rows`` (of one run, or merged shards)."""
    if not rows:
        raise SystemExit("no article with enough images")

    def tuned(r):
        return r.get("fine_tuned", r["after"])["f1@0.5"]

    def blend(r):
        return r["blended"]["f1@0.5"] if "blended" in r else float("nan")

    table = [
        [r["article"], r["k"], r["n_test"], r["otsu"]["f1@0.5"], r["before"]["f1@0.5"],
         r["after"]["f1@0.5"], r["otsu"]["dice"], r["before"]["dice"], r["after"]["dice"],
         r.get("band_particles", ""), r["kept"], tuned(r), blend(r)]
        for r in sorted(rows, key=lambda r: (r["article"], r["k"]))
    ]  # fmt: skip
    shots = sorted({r["k"] for r in rows})
    for k in shots:
        sel = [r for r in rows if r["k"] == k]

        def mean(part, key, sel=sel):
            return float(np.mean([r[part][key] for r in sel]))

        table.append([
            f"**mean, {k} shot{'s' if k > 1 else ''}**", k, sum(r["n_test"] for r in sel),
            mean("otsu", "f1@0.5"), mean("before", "f1@0.5"), mean("after", "f1@0.5"),
            mean("otsu", "dice"), mean("before", "dice"), mean("after", "dice"),
            "", f"worse than before on {sum(r['after']['f1@0.5'] < r['before']['f1@0.5'] for r in sel)}",
            float(np.mean([tuned(r) for r in sel])), float(np.mean([blend(r) for r in sel])),
        ])  # fmt: skip
    verdicts = []
    for k in shots:
        sel = [r for r in rows if r["k"] == k]
        err_after = np.mean([1 - r["after"]["f1@0.5"] for r in sel])
        err_ref = min(np.mean([1 - r["otsu"]["f1@0.5"] for r in sel]),
                      np.mean([1 - r["before"]["f1@0.5"] for r in sel]))  # fmt: skip
        worse = sum(r["after"]["f1@0.5"] < r["before"]["f1@0.5"] for r in sel)
        met = err_after <= 0.5 * err_ref and worse == 0
        verdicts.append(
            f"{k} shot{'s' if k > 1 else ''}: mean error (1 - F1@0.5) after {err_after:.3f} vs "
            f"{err_ref:.3f} for the better of Otsu and the starting model (goal: at most half), "
            f"worse than the starting model on {worse} of {len(sel)} articles (goal: none): "
            f"goal {'met' if met else 'NOT met'}."
        )
        held = [r for r in sel if r["kept"].startswith("starting model")]
        if held:
            verdicts.append(
                f"With {k} shot{'s' if k > 1 else ''} the choice kept the starting model "
                f"(its own or re-calibrated thresholds, or another scale) on {len(held)} "
                f"articles; there the fine-tuned model would have scored F1@0.5 "
                f"{np.mean([tuned(r) for r in held]):.3f} against "
                f"{np.mean([r['after']['f1@0.5'] for r in held]):.3f} for the model kept, and "
                f"been worse than the starting model on "
                f"{sum(tuned(r) < r['before']['f1@0.5'] for r in held)}."
            )
        if any("blended" in r for r in sel):
            verdicts.append(
                f"With {k} shot{'s' if k > 1 else ''} the blended weights were kept on "
                f"{sum(r['kept'] == 'blended' for r in sel)} articles; kept always, they would "
                f"have scored F1@0.5 {np.mean([blend(r) for r in sel]):.3f} and been worse than "
                f"the starting model on {sum(blend(r) < r['before']['f1@0.5'] for r in sel)}."
            )
    header = ["article", "k", "test images", "Otsu F1@0.5", "before F1@0.5", "after F1@0.5",
              "Otsu Dice", "before Dice", "after Dice", "band particles", "kept",
              "fine-tuned F1@0.5", "blended F1@0.5"]  # fmt: skip
    md = markdown_table(header, table)
    print(md)
    cmd = (
        f"python benchmarks/bench_fewshot.py --articles {args.articles} --minutes {args.minutes:g}"
        f" --base {args.base} --shots {args.shots}"
        + (f" --max-test {args.max_test}" if args.max_test else "")
    )
    n_articles = len({r["article"] for r in rows})
    body = f"""## Few-shot fine-tuning episodes (issue 14)

`{cmd}` ({minutes:.0f} min of episodes on {machine()}{args.how}).

Per article of the EMPS training split with at least 3 images: fine-tune the base model for
{args.minutes:g} CPU-minutes on its first k images (`api.fine_tune`: few-shot recipe, a
held-out band of each image for validation, re-calibrated thresholds and network scale, the
starting model kept when the fine-tuned one is not better there), then segment the article's
other images (at the particle size of the training labels, for every method) and score them.
Otsu + watershed has its polarity and marker distance tuned on the same k images. "kept" is
the choice made on the validation band, which holds "band particles" particles: a replacement
of the starting model must beat it there by more than one particle's worth of F1@0.5
(`decision_margin`: 1 / particles, at least 0.02) with Dice at most 0.02 lower, or
by more than 0.03 of Dice with F1@0.5 not lower. The candidates are the starting model
(its own or re-calibrated thresholds), the fine-tuned model and the blended weights
(`TrainConfig.blend`: halfway from the starting to the fine-tuned weights, re-calibrated;
on a tie the one nearer the starting model is kept). "fine-tuned F1@0.5" and "blended
F1@0.5" are those weights on the other images whichever was kept: what the choice gained
or cost.

{note}

{md}

Other rules for the choice, replayed from the same episodes (the scores of every
candidate on the band and on the other images; "worse": below the starting model at its
own thresholds on the other images):

{replay(rows)}

Against the issue's goal: {" ".join(verdicts)} The "kept" choice is made on a held-out band
of the k training images only; where it re-calibrated the thresholds or kept the fine-tuned
model and the article's other images then scored lower, the choice did not carry over from
the band to the rest of the article.
"""
    if n_articles < 10 or args.minutes < 5:
        body += (
            "\nThis is a small run that shows the benchmark works; the full run (10 articles, "
            "5 minutes) is still to be made on a machine with free CPU.\n"
        )
    return body


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--articles", type=int, default=10)
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--base", default="default", help="the model to fine-tune (default: bundled)")
    ap.add_argument("--shots", default="1,2", help="numbers of training images per episode")
    ap.add_argument("--max-test", type=int, default=0, help="score at most this many (0: all)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument(
        "--shard",
        default="0/1",
        metavar="I/N",
        help="run only every N-th episode starting at the I-th (parallel processes; with "
        "--rows-out, then --merge)",
    )
    ap.add_argument("--rows-out", help="write this shard's rows (JSON) here instead of docs")
    ap.add_argument("--merge", nargs="+", metavar="ROWS", help="report the rows of these shards")
    ap.add_argument("--no-write", action="store_true", help="do not write docs/benchmarks.md")
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    base = Checkpoint.load(args.base, kind="segmenter")
    note = base_note(base, emps.fewshot_articles(args.articles), args.base)
    print(note)
    args.how = ""
    if args.merge:
        parts = [json.loads(Path(f).read_text()) for f in args.merge]
        rows = [r for part in parts for r in part["rows"]]
        minutes = max(part["minutes"] for part in parts)
        args.how = f", {len(parts)} processes side by side"
    else:
        t0 = time.perf_counter()
        rows = run_episodes(args, base)
        minutes = (time.perf_counter() - t0) / 60
        if args.rows_out:
            Path(args.rows_out).write_text(json.dumps({"minutes": minutes, "rows": rows}))
            return
    body = report(rows, args, minutes, note)
    if not args.no_write:
        write_section("fewshot", body)


if __name__ == "__main__":
    main()
