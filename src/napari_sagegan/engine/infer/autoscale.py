"""Particle scale found by the network: a ladder of scales scored by self-consistency.

The segmenter sees particles about ``target`` pixels across (the network scale). To find
the scale of a new image, a central crop is segmented at a coarse ladder of assumed
particle diameters (6 px to 384 px, a factor sqrt(2) apart), each time resampled so that the
assumed diameter comes out at the network scale. At the right rung the network's own
particles measure what was assumed (their median diameter is ``target`` network pixels),
and neighbouring rungs measure the same particles, so their implied diameters agree; at a
wrong rung the network finds texture, fragments or merged blobs whose sizes follow the
assumption instead. Each rung gets a cost

    cost_k = |log(m_k / target)| + 1/2 sum_{j = k +- 1} |log(D_j / D_k)| - 0.05 log n_k

(``m_k``: median diameter of the rung's particles in network pixels, ``D_k``: the same in
image pixels, ``n_k``: how many particles the rung found; a missing neighbour costs 1/2),
and the rung of least cost gives the diameter ``D_k``. The classical estimate
(:func:`~napari_sagegan.engine.infer.scale.estimate_diameter`) is only a first guess: it
adds a small prior ``0.1 min(|log(d_k / guess)|, 2)``, and when it agrees with the
network's answer within 1.3x the segmenter uses the geometric mean of the two.

The answer carries a confidence in [0, 1], ``exp(-2 cost)``, and the rung table, so that a
caller can check the next-best rungs with full passes (see
:meth:`~napari_sagegan.engine.infer.segment.Segmenter.segment`, which keeps the pass whose
particles the network is clearly most confident in: on images of a few particles larger
than a quarter of the frame the ladder's crops see only the inside of one particle, and its
answer is texture).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...util.progress import Progress

#: Assumed diameters of the ladder (pixels of the image).
LADDER: tuple[float, ...] = tuple(round(6.0 * 2 ** (k / 2), 2) for k in range(13))
#: Side of the crop the network sees at each rung (network pixels).
CROP = 256
#: Fewest particles a rung must find to count.
MIN_COUNT = 2
#: Below this confidence the estimate is reported as uncertain.
LOW_CONFIDENCE = 0.35


@dataclass(frozen=True)
class Rung:
    """One rung of the ladder.

    Attributes
    ----------
    assumed : float
        Diameter assumed (image pixels).
    measured : float or None
        Median equivalent diameter of the particles found there (image pixels).
    count : int
        Particles found (not touching the crop's border).
    cost : float
        Self-consistency cost (lower is better; ``inf`` when the rung does not count).
    """

    assumed: float
    measured: float | None
    count: int
    cost: float = math.inf


@dataclass(frozen=True)
class ScaleSearch:
    """The ladder's answer: ``diameter`` (image pixels) with a ``confidence`` in [0, 1],
    and the rungs, best first."""

    diameter: float | None
    confidence: float
    rungs: tuple[Rung, ...]

    def alternatives(self) -> list[float]:
        """Diameters of the other counting rungs, best first, at least 1.4x from the answer
        and from each other."""
        out: list[float] = []
        for r in self.rungs[1:]:
            if r.measured is None or not math.isfinite(r.cost):
                continue
            keep = [self.diameter] + out if self.diameter else out
            if all(abs(math.log(r.measured / d)) > math.log(1.4) for d in keep):
                out.append(r.measured)
        return out


def _crop(image: Any, side: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    h, w = int(image.shape[-2]), int(image.shape[-1])
    ch, cw = min(h, side), min(w, side)
    y0, x0 = (h - ch) // 2, (w - cw) // 2
    box = (y0, x0, y0 + ch, x0 + cw)
    return np.asarray(image[y0 : y0 + ch, x0 : x0 + cw], dtype=np.float32), box


def _interior_diameter(labels: np.ndarray, min_area: int) -> tuple[float | None, int]:
    """Median equivalent diameter and count of the instances not touching the border."""
    if not labels.any():
        return None, 0
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    areas = np.bincount(labels.ravel())
    areas[border] = 0
    areas[0] = 0
    areas = areas[areas >= max(1, min_area)]
    if areas.size == 0:
        return None, 0
    return float(np.median(2.0 * np.sqrt(areas / math.pi))), int(areas.size)


def rung_costs(rungs: list[Rung], target: float, guess: float | None) -> list[Rung]:
    """Score the rungs (see the module docstring); returns them with ``cost`` set."""
    out = []
    ok = [r.measured is not None and r.count >= MIN_COUNT for r in rungs]
    for k, r in enumerate(rungs):
        if not ok[k]:
            out.append(Rung(r.assumed, r.measured, r.count, math.inf))
            continue
        m_net = r.measured * target / r.assumed
        cost = abs(math.log(m_net / target))
        for j in (k - 1, k + 1):
            if 0 <= j < len(rungs) and ok[j]:
                cost += abs(math.log(rungs[j].measured / r.measured)) / 2
            else:
                cost += 0.5
        if guess:
            cost += 0.1 * min(abs(math.log(r.assumed / guess)), 2.0)
        cost -= 0.05 * math.log(r.count)
        out.append(Rung(r.assumed, r.measured, r.count, max(cost, 0.0)))
    return out


def search_scale(
    segment_crop: Callable[[np.ndarray, float, tuple[int, int, int, int]], np.ndarray],
    image: Any,
    target: float,
    *,
    guess: float | None = None,
    min_size: int = 15,
    ladder: tuple[float, ...] = LADDER,
    crop: int = CROP,
) -> Generator[Progress, None, ScaleSearch]:
    """Find the typical particle diameter of a 2-D image with the network.

    Parameters
    ----------
    segment_crop : callable
        ``segment_crop(crop, factor, box)``: the instance labels of ``crop`` (``box`` =
        (y0, x0, y1, x1) in the image) segmented with the image resampled by ``factor``, on
        the crop's grid; or ``(labels, grid)`` with the labels on another grid, ``grid``
        label pixels per crop pixel (the network's grid of a shrunk crop).
    image : array-like, shape (Y, X)
        The raw image (only central crops are read).
    target : float
        The network scale (pixels).
    guess : float, optional
        A first guess (the classical estimate), used as a weak prior.
    min_size : int
        Smallest particle counted, network pixels.
    ladder, crop
        The assumed diameters and the crop side in network pixels.

    Yields ``Progress(stage="scale", step, total)`` per rung; returns a :class:`ScaleSearch`.
    """
    h, w = int(image.shape[-2]), int(image.shape[-1])
    usable = [d for d in ladder if d <= max(8.0, min(h, w) / 2.0)]
    rungs: list[Rung] = []
    for i, d in enumerate(usable, 1):
        factor = target / d
        side = int(math.ceil(crop / factor))
        c, box = _crop(image, side)
        if min(c.shape) * factor < 32:  # too small to say anything at this rung
            rungs.append(Rung(d, None, 0))
        else:
            out = segment_crop(c, factor, box)
            lab, grid = out if isinstance(out, tuple) else (out, 1.0)
            min_area = max(1, int(round(min_size / factor**2 * grid**2)))
            m, n = _interior_diameter(np.asarray(lab), min_area)
            rungs.append(Rung(d, None if m is None else m / grid, n))
        yield Progress("scale", i, len(usable), message=f"particle size: trying {d:.0f} px")
    scored = rung_costs(rungs, target, guess)
    order = sorted(scored, key=lambda r: r.cost)
    best = order[0] if order else None
    if best is None or not math.isfinite(best.cost):
        return ScaleSearch(None, 0.0, tuple(order))
    return ScaleSearch(best.measured, float(math.exp(-2.0 * best.cost)), tuple(order))
