"""Particle scale: estimate each image's typical particle diameter and resample to it.

Real micrographs differ by more than a factor of 30 in particle size measured in pixels. The
segmenter is trained and run at one *network scale*: every image is resampled so that its
particles come out about ``target_diameter`` pixels across (a checkpoint records the value
it was trained with). This module holds the pieces:

* :func:`estimate_diameter`: a classical, polarity-free first estimate of the typical
  particle diameter of an image (pixels), from the inscribed radii of the compact phase of
  an Otsu split. It reads at most a few megapixels of the image, so it is cheap on huge
  memmaps too.
* :func:`median_diameter`: the median equivalent diameter of the instances of a label image
  (ground truth at training time; the network's first pass at inference time).
* :func:`scale_factor`: network scale / image scale, clipped to a sane range.
* :func:`rescale_pair`: an image and its instance labels resampled by a factor
  (anti-aliased image, nearest-neighbour labels).

Diameters are in pixels of the image they were measured on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Smallest and largest resampling factors (network pixels per image pixel).
MIN_FACTOR = 1.0 / 32.0
MAX_FACTOR = 4.0
#: Largest side the classical estimator works at (pixels): bigger images are shrunk first.
_EST_SIDE = 768
#: Objects (pixels at the estimator's resolution) ignored as specks.
_EST_MIN_AREA = 12


@dataclass(frozen=True)
class ScaleInfo:
    """How an image was resampled for the network.

    Attributes
    ----------
    diameter : float or None
        Typical particle diameter of the image, pixels (``None``: not estimated, the image
        is used as it is).
    source : str
        Where ``diameter`` came from: ``"user"``, ``"estimate"`` (classical),
        ``"network"`` (found by the network: the scale ladder and its own particles) or
        ``"none"``.
    factor : float
        Network pixels per image pixel (``> 1``: the image is enlarged).
    confidence : float or None
        For an estimated size, how sure the estimate is, in [0, 1] (below
        :data:`~napari_sagegan.engine.infer.autoscale.LOW_CONFIDENCE`: uncertain).
    alternatives : tuple of float
        Other plausible diameters (pixels), best first, tried when the full pass disagrees.
    """

    diameter: float | None
    source: str
    factor: float
    confidence: float | None = None
    alternatives: tuple[float, ...] = ()

    @property
    def uncertain(self) -> bool:
        """True when the size was estimated with a low confidence (check it, or give it)."""
        from .autoscale import LOW_CONFIDENCE

        return (
            self.source in ("estimate", "network")
            and self.confidence is not None
            and self.confidence < LOW_CONFIDENCE
        )

    def describe(self, pixel_size_nm: float | None = None) -> str:
        """One line for the user, e.g. ``particle diameter ~ 42 px (estimated), x0.57``."""
        if self.diameter is None:
            return "particle size not used: image segmented at its own scale"
        what = {"user": "given", "estimate": "estimated", "network": "estimated"}.get(
            self.source, self.source
        )
        size = f"{self.diameter:.3g} px"
        if pixel_size_nm:
            size += f" = {self.diameter * pixel_size_nm:.3g} nm"
        line = f"particle diameter ~ {size} ({what})"
        if self.confidence is not None and self.source != "user":
            line += f", confidence {self.confidence:.2f}"
        line += f"; image resampled x{self.factor:.3g}"
        if self.uncertain:
            line += "; uncertain: check the outlines, or give the particle diameter"
        return line


def median_diameter(labels: Any, min_area: int = 1) -> float | None:
    """Median equivalent diameter ``2 sqrt(area / pi)`` of the instances, pixels.

    Parameters
    ----------
    labels : array-like of int
        Instance labels, 0 = background, any shape.
    min_area : int
        Instances smaller than this (pixels) are ignored.

    Returns
    -------
    float or None
        ``None`` when there is no instance of at least ``min_area`` pixels.
    """
    lab = np.asarray(labels)
    if lab.size == 0 or not lab.any():
        return None
    counts = np.bincount(lab[lab > 0].ravel().astype(np.int64))[1:]
    counts = counts[counts >= max(int(min_area), 1)]
    if counts.size == 0:
        return None
    return float(np.median(2.0 * np.sqrt(counts / math.pi)))


def scale_factor(diameter: float | None, target_diameter: float | None) -> float:
    """Resampling factor that brings ``diameter`` to ``target_diameter``, clipped.

    ``1.0`` when either is unknown. Clipped to ``[MIN_FACTOR, MAX_FACTOR]``.
    """
    if not diameter or not target_diameter or diameter <= 0 or target_diameter <= 0:
        return 1.0
    return float(np.clip(target_diameter / diameter, MIN_FACTOR, MAX_FACTOR))


def band_factor(
    diameter: float | None, target_diameter: float | None, band: tuple[float, float]
) -> float:
    """Resampling factor for particles of ``diameter`` px with a network trained at
    ``target_diameter`` that is as accurate over ``band`` (fractions of it, see
    ``InferConfig.scale_band``): 1 when the particles are in the band already, else the
    factor that brings them to its low end (the cheapest accurate size), clipped to
    ``[MIN_FACTOR, MAX_FACTOR]``; 1 when either size is unknown."""
    if not diameter or not target_diameter or diameter <= 0 or target_diameter <= 0:
        return 1.0
    lo, hi = band[0] * target_diameter, band[1] * target_diameter
    if lo <= diameter <= hi:
        return 1.0
    return scale_factor(diameter, lo)


def _read_window(image: Any, limit: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The central ``limit x limit`` (at most) part of an image, as float32, and where it is
    valid (``None``: everywhere). Only that part is read from a memmap or dask array.
    Missing (non-finite) pixels are given the window's finite median, so that smoothing and
    resampling see a neutral grey there; callers keep them out with the mask."""
    h, w = int(image.shape[-2]), int(image.shape[-1])
    y0, x0 = max((h - limit) // 2, 0), max((w - limit) // 2, 0)
    window = np.asarray(image[y0 : y0 + min(h, limit), x0 : x0 + min(w, limit)], np.float32)
    valid = np.isfinite(window)
    if valid.all():
        return window, None
    window = np.where(valid, window, np.median(window[valid]) if valid.any() else 0.0)
    return window.astype(np.float32, copy=False), valid


def _shrink(
    img: np.ndarray, side: int, valid: np.ndarray | None = None
) -> tuple[np.ndarray, float, np.ndarray | None]:
    """``img`` shrunk to at most ``side`` pixels a side, the factor, and the valid mask
    shrunk with it (a pixel stays valid only when all it was made of was)."""
    from skimage.transform import resize

    m = max(img.shape)
    if m <= side:
        return img, 1.0, valid
    f = side / m
    out_shape = (max(1, round(img.shape[0] * f)), max(1, round(img.shape[1] * f)))
    small = resize(img, out_shape, order=1, anti_aliasing=True, preserve_range=True)
    if valid is not None:
        share = resize(valid.astype(np.float32), out_shape, order=1, anti_aliasing=True)
        valid = share > 0.99
    return small.astype(np.float32), f, valid


def _inscribed_diameter(img: np.ndarray, valid: np.ndarray | None = None) -> float | None:
    """Area-weighted median inscribed diameter of the compact phase of an Otsu split.

    Both phases are tried; the particle phase is the one whose area lies less on the image
    border relative to its share of the image (particles are islands, the background is the
    sea). Returns pixels at ``img``'s resolution, or ``None`` for a featureless image.

    ``valid`` (optional, bool like ``img``): where the image was measured. Missing pixels
    belong to neither phase, the edge of the valid region counts as the border, and a
    particle's inscribed circle stops at missing pixels.
    """
    from scipy import ndimage as ndi
    from skimage.filters import threshold_otsu

    if valid is not None and valid.all():
        valid = None
    if valid is not None and valid.sum() < 4 * _EST_MIN_AREA:
        return None
    x = ndi.gaussian_filter(np.asarray(img, np.float32), 1.0)
    seen = x if valid is None else x[valid]
    lo, hi = np.percentile(seen, [0.01, 99.99])  # a few particles may be a tiny fraction
    if not hi > lo:
        return None
    x = np.clip((x - lo) / (hi - lo), 0, 1)
    try:
        t = threshold_otsu(x if valid is None else x[valid])
    except ValueError:
        return None
    if valid is not None:  # the valid region's own edge: the image border or missing pixels
        frame = valid & ~ndi.binary_erosion(valid, border_value=0)
    best = None
    for mask in (x > t, x < t):
        if valid is None:
            frac = mask.mean()
            edge = np.concatenate([mask[0], mask[-1], mask[:, 0], mask[:, -1]]).mean()
        else:
            mask &= valid
            frac = mask[valid].mean()
            edge = mask[frame].mean()
        if frac <= 0 or frac >= 1:
            continue
        islands = edge / frac  # < 1: the phase avoids the border, as particles do
        lab, n = ndi.label(mask)
        areas = np.bincount(lab.ravel())[1:]
        keep = np.flatnonzero(areas >= _EST_MIN_AREA)
        if keep.size == 0:
            continue
        edt = ndi.distance_transform_edt(mask)
        peak = np.zeros(n + 1)  # each component's largest distance (ndi.maximum's values,
        np.maximum.at(peak, lab.ravel(), edt.ravel())  # without its sort of every pixel)
        radii = peak[keep + 1]
        weights = areas[keep].astype(np.float64)
        order = np.argsort(radii)
        cum = np.cumsum(weights[order]) / weights.sum()
        radius = float(radii[order][min(np.searchsorted(cum, 0.5), order.size - 1)])
        if best is None or islands < best[0]:
            best = (islands, 2.0 * radius)
    return None if best is None else best[1]


def estimate_diameter(image: Any) -> float | None:
    """Classical estimate of the typical particle diameter of a 2-D image, pixels.

    Splits the (smoothed, robustly stretched) image at its Otsu threshold, picks the phase
    that forms islands, and returns the area-weighted median of its components' inscribed
    diameters (twice the largest distance to the phase edge; touching particles keep the
    diameter of one particle). Works for dark or bright particles. Images bigger than a few
    megapixels are estimated on a central crop; the crop is shrunk to at most 768 pixels a
    side, and re-read at full resolution when the particles come out too small to measure
    there.

    Non-finite pixels (NaN, +-inf) are missing: they belong to neither phase, and the
    edge of the measured region counts as the image border.

    Parameters
    ----------
    image : array-like, shape (Y, X)
        Raw grey values (numpy array, memmap or dask array).

    Returns
    -------
    float or None
        Diameter in pixels of ``image``; ``None`` when no particle-like phase is found (or
        no pixel of it is finite).
    """
    shape = tuple(getattr(image, "shape", ()))
    if len(shape) != 2:
        raise ValueError(f"estimate_diameter needs a 2-D image (Y, X), got shape {shape}")
    window, valid = _read_window(image, 4 * _EST_SIDE)
    if valid is not None and not valid.any():
        return None  # nothing measured here
    d_full = None
    if max(window.shape) > _EST_SIDE:
        # particles a few pixels wide vanish when the window is shrunk: measure a
        # full-resolution crop first, and trust it for all but particles too big for it
        # (then the shrunk window, which sees more of them, is not needed)
        crop, _ = _read_window(window, _EST_SIDE)
        crop_valid = None if valid is None else _read_window(valid, _EST_SIDE)[0] > 0.5
        d_full = _inscribed_diameter(crop, crop_valid)
        if d_full is not None and d_full <= _EST_SIDE / 4:
            return d_full
    small, f, small_valid = _shrink(window, _EST_SIDE, valid)
    d = _inscribed_diameter(small, small_valid)
    if d is None:
        return d_full
    return d / f


def rescale_image(image: np.ndarray, factor: float) -> np.ndarray:
    """Resample a 2-D image by ``factor`` (bilinear, anti-aliased when shrinking), float32."""
    from skimage.transform import resize

    if abs(factor - 1.0) < 1e-6:
        return np.asarray(image, dtype=np.float32)
    shape = tuple(max(1, round(s * factor)) for s in image.shape)
    out = resize(
        np.asarray(image, dtype=np.float32),
        shape,
        order=1,
        anti_aliasing=factor < 1.0,
        preserve_range=True,
    )
    return out.astype(np.float32)


def rescale_labels(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resample instance labels to ``shape`` (nearest neighbour; ids kept)."""
    from skimage.transform import resize

    lab = np.asarray(labels)
    if lab.shape == tuple(shape):
        return lab
    out = resize(lab, shape, order=0, anti_aliasing=False, preserve_range=True)
    return out.astype(lab.dtype)


def rescale_pair(image: np.ndarray, labels: np.ndarray, factor: float):
    """An image and its instance labels resampled by ``factor`` (same output shape)."""
    img = rescale_image(image, factor)
    return img, rescale_labels(labels, img.shape)
