"""Images larger than memory: segmented block by block with overlap, and stitched.

The image is cut into a grid of core blocks (``block`` pixels a side, the last ones
smaller) that tile it without overlap; each block is segmented with a margin of
``overlap`` pixels on every side (its *padded* block, clipped to the image), so that
everything in its core is seen with at least ``overlap`` pixels of context, and a particle
narrower than ``overlap`` that crosses a core border lies whole in both padded blocks.

1. **Segment** (one task per block): the padded window is read from the image (a zarr
   array, a lazy TIFF, a memmap, a dask array: only that window), segmented by the
   :class:`~.segment.Segmenter` with the same particle diameter, thresholds and grey-level
   range for every block (the whole image's, estimated once), and its labels (block-local
   ids ``1..n``) written to a scratch array at the block's slot. The task returns a
   :class:`BlockSummary`: ``n``, the ids present in the core, the missing pixels.
2. **Match** (one task per pair of side neighbours): in the region both padded blocks
   cover, a label of one and a label of the other are the same particle when their
   intersection over union there is at least :data:`MATCH_IOU` (at most one partner each).
3. **Resolve** (on the driver, small): block ``b``'s local id ``k`` is the global id
   ``offset_b + k``; the matches are the edges of a graph whose connected components
   (``scipy.sparse.csgraph.connected_components``, a union-find) are the particles, numbered
   ``1..N`` in the order they first appear (blocks row by row), so the labels are unique and
   consecutive over the whole image and do not depend on which task finished first.
4. **Write** (one task per block): the core of the block's scratch labels, mapped through
   its lookup table, is written to the output at the core's place (the output's chunks are
   the core blocks, so no two tasks write the same chunk).

A pixel takes the labels of the block whose core holds it, so a particle crossing a border
is stitched from the two blocks' views of it, both seen with full context. Each task holds
one padded block (its image window, maps and labels): memory per worker is a function of
``block`` and ``overlap``, not of the image size. The tasks are ``dask.delayed`` calls run
by dask: on an active ``dask.distributed`` client's workers, else here (``"sync"`` by
default: one block at a time, torch using every core inside it; ``"threads"``).

About 530 lines, a little over the house's ~500: the grid, the three tasks, the relabelling
and the driver that runs them share the block geometry (core, padded window, scratch slot),
and a reader checks the stitching by reading them together.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ...util.progress import EtaClock, Progress, run_to_end
from ..config import InferConfig

#: Two labels that meet in the overlap of side neighbours are one particle from this IoU.
MATCH_IOU = 0.5
#: The smallest overlap used by default, pixels.
MIN_OVERLAP = 32

Box = tuple[int, int, int, int]  # y0, y1, x0, x1
Index = tuple[int, int]  # block row, block column


@dataclass(frozen=True)
class BlockGrid:
    """Core blocks tiling a ``(Y, X)`` image, and their padded windows.

    Attributes
    ----------
    shape : (int, int)
        The image's ``(Y, X)``.
    block : (int, int)
        Core block height and width, pixels (the last row / column may be smaller).
    overlap : int
        Margin added on every side of a core block, pixels.
    """

    shape: tuple[int, int]
    block: tuple[int, int]
    overlap: int

    @classmethod
    def make(cls, shape: Sequence[int], block_size: int | Sequence[int], overlap: int) -> BlockGrid:
        """A checked grid.

        Raises
        ------
        ValueError
            Not a 2-D shape; a block size under 16 pixels or smaller than the overlap; a
            negative overlap.
        """
        shape = tuple(int(s) for s in shape)
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(
                f"block-by-block segmentation expects a 2-D image (Y, X), got an array of "
                f"shape {shape}; segment each plane or channel on its own"
            )
        sizes = (block_size, block_size) if np.ndim(block_size) == 0 else tuple(block_size)
        block = tuple(int(b) for b in sizes)
        overlap = int(overlap)
        if overlap < 0:
            raise ValueError(f"the block overlap must be 0 or more pixels, got {overlap}")
        if len(block) != 2 or min(block) < 16:
            raise ValueError(f"the block size must be at least 16 pixels, got {block_size}")
        if min(block) < overlap:
            raise ValueError(
                f"the block size ({min(block)} px) is smaller than the overlap between blocks "
                f"({overlap} px): give a block size of at least {overlap} px (--block-size), "
                "or a smaller overlap"
            )
        return cls(shape, (block[0], block[1]), overlap)

    @property
    def grid(self) -> tuple[int, int]:
        """Blocks per column and per row."""
        return tuple(math.ceil(s / b) for s, b in zip(self.shape, self.block))

    def __len__(self) -> int:
        return self.grid[0] * self.grid[1]

    def indices(self) -> list[Index]:
        """Every block, row by row."""
        return [(i, j) for i in range(self.grid[0]) for j in range(self.grid[1])]

    def core(self, index: Index) -> Box:
        i, j = index
        (h, w), (bh, bw) = self.shape, self.block
        return i * bh, min((i + 1) * bh, h), j * bw, min((j + 1) * bw, w)

    def padded(self, index: Index) -> Box:
        y0, y1, x0, x1 = self.core(index)
        o, (h, w) = self.overlap, self.shape
        return max(y0 - o, 0), min(y1 + o, h), max(x0 - o, 0), min(x1 + o, w)

    @property
    def slot(self) -> tuple[int, int]:
        """The largest padded block: the chunk of the scratch array."""
        return self.block[0] + 2 * self.overlap, self.block[1] + 2 * self.overlap

    @property
    def scratch_shape(self) -> tuple[int, int]:
        """Shape of the scratch array holding every padded block's labels at its slot."""
        return self.grid[0] * self.slot[0], self.grid[1] * self.slot[1]

    def slot_of(self, index: Index, box: Box | None = None) -> tuple[slice, slice]:
        """Where ``box`` (image coordinates, inside the padded block; default: all of it) is
        kept in the scratch array."""
        py0, _, px0, _ = self.padded(index)
        y0, y1, x0, x1 = box if box is not None else self.padded(index)
        sy, sx = index[0] * self.slot[0] - py0, index[1] * self.slot[1] - px0
        return slice(y0 + sy, y1 + sy), slice(x0 + sx, x1 + sx)

    def neighbours(self) -> list[tuple[Index, Index]]:
        """Side neighbours ``(a, b)``: ``b`` right of or below ``a``."""
        gy, gx = self.grid
        pairs = [((i, j), (i, j + 1)) for i in range(gy) for j in range(gx - 1)]
        return pairs + [((i, j), (i + 1, j)) for i in range(gy - 1) for j in range(gx)]


