"""``sagegan measure``: particle tables and summaries from label images.

::

    sagegan measure LABELS... [--image IMG...] [--pixel-size NM] --out FILE.csv

writes one row per particle to ``FILE.csv`` and the summary statistics, the order analysis
and g(r) to ``FILE.summary.json`` beside it. Both are written atomically (a temporary file
renamed into place). The pixel size comes from ``--pixel-size``, else the label file's own
metadata, else the matching ``--image`` file's metadata (TIFF, DM3/DM4, EMD, SER, MRC), else
lengths stay in pixels; each file's choice is printed. Qt-free and torch-free.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from napari_sagegan.engine.analysis.measure import (
    Measurements,
    check_pixel_size,
    measure,
    summarize,
)
from napari_sagegan.util.files import atomic_path, atomic_write_text

_FLOAT_FORMAT = "%.6g"


def summary_path(csv_path: str | os.PathLike) -> Path:
    """``results.csv -> results.summary.json`` (beside the CSV)."""
    p = Path(csv_path)
    return (
        p.with_name(p.stem + ".summary.json") if p.suffix else p.with_name(p.name + ".summary.json")
    )


def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return [_json_ready(v) for v in value.tolist()]
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    return value


def _file_record(m: Measurements, labels: str | None, image: str | None, source: str) -> dict:
    return {
        "labels": labels,
        "image": image,
        "shape": list(m.field_shape),
        "pixel_size_nm": m.pixel_size,
        "pixel_size_source": source,
        "unit": m.unit,
        "summary": m.summary,
        "rdf": {f"r_{m.unit}": m.rdf_r, "g": m.rdf_g},
    }


def _write_outputs(csv_path: Path, table, record: dict) -> None:
    text = json.dumps(_json_ready(record), indent=2, allow_nan=False) + "\n"
    with atomic_path(csv_path) as tmp:
        table.to_csv(tmp, index=False, float_format=_FLOAT_FORMAT)
    atomic_write_text(summary_path(csv_path), text)


def write_particle_csv(
    path: str | os.PathLike,
    labels: np.ndarray,
    image: np.ndarray | None = None,
    pixel_size: float | None = None,
    *,
    include_border: bool = False,
    pixel_size_source: str | None = None,
) -> Measurements:
    """Measure ``labels`` and write ``path`` (CSV) and its ``.summary.json``, atomically.

    Parameters
    ----------
    path : str or PathLike
        Destination CSV; the summary goes to :func:`summary_path` of it.
    labels : numpy.ndarray
        ``(Y, X)`` or ``(Z, Y, X)`` instance labels.
    image : numpy.ndarray, optional
        Intensity image of the same shape (``mean_intensity`` column).
    pixel_size : float, optional
        nm per pixel; ``None`` measures in pixels.
    include_border : bool
        Keep particles touching the border in the size statistics.
    pixel_size_source : str, optional
        Where the pixel size came from, recorded in the summary.

    Returns
    -------
    Measurements
        What was written.

    Raises
    ------
    ValueError, FileNotFoundError
        Bad labels, image or pixel size; the destination folder does not exist.
    """
    m = measure(labels, image, pixel_size, include_border=include_border)
    write_measurements(path, m, pixel_size_source=pixel_size_source)
    return m


def write_measurements(
    path: str | os.PathLike,
    m: Measurements,
    *,
    labels_name: str | None = None,
    image_name: str | None = None,
    pixel_size_source: str | None = None,
) -> Path:
    """Write a :class:`Measurements` table to ``path`` (CSV) and its summary JSON, atomically.

    Returns the CSV path; the summary is at :func:`summary_path` of it.
    """
    source = pixel_size_source or ("given" if m.pixel_size is not None else "none")
    record = {
        "tool": "sagegan measure",
        "files": [_file_record(m, labels_name, image_name, source)],
    }
    _write_outputs(Path(path), m.table, record)
    return Path(path)


# --------------------------------------------------------------------------- command


def add_measure_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``measure`` sub-command to ``sagegan``'s sub-parsers."""
    p = subparsers.add_parser(
        "measure",
        help="measure particles (size, shape, order) from label images into a CSV",
        description=(
            "Measure every particle of one or more label images: area, equivalent diameter, "
            "Feret diameters, aspect ratio, circularity, solidity, mean intensity, "
            "nearest-neighbour distance, coordination and bond-orientational order (psi6, "
            "psi4). Writes FILE.csv (one row per particle) and FILE.summary.json (counts, "
            "mean, std, D10/D50/D90, number density, order parameters, g(r)). Lengths are in "
            "nm when the pixel size is known, in pixels otherwise; column names say which."
        ),
    )
    p.add_argument("labels", nargs="+", help="label images (0 = background) or binary masks")
    p.add_argument(
        "--image",
        nargs="+",
        metavar="IMG",
        help="the micrograph of each label image, in the same order: mean intensity, and the "
        "pixel size when the labels carry none (TIFF, DM3/DM4, EMD, SER, MRC)",
    )
    p.add_argument(
        "--pixel-size",
        type=float,
        metavar="NM",
        help="pixel size in nm (overrides what the files say)",
    )
    p.add_argument("--out", required=True, metavar="FILE.csv", help="particle table to write")
    p.add_argument(
        "--include-border",
        action="store_true",
        help="keep particles touching the image border in the size statistics",
    )
    p.set_defaults(func=cmd_measure)
    return p


