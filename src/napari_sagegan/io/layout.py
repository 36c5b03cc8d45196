"""What an image file holds, told from its header before any pixel is decoded.

:mod:`napari_sagegan.io.images` asks this module two questions about every file:

- **Is its decoded size plausible here?** A 138-byte TIFF may declare 200000 x 200000
  pixels, and a PNG "decompression bomb" 40000 x 40000: decoding either would exhaust the
  memory. :func:`check_decoded_size` refuses an image with more than :data:`MAX_PIXELS`
  pixels per plane, or whose decoded bytes exceed the memory available now, giving the
  declared shape and bytes. :func:`pillow_header` turns Pillow's decompression-bomb guard
  into the same kind of one-line reason.
- **Which axes are planes of a stack, and which are channels?** (:func:`tiff_layout`,
  from tifffile's ``series.axes``.) Depth, time, angle and unnamed axes (``Z``, ``T``,
  ``A``, ``I``, ``Q``...) are planes of a stack. Channels (``C``) and samples per pixel
  (``S``) that are not an RGB(A) photograph are ambiguous: the caller must choose one
  (``channel=N``, ``--channel N``), otherwise the file is refused with its axes and shape.
  An RGB(A) image keeps its samples for the caller's colour rules (equal channels are one
  grey channel); a grey image with an alpha sample drops the alpha.

Torch-free and Qt-free; tifffile and Pillow are imported by the callers' readers.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: Most pixels one image (one plane of a stack) may have: 2**31, the int32 limit.
MAX_PIXELS = 2**31
#: tifffile axis codes that hold channels rather than planes of a stack.
CHANNEL_AXES = "CS"


class ImageRefused(ValueError):
    """A file that was read fine but cannot be used as it is (its message says why and
    what to do): too large, ambiguous channels, a channel that is not there."""


def dims(shape: tuple[int, ...]) -> str:
    """``(3, 512, 512) -> "3x512x512"``."""
    return "x".join(str(int(n)) for n in shape)


def _human_bytes(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.3g} {unit}"
        n /= 1000.0
    return f"{n:.3g} PB"  # pragma: no cover


def available_memory() -> int | None:
    """Bytes of memory available now (Linux ``MemAvailable``; else free physical pages),
    or ``None`` when the system does not say."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, ValueError):
        return None


def check_decoded_size(
    path: Path, shape: tuple[int, ...], dtype: Any, plane: tuple[int, int] | None = None
) -> None:
    """Refuse an image whose decoded size is implausible for this machine.

    Parameters
    ----------
    path : Path
        The file (named in the message).
    shape : tuple of int
        The declared shape of everything that will be decoded (samples included).
    dtype : numpy dtype
        The declared pixel type.
    plane : (int, int), optional
        ``(Y, X)`` of one plane (default: the last two axes of ``shape``).

    Raises
    ------
    ImageRefused
        More than :data:`MAX_PIXELS` pixels in one plane, or more decoded bytes than the
        memory available now.
    """
    itemsize = np.dtype(dtype).itemsize
    n_bytes = math.prod(int(n) for n in shape) * itemsize
    h, w = plane if plane is not None else (int(shape[-2]), int(shape[-1]))
    declared = (
        f"{path} declares {dims(shape).replace('x', ' x ')} pixels of {np.dtype(dtype)} "
        f"({_human_bytes(n_bytes)} decoded)"
    )
    if h * w > MAX_PIXELS:
        raise ImageRefused(
            f"{declared}, more than the {MAX_PIXELS / 1e9:.3g} billion pixels one image may "
            "have here: crop or bin it first, or check that the file is not damaged"
        )
    free = available_memory()
    if free is not None and n_bytes > free:
        raise ImageRefused(
            f"{declared}, more than the {_human_bytes(free)} of memory available now: crop "
            "or bin it first (or free memory), or check that the file is not damaged"
        )