def receptive_radius(depth: int) -> int:
    """Half the receptive field of a U-Net of ``depth`` levels with two 3x3 convolutions per
    level on both sides (network pixels): ``(12 * 2**depth - 8) / 2``."""
    return (12 * 2 ** int(depth) - 8) // 2


def default_overlap(depth: int, diameter: float | None, factor: float = 1.0) -> int:
    """The overlap used when none is given: three particle diameters, and at least the
    network's receptive radius (in image pixels: divided by the resampling ``factor``) and
    :data:`MIN_OVERLAP`; rounded up to a multiple of 16."""
    need = max(MIN_OVERLAP, receptive_radius(depth) / max(factor, 1e-6))
    if diameter:
        need = max(need, 3.0 * float(diameter))
    return int(16 * math.ceil(need / 16))


@dataclass
class BlockSummary:
    """What a segment task returns (small: no pixels).

    Attributes
    ----------
    index : (int, int)
        The block.
    n : int
        Its local ids are ``1..n``.
    present : numpy.ndarray
        The local ids found in its core (sorted).
    nonfinite : int
        Pixels of its core that were NaN or infinite.
    excluded : list of dict
        Burned-in annotations left out whose box centre is in its core, in image
        coordinates (see ``SegmentResult.excluded``).
    """

    index: Index
    n: int
    present: np.ndarray
    nonfinite: int = 0
    excluded: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Stitched:
    """The result of :func:`segment_blocks`.

    Attributes
    ----------
    n_particles : int
        Particles in the output (ids ``1..n_particles``).
    n_blocks : int
        Blocks segmented.
    merged : int
        Particles that crossed a block border and were stitched into one.
    nonfinite : int
        NaN / infinite pixels of the image (background in the output).
    excluded : list of dict
        Burned-in annotations left out, in image coordinates.
    """

    n_particles: int
    n_blocks: int
    merged: int
    nonfinite: int
    excluded: list[dict[str, Any]]


