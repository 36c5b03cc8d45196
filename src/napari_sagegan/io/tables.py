"""Particle tables on disk: one CSV row per particle, and a summary JSON beside it.

``results.csv`` holds the particle table of :func:`napari_sagegan.engine.analysis.measure.
measure`; ``results.summary.json`` (:func:`summary_path`) holds, per file, the pixel size
and where it came from, the unit, the summary statistics and g(r), and (several files) the
pooled statistics. Both are written atomically. ``sagegan measure``, ``sagegan segment
--csv`` and the Measure dock write through here, and the Measure dock's summary table (one
row per image: :func:`write_summary_table`). Torch-free, Qt-free and engine-free: the
measuring is :func:`napari_sagegan.api.measure`'s.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from napari_sagegan.util.files import atomic_path, atomic_write_text

if TYPE_CHECKING:  # pragma: no cover
    from napari_sagegan.engine.analysis.measure import Measurements

_FLOAT_FORMAT = "%.6g"
#: ``"tool"`` entry of every summary JSON.
TOOL = "sagegan measure"


def summary_path(csv_path: str | os.PathLike) -> Path:
    """``results.csv -> results.summary.json`` (beside the CSV)."""
    p = Path(csv_path)
    return (
        p.with_name(p.stem + ".summary.json") if p.suffix else p.with_name(p.name + ".summary.json")
    )


def json_ready(value: Any) -> Any:
    """``value`` with NumPy scalars and arrays as plain Python, non-finite floats as None."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return [json_ready(v) for v in value.tolist()]
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    return value


def write_json(path: str | os.PathLike, record: Any) -> Path:
    """Write ``record`` as indented JSON (strict: no NaN), atomically."""
    text = json.dumps(json_ready(record), indent=2, allow_nan=False) + "\n"
    return atomic_write_text(path, text)


def file_record(
    m: Measurements, labels: str | None, image: str | None, source: str
) -> dict[str, Any]:
    """The summary JSON's entry for one measured label image."""
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


def write_table(csv_path: str | os.PathLike, table: Any, record: dict[str, Any]) -> Path:
    """Write a particle table (CSV) and its summary ``record`` (JSON beside it), atomically."""
    csv_path = Path(csv_path)
    with atomic_path(csv_path) as tmp:
        table.to_csv(tmp, index=False, float_format=_FLOAT_FORMAT)
    write_json(summary_path(csv_path), record)
    return csv_path


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
    record = {"tool": TOOL, "files": [file_record(m, labels_name, image_name, source)]}
    return write_table(path, m.table, record)


def write_summary_table(path: str | os.PathLike, table: Any) -> Path:
    """Write the per-image summary table (one row per image, then pooled rows) as CSV,
    atomically; columns carry their units (``D50_nm``, ``number_density_per_um2``)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False, float_format=_FLOAT_FORMAT)
    return path
