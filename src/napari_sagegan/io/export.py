"""The one label-TIFF writer (Fiji/ImageJ opens the files with their pixel size), and the
napari particle features table.

Qt-free and torch-free: ``sagegan segment``, ``augment`` and ``generate``, the napari writer
contribution, the "export all labels" button and scripts use it.

- :func:`write_labels_tiff` writes instance labels as uint16 (uint32 when there are more
  than 65535 ids) with the pixel size and its unit, written the way ImageJ reads them
  (``XResolution`` / ``YResolution`` in pixels per unit, ``unit=`` and ``spacing=`` in the
  ImageJ description). The file is written to a temporary name and renamed, so a failure
  never leaves a half-written file.
- :func:`read_labels_scale` reads the scale and unit back (the writer's inverse).
- :func:`particle_table` measures each particle (area, equivalent diameter, centroid) in
  pixels and, when the pixel size is known, in physical units.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

_UINT16_MAX = 65535
_UINT32_MAX = 2**32 - 1

#: Length units understood for the TIFF resolution tags, in centimetres (ImageJ spelling
#: first). Used only for label files too large for ImageJ's format (uint32).
_UNIT_CM = {
    "m": 100.0,
    "cm": 1.0,
    "mm": 0.1,
    "um": 1e-4,
    "µm": 1e-4,
    "micron": 1e-4,
    "nm": 1e-7,
    "pm": 1e-10,
    "A": 1e-8,
    "Å": 1e-8,
}

#: Long unit names (as pint writes them) -> the short names ImageJ displays.
_SHORT_UNITS = {
    "meter": "m",
    "centimeter": "cm",
    "millimeter": "mm",
    "micrometer": "µm",
    "micron": "µm",
    "nanometer": "nm",
    "picometer": "pm",
    "angstrom": "Å",
    "ångström": "Å",
}


#: Short names -> the ASCII spelling ImageJ writes in its description.
_IMAGEJ_UNITS = {"µm": "micron", "Å": "A"}


def ascii_unit(unit: str) -> str:
    """An ASCII spelling of a short unit for column and file names (``"µm"`` -> ``"um"``)."""
    return {"µm": "um", "Å": "A"}.get(unit, unit)


def short_unit(unit: Any) -> str | None:
    """Normalise a length unit (``str`` or pint unit) to a short name, e.g. ``"nm"``.

    Returns ``None`` for no unit or for pixels (``"pixel"``, ``"px"``), which mean "not
    calibrated".
    """
    if unit is None:
        return None
    try:
        text = f"{unit:~}"  # pint units: abbreviated form
    except (TypeError, ValueError):
        text = str(unit)
    text = text.strip()
    if not text or text.lower() in ("pixel", "pixels", "px", "dimensionless", "none"):
        return None
    return _SHORT_UNITS.get(text.lower(), "µm" if text == "um" else text)


def _pixel_size(scale: Sequence[float] | None, ndim: int) -> tuple[float, ...] | None:
    """The last ``ndim`` entries of ``scale`` as floats, or ``None`` when all are 1."""
    if scale is None:
        return None
    values = tuple(float(s) for s in scale)[-ndim:]
    if len(values) < ndim:
        values = (1.0,) * (ndim - len(values)) + values
    for v in values:
        if not math.isfinite(v) or v <= 0:
            raise ValueError(f"the pixel size must be positive and finite, got scale {values}")
    return None if all(v == 1.0 for v in values) else values


def _as_label_array(labels: Any) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.dtype == bool:
        labels = labels.astype(np.uint8)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels must hold integers (0 = background, 1, 2, ... = particles), got dtype "
            f"{labels.dtype}"
        )
    if labels.ndim not in (2, 3) or labels.size == 0:
        raise ValueError(
            f"labels must be a non-empty (Y, X) image or (Z, Y, X) stack, got shape "
            f"{labels.shape}; export one 2-D or 3-D Labels layer at a time"
        )
    if labels.min() < 0:
        raise ValueError("labels must not be negative (0 = background, 1, 2, ... = particles)")
    if int(labels.max()) > _UINT32_MAX:
        raise ValueError(f"label ids up to {_UINT32_MAX} can be written, got {int(labels.max())}")
    return labels


def write_labels_tiff(
    path: str | os.PathLike,
    labels: Any,
    *,
    scale: Sequence[float] | None = None,
    unit: Any = None,
) -> Path:
    """Write instance labels as a TIFF that Fiji/ImageJ opens as a label image.

    Parameters
    ----------
    path : str or PathLike
        Destination file (``.tif``); its folder must exist.
    labels : array-like
        ``(Y, X)`` or ``(Z, Y, X)`` non-negative integer labels (0 = background).
    scale : sequence of float, optional
        Pixel size per axis, e.g. a napari layer's ``scale`` (its last 2 or 3 entries are
        used, ``(Z,) Y, X``). Nothing is written when every entry is 1 (uncalibrated).
    unit : str or pint unit, optional
        Length unit of ``scale`` (``"nm"``, ``"µm"``, a napari layer's ``units[-1]``, ...).
        ``"pixel"`` / ``None`` write no unit.

    Returns
    -------
    pathlib.Path
        ``path``.

    Notes
    -----
    Up to 65535 particles the file is uint16 in ImageJ's hyperstack format: the pixel size
    goes to ``XResolution`` / ``YResolution`` (pixels per unit), the unit and the Z spacing
    to the ImageJ description. More ids need uint32, which ImageJ's format lacks: the file
    is then a plain TIFF whose resolution tags are in pixels per centimetre (when the unit
    is a known length) and which Fiji reads through Bio-Formats.

    Raises
    ------
    ValueError
        Labels that are not integer, not 2-D/3-D, negative or above 2**32 - 1; a
        non-positive pixel size.
    FileNotFoundError
        The destination folder does not exist.
    """
    import tifffile

    from napari_sagegan.util.files import atomic_path

    labels = _as_label_array(labels)
    size = _pixel_size(scale, labels.ndim)
    unit_name = short_unit(unit)
    imagej = int(labels.max()) <= _UINT16_MAX
    data = np.ascontiguousarray(labels, dtype=np.uint16 if imagej else np.uint32)
    kwargs: dict[str, Any] = {"compression": "zlib"}
    if imagej:
        metadata: dict[str, Any] = {"axes": "ZYX" if data.ndim == 3 else "YX"}
        if size is not None:
            kwargs["resolution"] = (1.0 / size[-1], 1.0 / size[-2])
            if unit_name is not None:
                # ImageJ's description is ASCII: it spells micrometres "micron"
                metadata["unit"] = _IMAGEJ_UNITS.get(unit_name, unit_name)
            if data.ndim == 3:
                metadata["spacing"] = size[0]
        kwargs.update(imagej=True, metadata=metadata)
    else:
        kwargs.update(photometric="minisblack", metadata=None)
        factor = _UNIT_CM.get(unit_name or "")
        if size is not None and factor is not None:
            kwargs["resolution"] = (1.0 / (size[-1] * factor), 1.0 / (size[-2] * factor))
            kwargs["resolutionunit"] = tifffile.RESUNIT.CENTIMETER
    path = Path(path).expanduser()
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, data, **kwargs)
    return path


def read_labels_scale(path: str | os.PathLike) -> tuple[tuple[float, float], str | None]:
    """The ``(y, x)`` scale and its unit as :func:`write_labels_tiff` wrote them.

    The inverse of the writer, in the file's own unit (a napari layer's round trip);
    ``((1.0, 1.0), None)`` for an uncalibrated file. For an image's pixel size in nm, use
    :func:`napari_sagegan.io.pixel_size.read_pixel_size`.
    """
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        tags = page.tags
        ij = tif.imagej_metadata or {}
        unit = ij.get("unit")
        if "XResolution" not in tags or "YResolution" not in tags:
            return (1.0, 1.0), short_unit(unit)
        xn, xd = tags["XResolution"].value
        yn, yd = tags["YResolution"].value
        px_x, px_y = xd / xn, yd / yn
        if not ij and "ResolutionUnit" in tags:
            if tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER:
                return (px_y * 1e7, px_x * 1e7), "nm"
            return (1.0, 1.0), None
        return (px_y, px_x), short_unit(unit)


def particle_table(
    labels: Any,
    scale: Sequence[float] | None = None,
    unit: Any = None,
) -> pd.DataFrame:
    """Measure every particle of an instance label image.

    Parameters
    ----------
    labels : array-like
        ``(Y, X)`` or ``(Z, Y, X)`` instance labels (0 = background). A stack is measured
        slice by slice (it is segmented that way): each row is one particle in one slice.
    scale : sequence of float, optional
        Pixel size (last 2 entries: Y, X); physical columns are added when it is not 1.
    unit : str or pint unit, optional
        Length unit of ``scale`` for the column names (``"units"`` when unknown).

    Returns
    -------
    pandas.DataFrame
        One row per particle, sorted by label: ``index`` and ``label`` (the label id; napari
        uses ``index`` to show a particle's values under the cursor), ``slice`` (stacks
        only), ``area_px``, ``equivalent_diameter_px``, ``centroid_y_px``,
        ``centroid_x_px``, ``touches_border`` (the particle reaches the image edge, so it
        is cut by it: its size is a lower bound) and, with a pixel size in unit ``u``:
        ``area_u2``, ``equivalent_diameter_u``, ``centroid_y_u``, ``centroid_x_u`` (``u``
        in ASCII: ``um`` for micrometres). Centroids are measured from the image's top-left
        pixel centre. The equivalent diameter is that of the disc of the same area,
        ``2 sqrt(area / pi)``.
    """
    import pandas as pd
    from skimage.measure import regionprops_table

    labels = np.asarray(labels)
    if labels.ndim not in (2, 3):
        raise ValueError(f"expected (Y, X) or (Z, Y, X) labels, got shape {labels.shape}")
    props = ("label", "area", "centroid", "bbox")
    planes = [(None, labels)] if labels.ndim == 2 else list(enumerate(labels))
    parts = []
    for z, plane in planes:
        if not np.any(plane):
            continue
        t = regionprops_table(np.asarray(plane, dtype=np.int64), properties=props)
        ny, nx = plane.shape
        part = pd.DataFrame(
            {
                "label": t["label"].astype(np.int64),
                "area_px": t["area"].astype(np.float64),
                "centroid_y_px": t["centroid-0"],
                "centroid_x_px": t["centroid-1"],
                "touches_border": (t["bbox-0"] == 0)
                | (t["bbox-1"] == 0)
                | (t["bbox-2"] == ny)
                | (t["bbox-3"] == nx),
            }
        )
        if z is not None:
            part.insert(1, "slice", z)
        parts.append(part)
    columns = ["label"] + (["slice"] if labels.ndim == 3 else [])
    columns += ["area_px", "centroid_y_px", "centroid_x_px", "touches_border"]
    table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns)
    table = table.sort_values(["label"] + (["slice"] if labels.ndim == 3 else []))
    table = table.reset_index(drop=True)
    table["touches_border"] = table["touches_border"].astype(bool)
    table.insert(
        table.columns.get_loc("area_px") + 1,
        "equivalent_diameter_px",
        2.0 * np.sqrt(table["area_px"].to_numpy(dtype=np.float64) / np.pi),
    )
    table.insert(0, "index", table["label"].to_numpy(dtype=np.int64))
    size = _pixel_size(scale, 2)
    if size is not None:
        u = ascii_unit(short_unit(unit) or "units")
        sy, sx = size
        area = table["area_px"].to_numpy(dtype=np.float64) * sy * sx
        table[f"area_{u}2"] = area
        table[f"equivalent_diameter_{u}"] = 2.0 * np.sqrt(area / np.pi)
        table[f"centroid_y_{u}"] = table["centroid_y_px"] * sy
        table[f"centroid_x_{u}"] = table["centroid_x_px"] * sx
    return table
