"""Read electron micrographs together with their pixel size, in nanometres.

Qt-free and torch-free. Formats and where the pixel size comes from:

=============  ====================================================  ==========
File           Pixel size read from                                  ``source``
=============  ====================================================  ==========
TIFF (FEI /    ``[Scan] PixelWidth`` (metres) of the FEI_HELIOS or    ``fei``
Thermo)        FEI_SFEG tag (tifffile ``fei_metadata``)
TIFF (Zeiss)   ``AP_IMAGE_PIXEL_SIZE`` (else ``AP_PIXEL_SIZE``) of     ``zeiss``
               the CZ_SEM tag (tifffile ``sem_metadata``)
TIFF (OME)     ``Pixels/@PhysicalSizeX`` and its unit (default µm)   ``ome``
TIFF (ImageJ)  X resolution (pixels per unit) and ``unit=``          ``imagej``
TIFF (plain)   X resolution in pixels per centimetre, when it gives   ``tiff``
               at most 10 µm per pixel (large label files are
               written so, as ImageJ cannot hold uint32)
DM3 / DM4      calibration of the X dimension (rosettasciio)         ``dm``
EMD            Velox or Berkeley EMD axes (rosettasciio)             ``emd``
SER            FEI TIA calibration (rosettasciio)                    ``ser``
MRC / MRCS     voxel size in Å (mrcfile)                             ``mrc``
=============  ====================================================  ==========

:mod:`napari_sagegan.io.pixel_size` decides which file or value gives an image's pixel size.
A TIFF is searched in that order (instrument tags first: they are written at acquisition).
Other resolution tags are ignored: nearly every program writes 72 dots per inch there, which
says nothing about the specimen; hence also the 10 µm bound on centimetre resolutions. A file without a usable calibration (none
written, zero, a reciprocal unit such as 1/nm for a diffraction pattern, or "pixel") gives
``pixel_size=None`` and ``source="none"``: measurements then stay in pixels, and callers say
so. Pixels are assumed square; when X and Y differ by more than 1 % a warning says so and
the X size is used.
"""

from __future__ import annotations

import math
import os
import re
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np

from napari_sagegan.io.images import existing_file, read_image, require_finite
from napari_sagegan.io.layout import check_channel

#: Suffixes handled by a dedicated EM reader (rosettasciio or mrcfile), lower case.
EM_SUFFIXES = (".dm3", ".dm4", ".emd", ".ser", ".mrc", ".mrcs")
TIFF_SUFFIXES = (".tif", ".tiff")
SOURCES = ("fei", "zeiss", "ome", "imagej", "tiff", "dm", "emd", "ser", "mrc", "none")

# Length units to nanometres. Keys are lower case; the micro sign (U+00B5) and the Greek mu
# (U+03BC) are both used in the wild, as are the Angstrom sign (U+212B) and A-ring (U+00C5).
_NM_PER_UNIT = {
    "m": 1e9,
    "meter": 1e9,
    "meters": 1e9,
    "metre": 1e9,
    "metres": 1e9,
    "cm": 1e7,
    "mm": 1e6,
    "um": 1e3,
    "\u00b5m": 1e3,
    "\u03bcm": 1e3,
    "micron": 1e3,
    "microns": 1e3,
    "micrometer": 1e3,
    "micrometers": 1e3,
    "micrometre": 1e3,
    "micrometres": 1e3,
    "nm": 1.0,
    "nanometer": 1.0,
    "nanometers": 1.0,
    "nanometre": 1.0,
    "nanometres": 1.0,
    "\u00e5": 0.1,
    "a": 0.1,
    "angstrom": 0.1,
    "angstroms": 0.1,
    "\u00e5ngstr\u00f6m": 0.1,
    "pm": 1e-3,
    "picometer": 1e-3,
    "picometers": 1e-3,
}
_SQUARE_TOLERANCE = 0.01
#: Largest pixel size (nm) believed from a plain TIFF's resolution in pixels per centimetre.
_MAX_PLAIN_TIFF_NM = 1e4
_RESUNIT_CENTIMETER = 3


