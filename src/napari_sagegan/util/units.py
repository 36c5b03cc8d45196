"""Lengths in pixels and in nanometres: the one place they are converted.

A pixel size is always nm per pixel; ``None`` means unknown (lengths then stay in pixels).
"""

from __future__ import annotations

import math
from typing import Any

#: A plausible pixel size, nm per pixel, from sub-atomic sampling to millimetre pixels:
#: outside it lengths, areas and densities underflow or overflow.
PIXEL_SIZE_RANGE_NM = (1e-6, 1e6)


def check_pixel_size(pixel_size: Any) -> float | None:
    """Validate a pixel size in nm per pixel (``None`` = unknown); return it as a float.

    Raises
    ------
    ValueError
        Not a finite number in :data:`PIXEL_SIZE_RANGE_NM`.
    """
    if pixel_size is None:
        return None
    try:
        value = float(pixel_size)
    except (TypeError, ValueError):
        raise ValueError(
            f"pixel size must be a number of nm per pixel, got {pixel_size!r}"
        ) from None
    lo, hi = PIXEL_SIZE_RANGE_NM
    if not (math.isfinite(value) and lo <= value <= hi):
        raise ValueError(
            f"pixel size must be a positive number of nm per pixel from {lo:g} to {hi:g}, "
            f"got {pixel_size!r}; leave it out to measure in pixels"
        )
    return value


def nm_to_px(length_nm: float, pixel_size_nm: float) -> float:
    """A length in nm as pixels of an image with ``pixel_size_nm`` nm per pixel."""
    return float(length_nm) / float(pixel_size_nm)


def px_to_nm(length_px: float, pixel_size_nm: float) -> float:
    """A length in pixels as nm, for an image with ``pixel_size_nm`` nm per pixel."""
    return float(length_px) * float(pixel_size_nm)
