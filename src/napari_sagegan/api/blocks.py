"""Images larger than memory: :func:`segment_blocks` (one image into a zarr array or a tiled
TIFF) and :func:`segment_blocks_into` (several into a folder, with ``segment_report.json``),
block by block with overlap and stitching (:mod:`napari_sagegan.engine.infer.blocks`).

The particle size is resolved once per image (the user's, or estimated on a central window
of :data:`ESTIMATE_SIDE` pixels a side, or one padded block when that is larger) and so is the grey-level range (a strided
sample of the whole image, as for :func:`~napari_sagegan.api.segment`); every block is then
segmented with both fixed, so blocks agree. Outputs are staged and moved into place at the
end: bad input, an error or a cancel leave nothing behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from napari_sagegan.api.segment import (
    REPORT_FORMAT,
    REPORT_NAME,
    REPORT_VERSION,
    Micrograph,
    Segmented,
    _named,
    _segmenter,
    particle_diameter,
)
from napari_sagegan.io.pixel_size import PixelSize, resolve_pixel_size
from napari_sagegan.util.progress import Progress, relay

PathLike = str | os.PathLike
#: Output format -> file suffix.
BLOCK_FORMATS = {"zarr": ".zarr", "tiff": ".tif"}
_SUFFIXES = {".zarr": "zarr", ".tif": "tiff", ".tiff": "tiff"}
#: Side of the central window the particle size is estimated on (at least a padded block).
ESTIMATE_SIDE = 1024
#: Default block side, pixels.
DEFAULT_BLOCK = 2048


@dataclass
class BlockSegmented(Segmented):
    """The block-by-block segmentation of one image (labels on disk, not in memory).

    Besides :class:`~napari_sagegan.api.Segmented`'s attributes (``labels`` is ``None``):

    Attributes
    ----------
    output : Path or None
        The zarr folder or tiled TIFF written.
    format : str
        ``"zarr"`` or ``"tiff"``.
    n_blocks, block_size, overlap : int
        The grid used (pixels).
    merged : int
        Particles crossing a block border, stitched into one.
    shape : tuple of int
        The image's ``(Y, X)``.
    """

    output: Path | None = None
    format: str = "zarr"
    n_blocks: int = 0
    block_size: int = 0
    overlap: int = 0
    merged: int = 0
    shape: tuple[int, ...] = ()

    def report(self) -> dict[str, Any]:
        """This image's entry of ``segment_report.json``: the keys of
        :meth:`Segmented.report` plus ``output``, ``format``, ``blocks``, ``block_size``,
        ``overlap``, ``stitched`` and ``shape``."""
        entry = super().report()
        entry.update(
            output=self.output.name if self.output is not None else None,
            format=self.format,
            blocks=int(self.n_blocks),
            block_size=int(self.block_size),
            overlap=int(self.overlap),
            stitched=int(self.merged),
            shape=[int(s) for s in self.shape],
        )
        return entry

    def open_labels(self) -> Any:
        """The written labels as a lazy array (see :func:`napari_sagegan.io.lazy.open_lazy`)."""
        from napari_sagegan.io.lazy import open_lazy

        return open_lazy(self.output)


def default_memory_limit() -> int:
    """A quarter of this machine's physical memory, bytes (4 GB when it does not say)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE")) // 4
    except (AttributeError, OSError, ValueError):
        return 4 << 30


def _files(inputs: Any) -> list[Path]:
    """TIFF files and zarr folders given, or found (not recursively) in plain folders."""
    from napari_sagegan.io.lazy import TIFF_SUFFIXES, is_zarr

    found: list[Path] = []
    for item in [inputs] if isinstance(inputs, (str, os.PathLike)) else inputs:
        p = Path(item).expanduser()
        if p.is_dir() and not is_zarr(p):
            found += sorted(
                e for e in p.iterdir() if is_zarr(e) or e.suffix.lower() in TIFF_SUFFIXES
            )
        else:
            found.append(p)
    return found


