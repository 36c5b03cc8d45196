"""Proofreading instance labels: the operations of the "Proofread particles" dock (no Qt).

Every operation takes one 2-D plane of a label image (a stack is proofread slice by slice)
and returns an :class:`Edit`: the box it changes with the crop before and after, which
labels it touched, and the network confidence of the particles it made (``NaN`` where
unknown). Nothing is changed until the edit is applied: :meth:`Edit.apply` writes a NumPy
plane, the dock writes it through napari's ``Labels.data_setitem`` (the way painting does,
so the layer counts as edited and napari's own undo knows it).

- :func:`delete_particle`, :func:`merge_particles`, :func:`split_particle` (a watershed
  inside the particle from two or more clicked seeds), :func:`add_particle` with its region
  from :func:`grow_from_maps` (the network's probability above a lower threshold, bounded by
  the distance map and a size limit: an object from one point prompt, as micro-sam adds
  one) or :func:`grow_from_image` (a local Otsu threshold of the image intensity, when no
  network maps are at hand);
- :func:`network_maps`: the network's maps of a crop around a click (a progress generator,
  run in a worker);
- :func:`low_confidence_order` / :func:`next_low_confidence`: the particles by ascending
  confidence, for "next low-confidence particle" (particles cut by the image border,
  :func:`border_labels`, may be skipped: they are partial, and left out of the size
  statistics anyway);
- :func:`refresh_features`: the layer's particle table with the touched rows measured again
  (only inside the edit's box: a click never re-measures the whole image).

(About 600 lines: every operation returns the same :class:`Edit`, which the growing, the
ranking and the table refresh read; one file keeps the dock's whole vocabulary in view.)
"""

from __future__ import annotations

import math
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from napari_sagegan.util.progress import Progress

__all__ = [
    "Edit",
    "add_particle",
    "border_labels",
    "confidence_array",
    "delete_particle",
    "grow_from_image",
    "grow_from_maps",
    "grow_job",
    "label_at",
    "low_confidence_order",
    "merge_particles",
    "network_maps",
    "next_low_confidence",
    "particle_box",
    "refresh_features",
    "split_particle",
    "typical_diameter",
    "window",
]

_FULL = np.ones((3, 3), bool)
#: Largest gap (pixels) between two particles that "merge" bridges.
MERGE_GAP = 3
#: Below this rise of the probability from the local background to the click, the network
#: sees no particle there.
MIN_RISE = 0.1
#: A grown region covering more than this fraction of its size limit leaked into the
#: background: refused.
LEAK_FRACTION = 0.9


# --------------------------------------------------------------------------- edits


@dataclass
class Edit:
    """A change of one 2-D label plane inside a box.

    Attributes
    ----------
    box : tuple of slice
        ``(rows, cols)`` of the plane the edit covers.
    before, after : np.ndarray
        The plane's crop at ``box`` before and after the edit.
    what : str
        One line for the user, e.g. ``"deleted particle 5"``.
    labels : list of int
        The labels present after the edit that it made or changed (a merged particle, the
        pieces of a split one, an added one).
    confidence : dict
        Network confidence of those labels when known (``NaN`` or missing: unknown, e.g.
        a particle drawn by hand).
    """

    box: tuple[slice, slice]
    before: np.ndarray
    after: np.ndarray
    what: str
    labels: list[int] = field(default_factory=list)
    confidence: dict[int, float] = field(default_factory=dict)

    @property
    def changed(self) -> np.ndarray:
        """Mask (box-sized) of the pixels whose label changes."""
        return self.before != self.after

    @property
    def touched(self) -> set[int]:
        """Every label whose pixels change (before or after), background excluded."""
        m = self.changed
        return (
            set(np.unique(self.before[m]).tolist()) | set(np.unique(self.after[m]).tolist())
        ) - {0}

    def indices(self, offset: Sequence[int] = ()) -> tuple[np.ndarray, ...]:
        """Indices of the changed pixels in the whole array (``offset``: leading indices,
        e.g. ``(z,)`` for a slice of a stack), for ``Labels.data_setitem``."""
        rr, cc = np.nonzero(self.changed)
        rr = rr + self.box[0].start
        cc = cc + self.box[1].start
        lead = tuple(np.full(rr.shape, int(v), np.intp) for v in offset)
        return (*lead, rr, cc)

    def values(self) -> np.ndarray:
        """The new labels of the changed pixels, in the order of :meth:`indices`."""
        return self.after[self.changed]

    def apply(self, plane: np.ndarray) -> None:
        """Write the edit into a NumPy plane (in place)."""
        plane[self.box] = np.where(self.changed, self.after, plane[self.box])

    def inverse(self) -> Edit:
        """The edit that undoes this one."""
        return Edit(self.box, self.after, self.before, f"undid: {self.what}")


