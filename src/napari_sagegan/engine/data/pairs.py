"""Training pairs: checked, split and rescaled once to the network scale, with their targets.

A training set is a list of 2-D micrographs and their instance label maps.
:func:`prepare_pairs` checks them (:func:`check_pairs`), splits off a seeded validation
set (:func:`split_indices`) and returns :class:`TrainingPairs`, whose
:meth:`~TrainingPairs.at_scale` resamples every pair once so that its particles' median
diameter is the model's network scale. Both trainers start from there.

Targets (:func:`instance_targets`) are the foreground mask and a boundary-aware distance map
that peaks at 1 in the middle of every particle and falls to 0 where two particles touch; the
post-processing splits touching particles on its valleys. NumPy / SciPy / scikit-image only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "TrainingPairs",
    "check_pairs",
    "FEW_PAIRS",
    "fill_nonfinite",
    "hold_out_band",
    "instance_targets",
    "prepare_pairs",
    "split_indices",
]

#: With fewer pairs than this (and ``holdout="auto"``), a part of every image is held out for
#: validation instead of whole images (:func:`hold_out_band`).
FEW_PAIRS = 8


# --------------------------------------------------------------------------- checks


def check_pairs(images: Sequence[Any], labels: Sequence[Any], *, what: str = "training") -> None:
    """Check that image/mask pairs can be trained on.

    Parameters
    ----------
    images, labels : sequences of array-like
        ``(Y, X)`` micrographs and their label maps, one each.
    what : str
        Names the set in the messages (``"training"``, ``"validation"``).

    Raises
    ------
    ValueError
        Not one mask per image, no pair, an image that is not 2-D, a mask whose shape
        differs from its image, or masks without any particle.
    """
    if len(images) != len(labels):
        raise ValueError(f"got {len(images)} images but {len(labels)} label images")
    if len(images) == 0:
        raise ValueError(f"no image/mask pairs to train on ({what} set)")
    for i, (im, lab) in enumerate(zip(images, labels)):
        if np.ndim(im) != 2:
            raise ValueError(f"{what} image {i} must be 2-D (Y, X), got shape {np.shape(im)}")
        if np.shape(im) != np.shape(lab):
            raise ValueError(
                f"{what} pair {i}: image shape {np.shape(im)} differs from mask shape "
                f"{np.shape(lab)}; masks must match their images pixel for pixel"
            )
    if not any(np.any(np.asarray(lab) > 0) for lab in labels):
        raise ValueError(
            "the masks contain no particles (every pixel is background); label at least a few "
            "particles before training"
        )


def fill_nonfinite(image: Any, *, what: str = "training image") -> Any:
    """``image`` with its non-finite pixels (NaN, +-inf: missing data, e.g. the border left by
    drift correction) set to the median of its finite pixels, so that neither the resampling
    to the network scale nor the normalisation spreads them (one NaN pixel would otherwise
    make every loss, gradient and weight NaN). Integer images, and float images without such
    pixels, are returned as they are (no copy).

    Raises
    ------
    ValueError
        The image holds no finite value at all.
    """
    dtype = getattr(image, "dtype", None)
    if dtype is None or not np.issubdtype(dtype, np.inexact):
        return image
    arr = np.asarray(image)
    bad = ~np.isfinite(arr)
    if not bad.any():
        return image
    if bad.all():
        raise ValueError(
            f"{what} holds no finite value (every pixel is NaN or infinite); remove it from "
            "the training set"
        )
    out = np.array(arr, dtype=np.result_type(arr.dtype, np.float32))
    out[bad] = np.median(arr[~bad])
    return out


# --------------------------------------------------------------------------- targets


def _touching(labels: np.ndarray) -> np.ndarray:
    """Pixels of an instance with a 4-neighbour in a *different* instance (not background)."""
    out = np.zeros(labels.shape, dtype=bool)
    for axis in (0, 1):
        a = labels[:-1, :] if axis == 0 else labels[:, :-1]
        b = labels[1:, :] if axis == 0 else labels[:, 1:]
        differ = (a != b) & (a > 0) & (b > 0)
        if axis == 0:
            out[:-1, :] |= differ
            out[1:, :] |= differ
        else:
            out[:, :-1] |= differ
            out[:, 1:] |= differ
    return out


def instance_targets(
    labels: np.ndarray, *, min_area: int = 15
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Foreground and boundary-aware distance targets from an instance label map.

    The distance of a particle pixel is its Euclidean distance (pixels) to the nearest pixel
    that is background *or* lies on the contact line with another particle (the contact
    pixels themselves get 0), divided by the particle's maximum. So every particle peaks at
    1, its rim against the background is ``1 / max`` (small but positive) and two touching
    particles are separated by a two-pixel valley of 0. One EDT for the whole image and one
    scatter-max (``np.maximum.at``) for the per-particle maxima: no loop over particles, except
    for the rare particle that lies entirely on contact lines (1-2 px thick, squeezed
    between others), which gets the exact distance to any other label inside its own box.

    Parameters
    ----------
    labels : numpy.ndarray
        ``(H, W)`` instance labels: 0 = background, 1..N = particles (ids need not be
        consecutive). A boolean mask is split into 4-connected components first.
    min_area : int
        Particles with fewer pixels are set to background.

    Returns
    -------
    labels_clean : numpy.ndarray
        ``(H, W)`` int32, the input without the small particles (ids kept; renumbered only
        if larger than the number of pixels).
    fg : numpy.ndarray
        ``(H, W)`` float32 in {0, 1}: ``labels_clean > 0``.
    dist : numpy.ndarray
        ``(H, W)`` float32 in [0, 1]: 0 on the background, 1 at every particle's centre,
        ``> 0`` somewhere in every kept particle.

    Raises
    ------
    ValueError
        ``labels`` is not 2-D, not integer/boolean, or negative.
    """
    from scipy import ndimage as ndi

    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be a 2-D (H, W) array, got shape {labels.shape}")
    if labels.dtype == bool:
        from skimage.measure import label as connected_components

        labels = connected_components(labels, connectivity=1)
    elif not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers (instance ids), got dtype {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise ValueError("labels must not be negative (0 = background, 1..N = particles)")
    if labels.size and labels.max() > labels.size:  # sparse huge ids: compact them
        from skimage.segmentation import relabel_sequential

        labels = relabel_sequential(labels)[0]
    clean = labels.astype(np.int32)  # a copy

    n_ids = int(clean.max()) + 1 if clean.size else 1
    area = np.bincount(clean.ravel(), minlength=n_ids)
    small = area < min_area
    small[0] = False
    if small.any():
        clean[small[clean]] = 0
    fg = clean > 0

    edt = ndi.distance_transform_edt(fg & ~_touching(clean)).astype(np.float32)
    peak = np.zeros(n_ids, dtype=np.float32)
    ids = np.flatnonzero((area > 0) & ~small)
    ids = ids[ids > 0]
    if ids.size:
        # Per-particle maxima. np.maximum.at is an unbuffered scatter, ~50x faster here than
        # scipy.ndimage.maximum, which sorts the whole image (seconds on 4k x 4k).
        np.maximum.at(peak, clean[fg], edt[fg])
        flat = ids[peak[ids] == 0]  # particles lying entirely on contact lines (rare)
        boxes = ndi.find_objects(clean) if flat.size else []
        for k in flat:  # exact distance to any other label, inside the particle's box
            box = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in boxes[k - 1])
            inside = clean[box] == k
            local = ndi.distance_transform_edt(inside).astype(np.float32)
            edt[box][inside] = local[inside]
            peak[k] = local.max()
    denom = peak[clean]
    dist = np.divide(edt, denom, out=np.zeros_like(edt), where=denom > 0)
    return clean, fg.astype(np.float32), np.clip(dist, 0.0, 1.0, out=dist)


