"""npe2 writer: a Labels layer -> a TIFF that Fiji/ImageJ opens with its pixel size."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from napari_sagegan.io.export import short_unit, write_labels_tiff

_SUFFIXES = (".tif", ".tiff")


def write_labels(path: str, data: Any, meta: dict) -> list[str]:
    """Write one Labels layer (napari writer contribution).

    Parameters
    ----------
    path : str
        Destination; ``.tif`` is appended when the name has no TIFF suffix.
    data : array-like
        ``(Y, X)`` or ``(Z, Y, X)`` labels.
    meta : dict
        The layer's state (napari passes ``scale``, ``units``, ``name``, ...).

    Returns
    -------
    list of str
        The path written.
    """
    out = Path(path)
    if out.suffix.lower() not in _SUFFIXES:
        out = out.with_name(out.name + ".tif")
    units = meta.get("units")
    unit = short_unit(units[-1]) if units else None
    write_labels_tiff(out, data, scale=meta.get("scale"), unit=unit)
    return [str(out)]
