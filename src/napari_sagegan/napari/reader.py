"""npe2 reader contribution: electron micrographs opened with their pixel size.

The manifest routes to it what napari does not read on its own: Gatan DM3/DM4, Velox/Berkeley
EMD, FEI TIA SER and MRC/MRCS files. TIFFs stay with napari's own reader (a second claim on
``*.tif`` would make napari ask which reader to use for every TIFF); :func:`get_reader` still
reads TIFFs whose metadata hold a pixel size (FEI/Thermo, Zeiss SEM, OME or ImageJ) when it is
called directly, and the docks write a TIFF layer's pixel size, read from its source file,
into the layer (:mod:`napari_sagegan.napari.calibration`). The
layer's ``scale`` is the pixel size in nm and its ``units`` are nm, so the
scale bar and measurements read in nanometres; ``metadata`` repeats the pixel size, unit and
where it came from, since layer units are not kept by every napari tool.

Qt-free: napari calls these functions and shows a ``ValueError`` as a notification.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from napari_sagegan.io.em import EM_SUFFIXES, TIFF_SUFFIXES

#: File names (stems) read as label layers when they hold integers.
_LABEL_STEM_ENDINGS = ("_labels", "_label", "_masks", "_mask")

LayerDataTuple = tuple[Any, dict[str, Any], str]


def _suffix(path: str | os.PathLike) -> str:
    return Path(path).suffix.lower()


def _claims(path: str | os.PathLike) -> bool:
    suffix = _suffix(path)
    if suffix in EM_SUFFIXES:
        return True
    if suffix not in TIFF_SUFFIXES or not Path(path).is_file():
        return False
    from napari_sagegan.io.em import tiff_pixel_size

    try:
        return tiff_pixel_size(path)["pixel_size"] is not None
    except (OSError, ValueError):  # unreadable: let napari's own reader say why
        return False


def get_reader(
    path: str | os.PathLike | Sequence[str | os.PathLike],
) -> Callable[[Any], list[LayerDataTuple]] | None:
    """Return :func:`read_micrographs` when every path is an EM file this plugin reads.

    Parameters
    ----------
    path : str, PathLike or list of them
        What napari asks to open.

    Returns
    -------
    callable or None
        ``None`` for anything napari reads as well on its own (a TIFF without pixel size,
        PNG, ...), for folders, and for lists mixing such files.
    """
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not paths or not all(_claims(p) for p in paths):
        return None
    return read_micrographs


def _layer(path: Path) -> LayerDataTuple:
    import numpy as np

    from napari_sagegan.io.em import read_em

    data, meta = read_em(path)
    px = meta["pixel_size"]
    ndim = data.ndim
    attrs: dict[str, Any] = {
        "name": path.stem,
        "metadata": {
            "pixel_size_nm": px,
            "unit": "nm" if px is not None else "px",
            "source": meta["source"],
            "path": str(path),
        },
    }
    if px is not None:
        attrs["scale"] = (1.0,) * (ndim - 2) + (px, px)
        attrs["units"] = ("pixel",) * (ndim - 2) + ("nm", "nm")
    else:
        warnings.warn(
            f"{path.name}: pixel size unknown: measurements in pixels",
            UserWarning,
            stacklevel=3,
        )
    is_labels = np.issubdtype(data.dtype, np.integer) and path.stem.lower().endswith(
        _LABEL_STEM_ENDINGS
    )
    return data, attrs, "labels" if is_labels else "image"


def read_micrographs(path: str | os.PathLike | Sequence[str | os.PathLike]) -> list[LayerDataTuple]:
    """Read EM files into napari layer data tuples.

    Parameters
    ----------
    path : str, PathLike or list of them
        Files accepted by :func:`get_reader`.

    Returns
    -------
    list of (data, attributes, layer_type)
        One layer per file: ``(Y, X)`` or ``(Z, Y, X)`` data; attributes ``name`` (file
        stem), ``scale`` (nm per pixel; 1 along Z) and ``units`` when the pixel size is
        known, and ``metadata`` with ``pixel_size_nm`` (``None`` if unknown), ``unit``
        (``"nm"`` or ``"px"``), ``source`` and ``path``. Layer type ``"image"``, or
        ``"labels"`` for integer files named ``*_labels`` / ``*_mask``.

    Raises
    ------
    FileNotFoundError, ValueError
        Missing, unreadable, truncated or unsupported files (napari shows the message).
    """
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    return [_layer(Path(p)) for p in paths]
