"""Tiled (sliding-window) inference with overlap and smooth blending.

An image of any size is cut into overlapping square-ish tiles, the tiles go through a
prediction function in batches, and the per-tile predictions are blended with a separable
Gaussian weight window::

    out[k, y, x] = sum_t w_t(y, x) * pred_t[k, y, x] / sum_t w_t(y, x)

The ratio is exact whatever the window, as long as ``sum_t w_t > 0`` everywhere, so the
window is floored at a small positive value: pixels on the image border, seen only near
the edge of a tile, still get the right value, and seams get the interior of the
neighbouring tile rather than the edge of the current one.

Memory stays bounded whatever the image size: the input is read one strip (one row of
tiles) at a time, normalised strip by strip, and the weighted sums are accumulated in a
strip buffer of one tile height. Rows no later tile touches are divided and written to the
output, which is the only full-size allocation. The same code serves numpy arrays,
``np.memmap`` files and dask arrays (anything that slices to something ``np.asarray``
accepts).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Iterator
from typing import Any

import numpy as np
import torch

from ...util.progress import EtaClock, Progress, run_to_end

#: Standard deviation of the blending window, as a fraction of the tile side.
SIGMA_FRACTION = 0.125
#: Floor of the 1-D blending window (relative to its peak of 1); 2-D corners get its square.
WEIGHT_FLOOR = 1e-3

PredictFn = Callable[[torch.Tensor], torch.Tensor]


def _round_up(value: int, divisor: int) -> int:
    return -(-int(value) // int(divisor)) * int(divisor)


def _round_down(value: int, divisor: int) -> int:
    return int(value) // int(divisor) * int(divisor)


def _check_overlap(overlap: float) -> None:
    if not 0.0 <= overlap < 1.0:
        raise ValueError(
            f"overlap is the fraction of a tile shared with its neighbour and must be in "
            f"[0, 1), got {overlap}; 0.25 is a good default"
        )


def tile_sides(shape: tuple[int, int], tile_size: int, divisor: int) -> tuple[int, int]:
    """Tile height and width used for an image.

    Each side is ``min(round_up(tile_size, divisor), round_up(image_side, divisor))``: big
    images get full tiles, small or odd-sized ones a single tile padded to the divisor.

    Parameters
    ----------
    shape : (int, int)
        Image shape ``(Y, X)``, pixels.
    tile_size : int
        Requested tile side, pixels.
    divisor : int
        The network needs sides that are multiples of this (``2**depth``).

    Returns
    -------
    (int, int)
        Tile height and width, pixels, both multiples of ``divisor``.
    """
    if divisor < 1:
        raise ValueError(f"divisor must be a positive integer, got {divisor}")
    if tile_size < 1:
        raise ValueError(f"tile_size must be a positive number of pixels, got {tile_size}")
    full = _round_up(tile_size, divisor)
    return tuple(min(full, _round_up(max(int(s), 1), divisor)) for s in shape)  # type: ignore[return-value]


def _axis_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of the tiles along one axis; the last one is flush with the end."""
    if length <= tile:
        return [0]
    stride = max(1, int(tile * (1.0 - overlap)))
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def tile_grid(
    shape: tuple[int, int], tile: int | tuple[int, int], overlap: float
) -> list[tuple[int, int]]:
    """Top-left corners of the tiles covering an image, in row-major order.

    Along each axis the tiles start every ``floor(tile * (1 - overlap))`` pixels and the
    last one ends exactly at the image end. An axis shorter than the tile gets one tile at
    0 (the image is padded to the tile there).

    Parameters
    ----------
    shape : (int, int)
        Image shape ``(Y, X)``, pixels.
    tile : int or (int, int)
        Tile side, or ``(height, width)``, pixels.
    overlap : float
        Fraction of a tile shared with its neighbour, in [0, 1).

    Returns
    -------
    list of (int, int)
        ``(y, x)`` corners, sorted by ``y`` then ``x``.
    """
    _check_overlap(overlap)
    th, tw = (tile, tile) if isinstance(tile, int | np.integer) else tile
    ys = _axis_starts(int(shape[0]), int(th), overlap)
    xs = _axis_starts(int(shape[1]), int(tw), overlap)
    return [(y, x) for y in ys for x in xs]