def unit_to_nm(unit: str | None) -> float | None:
    """Nanometres in one ``unit`` (``"µm" -> 1000``), ``None`` for a non-length unit.

    Understands SI spellings and abbreviations, ``micron``, ``um``, the micro sign and Greek
    mu, Angstrom spellings and ImageJ's escaped ``\\u00B5m``.
    """
    if unit is None:
        return None
    text = str(unit).strip()
    text = re.sub(r"\\u([0-9a-fA-F]{4})", lambda m: chr(int(m.group(1), 16)), text)
    return _NM_PER_UNIT.get(text.lower())


def _meta(pixel_size: float | None, source: str) -> dict[str, Any]:
    if pixel_size is None or not math.isfinite(pixel_size) or pixel_size <= 0:
        return {"pixel_size": None, "unit": None, "source": "none"}
    return {"pixel_size": float(pixel_size), "unit": "nm", "source": source}


def _to_nm(value: Any, unit: str | None) -> float | None:
    factor = unit_to_nm(unit)
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    if factor is None or not math.isfinite(value) or value <= 0:
        return None
    return value * factor


def _check_square(x_nm: float | None, y_nm: float | None, path: Path) -> None:
    if x_nm and y_nm and abs(x_nm - y_nm) > _SQUARE_TOLERANCE * x_nm:
        warnings.warn(
            f"{path.name}: pixels are not square ({x_nm:.4g} nm wide, {y_nm:.4g} nm high); "
            "the width is used as the pixel size",
            UserWarning,
            stacklevel=3,
        )


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --------------------------------------------------------------------------- TIFF


def _fei_pixel_size(fei: dict[str, Any] | None) -> tuple[float | None, float | None]:
    if not fei:
        return None, None
    for section in ("Scan", "EScan", "Image"):
        values = fei.get(section) or {}
        x = _to_nm(values.get("PixelWidth"), "m")
        if x is not None:
            return x, _to_nm(values.get("PixelHeight"), "m")
    return None, None


def _zeiss_pixel_size(sem: dict[str, Any] | None) -> float | None:
    if not sem:
        return None
    for key in ("ap_image_pixel_size", "ap_pixel_size"):
        entry = sem.get(key)
        if isinstance(entry, tuple) and len(entry) >= 3:  # (name, value, unit)
            value = _to_nm(entry[1], entry[2])
            if value is not None:
                return value
    return None


def _ome_pixel_size(xml: str | None) -> tuple[float | None, float | None]:
    if not xml:
        return None, None
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None, None
    for element in root.iter():
        if element.tag.rsplit("}", 1)[-1] == "Pixels":
            x = _to_nm(element.get("PhysicalSizeX"), element.get("PhysicalSizeXUnit", "µm"))
            y = _to_nm(element.get("PhysicalSizeY"), element.get("PhysicalSizeYUnit", "µm"))
            return x, y
    return None, None


def _imagej_pixel_size(tif: Any) -> tuple[float | None, float | None]:
    meta = tif.imagej_metadata or {}
    unit = meta.get("unit")
    if unit_to_nm(unit) is None:
        return None, None
    tags = tif.pages.first.tags
    sizes = []
    for name in ("XResolution", "YResolution"):
        tag = tags.get(name)
        if tag is None:
            sizes.append(None)
            continue
        num, den = tag.value
        # Resolution is pixels per unit; ImageJ writes 1/1 when uncalibrated.
        sizes.append(_to_nm(den / num, unit) if num else None)
    return sizes[0], sizes[1]


