"""Calibrated operating point: the thresholds that make particle sizes unbiased.

A segmenter trained with a recall-leaning loss (the authors' Tversky 0.3 / 0.7) draws its
particles too wide at the conventional probability threshold 0.5: +5 % to +28 % in diameter
on data with exact labels. The network's maps are fine; the *operating point* is not. This
module chooses, on labelled validation images, the probability threshold and the seed
threshold (the distance-map level that splits touching particles) so that

* the particles matched to the ground truth at IoU 0.5 have an unbiased size: the median
  linear size ratio ``sqrt(area_pred / area_true)`` (per image, then the median over
  images, so that every image counts alike) is as close to 1 as the grid allows, and
* the instance F1 at IoU 0.5 (averaged over images) is as high as possible among the
  operating points whose size bias is within :data:`BIAS_TOLERANCE` (outside it, each
  1 % of bias costs 0.05 of F1).

Then, at those thresholds, the *minimum particle confidence* (:mod:`.confidence`) under
which a particle is left out is chosen the same way (highest F1 among the unbiased points;
a tie keeps the current cut, else the lower one). The network's least sure particles are mostly false ones
(on background texture, a support film, a half-seen blob), so the cut raises precision
more than it costs recall; how much depends on the model, hence its calibration.

The maps are computed once per image (with the particle size given from the ground truth,
so that the calibration measures the boundaries, not the size estimate) and only the
post-processing runs per grid point. The chosen values are stored in the checkpoint's
``infer`` settings, which :class:`~napari_sagegan.engine.infer.segment.Segmenter` uses
unless the user overrides them.
"""

from __future__ import annotations

import math
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ...util.progress import Progress
from ..analysis.metrics import match_instances, size_ratios
from .confidence import drop_unsure, particle_confidence
from .postprocess import instances_from_maps

#: Probability thresholds tried.
THRESHOLDS: tuple[float, ...] = (
    0.3, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.93, 0.96,
)  # fmt: skip
#: Seed thresholds tried (normalised distance to the edge).
SEED_THRESHOLDS: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7)
#: Minimum particle confidences tried (0: keep every particle).
MIN_CONFIDENCES: tuple[float, ...] = (
    0.0, 0.1, 0.2, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7,
)  # fmt: skip
#: A size bias within this (relative, linear) counts as unbiased.
BIAS_TOLERANCE = 0.03


@dataclass(frozen=True)
class OperatingPoint:
    """The result of a calibration.

    Attributes
    ----------
    threshold, seed_threshold : float
        The chosen probability and seed thresholds.
    min_confidence : float
        The chosen minimum particle confidence (0: every particle kept).
    confidence_scores : dict
        With the minimum confidence chosen on the whole pipeline (``calibrate(...,
        confidence_on="found")``): the mean F1@0.5 of each cut tried, by cut; else empty.
    f1 : float
        Instance F1 at IoU 0.5 at that point, averaged over the calibration images.
    size_bias : float or None
        Median over the images of their matched particles' median linear size ratio at
        that point (1 = unbiased).
    n_images, n_particles : int
        Calibration images and ground-truth particles used.
    baseline : dict
        F1 and size bias at the previous operating point (the starting thresholds and
        minimum confidence), for the report.
    """

    threshold: float
    seed_threshold: float
    f1: float
    size_bias: float | None
    n_images: int
    n_particles: int
    baseline: dict[str, Any] = field(default_factory=dict)
    min_confidence: float = 0.0
    confidence_scores: dict[str, float] = field(default_factory=dict)

    def infer_overrides(self) -> dict[str, float]:
        """The settings to store in a checkpoint's ``infer`` dict."""
        return {
            "threshold": float(self.threshold),
            "seed_threshold": float(self.seed_threshold),
            "min_confidence": float(self.min_confidence),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "threshold": float(self.threshold),
            "seed_threshold": float(self.seed_threshold),
            "min_confidence": float(self.min_confidence),
            "confidence_scores": dict(self.confidence_scores),
            "f1@0.5": float(self.f1),
            "size_bias": None if self.size_bias is None else float(self.size_bias),
            "n_images": int(self.n_images),
            "n_particles": int(self.n_particles),
            "baseline": dict(self.baseline),
        }

    def describe(self) -> str:
        bias = "n/a" if self.size_bias is None else f"{100 * (self.size_bias - 1):+.1f} %"
        line = (
            f"operating point: threshold {self.threshold:g}, seed threshold "
            f"{self.seed_threshold:g}{_cut(self.min_confidence)} (F1@0.5 {self.f1:.3f}, "
            f"size bias {bias}, {self.n_images} images, {self.n_particles} particles)"
        )
        scores = self.confidence_scores
        if scores:
            line += (
                f"; the minimum confidence chosen on the whole pipeline (size found): F1@0.5 "
                f"{scores.get('0', float('nan')):.3f} with every particle, "
                f"{scores.get(f'{self.min_confidence:g}', float('nan')):.3f} with the cut"
            )
        if self.baseline:
            b = self.baseline
            bb = "n/a" if b.get("size_bias") is None else f"{100 * (b['size_bias'] - 1):+.1f} %"
            line += (
                f"; before: threshold {b['threshold']:g}{_cut(b.get('min_confidence', 0.0))}, "
                f"F1@0.5 {b['f1@0.5']:.3f}, size bias {bb}"
            )
        return line