def _plane(labels: Any) -> np.ndarray:
    plane = np.asarray(labels)
    if plane.ndim != 2:
        raise ValueError(
            f"proofreading works on one 2-D plane of labels, got shape {plane.shape}; pick a "
            "slice of the stack"
        )
    if not np.issubdtype(plane.dtype, np.integer):
        raise ValueError(f"labels must be integers (0 = background), got dtype {plane.dtype}")
    return plane


def _point(point: Sequence[float], shape: tuple[int, ...]) -> tuple[int, int]:
    y, x = (int(math.floor(float(v) + 0.5)) for v in point[-2:])
    if not (0 <= y < shape[0] and 0 <= x < shape[1]):
        raise ValueError(
            f"the point ({y}, {x}) is outside the image ({shape[0]} x {shape[1]} pixels)"
        )
    return y, x


def label_at(labels: Any, point: Sequence[float]) -> int:
    """The label under ``point`` (``(row, col)`` in pixels; 0 = background)."""
    plane = _plane(labels)
    y, x = _point(point, plane.shape)
    return int(plane[y, x])


def particle_box(labels: np.ndarray, *ids: int, pad: int = 0) -> tuple[slice, slice]:
    """The bounding box of the pixels of ``ids`` in a plane, grown by ``pad`` pixels."""
    plane = _plane(labels)
    mask = np.isin(plane, ids)
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise ValueError(f"there is no particle {ids[0] if len(ids) == 1 else list(ids)} here")
    h, w = plane.shape
    return (
        slice(max(0, rows[0] - pad), min(h, rows[-1] + 1 + pad)),
        slice(max(0, cols[0] - pad), min(w, cols[-1] + 1 + pad)),
    )


def window(point: Sequence[float], half: int, shape: tuple[int, ...]) -> tuple[slice, slice]:
    """A box of about ``2 half + 1`` pixels around ``point``, inside a plane of ``shape``."""
    y, x = _point(point, shape)
    half = max(1, int(half))
    return (
        slice(max(0, y - half), min(shape[0], y + half + 1)),
        slice(max(0, x - half), min(shape[1], x + half + 1)),
    )


def _need(label: int, what: str) -> None:
    if label <= 0:
        raise ValueError(f"there is no particle under the click: click inside a particle to {what}")


def delete_particle(labels: Any, label: int) -> Edit:
    """Remove particle ``label`` (its pixels become background)."""
    plane = _plane(labels)
    _need(int(label), "delete it")
    box = particle_box(plane, label)
    before = plane[box].copy()
    after = np.where(before == label, 0, before).astype(plane.dtype)
    return Edit(box, before, after, f"deleted particle {label}")