def _plain_pixel_size(tif: Any) -> tuple[float | None, float | None]:
    if tif.is_imagej:  # ImageJ's resolution is in its own unit, read above
        return None, None
    tags = tif.pages.first.tags
    unit = tags.get("ResolutionUnit")
    if unit is None or int(unit.value) != _RESUNIT_CENTIMETER:
        return None, None
    sizes = []
    for name in ("XResolution", "YResolution"):
        tag = tags.get(name)
        num, den = tag.value if tag is not None else (0, 1)
        nm = _to_nm(den / num, "cm") if num else None
        sizes.append(nm if nm is not None and nm <= _MAX_PLAIN_TIFF_NM else None)
    return sizes[0], sizes[1]


def tiff_pixel_size(path: str | os.PathLike) -> dict[str, Any]:
    """Pixel size of a TIFF from its metadata, reading only the header.

    Returns
    -------
    dict
        ``pixel_size`` (nm per pixel, or ``None``), ``unit`` (``"nm"`` or ``None``) and
        ``source`` (``"fei"``, ``"zeiss"``, ``"ome"``, ``"imagej"``, ``"tiff"`` or
        ``"none"``).

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    ValueError
        Not a readable TIFF.
    """
    import tifffile

    p = existing_file(path)
    try:
        with tifffile.TiffFile(p) as tif:
            if not tif.pages:
                raise ValueError("the file holds no image")
            found = [
                ("fei", _fei_pixel_size(tif.fei_metadata if tif.is_fei else None)),
                ("zeiss", (_zeiss_pixel_size(tif.sem_metadata if tif.is_sem else None), None)),
                ("ome", _ome_pixel_size(tif.ome_metadata if tif.is_ome else None)),
                ("imagej", _imagej_pixel_size(tif) if tif.is_imagej else (None, None)),
                ("tiff", _plain_pixel_size(tif)),
            ]
    except (FileNotFoundError, MemoryError):
        raise
    except Exception as exc:
        raise ValueError(f"cannot read {p} as a TIFF file: {_reason(exc)}") from exc
    for source, (x, y) in found:
        if x is not None:
            _check_square(x, y, p)
            return _meta(x, source)
    return _meta(None, "none")


# --------------------------------------------------------------------------- EM formats


def _rsciio_reader(suffix: str):
    try:
        if suffix in (".dm3", ".dm4"):
            from rsciio.digitalmicrograph import file_reader
        elif suffix == ".emd":
            from rsciio.emd import file_reader
        else:
            from rsciio.tia import file_reader
    except ImportError as exc:
        raise ValueError(
            f"reading {suffix} files needs the rosettasciio package (with h5py for .emd): "
            f"pip install 'rosettasciio[hdf5]' ({_reason(exc)})"
        ) from exc
    return file_reader


def _pick_image(signals: list[dict[str, Any]], path: Path) -> dict[str, Any]:
    """The first 2-D image (or stack of images) among the signals of a file."""
    kinds = []
    for sig in signals:
        data = sig.get("data")
        shape = getattr(data, "shape", ())
        kinds.append(len(shape))
        if len(shape) in (2, 3):
            axes = sig.get("axes") or []
            if len(axes) == len(shape) and not any(a.get("navigate") for a in axes[-2:]):
                return sig
    raise ValueError(
        f"{path} holds no 2-D image (found data with {kinds or 'no'} dimensions: spectra or "
        "4-D STEM are not images); export the image from the acquisition software"
    )


def _read_rsciio(path: Path, source: str) -> tuple[np.ndarray, dict[str, Any]]:
    reader = _rsciio_reader(path.suffix.lower())
    try:
        signals = reader(str(path), lazy=False)
    except (FileNotFoundError, MemoryError):
        raise
    except Exception as exc:
        article = "an" if source in ("emd", "ser") else "a"
        raise ValueError(
            f"cannot read {path} as {article} {source.upper()} file (truncated or damaged?): "
            f"{_reason(exc)}"
        ) from exc
    sig = _pick_image(list(signals or []), path)
    data = np.asarray(sig["data"])
    if data.dtype.names is not None or np.iscomplexobj(data):
        raise ValueError(
            f"{path} holds {'colour' if data.dtype.names else 'complex'} data; expected a "
            "grayscale micrograph"
        )
    y_axis, x_axis = sig["axes"][-2], sig["axes"][-1]
    x = _to_nm(x_axis.get("scale"), x_axis.get("units"))
    y = _to_nm(y_axis.get("scale"), y_axis.get("units"))
    # An uncalibrated DM/EMD image reports scale 1 with no unit: unknown, not 1 nm.
    _check_square(x, y, path)
    return data, _meta(x, source)


