"""How sure the network is of each particle: a per-instance confidence in [0, 1].

Computed once per image from the maps the labels were made from (the particle probability
``prob`` and, for networks with a distance head, the normalised distance-to-edge map
``dist``), after post-processing, so it describes the particles as they are in the result.
It ranks particles for proofreading (the least sure first) and goes into the particle
tables as a ``confidence`` column.

Definition
----------
For particle ``i`` with pixels ``P_i``, ``t`` the probability threshold it was cut at and
``R_i`` its *outer ring* (background pixels within ``ring`` pixels of it, 8-connected)::

    interior_i = clip((mean(prob[P_i]) - t) / (1 - t), 0, 1)
    contrast_i = clip(mean(prob[P_i]) - mean(prob[R_i]), 0, 1)
    seed_i     = clip(max(dist[P_i]), 0, 1)                       (with a distance map)
    confidence_i = geometric mean of the terms available

- *interior*: how far above the threshold the particle lies on average; a particle whose
  pixels are mostly just above the threshold (a faint or partial one) scores low.
- *contrast*: how sharply the probability drops across the particle's boundary; a blob in
  a hazy region of middling probability scores low. A particle with no background around it
  (enclosed by its neighbours) has no ring, and the term is left out.
- *seed*: the height of the distance map's peak inside the particle. Every clear particle
  has a centre where ``dist`` approaches 1; a fragment left by a split, or a region of
  probability without a centre, has a low peak.

The geometric mean makes one poor term enough for a low score (a particle is suspect when
any of the three says so), and a clear disc on a clean background scores close to 1.
Where the outer rings of two particles overlap, a ring pixel counts for the larger label
(a dilation of the labels). Every pass runs block by block over the rows (the image is
never copied at full size in float64), so very large images cost a few passes over the
maps.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage as ndi

__all__ = ["RING", "drop_unsure", "particle_confidence", "with_confidence"]

#: Width of the outer ring, pixels.
RING = 2
_BLOCK_PIXELS = 1 << 22


def _row_blocks(shape: tuple[int, ...]):
    step = max(1, _BLOCK_PIXELS // max(1, shape[1]))
    for r0 in range(0, shape[0], step):
        yield r0, min(r0 + step, shape[0])


def _as_plane(arr: Any, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    a = np.asarray(arr)
    if a.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D image (height, width), got shape {a.shape}; score a stack "
            "one slice at a time"
        )
    if shape is not None and a.shape != shape:
        raise ValueError(
            f"{name} has shape {a.shape} but the labels have shape {shape}; both must come "
            "from the same segmentation"
        )
    return a


def particle_confidence(
    labels: Any,
    prob: Any,
    dist: Any = None,
    *,
    threshold: float = 0.5,
    ring: int = RING,
) -> np.ndarray:
    """Per-particle confidence in [0, 1] from the network's maps (see the module docstring).

    Parameters
    ----------
    labels : array_like, shape (H, W), int
        Instance labels (0 = background), as post-processed from ``prob`` / ``dist``.
    prob : array_like, shape (H, W), float in [0, 1]
        Particle probability.
    dist : array_like, shape (H, W), float in [0, 1], optional
        Normalised distance-to-edge map (networks with a distance head).
    threshold : float
        The probability threshold the labels were cut at, in [0, 1).
    ring : int
        Width of the outer ring, pixels (>= 1).

    Returns
    -------
    np.ndarray, shape (labels.max() + 1,), float32
        ``confidence[label]``; ``NaN`` at index 0 and for label values not present.

    Raises
    ------
    ValueError
        Maps of another shape than the labels, negative labels, a threshold outside [0, 1).
    """
    labels = _as_plane(labels, "labels")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be an integer label image, got dtype {labels.dtype}")
    prob = _as_plane(prob, "prob", labels.shape)
    if dist is not None:
        dist = _as_plane(dist, "dist", labels.shape)
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must be in [0, 1), got {threshold}")
    if int(ring) < 1:
        raise ValueError(f"ring must be at least 1 pixel, got {ring}")
    n = int(labels.max()) if labels.size else 0
    out = np.full(n + 1, np.nan, np.float32)
    if n == 0:
        return out
    if int(labels.min()) < 0:
        raise ValueError("labels must be >= 0 (0 = background)")
    count = np.zeros(n + 1, np.float64)
    total = np.zeros(n + 1, np.float64)
    ring_n = np.zeros(n + 1, np.float64)
    ring_sum = np.zeros(n + 1, np.float64)
    peak = np.full(n + 1, -np.inf) if dist is not None else None
    h = labels.shape[0]
    for r0, r1 in _row_blocks(labels.shape):
        lab = labels[r0:r1]
        p = np.asarray(prob[r0:r1], np.float64)  # bincount's weights are doubles anyway
        flat = lab.ravel()
        c = np.bincount(flat, minlength=n + 1)
        count += c
        total += np.bincount(flat, p.ravel(), minlength=n + 1)
        # the ring: background pixels reached by a dilation of the labels (halo: ring rows)
        a0, a1 = max(0, r0 - ring), min(h, r1 + ring)
        grown = ndi.maximum_filter(labels[a0:a1], size=2 * int(ring) + 1)[r0 - a0 : r1 - a0]
        at = (lab == 0) & (grown > 0)
        ring_n += np.bincount(grown[at], minlength=n + 1)
        ring_sum += np.bincount(grown[at], p[at], minlength=n + 1)
        if peak is not None:
            # per-label maximum of dist: the particle pixels sorted by label, then reduceat
            fg = np.flatnonzero(flat)
            if fg.size:
                d = np.asarray(dist[r0:r1]).ravel()[fg]
                ids_fg = flat[fg]
                order = np.argsort(ids_fg, kind="stable")
                ids_fg = ids_fg[order]
                starts = np.flatnonzero(np.r_[True, ids_fg[1:] != ids_fg[:-1]])
                block_peak = np.maximum.reduceat(d[order], starts)
                where = ids_fg[starts]
                peak[where] = np.maximum(peak[where], block_peak)
    ids = np.flatnonzero(count[1:]) + 1
    mean_in = total[ids] / count[ids]
    interior = np.clip((mean_in - threshold) / (1.0 - threshold), 0.0, 1.0)
    has_ring = ring_n[ids] > 0
    contrast = np.clip(mean_in - ring_sum[ids] / np.maximum(ring_n[ids], 1.0), 0.0, 1.0)
    logs = np.log(np.maximum(interior, 1e-12))
    k = np.ones(ids.size)
    logs += np.where(has_ring, np.log(np.maximum(contrast, 1e-12)), 0.0)
    k += has_ring
    if peak is not None:
        logs += np.log(np.maximum(np.clip(peak[ids], 0.0, 1.0), 1e-12))
        k += 1
    conf = np.exp(logs / k)
    conf[conf < 1e-6] = 0.0
    out[ids] = conf.astype(np.float32)
    return out


def drop_unsure(
    labels: np.ndarray, confidence: np.ndarray, min_confidence: float
) -> tuple[np.ndarray, np.ndarray, int]:
    """Leave out the particles whose confidence is below ``min_confidence``.

    ``confidence`` is indexed by label (:func:`particle_confidence`). Returns
    ``(labels, confidence, removed)``: the labels kept, numbered again 1..n in their order,
    their confidences indexed the same way, and how many particles were left out. With
    ``min_confidence`` 0 (or nothing to leave out) the inputs come back as they are.
    """
    if not 0.0 <= float(min_confidence) < 1.0:
        raise ValueError(f"min_confidence must be in [0, 1), got {min_confidence}")
    conf = np.asarray(confidence, np.float32)
    n = int(conf.size) - 1
    if min_confidence <= 0.0 or n < 1:
        return labels, conf, 0
    present = ~np.isnan(conf[1:])
    low = present & (conf[1:] < min_confidence)
    removed = int(low.sum())
    if removed == 0:
        return labels, conf, 0
    keep = present & ~low
    lut = np.zeros(n + 1, labels.dtype)
    lut[1:][keep] = np.arange(1, int(keep.sum()) + 1, dtype=labels.dtype)
    out = np.empty_like(labels)
    for r0, r1 in _row_blocks(labels.shape):  # no full-size temporary beyond ``out``
        out[r0:r1] = lut[labels[r0:r1]]
    new_conf = np.concatenate([np.full(1, np.nan, np.float32), conf[1:][keep]])
    return out, new_conf, removed


def with_confidence(table: Any, confidence: Any, label_column: str = "label") -> Any:
    """``table`` (a pandas DataFrame of particles) with a ``confidence`` column, by label.

    ``confidence`` is an array indexed by label (:func:`particle_confidence`,
    ``SegmentResult.confidence``), or an object carrying one as ``.confidence``; ``None``
    returns the table unchanged. Labels beyond the array get ``NaN``. The column goes after
    the existing ones (a table's other columns keep their order, for scripts reading them).
    """
    conf = getattr(confidence, "confidence", confidence)
    if conf is None:
        return table
    conf = np.asarray(conf, dtype=np.float64)
    ids = np.asarray(table[label_column], dtype=np.int64)
    values = np.full(ids.shape, np.nan)
    ok = (ids >= 0) & (ids < conf.size)
    values[ok] = conf[ids[ok]]
    out = table.copy()
    out["confidence"] = values
    return out