# --------------------------------------------------------------------------- splits


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Fixed, seeded split of ``n`` items into training and validation indices.

    Parameters
    ----------
    n : int
        Number of image/mask pairs.
    val_fraction : float
        Fraction held out for validation, in ``[0, 1)``; rounded to the nearest count, at
        least 1 when ``n >= 2`` and ``val_fraction > 0``, and never all items.
    seed : int
        Seed of ``np.random.default_rng``: the same seed gives the same split.

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        Sorted int64 training and validation indices, disjoint, together ``0..n-1``.
    """
    if n <= 0:
        raise ValueError(
            f"no image/mask pairs to split (got {n}); give at least one image with its mask"
        )
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = int(math.floor(n * val_fraction + 0.5))
    if val_fraction > 0 and n >= 2:
        n_val = max(n_val, 1)
    n_val = min(n_val, n - 1)
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_val:]).astype(np.int64), np.sort(order[:n_val]).astype(np.int64)


# --------------------------------------------------------------------------- prepared pairs


@dataclass(frozen=True)
class TrainingPairs:
    """Checked image/mask pairs, split into training and validation sets.

    Attributes
    ----------
    train_images, train_labels : list of numpy.ndarray
        ``(Y, X)`` training micrographs and their label maps.
    val_images, val_labels : list of array-like
        The validation pairs (may be empty).
    target_diameter : float or None
        The network scale the pairs were resampled to by :meth:`at_scale` (particle
        diameter, network pixels); ``None``: the images' own scale.
    """

    train_images: list[np.ndarray]
    train_labels: list[np.ndarray]
    val_images: list[Any]
    val_labels: list[Any]
    target_diameter: float | None = None
    #: Spatial hold-out (few pairs): the fraction of every image's area held out for
    #: validation, 0 for whole-image validation. Applied by :meth:`at_scale` (so that the
    #: band and its margin are measured at the network scale).
    parts: float = 0.0
    #: Gap (pixels at the pairs' scale) between each training part and its held-out band.
    margin: int = 0
    #: Where each training image / validation crop lies in its source pair (after
    #: :meth:`at_scale` with ``parts``): ``{"source": i, "box": (y0, x0, h, w)}``.
    train_regions: tuple[dict, ...] = ()
    val_regions: tuple[dict, ...] = ()
    #: Extra training pairs mixed in (rehearsal: generated pairs), never validated on.
    extra_images: tuple[np.ndarray, ...] = ()
    extra_labels: tuple[np.ndarray, ...] = ()
    #: The particle diameter (pixels) the user gave for each training / validation image
    #: (``None`` or an empty tuple: not given, the labels' median diameter is used); only
    #: at the pairs' own scale (:meth:`at_scale` resamples by them, and its pairs have none).
    train_diameters: tuple[float | None, ...] = ()
    val_diameters: tuple[float | None, ...] = ()
    #: After :meth:`at_scale`: how many of the pairs were resampled by a diameter the user
    #: gave (the others by their labels' median diameter).
    n_sized: int = 0

    def at_scale(self, target_diameter: float | None) -> TrainingPairs:
        """The pairs resampled so that each one's particles have a median diameter of
        ``target_diameter`` pixels (``None``: unchanged). An image without particles is
        resampled by the diameter inference would estimate on it, so empty fields are seen
        as they will be met. With :attr:`parts`, every resampled pair is then cut into its
        training part and its held-out band (:func:`hold_out_band`)."""
        if not target_diameter:
            train = (list(self.train_images), list(self.train_labels))
            val = (list(self.val_images), list(self.val_labels))
            extra = (list(self.extra_images), list(self.extra_labels))
        else:
            train = _to_scale(
                self.train_images, self.train_labels, target_diameter, self.train_diameters
            )
            val = _to_scale(self.val_images, self.val_labels, target_diameter, self.val_diameters)
            extra = _to_scale(self.extra_images, self.extra_labels, target_diameter)
        t_regions: list[dict] = []
        v_regions: list[dict] = []
        if self.parts:
            t_im, t_lab, v_im, v_lab = [], [], [], []
            for i, (im, lab) in enumerate(zip(*train)):
                cut = hold_out_band(im, lab, self.parts, self.margin)
                t_im.append(cut["train"][0])
                t_lab.append(cut["train"][1])
                t_regions.append({"source": i, "box": cut["train_box"]})
                if cut["val"] is not None:
                    v_im.append(cut["val"][0])
                    v_lab.append(cut["val"][1])
                    v_regions.append({"source": i, "box": cut["val_box"]})
            train, val = (t_im, t_lab), (v_im, v_lab)
        return TrainingPairs(
            *train,
            *val,
            target_diameter=float(target_diameter) if target_diameter else None,
            margin=self.margin,
            train_regions=tuple(t_regions),
            val_regions=tuple(v_regions),
            extra_images=tuple(extra[0]),
            extra_labels=tuple(extra[1]),
            n_sized=sum(d is not None for d in (*self.train_diameters, *self.val_diameters))
            if target_diameter
            else 0,
        )

    @property
    def n_pairs(self) -> int:
        """The user's training pairs (without the rehearsal pairs)."""
        return len(self.train_images)

    @property
    def sampled_images(self) -> list[np.ndarray]:
        """What patches are drawn from: the training images (or parts) and the extra pairs."""
        return [*self.train_images, *self.extra_images]

    @property
    def sampled_labels(self) -> list[np.ndarray]:
        return [*self.train_labels, *self.extra_labels]

    def describe(self) -> str:
        """What is used for what, for the user: ``trained on 2 images (70 % of each),
        validating on their held-out 20 %`` or ``training on 5 images, validating on 1``."""
        if self.train_regions:
            sizes = _source_areas(self.train_regions, self.val_regions)

            def share(regions: Sequence[dict]) -> float:
                parts = [r["box"][2] * r["box"][3] / sizes[r["source"]] for r in regions]
                return float(np.mean(parts)) if parts else 0.0

            n = len(self.train_regions)
            text = (
                f"training on {n} image{'s' if n != 1 else ''} "
                f"({100 * share(self.train_regions):.0f} % of each), validating on "
                + (
                    f"their held-out {100 * share(self.val_regions):.0f} %"
                    if self.val_regions
                    else "nothing (the images are too small to hold a part out)"
                )
            )
        else:
            n, v = self.n_pairs, len(self.val_images)
            text = f"training on {n} image{'s' if n != 1 else ''}, validating on {v}"
        if self.extra_images:
            text += f", with {len(self.extra_images)} generated pairs mixed in (rehearsal)"
        if self.n_sized:
            text += (
                f"; {self.n_sized} image{'s' if self.n_sized != 1 else ''} brought to the "
                "network scale by the particle size you set, not by its labels"
            )
        return text