class _Held:
    """An object handed to dask tasks as it is (dask would compute a dask array passed as
    an argument whole, and tokenize a network): unwrapped inside the task."""

    def __init__(self, value: Any) -> None:
        self.value = value


def _read(image: Any, key: tuple[slice, slice]) -> np.ndarray:
    window = image[key]
    if hasattr(window, "compute") and hasattr(window, "dask"):
        window = window.compute(scheduler="sync")
    return np.asarray(window)


def read_window(image: Any, box: Box) -> np.ndarray:
    """``image[y0:y1, x0:x1]`` as a numpy array; a dask array is computed here, in this
    thread (``scheduler="sync"``), so only the window is ever materialised."""
    y0, y1, x0, x1 = box
    return _read(image, (slice(y0, y1), slice(x0, x1)))


class Sliced:
    """A 2-D array-like read only by slicing (never ``np.asarray`` of the original): for
    the grey-level statistics, which read a strided subsample (or, for an image of at
    most their sample size, all of it) through this."""

    def __init__(self, image: Any) -> None:
        self.image = image
        self.shape = tuple(int(s) for s in image.shape)
        self.dtype = np.dtype(image.dtype)
        self.ndim = len(self.shape)

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        return _read(self.image, key)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = _read(self.image, (slice(None), slice(None)))
        return out if dtype is None else out.astype(dtype, copy=False)


def segment_block(
    segmenter: Any,
    image: Any,
    grid: BlockGrid,
    index: Index,
    config: InferConfig,
    value_range: tuple[float, float] | None,
    scratch: Any,
) -> BlockSummary:
    """Segment one padded block; write its local labels to ``scratch``; summarise it.

    ``segmenter``, ``image`` may come wrapped (see :func:`segment_blocks`). ``config`` must
    fix the particle size (``diameter`` set, or ``auto_scale`` off) so blocks agree.
    """
    from ..data.intensity import has_finite

    segmenter = segmenter.value if isinstance(segmenter, _Held) else segmenter
    image = image.value if isinstance(image, _Held) else image
    box = grid.padded(index)
    window = read_window(image, box)
    y0, _, x0, _ = box
    cy0, cy1, cx0, cx1 = grid.core(index)
    inner = (slice(cy0 - y0, cy1 - y0), slice(cx0 - x0, cx1 - x0))
    excluded: list[dict[str, Any]] = []
    if has_finite(window):
        res = run_to_end(segmenter.segment(window, config, value_range=value_range))
        labels = res.labels
        for item in res.excluded:
            by0, bx0, by1, bx1 = (int(v) for v in item["bbox"])
            cy, cx = y0 + (by0 + by1) // 2, x0 + (bx0 + bx1) // 2
            if cy0 <= cy < cy1 and cx0 <= cx < cx1:
                excluded.append({**item, "bbox": [by0 + y0, bx0 + x0, by1 + y0, bx1 + x0]})
    else:
        labels = np.zeros(window.shape, np.int32)
    scratch[grid.slot_of(index)] = labels
    core = labels[inner]
    present = np.unique(core)
    nonfinite = 0
    if window.dtype.kind in "fc":
        nonfinite = int(np.count_nonzero(~np.isfinite(window[inner])))
    return BlockSummary(index, int(labels.max()), present[present > 0], nonfinite, excluded)


def match_labels(a: np.ndarray, b: np.ndarray, min_iou: float = MATCH_IOU) -> np.ndarray:
    """Pairs ``(label in a, label in b)`` whose IoU over the region ``a`` and ``b`` both
    label is at least ``min_iou``: ``(k, 2)`` int64. With ``min_iou >= 0.5`` each label has
    at most one partner."""
    a = np.asarray(a).ravel().astype(np.int64)
    b = np.asarray(b).ravel().astype(np.int64)
    both = (a > 0) & (b > 0)
    if not both.any():
        return np.zeros((0, 2), np.int64)
    width = int(b.max()) + 1
    keys, inter = np.unique(a[both] * width + b[both], return_counts=True)
    la, lb = keys // width, keys % width
    area_a, area_b = np.bincount(a), np.bincount(b)
    iou = inter / (area_a[la] + area_b[lb] - inter)
    keep = iou >= min_iou
    return np.stack([la[keep], lb[keep]], axis=1)