def merge_particles(labels: Any, a: int, b: int, *, max_gap: int = MERGE_GAP) -> Edit:
    """Merge particle ``b`` into particle ``a`` (``a`` keeps its label).

    Particles that do not touch but lie within ``max_gap`` pixels of each other are joined
    across the gap (background pixels closed between them); farther apart, the merge is
    refused, since it would make one particle of two separate pieces.
    """
    plane = _plane(labels)
    a, b = int(a), int(b)
    _need(a, "merge it")
    _need(b, "merge it")
    if a == b:
        raise ValueError(f"both clicks are on particle {a}: click two different particles")
    box = particle_box(plane, a, b, pad=max_gap + 1)
    before = plane[box].copy()
    union = (before == a) | (before == b)
    if ndi.label(union, structure=_FULL)[1] > 1:
        from skimage.morphology import disk

        closed = ndi.binary_closing(union, structure=disk(max(1, (max_gap + 1) // 2)))
        union |= closed & (before == 0)
        if ndi.label(union, structure=_FULL)[1] > 1:
            raise ValueError(
                f"particles {a} and {b} do not touch (more than {max_gap} px apart): merging "
                "them would make one particle of two pieces; merge neighbours only"
            )
    after = np.where(union, a, before).astype(plane.dtype)
    return Edit(box, before, after, f"merged particle {b} into {a}", labels=[a])


def split_particle(
    labels: Any,
    label: int,
    seeds: Sequence[Sequence[float]],
    *,
    new_label: int | None = None,
) -> Edit:
    """Split particle ``label`` by a watershed from two or more seed points inside it.

    The watershed runs on the inverted distance to the particle's edge, so the cut follows
    the particle's waist between the seeds. The piece of the first seed keeps ``label``;
    the others get ``new_label``, ``new_label + 1``, ... (default: above the plane's
    largest label).
    """
    plane = _plane(labels)
    label = int(label)
    _need(label, "split it")
    if len(seeds) < 2:
        raise ValueError("splitting needs two clicks inside the particle (one per piece)")
    box = particle_box(plane, label, pad=1)
    before = plane[box].copy()
    own = before == label
    markers = np.zeros(own.shape, np.int32)
    for k, p in enumerate(seeds, 1):
        y, x = _point(p, plane.shape)
        yy, xx = y - box[0].start, x - box[1].start
        if not (0 <= yy < own.shape[0] and 0 <= xx < own.shape[1]) or not own[yy, xx]:
            raise ValueError(
                f"seed {k} at ({y}, {x}) is not inside particle {label}: click both points "
                "inside the particle to split"
            )
        if markers[yy, xx]:
            raise ValueError("two seeds are on the same pixel: click two separate points")
        markers[yy, xx] = k
    from skimage.segmentation import watershed

    edt = ndi.distance_transform_edt(own)
    pieces = watershed(-edt, markers, mask=own, connectivity=2)
    first = int(new_label) if new_label is not None else int(plane.max()) + 1
    ids = [label] + [first + i for i in range(len(seeds) - 1)]
    lut = np.array([0] + ids, dtype=np.int64)
    after = np.where(own, lut[pieces], before).astype(plane.dtype)
    made = [i for i in ids if np.any(after == i)]
    if len(made) < 2:
        raise ValueError(f"particle {label} could not be split between these points")
    return Edit(box, before, after, f"split particle {label} into {len(made)}", labels=made)


def add_particle(
    labels: Any,
    region: np.ndarray,
    box: tuple[slice, slice],
    *,
    new_label: int | None = None,
    confidence: float = float("nan"),
) -> Edit:
    """Add the pixels of ``region`` (a bool mask of ``box``) that are background as a new
    particle (default label: above the plane's largest)."""
    plane = _plane(labels)
    before = plane[box].copy()
    region = np.asarray(region, bool)
    if region.shape != before.shape:
        raise ValueError(f"the region has shape {region.shape}, its box {before.shape}")
    free = region & (before == 0)
    if not free.any():
        raise ValueError("no new particle here: the region is empty or already labelled")
    label = int(new_label) if new_label is not None else int(plane.max()) + 1
    after = np.where(free, label, before).astype(plane.dtype)
    return Edit(
        box, before, after, f"added particle {label} ({int(free.sum())} px)", labels=[label],
        confidence={label: float(confidence)},
    )  # fmt: skip


# --------------------------------------------------------------------------- growing


def _disc(shape: tuple[int, int], y: int, x: int, radius: float) -> np.ndarray:
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return (yy - y) ** 2 + (xx - x) ** 2 <= radius**2


def _component_at(mask: np.ndarray, y: int, x: int, score: np.ndarray) -> np.ndarray | None:
    """The 8-connected component of ``mask`` at ``(y, x)``, or at the best-scoring mask
    pixel within 3 px of it; ``None`` when there is none."""
    if not mask[y, x]:
        y0, y1 = max(0, y - 3), min(mask.shape[0], y + 4)
        x0, x1 = max(0, x - 3), min(mask.shape[1], x + 4)
        near = mask[y0:y1, x0:x1]
        if not near.any():
            return None
        s = np.where(near, score[y0:y1, x0:x1], -np.inf)
        dy, dx = np.unravel_index(int(np.argmax(s)), s.shape)
        y, x = y0 + int(dy), x0 + int(dx)
    comp, _ = ndi.label(mask, structure=_FULL)
    return comp == comp[y, x]


def _check_leak(region: np.ndarray, limit: np.ndarray) -> np.ndarray:
    if region.sum() > LEAK_FRACTION * limit.sum():
        raise ValueError(
            "no particle found at the click: the region grows to the size limit (the click "
            "is probably on the background); click the particle's centre or lower the size"
        )
    return ndi.binary_fill_holes(region)


def grow_from_maps(
    prob: np.ndarray,
    dist: np.ndarray | None,
    point: Sequence[float],
    occupied: np.ndarray,
    *,
    max_radius: float,
    threshold: float | None = None,
    seed_threshold: float = 0.5,
) -> np.ndarray:
    """A particle grown from one click on the network's maps (crop-sized arrays).

    The region is the connected part of ``prob > threshold`` at the click, among pixels not
    ``occupied`` by another particle and within ``max_radius`` of the click. ``threshold``
    ``None`` (the default) is halfway between the local background (the median probability
    of the crop's free pixels) and the peak at the click (the highest probability within
    2 px): a lower threshold than Segment's for a faint particle, a higher one where the
    network's background is hazy. With a distance
    map whose seeds (``dist > seed_threshold``) are several in that region (missed particles
    that touch), a watershed on ``-dist`` from those seeds keeps only the click's particle.

    Raises
    ------
    ValueError
        Nothing above the threshold at the click, or a region that fills the size limit
        (the click was on the background).
    """
    prob = np.nan_to_num(np.asarray(prob, np.float32), nan=0.0)
    y, x = _point(point, prob.shape)
    occupied = np.asarray(occupied, bool)
    limit = _disc(prob.shape, y, x, max_radius) & ~occupied
    near = prob[max(0, y - 2) : y + 3, max(0, x - 2) : x + 3]
    peak = float(near.max())
    background = float(np.median(prob[~occupied])) if (~occupied).any() else 0.0
    if threshold is None:
        if peak - background < MIN_RISE:
            raise ValueError(
                f"the network sees no particle at the click (probability {peak:.2f}, about "
                f"its background {background:.2f}): click the particle's centre, or grow "
                "from the image intensity"
            )
        threshold = background + 0.5 * (peak - background)
    cand = (prob > threshold) & limit
    region = _component_at(cand, y, x, prob)
    if region is None:
        raise ValueError(
            f"the network sees no particle at the click (probability {peak:.2f}, below "
            f"{threshold:.2f}): lower the level of Add, or grow from the image intensity"
        )
    if dist is not None:
        d = np.nan_to_num(np.asarray(dist, np.float32), nan=0.0)
        markers, k = ndi.label(region & (d > seed_threshold), structure=_FULL)
        if k >= 2:
            from skimage.segmentation import watershed

            basins = watershed(-d, markers, mask=region, connectivity=2)
            yy, xx = np.nonzero(region)
            nearest = np.argmin((yy - y) ** 2 + (xx - x) ** 2)
            region = basins == basins[yy[nearest], xx[nearest]]
    return _check_leak(region, limit)


def grow_from_image(
    image: np.ndarray,
    point: Sequence[float],
    occupied: np.ndarray,
    *,
    max_radius: float,
) -> np.ndarray:
    """A particle grown from one click on the image intensity (a crop around the click).

    The crop is smoothed (Gaussian, sigma 1 px) and split by its Otsu threshold; the
    particle is the side of the threshold the click is on (dark or bright particles alike),
    its connected part at the click, among free pixels within ``max_radius``.

    Raises
    ------
    ValueError
        A flat crop, or a region that fills the size limit (the click was on the
        background).
    """
    from skimage.filters import threshold_otsu

    img = np.asarray(image, np.float64)
    finite = np.isfinite(img)
    if finite.sum() < 4 or np.ptp(img[finite]) == 0:
        raise ValueError("the image is flat around the click: there is no particle to add")
    img = np.where(finite, img, np.median(img[finite]))
    smooth = ndi.gaussian_filter(img, 1.0)
    y, x = _point(point, img.shape)
    t = threshold_otsu(smooth[finite])
    side = smooth > t if smooth[y, x] > t else smooth <= t
    limit = _disc(img.shape, y, x, max_radius) & ~np.asarray(occupied, bool) & finite
    score = np.abs(smooth - t)
    region = _component_at(side & limit, y, x, score)
    if region is None:
        raise ValueError("no particle found at the click: click inside the particle")
    return _check_leak(region, limit)


def typical_diameter(labels: np.ndarray, fallback: float | None = None) -> float:
    """The median equivalent diameter (px) of a plane's particles (at least 3 of them),
    else ``fallback``, else 24 px."""
    plane = _plane(labels)
    areas = np.bincount(plane.ravel())[1:] if plane.size else np.zeros(0)
    areas = areas[areas > 0]
    if areas.size >= 3:
        return float(2.0 * np.sqrt(np.median(areas) / np.pi))
    return float(fallback) if fallback else 24.0


def network_maps(
    segmenter: Any,
    crop: np.ndarray,
    diameter: float,
    infer: dict | None = None,
) -> Generator[Progress, None, tuple[np.ndarray, np.ndarray | None, Any]]:
    """The network's probability (and distance) maps of an image crop, at the scale where
    particles of ``diameter`` px reach the network scale (worker thread).

    Returns ``(prob, dist or None, config)`` on the crop's grid, ``config`` being the
    :class:`~napari_sagegan.engine.config.InferConfig` used (its thresholds).
    """
    from napari_sagegan.engine.infer.scale import band_factor

    config = segmenter.default_infer_config(**(infer or {}))
    target = segmenter.target_diameter
    factor = band_factor(diameter, target, config.scale_band) if target else 1.0
    yield Progress("maps", 0, 1, message="the network's maps around the click ...")
    maps = yield from segmenter.predict_maps(np.asarray(crop), config, factor=factor)
    dist = maps[1] if segmenter.model.config.dist_head else None
    yield Progress("maps", 1, 1, message="maps ready")
    return np.asarray(maps[0], np.float32), dist, config


def grow_job(
    entry: Any,
    crop: np.ndarray,
    point: Sequence[float],
    occupied: np.ndarray,
    diameter: float,
    *,
    threshold: float | None = None,
    device: str = "auto",
    threads: int | None = None,
) -> Generator[Progress, None, tuple[np.ndarray, float]]:
    """Grow a particle from one click on the network's maps of ``crop`` (worker thread).

    ``entry`` is a :class:`~napari_sagegan.napari.state.ModelEntry` (loaded here);
    ``point`` and ``occupied`` are in the crop. The size limit is one typical ``diameter``
    from the click. Returns ``(region, confidence)``: the crop-sized bool mask and its
    network confidence (:func:`~napari_sagegan.engine.infer.confidence.particle_confidence`
    at the model's threshold: a particle grown below it scores low).
    """
    from napari_sagegan.engine.device import torch_threads
    from napari_sagegan.engine.infer.confidence import particle_confidence

    with torch_threads(threads):
        seg = entry.segmenter(device)
        prob, dist, config = yield from network_maps(seg, crop, diameter)
    region = grow_from_maps(
        prob, dist, point, occupied, max_radius=diameter, threshold=threshold,
        seed_threshold=config.seed_threshold,
    )  # fmt: skip
    score = particle_confidence(region.astype(np.int32), prob, dist, threshold=config.threshold)
    return region, float(score[1])


# --------------------------------------------------------------------------- confidence


def confidence_array(features: Any) -> np.ndarray | None:
    """A label-indexed confidence array from a features table (``None`` without a
    ``confidence`` column)."""
    if features is None or "confidence" not in getattr(features, "columns", ()):
        return None
    ids = np.asarray(features["label"], np.int64)
    out = np.full(int(ids.max()) + 1 if ids.size else 1, np.nan)
    out[ids] = np.asarray(features["confidence"], np.float64)
    return out


def border_labels(labels: Any) -> set[int]:
    """The labels that touch the image border (of any slice of a stack): particles cut by
    the edge of the field, left out of the size statistics."""
    arr = np.asarray(labels)
    edges = [arr[..., 0, :], arr[..., -1, :], arr[..., :, 0], arr[..., :, -1]]
    return set(np.unique(np.concatenate([e.ravel() for e in edges])).tolist()) - {0}


def low_confidence_order(features: Any, skip: Any = ()) -> list[tuple[int, float]]:
    """``(label, confidence)`` of the scored particles by ascending confidence (ties by
    label); particles without a score (edited by hand) and the labels in ``skip`` (e.g.
    :func:`border_labels`) are left out."""
    if features is None or "confidence" not in getattr(features, "columns", ()):
        return []
    conf = np.asarray(features["confidence"], np.float64)
    ids = np.asarray(features["label"], np.int64)
    ok = np.isfinite(conf)
    if len(skip):
        ok &= ~np.isin(ids, np.fromiter(skip, np.int64))
    order = np.lexsort((ids[ok], conf[ok]))
    return [(int(ids[ok][i]), float(conf[ok][i])) for i in order]


def next_low_confidence(
    features: Any, after: tuple[float, int] | None = None, skip: Any = ()
) -> tuple[int, float] | None:
    """The particle after ``after`` (``(confidence, label)`` of the last one visited) in
    ascending confidence, or the lowest when ``after`` is ``None``; ``None`` at the end.
    ``skip`` as in :func:`low_confidence_order`."""
    for label, conf in low_confidence_order(features, skip):
        if after is None or (conf, label) > (after[0], after[1]):
            return label, conf
    return None


# --------------------------------------------------------------------------- features


def refresh_features(
    features: Any,
    plane: np.ndarray,
    edit: Edit,
    scale: Sequence[float] | None = None,
    unit: Any = None,
    *,
    slice_index: int | None = None,
) -> Any:
    """The particle table with the rows of the labels ``edit`` touched measured again.

    Rows of labels gone are dropped; the labels ``edit`` made or changed are measured with
    :func:`napari_sagegan.io.export.particle_table` inside the edit's box (the rest of the
    table is kept as it is) and get the edit's ``confidence`` (``NaN``: unknown). ``plane``
    is the plane after the edit. Returns a new table sorted by label.
    """
    import pandas as pd

    from napari_sagegan.io.export import particle_table

    if features is None or "label" not in getattr(features, "columns", ()):
        return features  # no particle table (a layer not made by Segment): none is made up
    touched = edit.touched
    box = edit.box
    crop = plane[box]
    keep_ids = [i for i in touched if np.any(crop == i)]
    own = np.where(np.isin(crop, keep_ids), crop, 0)
    rows = particle_table(own, scale, unit)
    if len(rows):
        oy, ox = box[0].start, box[1].start
        sy, sx = tuple(float(s) for s in scale)[-2:] if scale is not None else (1.0, 1.0)
        for col in rows.columns:
            if col.startswith("centroid_y_"):
                rows[col] = rows[col] + oy * (1.0 if col.endswith("_px") else sy)
            elif col.startswith("centroid_x_"):
                rows[col] = rows[col] + ox * (1.0 if col.endswith("_px") else sx)
        if "touches_border" in rows.columns:
            h, w = plane.shape
            border = []
            for lab in rows["label"]:
                r, c = np.nonzero(crop == lab)
                border.append(
                    bool(r.min() + oy == 0 or c.min() + ox == 0 or r.max() + oy == h - 1
                         or c.max() + ox == w - 1)
                )  # fmt: skip
            rows["touches_border"] = border
        if slice_index is not None and "slice" not in rows.columns:
            rows.insert(rows.columns.get_loc("label") + 1, "slice", int(slice_index))
        rows["confidence"] = [edit.confidence.get(int(i), np.nan) for i in rows["label"]]
    gone = features["label"].isin(list(touched))
    if slice_index is not None and "slice" in features.columns:
        gone &= features["slice"] == slice_index
    table = features[~gone]
    rows = rows.reindex(columns=table.columns)  # columns the table lacks are not added
    if len(rows):
        table = pd.concat([table, rows], ignore_index=True) if len(table) else rows
    by = ["label"] + (["slice"] if "slice" in table.columns else [])
    table = table.sort_values(by).reset_index(drop=True)
    if "index" in table.columns:
        table["index"] = table["label"].to_numpy(np.int64)
    return table