def check_channel(channel: Any) -> int | None:
    """``channel`` as an ``int >= 0`` (or ``None``); a ``ValueError`` otherwise."""
    if channel is None:
        return None
    if isinstance(channel, bool) or not isinstance(channel, (int, np.integer)) or channel < 0:
        raise ValueError(f"the channel must be a whole number 0, 1, 2, ..., got {channel!r}")
    return int(channel)


@dataclass(frozen=True)
class Layout:
    """How a TIFF's stored axes become a ``(Y, X)`` image or a ``(Z, Y, X)`` stack.

    Attributes
    ----------
    stored : tuple of int
        The shape as stored (``series.shape``).
    keep : tuple of int
        The stored axes kept: length-1 axes are dropped (Y and X always kept).
    axes : str
        tifffile's codes of the kept axes (``"CYX"``, ``"YXS"``, ``"ZYX"``...).
    shape : tuple of int
        The kept axes' lengths.
    channel_axis : int or None
        Index in :attr:`axes` of the axis ``channel`` is taken from.
    channel : int or None
        The channel taken.
    samples : str or None
        The samples axis left after that: ``"colour"`` (RGB(A): the caller's colour rules),
        ``"alpha"`` (grey + alpha: the first sample) or ``None`` (no samples axis).
    """

    stored: tuple[int, ...]
    keep: tuple[int, ...]
    axes: str
    shape: tuple[int, ...]
    channel_axis: int | None = None
    channel: int | None = None
    samples: str | None = None

    def apply(self, data: np.ndarray) -> np.ndarray:
        """The decoded series reduced to the chosen channel, a samples axis (if left) last."""
        data = data.reshape(self.shape)
        axes = self.axes
        if self.channel_axis is not None:
            data = np.take(data, self.channel, axis=self.channel_axis)
            axes = axes[: self.channel_axis] + axes[self.channel_axis + 1 :]
        if "S" in axes:
            data = np.moveaxis(data, axes.index("S"), -1)
        return data

    @property
    def planes(self) -> int:
        """Axes left besides Y, X and a samples axis (0: an image, 1: a stack)."""
        axes = self.axes
        if self.channel_axis is not None:
            axes = axes[: self.channel_axis] + axes[self.channel_axis + 1 :]
        return sum(1 for a in axes if a not in "YXS")


def _channels_message(path: Path, n: int, axes: str, shape: tuple[int, ...], what: str) -> str:
    head = f"{path} has {n} channels (axes {axes}, shape {dims(shape)})"
    if what == "image":
        return f"{head}; choose one with --channel N (0-{n - 1})"
    return (
        f"{head}; a mask must be a single-channel image: save the channel that holds the "
        "labels on its own"
    )


def _pick(path: Path, n: int, axes: str, shape: tuple[int, ...], channel: int) -> int:
    if channel >= n:
        raise ImageRefused(
            f"{path} has {n} channels (axes {axes}, shape {dims(shape)}); there is no channel "
            f"{channel}: choose one of 0-{n - 1}"
        )
    return channel