def match_pair(
    scratch: Any, grid: BlockGrid, a: Index, b: Index, min_iou: float = MATCH_IOU
) -> np.ndarray:
    """The local-id pairs of side neighbours ``a`` and ``b`` that are one particle (see
    :func:`match_labels`), compared where both padded blocks lie."""
    pa, pb = grid.padded(a), grid.padded(b)
    box = (max(pa[0], pb[0]), min(pa[1], pb[1]), max(pa[2], pb[2]), min(pa[3], pb[3]))
    if box[0] >= box[1] or box[2] >= box[3]:
        return np.zeros((0, 2), np.int64)
    la = np.asarray(scratch[grid.slot_of(a, box)])
    lb = np.asarray(scratch[grid.slot_of(b, box)])
    return match_labels(la, lb, min_iou)


def resolve(
    grid: BlockGrid,
    summaries: dict[Index, BlockSummary],
    matches: dict[tuple[Index, Index], np.ndarray],
) -> tuple[dict[Index, np.ndarray], int, int]:
    """Lookup tables ``local id -> global id`` per block, the particle count, and how many
    particles were stitched from several blocks.

    Global ids are ``1..N``, numbered in the order the particles first appear in the cores
    (blocks row by row, local ids ascending); ids absent from every core get none.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    order = grid.indices()
    offsets, total = {}, 0
    for idx in order:
        offsets[idx] = total
        total += summaries[idx].n
    rows, cols = [], []
    for (a, b), pairs in matches.items():
        if len(pairs):
            rows.append(offsets[a] + pairs[:, 0] - 1)
            cols.append(offsets[b] + pairs[:, 1] - 1)
    r = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    c = np.concatenate(cols) if cols else np.zeros(0, np.int64)
    graph = coo_matrix((np.ones(r.size, np.int8), (r, c)), shape=(total, total))
    _, component = connected_components(graph, directed=False)
    seen = [offsets[idx] + summaries[idx].present.astype(np.int64) - 1 for idx in order]
    comps = component[np.concatenate(seen)] if seen and total else np.zeros(0, np.int64)
    uniq, first = np.unique(comps, return_index=True)
    final = np.zeros(int(component.max()) + 1 if total else 1, np.int64)
    final[uniq[np.argsort(first)]] = np.arange(1, uniq.size + 1)
    luts = {}
    for idx, g in zip(order, seen):
        lut = np.zeros(summaries[idx].n + 1, np.int32)
        lut[summaries[idx].present] = final[component[g]]
        luts[idx] = lut
    pieces = sum(s.present.size for s in summaries.values())
    return luts, int(uniq.size), pieces - int(uniq.size)


def write_block(scratch: Any, grid: BlockGrid, index: Index, lut: np.ndarray, out: Any) -> int:
    """Write block ``index``'s core labels, mapped through ``lut``, to ``out``; return the
    pixels labelled."""
    y0, y1, x0, x1 = grid.core(index)
    labels = lut[np.asarray(scratch[grid.slot_of(index, (y0, y1, x0, x1))])]
    out[y0:y1, x0:x1] = labels
    return int(np.count_nonzero(labels))


def _client(scheduler: Any) -> Any:
    """The dask.distributed client to run on: ``scheduler`` itself when it is one; for
    ``None`` / ``"distributed"`` the active client, if any; else ``None``."""
    if scheduler is not None and hasattr(scheduler, "compute") and hasattr(scheduler, "submit"):
        return scheduler
    if scheduler not in (None, "distributed"):
        return None
    try:
        from distributed import get_client
    except ImportError:
        return None
    try:
        return get_client()
    except ValueError:
        if scheduler == "distributed":
            raise ValueError(
                "scheduler='distributed' needs an active dask.distributed Client"
            ) from None
        return None


def _execute(tasks: list[Any], scheduler: Any) -> Iterator[tuple[int, Any]]:
    """Run dask.delayed ``tasks``; yield ``(position, result)`` as they finish. On a
    distributed client all are submitted at once; here they run in waves of one per
    thread (one for ``"sync"``), so the caller can report progress between waves."""
    import dask

    client = _client(scheduler)
    if client is not None:
        from distributed import as_completed

        futures = client.compute(tasks)
        where = {f.key: k for k, f in enumerate(futures)}
        try:
            for fut in as_completed(futures):
                yield where[fut.key], fut.result()
        finally:
            client.cancel([f for f in futures if not f.done()])
        return
    name = scheduler or "sync"
    if name in ("sync", "synchronous", "single-threaded"):
        wave = 1
    else:
        wave = int(dask.config.get("num_workers", None) or 0) or (os.cpu_count() or 1)
    for start in range(0, len(tasks), wave):
        for k, result in enumerate(dask.compute(*tasks[start : start + wave], scheduler=name)):
            yield start + k, result


def segment_blocks(
    segmenter: Any,
    image: Any,
    grid: BlockGrid,
    config: InferConfig,
    *,
    scratch: Any,
    out: Any,
    value_range: tuple[float, float] | None = None,
    scheduler: Any = None,
    min_iou: float = MATCH_IOU,
) -> Generator[Progress, None, Stitched]:
    """Segment ``image`` block by block into ``out``, stitching particles across borders.

    Parameters
    ----------
    segmenter : Segmenter
        The network; sent once to each dask worker (one key of the graph).
    image : array-like, shape (Y, X)
        Sliced one padded block at a time (zarr array, :class:`~napari_sagegan.io.lazy.LazyTiff`,
        memmap, dask array, numpy array).
    grid : BlockGrid
        The blocks (``grid.shape == image.shape``).
    config : InferConfig
        The same for every block; its particle size must be fixed (``diameter`` given, or
        ``auto_scale`` off), else each block would estimate its own.
    scratch : array-like
        Writable int32 array of ``grid.scratch_shape`` (chunks ``grid.slot``): the blocks'
        local labels.
    out : array-like
        Writable int32 array of the image's shape (chunks ``grid.block``): the result.
    value_range : (float, float), optional
        The grey levels mapped to -1 and +1 in every block (the whole image's robust range).
    scheduler : optional
        A ``distributed.Client``, ``"distributed"``, ``"threads"`` or ``"sync"``; ``None``:
        the active distributed client if there is one, else ``"sync"``.
    min_iou : float
        See :func:`match_labels`.

    Yields
    ------
    Progress
        ``stage="blocks"`` after each block segmented, each pair of neighbours compared and
        each block written (``data``: ``phase``, ``n_blocks``).

    Returns
    -------
    Stitched
    """
    import dask

    if tuple(int(s) for s in image.shape) != grid.shape:
        raise ValueError(f"the grid is for shape {grid.shape}, the image is {image.shape}")
    if config.diameter is None and config.auto_scale and segmenter.target_diameter:
        raise ValueError(
            "give every block the same particle size: set the diameter (or auto_scale=False)"
        )
    tag = uuid.uuid4().hex
    seg = dask.delayed(_Held(segmenter), name=f"sagegan-segmenter-{tag}")
    img = dask.delayed(_Held(image), name=f"sagegan-image-{tag}")
    order = grid.indices()
    pairs = grid.neighbours()
    n = len(order)
    total = 2 * n + len(pairs)
    clock = EtaClock(total)
    state = {"done": 0}

    def tick(phase: str, message: str) -> Progress:
        state["done"] += 1
        d = state["done"]
        return Progress("blocks", d, total, clock.eta(d), message,
                        {"phase": phase, "n_blocks": n})  # fmt: skip

    run = dask.delayed(segment_block, pure=False)
    tasks = [run(seg, img, grid, idx, config, value_range, scratch) for idx in order]
    summaries: dict[Index, BlockSummary] = {}
    for k, summary in _execute(tasks, scheduler):
        summaries[order[k]] = summary
        yield tick("segment", f"block {len(summaries)}/{n} segmented")
    match = dask.delayed(match_pair, pure=False)
    found: dict[tuple[Index, Index], np.ndarray] = {}
    for k, result in _execute([match(scratch, grid, a, b, min_iou) for a, b in pairs], scheduler):
        found[pairs[k]] = result
        yield tick("match", f"border {len(found)}/{len(pairs)} compared")
    luts, n_particles, merged = resolve(grid, summaries, found)
    write = dask.delayed(write_block, pure=False)
    written = 0
    for _ in _execute([write(scratch, grid, idx, luts[idx], out) for idx in order], scheduler):
        written += 1
        yield tick("write", f"block {written}/{n} written")
    excluded = [e for idx in order for e in summaries[idx].excluded]
    nonfinite = sum(s.nonfinite for s in summaries.values())
    return Stitched(n_particles, n, merged, nonfinite, excluded)
