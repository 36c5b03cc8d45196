"""The summary table of the Measure dock: one row per segmented image, and the pooled sizes.

Each Labels layer is measured by :func:`napari_sagegan.api.measure` with its own pixel size
(:func:`napari_sagegan.napari.calibration.labels_pixel_size`), so images of different
magnifications compare in nm. A row holds the particle count, the size distribution of the
equivalent diameter (D10 / D50 / D90, mean and standard deviation), its fitted log-normal
law (median and geometric standard deviation,
:func:`napari_sagegan.engine.analysis.measure.lognormal_fit`) and the number density.
The last rows pool every particle of the images measured in the same unit.

Qt-free: :func:`summary_items` reads the layers on the main thread, :func:`summarise` runs in
a worker; the dock part is :class:`napari_sagegan.napari._qt.summary.SummaryPanel`.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from napari_sagegan.io.pixel_size import PixelSize
from napari_sagegan.napari.calibration import image_name_of, labels_pixel_size
from napari_sagegan.napari.layers import PREVIEW_NAME, is_result, is_synthetic
from napari_sagegan.util.progress import Progress

#: Name of the pooled rows (``"all (3 images)"``).
POOLED = "all"
#: ``pixel_size_source`` of the pooled rows.
POOLED_SOURCE = "each image's own"


@dataclass
class SummaryItem:
    """One Labels layer to summarise, read on the main thread.

    Attributes
    ----------
    labels : str
        The Labels layer's name.
    image : str or None
        The image it was made from, when known.
    data : numpy.ndarray
        A copy of the labels, ``(Y, X)`` or ``(Z, Y, X)``.
    pixel_size : PixelSize
        nm per pixel and where it came from (unknown: lengths in pixels).
    """

    labels: str
    image: str | None
    data: np.ndarray
    pixel_size: PixelSize


def summary_items(layers: Iterable[Any], state: Any = None) -> list[SummaryItem]:
    """The Labels layers of the summary: Segment's results (corrected or not), or every
    Labels layer when there is none (masks opened from files), generated pairs and the
    phase-2 preview left out; 2-D and 3-D only."""
    layers = list(layers)
    labels = [ly for ly in layers if type(ly).__name__.lower() == "labels" and ly.ndim in (2, 3)]
    chosen = [ly for ly in labels if is_result(ly)]
    if not chosen:
        chosen = [ly for ly in labels if not is_synthetic(ly) and ly.name != PREVIEW_NAME]
    return [
        SummaryItem(
            labels=str(ly.name),
            image=image_name_of(ly),
            data=np.array(ly.data),
            pixel_size=labels_pixel_size(layers, ly, state),
        )
        for ly in chosen
    ]


def summary_row(
    name: str,
    image: str | None,
    s: dict[str, Any],
    pixel_size: float | None,
    source: str = "",
) -> dict[str, Any]:
    """One row of the summary table from a summary dict (:func:`~napari_sagegan.engine.
    analysis.measure.summarize`; its lengths in ``s["unit"]``)."""
    u = s["unit"]
    key = f"equivalent_diameter_{u}"
    row: dict[str, Any] = {
        "labels": name,
        "image": image or "",
        "pixel_size_nm": pixel_size if pixel_size is not None else np.nan,
        "n_particles": s["n_particles"],
        f"D10_{u}": s[f"{key}_d10"],
        f"D50_{u}": s[f"{key}_d50"],
        f"D90_{u}": s[f"{key}_d90"],
        f"mean_{u}": s[f"{key}_mean"],
        f"std_{u}": s[f"{key}_std"],
        f"lognormal_median_{u}": s.get(f"lognormal_median_{u}"),
        "lognormal_gsd": s.get("lognormal_gsd"),
    }
    if u == "nm":
        row["number_density_per_um2"] = s["number_density_per_um2"]
    else:
        row["number_density_per_px2"] = s["number_density_per_px2"]
    row["area_fraction"] = s["area_fraction"]
    row["n_measured"] = s["n_measured"]
    row["n_touching_border"] = s["n_touching_border"]
    row["pixel_size_source"] = source
    return {k: (np.nan if v is None else v) for k, v in row.items()}


def _pooled_rows(done: Sequence[tuple[SummaryItem, Any]], include_border: bool) -> list[dict]:
    """Rows pooling all particles of the images measured in the same unit."""
    import pandas as pd

    from napari_sagegan.engine.analysis.measure import summarize

    rows = []
    units = sorted({m.unit for _, m in done})
    for unit in units:
        group = [m for _, m in done if m.unit == unit]
        if len(group) < 2:
            continue
        table = pd.concat([m.table for m in group], ignore_index=True)
        table.attrs = {"unit": unit}
        area = sum(float(np.prod(m.field_shape)) * (m.pixel_size or 1.0) ** 2 for m in group)
        pooled = summarize(table, None, None, field_area=area, include_border=include_border)
        pooled["unit"] = unit
        what = (
            f"{POOLED} ({len(group)} images)"
            if len(units) == 1
            else (f"{POOLED} in {unit} ({len(group)} images)")
        )
        rows.append(summary_row(what, None, pooled, None, POOLED_SOURCE))
    return rows


def summarise(
    items: Sequence[SummaryItem], *, include_border: bool = False
) -> Generator[Progress, None, Any]:
    """Measure each item (:func:`napari_sagegan.api.measure`) and tabulate its summary.

    Yields
    ------
    Progress
        ``stage="summary"``, one event per Labels layer measured.

    Returns
    -------
    pandas.DataFrame
        One row per item (:func:`summary_row`), then the pooled rows (one per unit with at
        least two images). Lengths carry their unit in the column names: ``D50_nm`` for the
        images of known pixel size, ``D50_px`` for the others.

    Raises
    ------
    ValueError
        No Labels layer to summarise.
    """
    import pandas as pd

    from napari_sagegan import api
    from napari_sagegan.util.progress import run_to_end

    if not items:
        raise ValueError("there is no Labels layer to summarise: segment an image first")
    done, rows = [], []
    for k, item in enumerate(items):
        measured = run_to_end(
            api.measure(
                [item.data],
                pixel_size=item.pixel_size if item.pixel_size.known else None,
                names=[item.labels],
                include_border=include_border,
            )
        )
        (m,) = measured.measurements
        done.append((item, m))
        rows.append(
            summary_row(
                item.labels, item.image, m.summary, m.pixel_size, item.pixel_size.describe()
            )
        )
        yield Progress(
            "summary",
            k + 1,
            len(items),
            message=f"{item.labels}: {m.summary['n_particles']} particles",
        )
    rows += _pooled_rows(done, include_border)
    return pd.DataFrame(rows)
