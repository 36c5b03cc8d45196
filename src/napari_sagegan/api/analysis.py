"""Analyse labels: :func:`measure` (particle tables) and :func:`evaluate` (scores against
ground truth). See :mod:`napari_sagegan.api` for the map.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from napari_sagegan.io.pixel_size import PixelSize, resolve_pixel_size
from napari_sagegan.util.files import new_file, refuse_overwriting_inputs
from napari_sagegan.util.progress import Progress
from napari_sagegan.util.units import PIXEL_SIZE_RANGE_NM

PathLike = str | os.PathLike


def _plausible(ps: PixelSize, name: str | None = None) -> PixelSize:
    """``ps``, refused when known but outside :data:`PIXEL_SIZE_RANGE_NM`."""
    lo, hi = PIXEL_SIZE_RANGE_NM
    if ps.known and not lo <= ps.nm <= hi:
        raise ValueError(
            f"{name + ': ' if name else ''}the pixel size {ps.nm:g} nm (from {ps.describe()}) "
            f"is not plausible; expected {lo:g} to {hi:g} nm per pixel: give the pixel size in "
            "nm (--pixel-size NM)"
        )
    return ps


def _text(name: str) -> str:
    """A file name as text any file can hold: bytes that are not UTF-8 (a name from another
    system) as ``\\xNN`` escapes, so that a CSV cell never fails to encode."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _paths(items: Sequence[Any]) -> list[Path]:
    return [Path(i).expanduser() for i in items if isinstance(i, (str, os.PathLike))]


# --------------------------------------------------------------------------- measure


@dataclass
class Measured:
    """What :func:`measure` produced: one ``Measurements`` per label image, the particle
    table of all of them (a ``file`` column first) and the summary record written beside
    the CSV (``files``, and ``pooled`` for several files)."""

    measurements: list
    table: Any
    record: dict[str, Any]
    pixel_sizes: list[PixelSize]


def measure(
    labels: Any,
    *,
    images: Sequence[Any] | None = None,
    pixel_size: float | PixelSize | None = None,
    names: Sequence[str] | None = None,
    include_border: bool = False,
    out: PathLike | None = None,
    channel: int | None = None,
) -> Generator[Progress, None, Measured]:
    """Measure every particle of one or more label images (size, shape, order, g(r)).

    Parameters
    ----------
    labels : path, array or a sequence of them
        Label images (0 = background) or binary masks, ``(Y, X)`` or ``(Z, Y, X)``.
    images : sequence of path or array, optional
        The micrograph of each, in the same order: ``mean_intensity``, and the pixel size
        when the labels carry none.
    pixel_size : float or PixelSize, optional
        nm per pixel of every image, overriding what the files say.
    names : sequence of str, optional
        Names of in-memory label images (the table's ``file`` column).
    out : path, optional
        ``FILE.csv`` (one row per particle) and ``FILE.summary.json``, written atomically.
    channel : int, optional
        The channel of multi-channel micrograph files (see
        :func:`~napari_sagegan.io.images.read_image`).

    Yields
    ------
    Progress
        ``pixel_size`` then ``file`` for each label image (``data["measurements"]``).

    Raises
    ------
    ValueError
        Image count or shapes that do not match; lengths in nm for some files and in pixels
        for others.
    """
    import pandas as pd

    from napari_sagegan.engine.analysis.measure import measure as measure_labels
    from napari_sagegan.engine.analysis.measure import summarize
    from napari_sagegan.io.em import read_em
    from napari_sagegan.io.images import read_label_image
    from napari_sagegan.io.tables import TOOL, file_record, write_table

    _plausible(resolve_pixel_size(override=pixel_size))  # refuse a bad value first
    if isinstance(labels, (str, os.PathLike, np.ndarray)):
        labels = [labels]
    labels = list(labels)
    images = list(images or [])
    if images and len(images) != len(labels):
        raise ValueError(
            f"got {len(images)} micrographs for {len(labels)} label images; give one "
            "micrograph per label image (--image), in the same order, or none"
        )
    if out is not None:
        from napari_sagegan.io.tables import summary_path

        out = new_file(out, example="particles.csv")
        refuse_overwriting_inputs([out, summary_path(out)], _paths(labels) + _paths(images))
    records, tables, done, sizes, units = [], [], [], [], set()
    for k, item in enumerate(labels):
        path = Path(item).expanduser() if isinstance(item, (str, os.PathLike)) else None
        name = _text(path.name) if path is not None else (names[k] if names else f"labels {k + 1}")
        lab = read_label_image(path) if path is not None else np.asarray(item)
        img_item = images[k] if images else None
        image, image_ps, ipath = None, None, None
        if isinstance(img_item, (str, os.PathLike)):
            ipath = Path(img_item).expanduser()
            image, meta = read_em(ipath, channel=channel)
            image_ps = PixelSize.from_meta(meta, ipath.name)
        elif img_item is not None:
            image = np.asarray(img_item)
        if image is not None and image.shape != lab.shape:
            raise ValueError(
                f"{ipath.name if ipath else 'the image'} has shape {image.shape} but {name} has "
                f"shape {lab.shape}; a label image must match its micrograph pixel for pixel"
            )
        ps = _plausible(resolve_pixel_size(path, image_ps, override=pixel_size), name)
        yield Progress(
            "pixel_size", k, len(labels), data={"file": name, "pixel_size": ps},
            message=f"{name}: pixel size {ps.nm:.6g} nm (from {ps.describe()})" if ps.known
            else f"{name}: pixel size unknown: measurements in pixels",
        )  # fmt: skip
        m = measure_labels(lab, image, ps.nm, include_border=include_border)
        units.add(m.unit)
        if len(units) > 1:
            raise ValueError(
                "some label images have a known pixel size and others not, so their lengths "
                "would be in different units; give the pixel size (--pixel-size NM) to "
                "measure all in nm"
            )
        table = m.table.copy()
        table.insert(0, "file", name)
        tables.append(table)
        done.append(m)
        sizes.append(ps)
        records.append(
            file_record(m, str(path) if path else name, str(ipath) if ipath else None,
                        ps.describe())
        )  # fmt: skip
        yield Progress(
            "file", k + 1, len(labels), data={"file": name, "measurements": m},
            message=f"{name}: {m.summary['n_particles']} particles "
            f"({m.summary['n_touching_border']} touching the border)",
        )  # fmt: skip
    table = pd.concat(tables, ignore_index=True)
    table.attrs = {"unit": units.pop()}
    record: dict[str, Any] = {"tool": TOOL, "files": records}
    if len(records) > 1:  # sizes pooled over all files; global order is per image only
        field_area = sum(
            float(np.prod(r["shape"])) * (r["pixel_size_nm"] or 1.0) ** 2 for r in records
        )
        nm = {r["pixel_size_nm"] for r in records}
        pooled = summarize(
            table, None, nm.pop() if len(nm) == 1 else None, field_area=field_area,
            include_border=include_border,
        )  # fmt: skip
        pooled["unit"] = table.attrs["unit"]
        record["pooled"] = pooled
    if out is not None:
        write_table(out, table, record)
    return Measured(done, table, record, sizes)


