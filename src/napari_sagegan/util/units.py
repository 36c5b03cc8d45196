"""Lengths in pixels and in nanometres: the one place they are converted.

A pixel size is always nm per pixel; ``None`` means unknown (lengths then stay in pixels).
"""

from __future__ import annotations

import math
from typing import Any


def check_pixel_size(pixel_size: Any) -> float | None:
    """Validate a pixel size in nm per pixel (``None`` = unknown); return it as a float.

    Raises
    ------
    ValueError
        Not a positive finite number.
    """
    if pixel_size is None:
        return None
    try:
        value = float(pixel_size)
    except (TypeError, ValueError):
        raise ValueError(
            f"pixel size must be a number of nm per pixel, got {pixel_size!r}"
        ) from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"pixel size must be a positive number of nm per pixel, got {pixel_size!r}; "
            "leave it out to measure in pixels"
        )
    return value


def nm_to_px(length_nm: float, pixel_size_nm: float) -> float:
    """A length in nm as pixels of an image with ``pixel_size_nm`` nm per pixel."""
    return float(length_nm) / float(pixel_size_nm)


def px_to_nm(length_px: float, pixel_size_nm: float) -> float:
    """A length in pixels as nm, for an image with ``pixel_size_nm`` nm per pixel."""
    return float(length_px) * float(pixel_size_nm)