def _cut(min_confidence: float) -> str:
    return f", particles under confidence {min_confidence:g} left out" if min_confidence else ""


def _score(point: dict[str, Any]) -> tuple[float, float]:
    """Sort key: unbiased points first (by F1), then the least biased."""
    bias = point["size_bias"]
    off = abs(math.log(bias)) if bias else math.inf
    tol = math.log1p(BIAS_TOLERANCE)
    # F1 counts fully inside the tolerance; outside it each 1 % of bias costs 0.05 of F1
    return (point["f1"] - 5.0 * max(0.0, off - tol), -off)


def _labels(prob, dist, threshold: float, seed_threshold: float, min_size: int) -> np.ndarray:
    return instances_from_maps(
        prob, dist, threshold=threshold, seed_threshold=seed_threshold, min_size=int(min_size)
    )


def _summary(
    labs: Sequence[np.ndarray], gts: Sequence[np.ndarray], **point: float
) -> dict[str, Any]:
    f1s: list[float] = []
    biases: list[float] = []
    matched = 0
    for lab, gt in zip(labs, gts):
        f1s.append(float(match_instances(lab, gt, (0.5,))["f1"][0.5]))
        r = size_ratios(lab, gt)
        if r.size:
            biases.append(float(np.median(r)))
            matched += int(r.size)
    return {
        **{k: float(v) for k, v in point.items()},
        "f1": float(np.mean(f1s)) if f1s else 1.0,
        "size_bias": float(np.median(biases)) if biases else None,
        "n_matched": matched,
    }


def evaluate_point(
    maps: Sequence[tuple[np.ndarray, np.ndarray | None]],
    gts: Sequence[np.ndarray],
    threshold: float,
    seed_threshold: float,
    min_sizes: Sequence[int],
    min_confidence: float = 0.0,
) -> dict[str, Any]:
    """F1@0.5 and size bias of one operating point over images, every image counting alike.

    ``f1`` is the mean over images of the instance F1 at IoU 0.5; ``size_bias`` the median
    over images of each image's median linear size ratio (so that an image with hundreds
    of particles does not outvote the others); ``n_matched`` the matched particles.

    Parameters
    ----------
    maps : sequence of (prob, dist)
        Per image, the particle probability ``(Y, X)`` and the distance map (or ``None``).
    gts : sequence of ndarray
        Ground-truth instance labels, same shapes.
    threshold, seed_threshold : float
        The operating point.
    min_sizes : sequence of int
        Per image, the smallest particle kept (pixels of that image).
    min_confidence : float
        Particles less sure than this are left out (0: none).
    """
    labs = [_labels(p, d, threshold, seed_threshold, ms) for (p, d), ms in zip(maps, min_sizes)]
    if min_confidence > 0:
        labs = [
            drop_unsure(lab, particle_confidence(lab, p, d, threshold=threshold), min_confidence)[0]
            for lab, (p, d) in zip(labs, maps)
        ]
    return _summary(
        labs, gts, threshold=threshold, seed_threshold=seed_threshold,
        min_confidence=min_confidence,
    )  # fmt: skip