def oversized(inputs: Any, limit: int) -> list[tuple[Path, int]]:
    """The TIFF files and zarr arrays among ``inputs`` (files, folders) whose decoded size,
    read from their headers, exceeds ``limit`` bytes: ``(path, bytes)``."""
    from napari_sagegan.io.lazy import decoded_bytes

    out = []
    for p in _files(inputs):
        n = decoded_bytes(p)
        if n is not None and n > limit:
            out.append((p, n))
    return out


def _source(item: Any, pixel_size: Any) -> Micrograph:
    """A path, array or Micrograph as a Micrograph whose ``data`` is a lazy 2-D array."""
    from napari_sagegan.io.lazy import is_zarr, open_lazy

    if isinstance(item, (str, os.PathLike)):
        path = Path(item).expanduser()
        data = open_lazy(path)
        header = None if is_zarr(path) else path
        known = getattr(data, "attrs", {}).get("pixel_size_nm") if header is None else None
        candidate = PixelSize(float(known), "metadata") if known else None
        px = resolve_pixel_size(candidate, header, override=pixel_size)
        return Micrograph(path.name, data, px, path)
    if isinstance(item, Micrograph):
        m = dataclasses.replace(item)
        if m.data is None and m.path is not None:
            m.data = open_lazy(m.path)
        if pixel_size is not None:
            m.pixel_size = resolve_pixel_size(override=pixel_size)
        return m
    if not hasattr(item, "shape"):
        raise ValueError(
            f"expected a TIFF file, a zarr folder or a 2-D array, got {type(item).__name__}"
        )
    return Micrograph("image", item, resolve_pixel_size(override=pixel_size))


@contextlib.contextmanager
def _cluster(scheduler: Any, workers: int | None, threads: int | None) -> Iterator[Any]:
    """``scheduler`` as :func:`~napari_sagegan.engine.infer.blocks.segment_blocks` takes it:
    an address becomes a Client of it, ``workers`` a LocalCluster's Client (closed at the
    end: :func:`napari_sagegan.api.distributed._client`'s); anything else is passed on."""
    address = isinstance(scheduler, str) and "://" in scheduler
    if not address and workers is None:
        yield scheduler
        return
    if address and workers is not None:
        raise ValueError("give either a scheduler address or a number of workers, not both")
    if workers is not None and workers < 1:
        raise ValueError(f"the number of workers must be at least 1, got {workers}")
    from napari_sagegan.api.distributed import _client, require_distributed

    distributed = require_distributed()
    n = str(threads or 1)  # torch threads per worker process, read when torch loads
    env = {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n}
    with _client(distributed, scheduler if address else None, workers, threads or 1, env) as c:
        yield c


def _format_of(out: Path, format: str | None) -> str:
    fmt = format or _SUFFIXES.get(out.suffix.lower())
    if fmt not in BLOCK_FORMATS:
        raise ValueError(
            f"cannot tell the output format of {out}: name it NAME.zarr (a chunked zarr "
            "folder) or NAME.tif (a tiled TIFF), or give format='zarr' / 'tiff'"
        )
    return fmt


