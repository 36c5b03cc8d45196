"""Intensity normalisation: robust percentile stretch of a micrograph to ``[-1, 1]``.

The network sees one grayscale channel in ``[-1, 1]`` (method.md). EM images often use a
handful of grey levels or 16 bits, so each image is stretched between robust percentiles
(:func:`robust_range`, :func:`apply_range`) computed on a strided subsample: the same code
works on a numpy array, a ``np.memmap`` or a dask array without reading it whole. NumPy only.

Non-finite pixels (NaN, +-inf: dead detector pixels, the empty margin left by alignment or
drift correction) are *missing*: the percentiles are taken over the finite pixels only
(:func:`intensity_levels`), and :func:`apply_range` / :func:`normalize` replace them with a
fill level, by default the image's finite median mapped into ``[-1, 1]``, so that the
network never sees a NaN (one NaN pixel would otherwise spread through every convolution
whose window covers it). :func:`nonfinite_mask` and :func:`count_nonfinite` say where and
how many they were.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = [
    "NoFiniteValue",
    "apply_range",
    "count_nonfinite",
    "fill_level",
    "has_finite",
    "intensity_levels",
    "nonfinite_mask",
    "normalize",
    "robust_range",
]


class NoFiniteValue(ValueError):
    """An image none of whose pixels is finite (all NaN or infinite): nothing to measure.

    ``NoFiniteValue(name)`` names the image in the message (``"the image"`` by default).
    """

    def __init__(self, name: str = "the image") -> None:
        super().__init__(
            f"{name} holds no finite value (every pixel is NaN or infinite): there is nothing "
            "to segment or measure in it; check the file or the step that wrote it"
        )


def _strided_sample(image: Any, max_samples: int) -> np.ndarray:
    """Read at most ``max_samples`` pixels on a regular grid (same stride on every axis)."""
    shape = tuple(int(n) for n in image.shape)
    n = math.prod(shape)
    if n <= max_samples:
        return np.asarray(image)
    stride = max(1, math.ceil((n / max_samples) ** (1.0 / len(shape))))
    while math.prod(math.ceil(s / stride) for s in shape) > max_samples:
        stride += 1
    return np.asarray(image[(slice(None, None, stride),) * len(shape)])


def _check_levels_args(image: Any, low: float, high: float, max_samples: int) -> None:
    if not 0.0 <= low < high <= 100.0:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {low}, {high}")
    if max_samples < 1:
        raise ValueError(f"max_samples must be at least 1, got {max_samples}")
    if math.prod(image.shape) == 0:
        raise ValueError(f"the image is empty (shape {tuple(image.shape)})")


def intensity_levels(
    image: Any,
    *,
    low: float = 0.5,
    high: float = 99.8,
    max_samples: int = 2_000_000,
) -> tuple[float, float, float]:
    """Robust range and median of the finite pixels, from a strided subsample.

    Parameters
    ----------
    image, low, high, max_samples
        As in :func:`robust_range`.

    Returns
    -------
    (float, float, float)
        ``(lo, hi, median)``: the range of :func:`robust_range` and the median of the
        finite pixels sampled, in the image's grey levels.

    Raises
    ------
    ValueError
        Bad percentiles or an empty image; :class:`NoFiniteValue` (a ``ValueError``) when
        no pixel is finite.
    """
    _check_levels_args(image, low, high, max_samples)
    sample = _strided_sample(image, max_samples).astype(np.float64, copy=False).ravel()
    if not np.all(np.isfinite(sample)):
        sample = sample[np.isfinite(sample)]
        if sample.size == 0 and max_samples < math.prod(image.shape):
            # the grid missed every finite pixel (e.g. a small valid region): look at all
            sample = np.asarray(image, dtype=np.float64).ravel()
            sample = sample[np.isfinite(sample)]
        if sample.size == 0:
            raise NoFiniteValue()
    lo, mid, hi = (float(v) for v in np.percentile(sample, [low, 50.0, high]))
    if hi <= lo:
        lo, hi = float(sample.min()), float(sample.max())
    if hi <= lo:
        hi = lo + 1.0
    return lo, hi, mid


def robust_range(
    image: Any,
    *,
    low: float = 0.5,
    high: float = 99.8,
    max_samples: int = 2_000_000,
) -> tuple[float, float]:
    """Intensity range between two percentiles, estimated from a strided subsample.

    Parameters
    ----------
    image : array-like
        Any shape and dtype: numpy array, ``np.memmap``, dask array (anything sliceable with
        steps and accepted by ``np.asarray``). Only a regular grid of at most
        ``max_samples`` pixels is read. NaN and infinite values are ignored.
    low, high : float
        Percentiles, ``0 <= low < high <= 100``.
    max_samples : int
        Most pixels read.

    Returns
    -------
    (float, float)
        ``(lo, hi)`` with ``lo < hi``, in the image's grey levels. When the two percentiles
        coincide (an image with very few grey levels) the sample's min and max are used; a
        constant image with value ``v`` gives ``(v, v + 1)`` (it normalises to -1).

    Raises
    ------
    ValueError
        Bad percentiles or an empty image; :class:`NoFiniteValue` (a ``ValueError``) when
        no pixel is finite.
    """
    lo, hi, _ = intensity_levels(image, low=low, high=high, max_samples=max_samples)
    return lo, hi


def apply_range(image: Any, lo: float, hi: float, *, fill: float | None = None) -> np.ndarray:
    """Map grey level ``lo`` to -1 and ``hi`` to +1, linearly, clipping outside.

    Parameters
    ----------
    image : array-like
        Any shape and dtype.
    lo, hi : float
        Grey levels mapped to -1 and +1, ``lo < hi`` (see :func:`robust_range`).
    fill : float, optional
        Value in ``[-1, 1]`` given to non-finite pixels (NaN, +-inf). ``None``: NaN stays
        NaN and +-inf are clipped to +-1.

    Returns
    -------
    numpy.ndarray
        float32, same shape, values in ``[-1, 1]`` (NaN where the input was NaN, unless
        ``fill``).
    """
    if not hi > lo:
        raise ValueError(f"the intensity range needs lo < hi, got lo={lo}, hi={hi}")
    out = np.asarray(image, dtype=np.float32) - np.float32(lo)  # new array: safe to edit
    out *= np.float32(2.0 / (hi - lo))
    out -= np.float32(1.0)
    if fill is not None and out.dtype.kind == "f":
        bad = ~np.isfinite(out)
        if bad.any():
            out[bad] = np.float32(np.clip(fill, -1.0, 1.0))
    return np.clip(out, -1.0, 1.0, out=out)


def fill_level(lo: float, hi: float, median: float) -> float:
    """The value :func:`normalize` gives missing pixels: ``median`` mapped by
    :func:`apply_range` (``lo`` -> -1, ``hi`` -> +1), in ``[-1, 1]``."""
    return float(np.clip(2.0 * (median - lo) / (hi - lo) - 1.0, -1.0, 1.0))


def normalize(image: Any) -> np.ndarray:
    """Robustly stretch a whole image to ``[-1, 1]``; missing pixels get its median.

    ``apply_range(image, lo, hi, fill=...)`` with the 0.5th and 99.8th percentiles of the
    finite pixels as ``lo`` and ``hi``; non-finite pixels (NaN, +-inf) get the finite
    median's level (:func:`fill_level`).

    Parameters
    ----------
    image : array-like
        ``(Y, X)`` micrograph, any dtype.

    Returns
    -------
    numpy.ndarray
        float32 ``(Y, X)`` in ``[-1, 1]``, finite everywhere.

    Raises
    ------
    ValueError
        An empty image, or one with no finite value.
    """
    lo, hi, mid = intensity_levels(image)
    return apply_range(image, lo, hi, fill=fill_level(lo, hi, mid))


def _floating(image: Any) -> bool:
    return np.dtype(getattr(image, "dtype", np.float64)).kind in "fc"


def _row_blocks(image: Any, rows: int):
    """``(start, block)`` over the first axis, ``rows`` at a time, each read as an array."""
    for i in range(0, int(image.shape[0]), rows):
        yield i, np.asarray(image[i : i + rows])


def nonfinite_mask(image: Any, *, rows: int = 1024) -> np.ndarray | None:
    """Where an image is NaN or infinite: a bool array of its shape, or ``None`` when every
    pixel is finite (always for integer images, which cannot hold NaN: nothing is read).

    A float image is read ``rows`` rows (of the first axis) at a time, so a memmap or dask
    array is never loaded whole.
    """
    if not _floating(image):
        return None
    if len(image.shape) == 0:
        bad = ~np.isfinite(np.asarray(image))
        return bad if bad.any() else None
    out = np.zeros(tuple(int(n) for n in image.shape), bool)
    for i, block in _row_blocks(image, rows):
        np.logical_not(np.isfinite(block), out=out[i : i + len(block)])
    return out if out.any() else None


def count_nonfinite(image: Any, *, rows: int = 1024) -> int:
    """How many pixels of an image are NaN or infinite (integer images: 0, nothing read;
    float ones are read ``rows`` rows at a time)."""
    if not _floating(image):
        return 0
    if len(image.shape) == 0:
        return int(not np.isfinite(np.asarray(image)))
    return sum(int(np.count_nonzero(~np.isfinite(b))) for _, b in _row_blocks(image, rows))


def has_finite(image: Any, *, rows: int = 1024) -> bool:
    """Whether at least one pixel is finite (integer images: always; float ones are read
    ``rows`` rows at a time, stopping at the first finite pixel)."""
    if not _floating(image):
        return True
    if len(image.shape) == 0:
        return bool(np.isfinite(np.asarray(image)))
    return any(np.isfinite(b).any() for _, b in _row_blocks(image, rows))