def _source_areas(train: Sequence[dict], val: Sequence[dict]) -> dict[int, float]:
    """Each source pair's area (pixels at the pairs' scale), from its part and its band."""
    out: dict[int, float] = {}
    vals = {r["source"]: r["box"] for r in val}
    for r in train:
        boxes = [r["box"], *([vals[r["source"]]] if r["source"] in vals else [])]
        h = max(y0 + bh for y0, _x0, bh, _bw in boxes)
        w = max(x0 + bw for _y0, x0, _bh, bw in boxes)
        out[r["source"]] = float(h * w)
    return out


def hold_out_band(
    image: np.ndarray, labels: np.ndarray, fraction: float, margin: int
) -> dict[str, Any]:
    """Cut a pair into a training part and a held-out validation band.

    The band is ``fraction`` of the image across one of its four sides (at least 16
    pixels): of the sides whose band holds labelled particles, the one whose share of the
    particle pixels is closest to ``fraction`` (so that the band is representative), the
    bottom first on ties. ``margin`` pixels between the band and the training part belong to
    neither (reduced, down to 0, so that the training part keeps at least half of that
    side). The training part is its own array, so a patch drawn from it (wherever the
    sampler puts it, zoomed or not) never covers a validation pixel. An image too small for
    a band of 16 pixels next to a training part of 16 is not cut (``val`` is ``None``).

    Returns
    -------
    dict
        ``train``: (image, labels) of the training part; ``val``: those of the band or
        ``None``; ``train_box`` / ``val_box``: ``(y0, x0, h, w)`` in the pair.
    """
    image, labels = np.asarray(image), np.asarray(labels)
    h, w = image.shape
    whole = {"train": (image, labels), "val": None, "train_box": (0, 0, h, w), "val_box": None}
    total = int(np.count_nonzero(labels))
    options = []
    for order, (axis, end) in enumerate(((0, True), (0, False), (1, True), (1, False))):
        length = image.shape[axis]
        band = max(16, int(round(fraction * length)))
        gap = int(min(max(0, margin), max(0, length - band - (length + 1) // 2)))
        keep = length - band - gap
        if fraction <= 0 or keep < 16:
            continue
        # (start, size) of the band and of the training part along the axis
        vb, tb = ((length - band, band), (0, keep)) if end else ((0, band), (band + gap, keep))
        sl = [slice(None), slice(None)]
        sl[axis] = slice(vb[0], vb[0] + vb[1])
        share = np.count_nonzero(labels[tuple(sl)]) / total if total else 0.0
        options.append((share == 0, abs(share - fraction), order, axis, vb, tb))
    if not options:
        return whole
    _empty, _off, _order, axis, vb, tb = min(options)

    def box(start: int, size: int) -> tuple[int, int, int, int]:
        return (start, 0, size, w) if axis == 0 else (0, start, h, size)

    def cut(b: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
        y0, x0, bh, bw = b
        return image[y0 : y0 + bh, x0 : x0 + bw], labels[y0 : y0 + bh, x0 : x0 + bw]

    t_box, v_box = box(*tb), box(*vb)
    return {"train": cut(t_box), "val": cut(v_box), "train_box": t_box, "val_box": v_box}


def _to_scale(
    images: Sequence[Any],
    labels: Sequence[Any],
    target: float,
    diameters: Sequence[float | None] = (),
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Resample each pair so that its particles are ``target`` px across: by the diameter
    the user gave for it (``diameters``), else its labels' median diameter, else (no
    particle) the classical estimate on the image."""
    from ..infer.scale import (
        estimate_diameter,
        median_diameter,
        rescale_pair,
        scale_factor,
    )

    out_i, out_l = [], []
    for i, (image, lab) in enumerate(zip(images, labels)):
        image, lab = np.asarray(image), np.asarray(lab)
        given = diameters[i] if i < len(diameters) else None
        diameter = float(given) if given else median_diameter(lab, min_area=4)
        if diameter is None:
            diameter = estimate_diameter(image)
        factor = scale_factor(diameter, target)
        if abs(factor - 1.0) > 1e-3:
            image, lab = rescale_pair(image.astype(np.float32), lab, factor)
        out_i.append(image)
        out_l.append(lab)
    return out_i, out_l


def prepare_pairs(
    images: Sequence[Any],
    labels: Sequence[Any],
    *,
    val_fraction: float,
    seed: int,
    val_images: Sequence[Any] | None = None,
    val_labels: Sequence[Any] | None = None,
    holdout: str = "images",
    margin: int = 0,
    extra: Sequence[tuple[Any, Any]] = (),
    diameters: Sequence[float | None] | None = None,
) -> TrainingPairs:
    """Check the pairs and split off the validation set.

    Parameters
    ----------
    images, labels : sequences of array-like
        ``(Y, X)`` micrographs (any dtype) and their instance (or binary) label maps.
    val_fraction : float
        Fraction held out for validation when no explicit validation set is given.
    seed : int
        Seed of the split.
    val_images, val_labels : sequences, optional
        An explicit validation set (then every pair trains).
    holdout : str
        ``"images"``: hold out whole pairs; ``"parts"``: hold out a band of every pair
        (``val_fraction`` of its area, :func:`hold_out_band`, cut by
        :meth:`TrainingPairs.at_scale`) and train on the rest of all of them; ``"auto"``:
        parts with fewer than :data:`FEW_PAIRS` pairs, else images. Ignored with an explicit
        validation set or ``val_fraction`` 0.
    margin : int
        The gap between a training part and its band (pixels at the network scale).
    extra : sequence of (image, labels)
        Rehearsal pairs: trained on, never validated on.
    diameters : sequence of float or None, optional
        The typical particle diameter (pixels) of each image, where the user gave one (the
        Segment dock's size, ``sagegan train --diameter``): the pair is resampled to the
        network scale by it rather than by its labels' median diameter (which binary masks
        of touching particles overestimate). ``None`` entries: the labels decide.

    Returns
    -------
    TrainingPairs
        At the images' own scale; call :meth:`TrainingPairs.at_scale` to resample.

    Raises
    ------
    ValueError
        Pairs that cannot be trained on (:func:`check_pairs`), or a training split without
        any particle.
    """
    check_pairs(images, labels)
    given = _check_diameters(diameters, len(images))
    parts = 0.0
    if val_images is not None:
        check_pairs(val_images, val_labels or [], what="validation")
        train_idx: Sequence[int] = range(len(images))
        val_idx: Sequence[int] = ()
        v_images, v_labels = list(val_images), list(val_labels or [])
    elif val_fraction > 0 and (
        holdout == "parts" or (holdout == "auto" and len(images) < FEW_PAIRS)
    ):
        parts = float(val_fraction)
        train_idx, val_idx, v_images, v_labels = range(len(images)), (), [], []
    else:
        train_idx, val_idx = split_indices(len(images), val_fraction, seed)
        v_images = [images[i] for i in val_idx]
        v_labels = [labels[i] for i in val_idx]
    # missing (non-finite) pixels are filled once, before any resampling or normalisation
    t_images = [
        np.asarray(fill_nonfinite(images[i], what=f"training image {i}")) for i in train_idx
    ]
    v_images = [fill_nonfinite(im, what=f"validation image {i}") for i, im in enumerate(v_images)]
    t_labels = [np.asarray(labels[i]) for i in train_idx]
    if not any(np.any(lab > 0) for lab in t_labels):
        raise ValueError("the training split has no particles; add labelled images")
    e_images = tuple(np.asarray(fill_nonfinite(im, what="extra image")) for im, _ in extra)
    e_labels = tuple(np.asarray(lab) for _, lab in extra)
    return TrainingPairs(
        t_images, t_labels, v_images, v_labels, parts=parts, margin=int(margin),
        extra_images=e_images, extra_labels=e_labels,
        train_diameters=tuple(given[i] for i in train_idx),
        val_diameters=tuple(given[i] for i in val_idx),
    )  # fmt: skip


def _check_diameters(diameters: Sequence[float | None] | None, n: int) -> list[float | None]:
    """One diameter (or ``None``) per image, each a finite number of pixels of at least 1."""
    if diameters is None:
        return [None] * n
    out = list(diameters)
    if len(out) != n:
        raise ValueError(
            f"{len(out)} particle diameters for {n} training images; give one per image "
            "(None where it is not known)"
        )
    for i, d in enumerate(out):
        if d is not None and not (np.isfinite(d) and d >= 1.0):
            raise ValueError(
                f"the particle diameter of training image {i} is {d!r}; give the typical "
                "particle diameter in pixels (at least 1), or None to use its labels"
            )
    return [None if d is None else float(d) for d in out]
