"""Images larger than memory: read a window at a time, write a tile at a time.

- :func:`open_lazy` opens a TIFF file or a ``.zarr`` folder as a 2-D array-like that reads
  only the windows sliced from it: a tiled or compressed TIFF through tifffile's zarr store
  (``imread(..., aszarr=True)``, one tile or strip decoded at a time), an uncompressed
  contiguous TIFF as a read-only memory map (its single strip would otherwise be decoded
  whole), a zarr array as itself. What it returns pickles as its path, so a dask worker
  reopens the file itself (:class:`LazyTiff`).
- :func:`decoded_bytes` tells, from the header only, how many bytes a file would take
  decoded (for the ``segment`` command's memory check).
- :func:`create_labels_zarr` and :func:`write_tiled_labels` write label images that are
  never whole in memory: a chunked zarr array, and a tiled TIFF fed from an iterator of
  tiles read out of such an array.

zarr (>= 3, as tifffile's zarr store requires) is needed for everything but memory-mapped
TIFFs; install ``napari-sagegan[large]``. Torch-free and Qt-free.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from napari_sagegan.io.layout import ImageRefused, dims

TIFF_SUFFIXES = (".tif", ".tiff")
#: nm -> cm, for the resolution tags of a TIFF in pixels per centimetre.
_NM_PER_CM = 1e7


def _zarr():
    try:
        import zarr
    except ImportError:  # pragma: no cover - the `large` extra
        raise ImportError(
            "images larger than memory need zarr: pip install 'napari-sagegan[large]'"
        ) from None
    return zarr


def is_zarr(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a zarr folder (v2 or v3 metadata inside, or a ``.zarr`` name)."""
    p = Path(path)
    if not p.is_dir():
        return False
    names = (".zarray", ".zgroup", "zarr.json")
    return p.suffix.lower() == ".zarr" or any((p / n).exists() for n in names)


def _check_2d(shape: tuple[int, ...], what: str, axes: str | None = None) -> None:
    if len(shape) != 2:
        told = f" (axes {axes})" if axes else ""
        raise ImageRefused(
            f"{what} holds an array of shape {dims(shape)}{told}: block-by-block segmentation "
            "expects a single 2-D grey image (Y, X); save one plane or channel of it as its "
            "own TIFF or zarr array first"
        )


class LazyTiff:
    """The first series of a TIFF as a lazy 2-D array: ``shape``, ``dtype``, ``ndim``,
    and slicing that reads only what it returns.

    Pickles as its path: a dask worker that receives it opens the file itself.

    Parameters
    ----------
    path : str or PathLike
        A TIFF file whose first series is 2-D (``YX``).

    Raises
    ------
    ImageRefused
        The series is not 2-D (channels, samples, a stack).
    """

    def __init__(self, path: str | os.PathLike) -> None:
        import tifffile

        self.path = Path(path).expanduser().absolute()  # a worker opens it by this path
        with tifffile.TiffFile(self.path) as tif:
            series = tif.series[0]
            self.shape = tuple(int(n) for n in series.shape)
            self.dtype = np.dtype(series.dtype)
            _check_2d(self.shape, str(self.path), series.axes)
            page = series.pages[0]
            self.memmappable = bool(series.dataoffset is not None and page.is_memmappable)
        self.ndim = 2
        self._array: Any = None

    @property
    def array(self) -> Any:
        """The opened array (a read-only memmap or a zarr array over the TIFF's tiles)."""
        if self._array is None:
            import tifffile

            if self.memmappable:
                self._array = tifffile.memmap(self.path, mode="r")
            else:
                _zarr()
                store = tifffile.imread(self.path, aszarr=True, series=0, level=0)
                self._array = _zarr().open_array(store, mode="r")
        return self._array

    @property
    def chunks(self) -> tuple[int, int]:
        """The unit one read decodes (the whole image for a memory map: any window of it)."""
        arr = self.array
        return tuple(getattr(arr, "chunks", None) or (1, self.shape[1]))

    def __getitem__(self, key: Any) -> np.ndarray:
        return np.asarray(self.array[key])

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_array": None}

    def __repr__(self) -> str:
        return f"LazyTiff({str(self.path)!r}, shape={self.shape}, dtype={self.dtype})"