def _axis_for_count(
    length: int, n: int, margin: int, divisor: int, max_side: int
) -> tuple[int, list[int]] | None:
    """The least tile side (a multiple of ``divisor``, at most ``max_side``) and the start
    offsets with which ``n`` tiles cover ``length`` pixels, neighbours sharing at least
    ``margin`` pixels; ``None`` when ``n`` tiles of ``max_side`` cannot."""
    if n == 1:
        side = _round_up(max(length, 1), divisor)
        return (side, [0]) if side <= max_side else None
    side = _round_up(-(-(length + (n - 1) * margin) // n), divisor)
    if side >= length:  # n tiles would each span the whole axis: one does it
        return None
    while side <= max_side:
        # starts on the network's grid (multiples of ``divisor``), the last one flush with
        # the end: a U-Net is not shift-invariant, so a tile that starts off its grid gives
        # other maps than a whole-image pass would (up to 0.28 in probability, measured)
        starts = [
            _round_down(round(i * (length - side) / (n - 1)), divisor) for i in range(n - 1)
        ] + [length - side]
        if all(a + side - b >= margin for a, b in zip(starts, starts[1:])):
            return side, starts
        side += divisor
    return None


def _axis_options(
    length: int, full: int, overlap: float, margin: int, divisor: int, max_side: int
) -> list[tuple[int, list[int]]]:
    """Every useful ``(side, starts)`` of one axis: the plain tiles of :func:`tile_grid`,
    and one per tile count, from one tile of the whole axis (when it is at most
    ``max_side``) to tiles of half the full side."""
    plain_starts = _axis_starts(length, full, overlap)
    plain = len(plain_starts)
    # the plain tiles of tile_grid (full side, starts every stride) are always a choice
    options = [(full, plain_starts)] if length > full else []
    for n in range(1, 2 * plain + 2):  # half-side tiles need about twice as many
        found = _axis_for_count(length, n, margin, divisor, max_side)
        if found is not None:
            options.append(found)
            if 2 * found[0] <= full:
                break
    return options


def balanced_grid(
    shape: tuple[int, int], tile_size: int, overlap: float, divisor: int
) -> tuple[tuple[int, int], list[tuple[int, int]]]:
    """Tile sides ``(th, tw)`` and the row-major corners :func:`predict_tiled` uses.

    The network's memory grows with a tile's area, not its sides, so the tiles may be any
    rectangle of at most ``tile_size ** 2`` pixels (each side at most twice ``tile_size``,
    rounded up to ``divisor``), with neighbours sharing at least ``overlap * tile_size``
    pixels: of these grids the one that puts the fewest pixels through the network (then
    the fewest tiles). A 1536-px square takes two 1536 x 832 tiles for ``tile_size`` 1280
    instead of four of 832 px; never more pixels than the square tiles of
    :func:`tile_grid`.
    """
    _check_overlap(overlap)
    if divisor < 1:
        raise ValueError(f"divisor must be a positive integer, got {divisor}")
    if tile_size < 1:
        raise ValueError(f"tile_size must be a positive number of pixels, got {tile_size}")
    full = _round_up(int(tile_size), divisor)
    margin = int(math.ceil(overlap * full))
    max_side = 2 * full
    best = None
    ys_opts = _axis_options(int(shape[0]), full, overlap, margin, divisor, max_side)
    xs_opts = _axis_options(int(shape[1]), full, overlap, margin, divisor, max_side)
    for th, ys in ys_opts:
        for tw, xs in xs_opts:
            if th * tw > full * full:
                continue
            key = (len(ys) * len(xs) * th * tw, len(ys) * len(xs), abs(th - tw))
            if best is None or key < best[0]:
                best = (key, (th, tw), ys, xs)
    assert best is not None  # the plain square tiles (or a single padded one) always fit
    _, sides, ys, xs = best
    return sides, [(y, x) for y in ys for x in xs]


def n_tiles(shape: tuple[int, int], tile_size: int, overlap: float, divisor: int) -> int:
    """Number of tiles :func:`predict_tiled` runs for an image of this shape.

    Parameters
    ----------
    shape : (int, int)
        Image shape ``(Y, X)``, pixels.
    tile_size, overlap, divisor
        As in :func:`predict_tiled`.
    """
    return len(balanced_grid(shape, tile_size, overlap, divisor)[1])


def _window_1d(n: int) -> np.ndarray:
    """Gaussian window of length ``n`` (float32), peak 1, floored at ``WEIGHT_FLOOR``."""
    centre = (n - 1) / 2.0
    sigma = max(n * SIGMA_FRACTION, 1e-6)
    d = np.arange(n, dtype=np.float64) - centre
    w = np.exp(-0.5 * (d / sigma) ** 2)
    return np.maximum(w, WEIGHT_FLOOR).astype(np.float32)


def blend_window(height: int, width: int) -> np.ndarray:
    """Separable Gaussian blending window of a tile.

    Parameters
    ----------
    height, width : int
        Tile shape, pixels.

    Returns
    -------
    np.ndarray
        ``(height, width)`` float32, 1 at the centre, sigma = side / 8, each 1-D factor
        floored at ``WEIGHT_FLOOR`` so every pixel keeps a positive weight.
    """
    return np.outer(_window_1d(height), _window_1d(width))


def _pad_to(strip: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pad a 2-D array at the bottom/right to ``(height, width)``: reflect, else edge."""
    pad_y = max(0, height - strip.shape[0])
    pad_x = max(0, width - strip.shape[1])
    if pad_y == 0 and pad_x == 0:
        return strip
    # Each axis separately: reflect needs the pad to be shorter than the axis.
    if pad_y:
        mode = "reflect" if pad_y < strip.shape[0] else "edge"
        strip = np.pad(strip, ((0, pad_y), (0, 0)), mode=mode)
    if pad_x:
        mode = "reflect" if pad_x < strip.shape[1] else "edge"
        strip = np.pad(strip, ((0, 0), (0, pad_x)), mode=mode)
    return strip


def _resolve_range(
    image: Any, value_range: tuple[float, float] | None
) -> tuple[float, float, float | None]:
    """``(lo, hi, fill)``: the grey levels mapped to -1 and +1 and the value missing
    (non-finite) pixels get, the finite median's level (``None`` for an integer image,
    which has none)."""
    from ..data.intensity import fill_level, intensity_levels

    floating = np.dtype(getattr(image, "dtype", np.float32)).kind in "fc"
    if value_range is None:
        lo, hi, mid = intensity_levels(image)
    else:
        try:
            lo, hi = value_range
        except (TypeError, ValueError):
            raise ValueError(
                f"value_range must be a pair (low, high) of grey values, got {value_range!r}"
            ) from None
        mid = intensity_levels(image)[2] if floating else None
    lo, hi = float(lo), float(hi)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(
            f"value_range must be two finite grey values (low, high) with low < high, got "
            f"({lo}, {hi}); leave it unset to use the image's robust percentiles"
        )
    return lo, hi, fill_level(lo, hi, mid) if floating else None


class _StripAccumulator:
    """Weighted sums of tile predictions over a strip one tile high, flushed row by row.

    The buffer ``acc`` has shape ``(K + 1, th, Xp)`` (float32): channels ``:K`` hold
    ``sum(w * pred)`` and channel ``K`` holds ``sum(w)``, for image rows
    ``[top, top + th)``. Tiles must arrive in row-major order of their top edge.
    """

    def __init__(
        self, out: np.ndarray, tile_hw: tuple[int, int], padded_width: int, window: np.ndarray
    ) -> None:
        self.out = out
        self.k = out.shape[0]
        self.th, self.tw = tile_hw
        self.window = window
        self.acc = np.zeros((self.k + 1, self.th, padded_width), dtype=np.float32)
        self.top = 0

    def _flush(self, n_rows: int) -> None:
        """Write the first ``n_rows`` rows of the buffer to the output (cropped)."""
        y_end = min(self.top + n_rows, self.out.shape[1])
        rows = y_end - self.top
        if rows > 0:
            width = self.out.shape[2]
            np.divide(
                self.acc[: self.k, :rows, :width],
                self.acc[self.k, :rows, :width],
                out=self.out[:, self.top : y_end, :],
                casting="same_kind",
            )
        # Shift the rows still being accumulated to the top and clear the rest.
        keep = self.th - n_rows
        if keep > 0:
            self.acc[:, :keep] = self.acc[:, n_rows:].copy()
        self.acc[:, max(keep, 0) :] = 0.0
        self.top += n_rows

    def add(self, y: int, x: int, pred: np.ndarray) -> None:
        """Accumulate one tile prediction ``(K, th, tw)`` at corner ``(y, x)``."""
        if y > self.top:
            self._flush(y - self.top)
        region = self.acc[:, :, x : x + self.tw]
        region[: self.k] += pred * self.window
        region[self.k] += self.window

    def finish(self) -> None:
        """Write every row still in the buffer."""
        self._flush(self.th)


def _iter_tile_inputs(
    image: Any,
    tile_hw: tuple[int, int],
    corners: list[tuple[int, int]],
    lo: float,
    hi: float,
    fill: float | None = None,
) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield ``(y, x, tile)`` with ``tile`` float32 ``(th, tw)`` in [-1, 1], row-major;
    non-finite pixels get ``fill``.

    Only one normalised strip ``(th, Xp)`` is held at a time.
    """
    from ..data.intensity import apply_range

    th, tw = tile_hw
    strip_y = None
    strip = None
    for y, x in corners:
        if y != strip_y:
            raw = np.asarray(image[y : y + th, :])
            strip = _pad_to(apply_range(raw, lo, hi, fill=fill), th, tw)
            strip_y = y
        yield y, x, strip[:, x : x + tw]


def _run_batch(
    predict_fn: PredictFn,
    tiles: list[np.ndarray],
    device: torch.device,
    channels_last: bool,
) -> np.ndarray:
    """Run ``predict_fn`` on a batch of tiles; return ``(N, K, th, tw)`` float32 on the CPU."""
    batch = torch.from_numpy(np.stack(tiles)[:, None])
    batch = batch.to(device)
    if channels_last and device.type == "cpu":
        batch = batch.contiguous(memory_format=torch.channels_last)
    # inference_mode only around the call: a generator must not leave it switched on in
    # the caller's thread between two events.
    with torch.inference_mode():
        pred = predict_fn(batch)
        if not isinstance(pred, torch.Tensor):
            raise ValueError(
                f"the prediction function must return a torch.Tensor, got {type(pred).__name__}"
            )
        expected = (batch.shape[0], batch.shape[2], batch.shape[3])
        if pred.ndim != 4 or (pred.shape[0], pred.shape[2], pred.shape[3]) != expected:
            raise ValueError(
                f"the prediction function must return (N, K, h, w) = ({expected[0]}, K, "
                f"{expected[1]}, {expected[2]}) for a batch of shape {tuple(batch.shape)}, got "
                f"{tuple(pred.shape)}; check that the tile size suits the network (divisor)"
            )
        return pred.detach().to("cpu", torch.float32).contiguous().numpy()


def predict_tiled(
    predict_fn: PredictFn,
    image: Any,
    *,
    tile_size: int = 512,
    overlap: float = 0.25,
    batch_size: int = 4,
    divisor: int = 16,
    device: torch.device | str = "cpu",
    value_range: tuple[float, float] | None = None,
    out_dtype: Any = np.float32,
    channels_last: bool = True,
) -> Generator[Progress, None, np.ndarray]:
    """Apply a dense prediction function to an image of any size, tile by tile.

    A generator: it yields a :class:`~.progress.Progress` event (``stage="tiles"``) after
    each batch of tiles and returns the blended maps (read them with
    :func:`~.progress.run_to_end` or use :func:`predict_tiled_sync`). Closing it between
    two events cancels cleanly.

    Parameters
    ----------
    predict_fn : callable
        ``torch.Tensor (N, 1, h, w)`` float32 in [-1, 1] -> ``torch.Tensor (N, K, h, w)``
        (e.g. class probabilities in [0, 1]). Called under ``torch.inference_mode()``;
        autocast, if wanted, is the caller's business.
    image : array-like, shape (Y, X)
        Raw grey values of any dtype: numpy array, ``np.memmap`` or dask array. Only one
        strip of ``tile`` rows is read into memory at a time. Non-finite pixels (NaN,
        +-inf) are missing: the network sees the finite median's level there (see
        :mod:`..data.intensity`); their maps are the network's guess, for the caller to
        mask.
    tile_size : int
        Tiles hold at most ``tile_size ** 2`` pixels (the memory of a square tile of that
        side, rounded up to ``divisor``): rectangles shaped to cover the image with the
        fewest pixels at the overlap (:func:`balanced_grid`); a small image is one tile
        padded to ``divisor``.
    overlap : float
        Fraction of a tile shared with its neighbour, in [0, 1).
    batch_size : int
        Tiles per call of ``predict_fn``.
    divisor : int
        Tile sides are multiples of this (``2**depth`` for a U-Net of that depth).
    device : torch.device or str
        Where the input batches are sent.
    value_range : (float, float), optional
        Grey values mapped to -1 and 1. ``None``: ``robust_range(image)`` from
        :mod:`.data` (robust percentiles).
    out_dtype : numpy floating dtype
        dtype of the returned maps (float32, or float16 to halve the memory).
    channels_last : bool
        On the CPU, send batches in ``torch.channels_last`` memory format (faster with a
        model converted the same way). Ignored on other devices.

    Yields
    ------
    Progress
        ``step`` = tiles done, ``total`` = number of tiles, ``eta_s`` seconds left.

    Returns
    -------
    np.ndarray
        ``(K, Y, X)`` of ``out_dtype``: ``sum(w * pred) / sum(w)`` over the tiles covering
        each pixel, with a Gaussian window ``w`` (sigma = tile / 8).

    Raises
    ------
    ValueError
        If the image is not 2-D or empty, a parameter is out of range, or ``predict_fn``
        returns the wrong shape.
    """
    shape = tuple(int(s) for s in getattr(image, "shape", ()))
    if len(shape) != 2:
        raise ValueError(
            f"tiled prediction needs a single 2-D grey-level image (Y, X), got an array of "
            f"shape {shape}; split stacks into slices and convert RGB images to grey first"
        )
    if shape[0] < 1 or shape[1] < 1:
        raise ValueError(f"the image is empty (shape {shape})")
    _check_overlap(overlap)
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    out_dtype = np.dtype(out_dtype)
    if not np.issubdtype(out_dtype, np.floating):
        raise ValueError(f"out_dtype must be a floating dtype (float32, float16), got {out_dtype}")
    (th, tw), corners = balanced_grid(shape, tile_size, overlap, divisor)
    device = torch.device(device)
    lo, hi, fill = _resolve_range(image, value_range)

    total = len(corners)
    clock = EtaClock(total)
    window = blend_window(th, tw)
    tiles = _iter_tile_inputs(image, (th, tw), corners, lo, hi, fill)
    accumulator: _StripAccumulator | None = None
    done = 0
    try:
        while done < total:
            batch = [next(tiles) for _ in range(min(int(batch_size), total - done))]
            preds = _run_batch(predict_fn, [t for _, _, t in batch], device, channels_last)
            if accumulator is None:
                out = np.empty((preds.shape[1], *shape), dtype=out_dtype)
                accumulator = _StripAccumulator(out, (th, tw), max(shape[1], tw), window)
            for (y, x, _), pred in zip(batch, preds):
                accumulator.add(y, x, pred)
            done += len(batch)
            del batch, preds
            yield Progress(
                stage="tiles",
                step=done,
                total=total,
                eta_s=clock.eta(done),
                message=f"tile {done}/{total}",
            )
        assert accumulator is not None  # total >= 1 for a non-empty image
        accumulator.finish()
        return accumulator.out
    finally:
        tiles.close()  # release the input strip (and a dask/memmap read) at once


def predict_tiled_sync(
    predict_fn: PredictFn,
    image: Any,
    *,
    callback: Callable[[Progress], None] | None = None,
    **kwargs: Any,
) -> np.ndarray:
    """Run :func:`predict_tiled` to the end and return ``(K, Y, X)`` maps.

    Parameters
    ----------
    predict_fn, image, **kwargs
        As in :func:`predict_tiled`.
    callback : callable, optional
        Called with each :class:`~.progress.Progress` event.
    """
    return run_to_end(predict_tiled(predict_fn, image, **kwargs), callback)