def _read_mrc(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    try:
        import mrcfile
    except ImportError as exc:
        raise ValueError(
            "reading MRC files needs the mrcfile package: pip install mrcfile"
        ) from exc
    try:
        with mrcfile.open(path, mode="r", permissive=False) as mrc:
            if mrc.data is None:
                raise ValueError("the file holds no data")
            data = np.array(mrc.data)
            voxel = mrc.voxel_size
            x, y = float(voxel.x), float(voxel.y)
    except (FileNotFoundError, MemoryError):
        raise
    except Exception as exc:
        raise ValueError(
            f"cannot read {path} as an MRC file (truncated or damaged?): {_reason(exc)}"
        ) from exc
    if data.ndim not in (2, 3):
        raise ValueError(f"{path}: expected a 2-D image or a stack (Z, Y, X), got {data.shape}")
    if np.iscomplexobj(data):
        raise ValueError(f"{path} holds complex data; expected a grayscale micrograph")
    x_nm, y_nm = _to_nm(x, "Å"), _to_nm(y, "Å")
    _check_square(x_nm, y_nm, path)
    return data, _meta(x_nm, "mrc")


_SOURCE_OF_SUFFIX = {".dm3": "dm", ".dm4": "dm", ".emd": "emd", ".ser": "ser"}


def read_em(
    path: str | os.PathLike, *, channel: int | None = None
) -> tuple[np.ndarray, dict[str, Any]]:
    """Read a micrograph and its pixel size.

    Parameters
    ----------
    path : str or PathLike
        ``.tif/.tiff`` (ImageJ, OME, FEI/Thermo, Zeiss SEM metadata), ``.dm3/.dm4``,
        ``.emd`` (Velox or Berkeley), ``.ser`` (FEI TIA), ``.mrc/.mrcs``. Other image files
        (PNG, JPEG, ...) are read without a pixel size.
    channel : int, optional
        The channel of a multi-channel TIFF / PNG (see
        :func:`~napari_sagegan.io.images.read_image`); the EM formats hold one channel
        (``0`` is accepted for them).

    Returns
    -------
    data : numpy.ndarray
        ``(Y, X)`` image or ``(Z, Y, X)`` stack, dtype as stored.
    meta : dict
        ``pixel_size``: nm per pixel, or ``None`` when the file has no usable calibration
        (measure in pixels then); ``unit``: ``"nm"`` or ``None``; ``source``: where it came
        from, one of :data:`SOURCES`.

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    ValueError
        Unreadable, truncated or damaged file, colour or complex data, no 2-D image in it,
        no finite pixel in it, a channel that is not there, or a reader library missing.
    """
    p = existing_file(path)
    suffix = p.suffix.lower()
    channel = check_channel(channel)
    if suffix in (".mrc", ".mrcs") or suffix in _SOURCE_OF_SUFFIX:
        if channel:
            raise ValueError(
                f"{p} holds a single channel; there is no channel {channel}: leave --channel "
                "out for this file (or give 0)"
            )
        if suffix in (".mrc", ".mrcs"):
            data, meta = _read_mrc(p)
        else:
            data, meta = _read_rsciio(p, _SOURCE_OF_SUFFIX[suffix])
        require_finite(data, p)
        return data, meta
    data = read_image(p, channel=channel)
    if suffix in TIFF_SUFFIXES:
        return data, tiff_pixel_size(p)
    return data, _meta(None, "none")