def open_lazy(path: str | os.PathLike) -> Any:
    """A TIFF file or a zarr folder as a lazy 2-D array (see the module docstring).

    A zarr group is read through its array ``"0"`` (OME-Zarr's full resolution) or its only
    array.

    Raises
    ------
    FileNotFoundError
        Nothing at ``path``.
    ImageRefused
        Not 2-D; a group without one clear array.
    ValueError
        Neither a TIFF nor a zarr folder.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist")
    if is_zarr(p):
        zarr = _zarr()
        node = zarr.open(str(p), mode="r")
        if not hasattr(node, "shape"):  # a group
            names = sorted(name for name, _ in node.arrays())
            if "0" in names:
                node = node["0"]
            elif len(names) == 1:
                node = node[names[0]]
            else:
                raise ImageRefused(
                    f"{p} is a zarr group with arrays {names or 'none'}: give the path of the "
                    "one array to segment (e.g. image.zarr/0)"
                )
        _check_2d(tuple(int(n) for n in node.shape), str(p))
        return node
    if p.suffix.lower() in TIFF_SUFFIXES:
        return LazyTiff(p)
    raise ValueError(
        f"{p} is neither a TIFF file nor a zarr folder: block-by-block segmentation reads "
        "those two (convert other formats to a tiled TIFF or a zarr array first)"
    )


def decoded_bytes(path: str | os.PathLike) -> int | None:
    """Bytes a TIFF or a zarr array would take decoded, from its header only (``None`` for
    other files, or a header that cannot be read)."""
    p = Path(path).expanduser()
    try:
        if is_zarr(p):
            node = _zarr().open(str(p), mode="r")
            if not hasattr(node, "shape"):
                arrays = [a for _, a in node.arrays()]
                if not arrays:
                    return None
                node = max(arrays, key=lambda a: math.prod(a.shape))
            return math.prod(int(n) for n in node.shape) * np.dtype(node.dtype).itemsize
        if p.suffix.lower() in TIFF_SUFFIXES and p.is_file():
            import tifffile

            with tifffile.TiffFile(p) as tif:
                s = tif.series[0]
                return math.prod(int(n) for n in s.shape) * np.dtype(s.dtype).itemsize
    except (OSError, ValueError, KeyError, IndexError, ImportError):
        return None
    return None


def create_labels_zarr(
    path: str | os.PathLike,
    shape: tuple[int, int],
    chunks: tuple[int, int],
    *,
    attributes: dict[str, Any] | None = None,
) -> Any:
    """A new int32 zarr array of zeros at ``path`` (a folder), chunked as given."""
    zarr = _zarr()
    arr = zarr.create_array(
        store=str(Path(path).expanduser().absolute()),  # workers may run elsewhere
        shape=tuple(int(n) for n in shape),
        chunks=tuple(int(n) for n in chunks),
        dtype="int32",
        fill_value=0,
        overwrite=True,
    )
    if attributes:
        arr.attrs.update(attributes)
    return arr


def _tiles(labels: Any, tile: tuple[int, int], dtype: np.dtype) -> Iterator[np.ndarray]:
    """The tiles of ``labels`` in TIFF order (row by row), edge tiles padded with 0; one
    row of tiles is read at a time."""
    th, tw = tile
    h, w = int(labels.shape[0]), int(labels.shape[1])
    for y in range(0, h, th):
        strip = np.asarray(labels[y : y + th, :])
        for x in range(0, w, tw):
            part = strip[:, x : x + tw]
            out = np.zeros((th, tw), dtype)
            out[: part.shape[0], : part.shape[1]] = part
            yield out


def write_tiled_labels(
    path: str | os.PathLike,
    labels: Any,
    *,
    tile: int = 256,
    pixel_size_nm: float | None = None,
) -> Path:
    """Write 2-D labels as a tiled, compressed uint32 TIFF, a row of tiles at a time.

    Parameters
    ----------
    path : str or PathLike
        The TIFF to write (its folder must exist); written as it is: call it inside a
        staging folder.
    labels : array-like
        ``(Y, X)`` non-negative integer labels sliced one row of tiles at a time (a zarr
        array, a memmap, a numpy array).
    tile : int
        Tile side, a multiple of 16 (TIFF's rule).
    pixel_size_nm : float, optional
        Written as the resolution in pixels per centimetre (as
        :func:`~napari_sagegan.io.export.write_labels_tiff` does for uint32 labels).

    Returns
    -------
    Path
    """
    import tifffile

    if tile < 16 or tile % 16:
        raise ValueError(f"TIFF tiles are a multiple of 16 pixels a side, got {tile}")
    shape = (int(labels.shape[0]), int(labels.shape[1]))
    dtype = np.dtype(np.uint32)
    kwargs: dict[str, Any] = {}
    if pixel_size_nm:
        per_cm = _NM_PER_CM / float(pixel_size_nm)
        kwargs.update(resolution=(per_cm, per_cm), resolutionunit=tifffile.RESUNIT.CENTIMETER)
    tifffile.imwrite(
        path,
        _tiles(labels, (tile, tile), dtype),
        shape=shape,
        dtype=dtype,
        tile=(tile, tile),
        compression="zlib",
        photometric="minisblack",
        metadata=None,
        bigtiff=math.prod(shape) * dtype.itemsize > 2**32 - 2**26,
        **kwargs,
    )
    return Path(path)