# --------------------------------------------------------------------------- evaluate


def evaluate(
    pred: Any, gt: Any, *, names: Sequence[str] | None = None, out: PathLike | None = None
) -> Generator[Progress, None, dict[str, Any]]:
    """Score predicted labels against ground truth: Dice, instance precision / recall / F1.

    Parameters
    ----------
    pred, gt : folder or sequence of arrays
        Folders are paired by file name (:func:`~napari_sagegan.io.images.find_pairs`);
        sequences pair in order.
    names : sequence of str, optional
        Names of in-memory pairs.
    out : path, optional
        JSON file for ``{"per_image": ..., "mean": ...}``, written atomically.

    Returns
    -------
    dict
        ``per_image`` (name -> metrics) and ``mean``.
    """
    from napari_sagegan.engine.analysis.metrics import evaluate_pair, mean_metrics
    from napari_sagegan.io.images import find_pairs, read_labels

    if out is not None:
        out = new_file(out, example="metrics.json", flag="--json")
    if isinstance(pred, (str, os.PathLike)):
        files = find_pairs(pred, gt)
        if out is not None:
            refuse_overwriting_inputs([out], [f for pair in files for f in pair], what="--json")
        items = [(p.stem, p.name, g.name, lambda p=p, g=g: (read_labels(p), read_labels(g)))
                 for p, g in files]  # fmt: skip
    else:
        pred, gt = list(pred), list(gt)
        if len(pred) != len(gt):
            raise ValueError(f"got {len(pred)} predictions for {len(gt)} ground-truth images")
        items = [
            (n, n, n, lambda a=a, b=b: (np.asarray(a), np.asarray(b)))
            for n, a, b in zip(names or [f"image {i + 1}" for i in range(len(pred))], pred, gt)
        ]
    rows: dict[str, dict[str, Any]] = {}
    for k, (key, pname, gname, load) in enumerate(items):
        a, b = load()
        if a.shape != b.shape:
            raise ValueError(f"{pname} has shape {a.shape} but {gname} has shape {b.shape}")
        rows[key] = evaluate_pair(a, b)
        yield Progress("image", k + 1, len(items), message=f"{key}: scored", data={"image": key})
    report = {"per_image": rows, "mean": mean_metrics(list(rows.values()))}
    if out is not None:
        from napari_sagegan.io.tables import write_json

        write_json(out, report)
    return report