def _central_window(image: Any, side: int) -> Any:
    from napari_sagegan.engine.infer.blocks import read_window

    h, w = int(image.shape[0]), int(image.shape[1])
    y0, x0 = max((h - side) // 2, 0), max((w - side) // 2, 0)
    return read_window(image, (y0, min(y0 + side, h), x0, min(x0 + side, w)))


def _one(
    seg: Any,
    config: Any,
    m: Micrograph,
    target: Path,
    fmt: str,
    work: Path,
    *,
    block_size: int,
    overlap: int | None,
    diameter: float | None,
    diameter_nm: float | None,
    scheduler: Any,
    tile: int,
    tag: dict[str, Any],
) -> Generator[Progress, None, BlockSegmented]:
    """Segment one image into ``target`` (inside a staging folder), with scratch in
    ``work``."""
    from napari_sagegan.engine.data.intensity import intensity_levels
    from napari_sagegan.engine.infer import blocks
    from napari_sagegan.engine.infer.scale import ScaleInfo
    from napari_sagegan.io.lazy import create_labels_zarr, write_tiled_labels

    image = m.data
    shape = tuple(int(s) for s in image.shape)
    probe = blocks.BlockGrid.make(shape, block_size, overlap or 0)  # refuse bad input first
    d = particle_diameter(diameter, diameter_nm, m.pixel_size, m.name)

    def tagged(ev: Progress) -> Progress:
        return Progress(ev.stage, ev.step, ev.total, ev.eta_s, f"{m.name}: {ev.message}",
                        {**ev.data, **tag, "image": m.name, "device": seg.device_name})  # fmt: skip

    cfg = config
    if not seg.target_diameter:  # a model without a network scale: images as they are
        info = ScaleInfo(None, "none", 1.0)
    elif d:
        cfg = dataclasses.replace(config, diameter=d)
        info = seg.plan_scale(None, cfg)
    elif config.auto_scale:  # estimated once, on a central window, for every block
        side = max(ESTIMATE_SIDE, *probe.slot)
        with _named(m.name):
            window = _central_window(image, side)
            info = yield from relay(seg.estimate_scale(window, config), tagged)
        del window
        if info.diameter:
            cfg = dataclasses.replace(config, diameter=float(info.diameter))
        else:
            cfg = dataclasses.replace(config, auto_scale=False)
    else:
        info = ScaleInfo(None, "none", 1.0)
    if overlap is None:
        overlap = blocks.default_overlap(seg.model.config.depth, info.diameter, info.factor)
        overlap = min(overlap, min(probe.block))
    grid = blocks.BlockGrid.make(shape, block_size, overlap)
    with _named(m.name):
        lo, hi, _ = intensity_levels(blocks.Sliced(image))  # a subsample, <= 2M pixels
    scratch = create_labels_zarr(work / "scratch.zarr", grid.scratch_shape, grid.slot)
    attrs = {"source": m.name, "pixel_size_nm": m.pixel_size.nm, "unit": "nm"}
    store = target if fmt == "zarr" else work / "labels.zarr"
    out = create_labels_zarr(store, shape, grid.block, attributes=attrs)
    stitched = yield from relay(
        blocks.segment_blocks(
            seg, image, grid, cfg, scratch=scratch, out=out, value_range=(lo, hi),
            scheduler=scheduler,
        ),
        tagged,
    )  # fmt: skip
    shutil.rmtree(work / "scratch.zarr", ignore_errors=True)
    if fmt == "zarr":
        out.attrs.update({"n_particles": stitched.n_particles})
    else:
        write_tiled_labels(target, out, tile=tile, pixel_size_nm=m.pixel_size.nm)
        shutil.rmtree(store, ignore_errors=True)
    extra = SimpleNamespace(
        excluded=stitched.excluded, nonfinite=stitched.nonfinite, confidence=None
    )
    return BlockSegmented(
        m.name, None, stitched.n_particles, info, m.pixel_size, cfg, None, seg.device_name,
        m.path, extra, None, int(shape[0] * shape[1]), output=target, format=fmt,
        n_blocks=stitched.n_blocks, block_size=int(max(grid.block)), overlap=grid.overlap,
        merged=stitched.merged, shape=shape,
    )  # fmt: skip


def segment_blocks(
    image: Any,
    *,
    out: PathLike,
    block_size: int = DEFAULT_BLOCK,
    overlap: int | None = None,
    model: Any = "default",
    device: str = "auto",
    diameter: float | None = None,
    diameter_nm: float | None = None,
    pixel_size: float | PixelSize | None = None,
    infer: dict[str, Any] | None = None,
    format: str | None = None,
    scheduler: Any = None,
    workers: int | None = None,
    threads_per_worker: int | None = None,
    tile: int = 256,
) -> Generator[Progress, None, BlockSegmented]:
    """Segment one image larger than memory, block by block, into a zarr array or a tiled TIFF.

    Parameters
    ----------
    image : path, array or Micrograph
        A TIFF file (tiled, strips, or contiguous: read a window at a time), a zarr folder
        (an array, or a group's array ``"0"``), or a 2-D array (numpy, memmap, zarr, dask:
        with a distributed client each worker computes its own windows of a dask array).
    out : path
        ``NAME.zarr`` (a folder; int32, chunked as the blocks, with ``pixel_size_nm`` and
        ``n_particles`` attributes) or ``NAME.tif`` (a tiled uint32 TIFF, written a row of
        tiles at a time); replaced if it exists, written only at the end.
    block_size : int
        Core block side, pixels (at least 16 and at least ``overlap``). Each task holds one
        block plus its margins: memory per worker grows with it, not with the image.
    overlap : int, optional
        Margin around each block, pixels; default
        :func:`~napari_sagegan.engine.infer.blocks.default_overlap`: three particle
        diameters and at least the network's receptive radius.
    model, device, diameter, diameter_nm, pixel_size, infer
        As for :func:`~napari_sagegan.api.segment`; the diameter is the same for every
        block (without one it is estimated once, on a central window).
    format : ``"zarr"`` or ``"tiff"``, optional
        Instead of telling it from ``out``'s suffix.
    scheduler : optional
        Where the blocks run: a ``distributed.Client`` or a scheduler's address
        (``tcp://host:8786``; the workers must see the input and ``out`` at the same
        paths), ``"threads"``, ``"sync"``; by default the active distributed client if
        there is one, else one block at a time here.
    workers, threads_per_worker : int, optional
        Run the blocks on a dask ``LocalCluster`` of ``workers`` processes (each with
        ``threads_per_worker`` torch threads, default 1), started and closed here.
    tile : int
        Tile side of a TIFF output (a multiple of 16).

    Yields
    ------
    Progress
        ``prepare``; ``scale`` while the particle size is estimated; ``blocks`` after each
        block segmented, border compared and block written (``data["phase"]``); ``image``
        with ``data["result"]``.

    Returns
    -------
    BlockSegmented
    """
    from napari_sagegan.util.files import new_folder, refuse_overwriting_inputs

    out = Path(out).expanduser()
    fmt = _format_of(out, format)
    m = _source(image, pixel_size)
    new_folder(out.parent)
    refuse_overwriting_inputs([out], [m.path] if m.path is not None else [])
    items = yield from _run(
        [m], lambda _m: out.name, fmt, out.parent, model=model, device=device,
        block_size=block_size, overlap=overlap, diameter=diameter, diameter_nm=diameter_nm,
        infer=infer, scheduler=scheduler, workers=workers, threads=threads_per_worker,
        tile=tile, report=False,
    )  # fmt: skip
    return items[0]


def segment_blocks_into(
    images: Any,
    *,
    out: PathLike,
    block_format: str = "zarr",
    block_size: int = DEFAULT_BLOCK,
    overlap: int | None = None,
    model: Any = "default",
    device: str = "auto",
    diameter: float | None = None,
    diameter_nm: float | None = None,
    pixel_size: float | PixelSize | None = None,
    infer: dict[str, Any] | None = None,
    scheduler: Any = None,
    workers: int | None = None,
    threads_per_worker: int | None = None,
    tile: int = 256,
) -> Generator[Progress, None, list[BlockSegmented]]:
    """Segment several images block by block into the folder ``out``: ``<stem>.zarr`` (or
    ``<stem>.tif`` with ``block_format="tiff"``) each, and ``segment_report.json`` (the
    entries of :meth:`BlockSegmented.report`), all moved into place at the end.

    ``images``: TIFF files, zarr folders, plain folders of them, arrays or Micrographs; the
    other parameters as for :func:`segment_blocks`.
    """
    from napari_sagegan.util.files import new_folder, refuse_overwriting_inputs

    if block_format not in BLOCK_FORMATS:
        raise ValueError(f"the block format is 'zarr' or 'tiff', got {block_format!r}")
    if isinstance(images, (str, os.PathLike)) or hasattr(images, "shape"):
        images = [images]
    paths = [i for i in images if isinstance(i, (str, os.PathLike))]
    items = [_source(p, pixel_size) for p in _files(paths)]
    items += [_source(i, pixel_size) for i in images if not isinstance(i, (str, os.PathLike))]
    if not items:
        raise ValueError("there is no image to segment: give TIFF files, zarr folders or arrays")
    suffix = BLOCK_FORMATS[block_format]
    names = [Path(m.name).stem + suffix for m in items]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(
            f"several inputs would write {dupes[0]}: rename them or segment them separately"
        )
    out = new_folder(Path(out).expanduser())
    inputs = [m.path for m in items if m.path is not None]
    if isinstance(model, (str, os.PathLike)):
        inputs.append(model)
    refuse_overwriting_inputs([out / n for n in [*names, REPORT_NAME]], inputs, folder=out)
    results = yield from _run(
        items, lambda m: Path(m.name).stem + suffix, block_format, out,
        model=model, device=device, block_size=block_size, overlap=overlap, diameter=diameter,
        diameter_nm=diameter_nm, infer=infer, scheduler=scheduler, workers=workers,
        threads=threads_per_worker, tile=tile, report=True,
    )  # fmt: skip
    return results


def _run(
    items: list[Micrograph],
    name_of: Any,
    fmt: str,
    folder: Path,
    *,
    model: Any,
    device: str,
    block_size: int,
    overlap: int | None,
    diameter: float | None,
    diameter_nm: float | None,
    infer: dict[str, Any] | None,
    scheduler: Any,
    workers: int | None,
    threads: int | None,
    tile: int,
    report: bool,
) -> Generator[Progress, None, list[BlockSegmented]]:
    """Segment ``items`` into a staging folder moved into ``folder`` at the end."""
    from napari_sagegan.engine.infer.blocks import BlockGrid
    from napari_sagegan.util.files import staged_folder

    particle_diameter(diameter, diameter_nm, PixelSize(1.0), "")  # refuse bad values first
    for m in items:  # every image's shape and the grid, before any model is loaded
        BlockGrid.make(tuple(getattr(m.data, "shape", ())), block_size, overlap or 0)
        if diameter_nm is not None:
            particle_diameter(None, diameter_nm, m.pixel_size, m.name)
    seg = _segmenter(model, device)
    config = seg.default_infer_config(**(infer or {}))
    n = len(items)
    yield Progress(
        "prepare", 0, n, message=f"segmenting {n} image(s) block by block on {seg.device_name}",
        data={"device": seg.device_name},
    )  # fmt: skip
    results: list[BlockSegmented] = []
    with _cluster(scheduler, workers, threads) as scheduler, staged_folder(folder) as staging:
        work = staging / ".blocks-work"
        for i, m in enumerate(items):
            work.mkdir()
            r = yield from _one(
                seg, config, m, staging / name_of(m), fmt, work, block_size=block_size,
                overlap=overlap, diameter=diameter, diameter_nm=diameter_nm,
                scheduler=scheduler, tile=tile, tag={"index": i, "n_images": n},
            )  # fmt: skip
            shutil.rmtree(work, ignore_errors=True)
            r.output = folder / name_of(m)
            results.append(r)
            yield Progress(
                "image", i + 1, n, message=f"{m.name}: {r.n_particles} particles",
                data={"result": r, "device": seg.device_name},
            )  # fmt: skip
        if report:
            from napari_sagegan.io.tables import write_json

            source = model if isinstance(model, (str, os.PathLike)) else "memory"
            write_json(
                staging / REPORT_NAME,
                {"format": REPORT_FORMAT, "version": REPORT_VERSION, "model": str(source),
                 "images": [r.report() for r in results]},
            )  # fmt: skip
    return results
