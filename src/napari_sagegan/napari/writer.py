"""npe2 writer: a Labels layer -> a TIFF that Fiji/ImageJ opens with its pixel size."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from napari_sagegan.io.export import short_unit, write_labels_tiff

_SUFFIXES = (".tif", ".tiff")


def layer_scale_unit(
    scale: Any, units: Any, metadata: dict | None
) -> tuple[tuple[float, ...] | None, str | None]:
    """The pixel size and unit to write for a layer: its ``scale`` when its ``units`` are a
    length, else ``metadata["pixel_size_nm"]`` (in nm) when this plugin recorded one, else
    nothing (uncalibrated). Other axes (Z) keep their scale."""
    unit = short_unit(units[-1]) if units else None
    if unit is not None:
        return (tuple(float(s) for s in scale) if scale is not None else None), unit
    nm = (metadata or {}).get("pixel_size_nm")
    if nm:
        head = tuple(float(s) for s in scale[:-2]) if scale is not None else ()
        return head + (float(nm), float(nm)), "nm"
    return (tuple(float(s) for s in scale) if scale is not None else None), None


def write_labels(path: str, data: Any, meta: dict) -> list[str]:
    """Write one Labels layer (napari writer contribution).

    Parameters
    ----------
    path : str
        Destination; ``.tif`` is appended when the name has no TIFF suffix.
    data : array-like
        ``(Y, X)`` or ``(Z, Y, X)`` labels.
    meta : dict
        The layer's state (napari passes ``scale``, ``units``, ``metadata``, ``name``, ...):
        the pixel size comes from the scale in a length unit, else from
        ``metadata["pixel_size_nm"]`` (:func:`layer_scale_unit`).

    Returns
    -------
    list of str
        The path written.
    """
    out = Path(path)
    if out.suffix.lower() not in _SUFFIXES:
        out = out.with_name(out.name + ".tif")
    scale, unit = layer_scale_unit(meta.get("scale"), meta.get("units"), meta.get("metadata"))
    write_labels_tiff(out, data, scale=scale, unit=unit)
    return [str(out)]