def _read_labels_file(path: Path) -> np.ndarray:
    from napari_sagegan.io.images import as_instance_labels, read_image

    data = read_image(path)
    if data.ndim == 2:
        return as_instance_labels(data, source=str(path))
    return np.stack([as_instance_labels(s, source=f"{path} slice {z}") for z, s in enumerate(data)])


def _resolve_pixel_size(
    given: float | None, labels_path: Path, image_path: Path | None, image_meta: dict | None
) -> tuple[float | None, str]:
    from napari_sagegan.io.em import read_pixel_size

    if given is not None:
        return given, "--pixel-size"
    meta = read_pixel_size(labels_path)
    if meta["pixel_size"] is not None:
        return meta["pixel_size"], f"{labels_path.name} ({meta['source']} metadata)"
    if image_meta is not None and image_meta["pixel_size"] is not None:
        return image_meta["pixel_size"], f"{image_path.name} ({image_meta['source']} metadata)"
    return None, "none"


def cmd_measure(args: argparse.Namespace) -> int:
    """Run ``sagegan measure``; returns the exit status (0)."""
    from napari_sagegan.io.em import read_em

    given = check_pixel_size(args.pixel_size)
    label_paths = [Path(p).expanduser() for p in args.labels]
    image_paths = [Path(p).expanduser() for p in (args.image or [])]
    if image_paths and len(image_paths) != len(label_paths):
        raise ValueError(
            f"--image got {len(image_paths)} files for {len(label_paths)} label images; give "
            "one micrograph per label image, in the same order, or none"
        )
    out = Path(args.out).expanduser()
    if out.is_dir():
        raise ValueError(
            f"--out {out} is a folder; give a file name such as {out / 'particles.csv'}"
        )
    if not (out.parent if str(out.parent) else Path(".")).is_dir():
        raise FileNotFoundError(
            f"the folder of --out ({out.parent}) does not exist; create it first"
        )

    import pandas as pd

    records, tables, units = [], [], set()
    for k, lp in enumerate(label_paths):
        labels = _read_labels_file(lp)
        ip = image_paths[k] if image_paths else None
        image, image_meta = (None, None)
        if ip is not None:
            image, image_meta = read_em(ip)
            if image.shape != labels.shape:
                raise ValueError(
                    f"{ip.name} has shape {image.shape} but {lp.name} has shape {labels.shape}; "
                    "a label image must match its micrograph pixel for pixel"
                )
        px, source = _resolve_pixel_size(given, lp, ip, image_meta)
        if px is None:
            print(f"{lp.name}: pixel size unknown: measurements in pixels")
        else:
            print(f"{lp.name}: pixel size {px:.6g} nm (from {source})")
        m = measure(labels, image, px, include_border=args.include_border)
        units.add(m.unit)
        if len(units) > 1:
            raise ValueError(
                "some label images have a known pixel size and others not, so their lengths "
                "would be in different units; pass --pixel-size NM to measure all in nm"
            )
        table = m.table.copy()
        table.insert(0, "file", lp.name)
        tables.append(table)
        records.append(_file_record(m, str(lp), str(ip) if ip else None, source))
        print(
            f"{lp.name}: {m.summary['n_particles']} particles "
            f"({m.summary['n_touching_border']} touching the border)"
        )

    table = pd.concat(tables, ignore_index=True)
    table.attrs = {"unit": units.pop()}
    record: dict[str, Any] = {"tool": "sagegan measure", "files": records}
    if len(records) > 1:  # sizes pooled over all files; global order is per image only
        unit = table.attrs["unit"]
        field_area = sum(
            float(np.prod(r["shape"])) * (r["pixel_size_nm"] or 1.0) ** 2 for r in records
        )
        sizes = {r["pixel_size_nm"] for r in records}
        pooled = summarize(
            table,
            None,
            sizes.pop() if len(sizes) == 1 else None,
            field_area=field_area,
            include_border=args.include_border,
        )
        pooled["unit"] = unit
        record["pooled"] = pooled
    _write_outputs(out, table, record)
    print(f"wrote {out} ({len(table)} particles) and {summary_path(out)}")
    return 0
