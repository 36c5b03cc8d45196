"""Intensity normalisation: robust percentile stretch of a micrograph to ``[-1, 1]``.

The network sees one grayscale channel in ``[-1, 1]`` (method.md). EM images often use a
handful of grey levels or 16 bits, so each image is stretched between robust percentiles
(:func:`robust_range`, :func:`apply_range`) computed on a strided subsample: the same code
works on a numpy array, a ``np.memmap`` or a dask array without reading it whole. NumPy only.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["apply_range", "normalize", "robust_range"]


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
        Bad percentiles, an empty image, or no finite value.
    """
    if not 0.0 <= low < high <= 100.0:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {low}, {high}")
    if max_samples < 1:
        raise ValueError(f"max_samples must be at least 1, got {max_samples}")
    if math.prod(image.shape) == 0:
        raise ValueError(f"the image is empty (shape {tuple(image.shape)})")
    sample = _strided_sample(image, max_samples).astype(np.float64, copy=False).ravel()
    if not np.all(np.isfinite(sample)):
        sample = sample[np.isfinite(sample)]
        if sample.size == 0:
            raise ValueError("the image holds no finite value (all NaN or infinite)")
    lo, hi = (float(v) for v in np.percentile(sample, [low, high]))
    if hi <= lo:
        lo, hi = float(sample.min()), float(sample.max())
    if hi <= lo:
        hi = lo + 1.0
    return lo, hi


def apply_range(image: Any, lo: float, hi: float) -> np.ndarray:
    """Map grey level ``lo`` to -1 and ``hi`` to +1, linearly, clipping outside.

    Parameters
    ----------
    image : array-like
        Any shape and dtype.
    lo, hi : float
        Grey levels mapped to -1 and +1, ``lo < hi`` (see :func:`robust_range`).

    Returns
    -------
    numpy.ndarray
        float32, same shape, values in ``[-1, 1]``.
    """
    if not hi > lo:
        raise ValueError(f"the intensity range needs lo < hi, got lo={lo}, hi={hi}")
    out = np.asarray(image, dtype=np.float32) - np.float32(lo)  # new array: safe to edit
    out *= np.float32(2.0 / (hi - lo))
    out -= np.float32(1.0)
    return np.clip(out, -1.0, 1.0, out=out)


def normalize(image: Any) -> np.ndarray:
    """Robustly stretch a whole image to ``[-1, 1]``.

    ``apply_range(image, *robust_range(image))``: the 0.5th and 99.8th percentiles map to
    -1 and +1.

    Parameters
    ----------
    image : array-like
        ``(Y, X)`` micrograph, any dtype.

    Returns
    -------
    numpy.ndarray
        float32 ``(Y, X)`` in ``[-1, 1]``.
    """
    lo, hi = robust_range(image)
    return apply_range(image, lo, hi)