def choose_operating_point(
    maps: Sequence[tuple[np.ndarray, np.ndarray | None]],
    gts: Sequence[np.ndarray],
    min_sizes: Sequence[int],
    *,
    start: tuple[float, float] = (0.5, 0.5),
    start_confidence: float = 0.0,
    thresholds: Sequence[float] = THRESHOLDS,
    seed_thresholds: Sequence[float] = SEED_THRESHOLDS,
    min_confidences: Sequence[float] = MIN_CONFIDENCES,
) -> Generator[Progress, None, OperatingPoint]:
    """Grid-search the operating point on precomputed maps (see the module docstring): the
    thresholds with every particle kept, then the minimum confidence at those thresholds.

    Yields ``Progress(stage="calibrate", step, total)`` per grid point; returns an
    :class:`OperatingPoint`. ``start`` is the current (threshold, seed threshold) and
    ``start_confidence`` the current minimum confidence, scored too and reported as the
    baseline; the result is the baseline unless it scores higher. ``min_confidences=(0,)``
    calibrates the thresholds alone.
    """
    if not maps or len(maps) != len(gts) or len(gts) != len(min_sizes):
        raise ValueError(
            "calibration needs at least one labelled image, and as many maps as labels; "
            f"got {len(maps)} maps and {len(gts)} label images"
        )
    n_particles = int(sum(len(np.unique(g)) - (1 if (g == 0).any() else 0) for g in gts))
    if n_particles == 0:
        raise ValueError(
            "the calibration images contain no labelled particle: label at least a few "
            "particles to calibrate the thresholds"
        )
    has_dist = any(d is not None for _p, d in maps)
    seeds = tuple(seed_thresholds) if has_dist else (float(start[1]),)
    start_pt = (float(start[0]), float(start[1]))
    grid = [(float(t), float(s)) for t in thresholds for s in seeds]
    if start_pt not in grid:
        grid.append(start_pt)
    cuts = sorted({float(c) for c in min_confidences} | {0.0, float(start_confidence)})
    total = len(grid) + len(cuts) + 1
    points = []
    for i, (t, s) in enumerate(grid, 1):
        points.append(evaluate_point(maps, gts, t, s, min_sizes))
        yield Progress("calibrate", i, total, message=f"thresholds {t:g} / {s:g}")
    at_start = next(p for p in points if (p["threshold"], p["seed_threshold"]) == start_pt)
    best = max(points, key=_score)
    if _score(best) <= _score(at_start):  # ties: the current thresholds
        best = at_start
    # the minimum confidence, at those thresholds (confidences computed once per image)
    t, s = best["threshold"], best["seed_threshold"]
    labs = [_labels(p, d, t, s, ms) for (p, d), ms in zip(maps, min_sizes)]
    confs = [particle_confidence(lab, p, d, threshold=t) for lab, (p, d) in zip(labs, maps)]
    by_cut = {}
    for j, c in enumerate(cuts, len(grid) + 1):
        cut = [drop_unsure(lab, conf, c)[0] for lab, conf in zip(labs, confs)]
        by_cut[c] = _summary(cut, gts, threshold=t, seed_threshold=s, min_confidence=c)
        yield Progress("calibrate", j, total, message=f"minimum confidence {c:g}")
    # ties: the current cut, else the one leaving fewer particles out
    best = by_cut[float(start_confidence)]
    for point in by_cut.values():
        if _score(point) > _score(best):
            best = point
    base = evaluate_point(maps, gts, *start_pt, min_sizes, float(start_confidence))
    yield Progress("calibrate", total, total, message="the current operating point")
    # keep the current point unless the best one is really better (ties: no change)
    if _score(best) <= _score(base):
        best = base
    return OperatingPoint(
        threshold=best["threshold"],
        seed_threshold=best["seed_threshold"],
        min_confidence=best["min_confidence"],
        f1=best["f1"],
        size_bias=best["size_bias"],
        n_images=len(gts),
        n_particles=n_particles,
        baseline={
            "threshold": base["threshold"],
            "seed_threshold": base["seed_threshold"],
            "min_confidence": base["min_confidence"],
            "f1@0.5": base["f1"],
            "size_bias": base["size_bias"],
        },
    )