def tiff_layout(path: Path, series: Any, channel: int | None, what: str = "image") -> Layout:
    """The :class:`Layout` of a tifffile series (its first), read from the header only.

    Parameters
    ----------
    path : Path
        The file (named in messages).
    series : tifffile.TiffPageSeries
        ``TiffFile.series[0]``.
    channel : int or None
        The channel to take from a multi-channel image (``None``: refuse one).
    what : str
        ``"image"`` or ``"mask"`` (a mask is never read through a channel choice).

    Raises
    ------
    ImageRefused
        Ambiguous channels without a choice, a channel that is not there, channels on two
        axes.
    """
    import tifffile

    axes, stored = str(series.axes), tuple(int(n) for n in series.shape)
    keep = tuple(i for i, (ax, n) in enumerate(zip(axes, stored)) if n > 1 or ax in "YX")
    k_axes = "".join(axes[i] for i in keep)
    k_shape = tuple(stored[i] for i in keep)
    page = series.keyframe
    samples = None
    channel_axes = [i for i, a in enumerate(k_axes) if a == "C"]
    if "S" in k_axes:
        n_samples = k_shape[k_axes.index("S")]
        extras = tuple(int(e) for e in (getattr(page, "extrasamples", ()) or ()))
        photometric = page.photometric
        alpha = (1, 2)  # EXTRASAMPLE.ASSOCALPHA, UNASSALPHA
        if photometric in (tifffile.PHOTOMETRIC.RGB, tifffile.PHOTOMETRIC.YCBCR):
            samples = "colour"
        elif n_samples == 2 and extras and all(e in alpha for e in extras):
            samples = "alpha"
        else:  # samples that are not a colour photograph: channels like any other
            channel_axes.append(k_axes.index("S"))
    if len(channel_axes) > 1:
        raise ImageRefused(
            f"{path} has channels on two axes (axes {k_axes}, shape {dims(k_shape)}); save "
            "the channel to use as a single-channel TIFF (e.g. in Fiji)"
        )
    if channel_axes:
        (ax,) = channel_axes
        n = k_shape[ax]
        if channel is None or what != "image":
            raise ImageRefused(_channels_message(path, n, k_axes, k_shape, what))
        pick = _pick(path, n, k_axes, k_shape, channel)
        return Layout(stored, keep, k_axes, k_shape, ax, pick, samples)  # RGB kept: colour
    if channel is not None and samples == "colour":  # one channel of a colour image
        ax = k_axes.index("S")
        pick = _pick(path, k_shape[ax], k_axes, k_shape, channel)
        return Layout(stored, keep, k_axes, k_shape, ax, pick)
    if channel:
        raise ImageRefused(
            f"{path} has a single channel (axes {k_axes}, shape {dims(k_shape)}); there is no "
            f"channel {channel}: leave --channel out for this file (or give 0)"
        )
    return Layout(stored, keep, k_axes, k_shape, samples=samples)


def pillow_header(path: Path) -> tuple[tuple[int, int], str]:
    """``((height, width), mode)`` of a PNG / JPEG / BMP from its header, its decoded size
    checked (:func:`check_decoded_size`).

    Raises
    ------
    ImageRefused
        Too large to decode here, or more pixels than Pillow's guard against decompression
        bombs allows.
    Exception
        Whatever Pillow raises for a file it cannot read (the caller words it).
    """
    import warnings

    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as im:
                (w, h), mode, bands = im.size, im.mode, len(im.getbands())
        except Image.DecompressionBombError:
            limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
            size = _declared_size(path)
            shown = f"{size[0]} x {size[1]} pixels" if size else "more pixels than that"
            total = f" ({size[0] * size[1] / 1e9:.3g} billion)" if size else ""
            kind = path.suffix.lstrip(".").upper() or "image"
            raise ImageRefused(
                f"{path} declares {shown}{total}, more than the {limit / 1e6:.0f} million "
                f"pixels a {kind} file may have here (a guard against decompression bombs): "
                "if the image is genuine, save it as a TIFF"
            ) from None
    # bytes per band: 16-bit and 32-bit modes; a palette image decodes to RGBA at most
    depth = 4 if mode in ("I", "F") else 2 if mode.startswith("I;16") else 1
    bands = 4 if mode in ("P", "PA") else bands
    check_decoded_size(path, (h, w, bands) if bands > 1 else (h, w), f"u{depth}", (h, w))
    return (h, w), mode


def _declared_size(path: Path) -> tuple[int, int] | None:
    """``(width, height)`` a file's header declares, read by its Pillow plugin without the
    decompression-bomb check (which refuses to say); ``None`` when that fails."""
    from PIL import Image

    try:
        fmt = Image.registered_extensions().get(path.suffix.lower())
        factory = Image.OPEN[fmt][0]
        with open(path, "rb") as f:
            w, h = factory(f, str(path)).size
        return int(w), int(h)
    except Exception:  # noqa: BLE001 - only for a better message
        return None
