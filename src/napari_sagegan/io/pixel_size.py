"""The one pixel-size resolver: nm per pixel of an image, and where it came from.

Every front end asks the same question (what is the pixel size of this image?) and gets
the same answer from :func:`resolve_pixel_size`: the first known of

1. a value the user gave (``override``: a command-line flag, a spin box);
2. the candidates, in the order given: a :class:`PixelSize` already known, a metadata
   mapping (a napari layer's ``metadata["pixel_size_nm"]`` or the ``meta`` dict of
   :func:`~napari_sagegan.io.em.read_em`), a file (:func:`read_pixel_size`: a TIFF's header,
   an EM file's calibration), or ``None`` (skipped);
3. otherwise unknown: ``PixelSize(None, "none")``, and lengths stay in pixels.

:func:`from_scale` turns a napari layer's ``scale`` and length unit into a candidate.
Qt-free and torch-free.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from napari_sagegan.util.units import check_pixel_size

#: ``PixelSize.source`` of a value the user gave.
GIVEN = "given"
#: ``PixelSize.source`` of an unknown pixel size.
UNKNOWN = "none"


@dataclass(frozen=True)
class PixelSize:
    """A pixel size in nm per pixel, and where it came from.

    Attributes
    ----------
    nm : float or None
        nm per pixel; ``None`` when unknown (measure in pixels).
    source : str
        ``"given"`` (or the flag that gave it, e.g. ``"--pixel-size"``), a metadata kind
        (``"imagej"``, ``"fei"``, ``"zeiss"``, ``"ome"``, ``"tiff"``, ``"dm"``, ``"emd"``,
        ``"ser"``, ``"mrc"``), ``"metadata"`` or ``"scale"`` (a napari layer), or
        ``"none"``.
    file : str or None
        Name of the file whose metadata gave it.
    """

    nm: float | None
    source: str = UNKNOWN
    file: str | None = None

    @property
    def known(self) -> bool:
        return self.nm is not None

    def describe(self) -> str:
        """Where it came from, for the user: ``"a.tif (imagej metadata)"``, ``"given"``."""
        if self.file is not None and self.nm is not None:
            return f"{self.file} ({self.source} metadata)"
        return self.source

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any], file: str | None = None) -> PixelSize:
        """From a napari layer's ``metadata`` (``pixel_size_nm``) or the ``meta`` dict of
        :func:`~napari_sagegan.io.em.read_em` (``pixel_size``, ``source``)."""
        if meta.get("pixel_size_nm"):  # a napari layer's metadata (this plugin's readers)
            return cls(float(meta["pixel_size_nm"]), "metadata", file)
        value = meta.get("pixel_size")
        if value is not None and math.isfinite(float(value)) and float(value) > 0:
            return cls(float(value), str(meta.get("source") or "metadata"), file)
        return cls(None)


def read_pixel_size(path: str | os.PathLike) -> PixelSize:
    """Pixel size recorded in an image file.

    A TIFF's header alone is read (FEI, Zeiss, OME, ImageJ or plain resolution tags); an EM
    file (DM3/DM4, EMD, SER, MRC) is read whole, as its readers have no header-only mode;
    other image types (PNG, JPEG, ...) record none.

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    ValueError
        The file cannot be read.
    """
    from napari_sagegan.io.em import EM_SUFFIXES, TIFF_SUFFIXES, read_em, tiff_pixel_size

    p = Path(path).expanduser()
    suffix = p.suffix.lower()
    if suffix in TIFF_SUFFIXES:
        return PixelSize.from_meta(tiff_pixel_size(p), p.name)
    if suffix in EM_SUFFIXES:
        return PixelSize.from_meta(read_em(p)[1], p.name)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist: check the path and the file name")
    return PixelSize(None)


def from_scale(scale: Any, unit: Any) -> PixelSize:
    """A pixel size from a napari layer's ``scale`` (last axis) and its length ``unit``.

    ``unit`` is a string or a pint unit; napari's default unit, the pixel, and any unit that
    is not a length give an unknown pixel size.
    """
    from napari_sagegan.io.em import unit_to_nm

    if unit is None or scale is None:
        return PixelSize(None)
    factor = unit_to_nm(str(unit))
    if factor is None:
        try:
            factor = unit_to_nm(f"{unit:~}")  # pint: abbreviated form ("nm", "µm")
        except (TypeError, ValueError):
            factor = None
    try:
        value = float(scale[-1] if not isinstance(scale, (int, float)) else scale)
    except (TypeError, ValueError, IndexError):
        return PixelSize(None)
    if factor is None or not math.isfinite(value) or value <= 0:
        return PixelSize(None)
    return PixelSize(value * factor, "scale")


def resolve_pixel_size(
    *candidates: PixelSize | Mapping[str, Any] | str | os.PathLike | None,
    override: PixelSize | float | None = None,
    quiet: bool = True,
) -> PixelSize:
    """The pixel size of an image: ``override``, else the first known candidate.

    Parameters
    ----------
    *candidates : PixelSize, mapping, path or None
        Tried in order: a :class:`PixelSize` as it is; a mapping as a layer's metadata
        (``pixel_size_nm``) or as :func:`~napari_sagegan.io.em.read_em`'s ``meta``
        (``pixel_size``, ``source``); a path through :func:`read_pixel_size`. ``None`` is
        skipped.
    override : PixelSize or float, optional
        What the user gave; a float is recorded as ``source="given"``.
    quiet : bool
        A file that cannot be read counts as "no pixel size" (its reader reports the
        problem when the image itself is read); ``False`` raises instead.

    Returns
    -------
    PixelSize
        ``PixelSize(None, "none")`` when nothing is known.

    Raises
    ------
    ValueError
        ``override`` is not a positive number.
    """
    if override is not None:
        if isinstance(override, PixelSize):
            if override.known:
                return PixelSize(check_pixel_size(override.nm), override.source, override.file)
        else:
            return PixelSize(check_pixel_size(override), GIVEN)
    for candidate in candidates:
        if candidate is None:
            continue
        if isinstance(candidate, PixelSize):
            found = candidate
        elif isinstance(candidate, Mapping):
            found = PixelSize.from_meta(candidate, None)
        else:
            try:
                found = read_pixel_size(candidate)
            except (OSError, ValueError):
                if not quiet:
                    raise
                continue
        if found.known:
            return found
    return PixelSize(None)