def calibrate(
    segmenter: Any,
    images: Sequence[Any],
    labels: Sequence[np.ndarray],
    *,
    config: Any = None,
    confidence_on: str = "given",
    **grid: Any,
) -> Generator[Progress, None, OperatingPoint]:
    """Calibrate a segmenter's operating point on labelled images.

    Each image is segmented once with its particle size taken from its labels (median
    equivalent diameter), keeping the maps; then :func:`choose_operating_point` searches
    the thresholds and, with ``confidence_on="given"``, the minimum confidence on the same
    maps. With ``confidence_on="found"`` the minimum confidence is chosen instead on the
    particles of the whole pipeline as it runs on a new image (the particle size found by
    the network, :meth:`Segmenter.segment`, at the chosen thresholds): one more pass per
    image, for a model's shipped setting, where many of the particles a cut removes come
    from images whose size was found wrong (docs/benchmarks.md, section ``size``).

    Parameters
    ----------
    segmenter : Segmenter
        The model (its current thresholds are the baseline).
    images, labels : sequences of 2-D arrays
        Validation images and their instance labels (same shapes).
    config : InferConfig, optional
        Inference settings (default: the model's own).

    Yields ``Progress(stage="calibrate-maps")`` per image, then the grid's events.
    """
    from ...util.progress import relay
    from .scale import band_factor, median_diameter

    if len(images) != len(labels) or not images:
        raise ValueError(
            f"calibration needs labelled images: got {len(images)} images and "
            f"{len(labels)} label images"
        )
    config = config or segmenter.default_infer_config()
    target = segmenter.target_diameter
    maps, gts, mins = [], [], []
    for i, (img, gt) in enumerate(zip(images, labels), 1):
        gt = np.asarray(gt)
        if np.shape(img) != gt.shape:
            raise ValueError(
                f"calibration image {i} has shape {np.shape(img)} but its labels {gt.shape}"
            )
        d = median_diameter(gt)
        # at the scale inference will use (the network's accurate band)
        factor = band_factor(d, target, config.scale_band) if target else 1.0
        m = yield from relay(
            segmenter.predict_maps(img, config, factor=factor),
            lambda ev, i=i: Progress(
                "calibrate-maps", i, len(images), message=f"image {i}/{len(images)}"
            ),
        )
        has_dist = segmenter.model.config.dist_head
        maps.append(
            (np.asarray(m[0], np.float32), np.asarray(m[1], np.float32) if has_dist else None)
        )
        gts.append(gt)
        mins.append(max(1, int(round(config.min_size / factor**2))))
    if confidence_on not in ("given", "found"):
        raise ValueError(f"confidence_on must be 'given' or 'found', got {confidence_on!r}")
    cuts = grid.pop("min_confidences", MIN_CONFIDENCES)
    found = confidence_on == "found"
    point = yield from choose_operating_point(
        maps, gts, mins, start=(config.threshold, config.seed_threshold),
        start_confidence=0.0 if found else config.min_confidence,
        min_confidences=(0.0,) if found else cuts, **grid,
    )  # fmt: skip
    if not found:
        return point
    del maps
    at = config.replace(
        threshold=point.threshold, seed_threshold=point.seed_threshold, min_confidence=0.0
    )
    labs, confs = [], []
    for i, img in enumerate(images, 1):
        res = yield from relay(
            segmenter.segment(img, at),
            lambda ev, i=i: Progress(
                "calibrate-confidence", i, len(images), message=f"image {i}/{len(images)}"
            ),
        )
        labs.append(res.labels)
        confs.append(res.confidence)
    c, scores = choose_min_confidence(labs, confs, gts, cuts, start=config.min_confidence)
    return replace(
        point,
        min_confidence=c,
        baseline={**point.baseline, "min_confidence": float(config.min_confidence)},
        confidence_scores=scores,
    )


def choose_min_confidence(
    labels: Sequence[np.ndarray],
    confidences: Sequence[np.ndarray],
    gts: Sequence[np.ndarray],
    cuts: Sequence[float] = MIN_CONFIDENCES,
    *,
    start: float = 0.0,
) -> tuple[float, dict[str, float]]:
    """The minimum confidence among ``cuts`` that scores best (mean F1@0.5 over images,
    sizes unbiased: :func:`_score`) on labels already made, with their per-particle
    ``confidences``; ``start`` stays unless another scores higher, and of equal scores the
    lower cut wins. Returns ``(cut, scores)``: ``scores`` maps each cut tried (as text) to
    its mean F1@0.5."""
    points = {}
    for c in sorted({float(x) for x in cuts} | {0.0, float(start)}):
        cut = [drop_unsure(lab, conf, c)[0] for lab, conf in zip(labels, confidences)]
        points[c] = _summary(cut, gts, min_confidence=c)
    best = points[float(start)]
    for point in points.values():
        if _score(point) > _score(best):
            best = point
    return best["min_confidence"], {f"{c:g}": round(p["f1"], 4) for c, p in points.items()}
