"""The summary across segmented images (Measure dock, "Summary" tab) and the log-normal fit.

The fit is the engine's (``sagegan measure`` writes it into its summary JSON as well); the
dock's table has one row per image measured with its own pixel size, then the pooled rows,
and it is exported as CSV.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from skimage.draw import disk

from napari_sagegan.engine.analysis.measure import lognormal_fit, lognormal_pdf, measure
from napari_sagegan.napari.layers import META_KEY, labels_digest


def scattered_discs(shape, radii, seed):
    """Non-touching discs of the given radii at random places (none at the border)."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.int32)
    k = 0
    for r in radii:
        for _ in range(200):
            y, x = rng.uniform(r + 2, shape[0] - r - 3), rng.uniform(r + 2, shape[1] - r - 3)
            rr, cc = disk((y, x), r + 1.5, shape=shape)
            if not labels[rr, cc].any():
                k += 1
                rr, cc = disk((y, x), r, shape=shape)
                labels[rr, cc] = k
                break
    return labels


# --------------------------------------------------------------------------- engine


def test_lognormal_fit_is_the_maximum_likelihood_law():
    from scipy import stats

    rng = np.random.default_rng(0)
    d = rng.lognormal(mean=np.log(12.0), sigma=np.log(1.3), size=4000)
    median, gsd = lognormal_fit(d)
    shape, _, scale = stats.lognorm.fit(d, floc=0)
    assert median == pytest.approx(scale, rel=1e-6) and gsd == pytest.approx(np.exp(shape))
    assert median == pytest.approx(12.0, rel=0.02) and gsd == pytest.approx(1.3, rel=0.02)
    # a density: integrates to 1, and equals scipy's
    x = np.linspace(0.01, 80, 20000)
    pdf = lognormal_pdf(x, median, gsd)
    assert np.trapezoid(pdf, x) == pytest.approx(1.0, abs=1e-3)
    np.testing.assert_allclose(pdf, stats.lognorm.pdf(x, shape, scale=scale), rtol=1e-9)
    assert lognormal_fit([5.0]) is None and lognormal_fit([np.nan, -1, 0]) is None
    assert not lognormal_pdf(x, 10.0, 1.0).any()  # identical particles: no density


def test_measure_summary_gains_the_lognormal_law(tmp_path):
    """``sagegan measure``'s summary JSON (written by api.measure) carries the fit."""
    import json

    from napari_sagegan import api
    from napari_sagegan.util.progress import run_to_end

    labels = scattered_discs((160, 160), [3, 4, 5, 6, 7, 5, 4, 6], seed=1)
    s = measure(labels, pixel_size=0.8).summary
    d = measure(labels, pixel_size=0.8).table["equivalent_diameter_nm"]
    median, gsd = lognormal_fit(d)
    assert s["lognormal_median_nm"] == pytest.approx(median) and s["lognormal_gsd"] == gsd
    assert measure(labels).summary["lognormal_median_px"] == pytest.approx(median / 0.8)
    assert measure(np.zeros((8, 8), np.int32)).summary["lognormal_gsd"] is None
    out = tmp_path / "t.csv"
    run_to_end(api.measure([labels, labels], pixel_size=0.8, out=out))
    record = json.loads((tmp_path / "t.summary.json").read_text())
    assert record["files"][0]["summary"]["lognormal_median_nm"] == pytest.approx(median)
    assert record["pooled"]["lognormal_gsd"] == pytest.approx(gsd)


# --------------------------------------------------------------------------- the dock


@pytest.mark.gui
def test_summary_table_across_segmented_images(make_napari_viewer, tmp_path):
    pytest.importorskip("matplotlib")
    from napari_sagegan.napari._qt.measure import MeasureWidget

    viewer = make_napari_viewer()
    made = {}
    for name, nm, radii, seed in (
        ("a", 0.5, [6, 7, 8, 9, 7, 8], 2),
        ("b", 2.0, [2, 3, 2, 3, 2, 4, 3], 3),
    ):
        lab = scattered_discs((128, 128), radii, seed)
        viewer.add_image(np.where(lab > 0, 40, 200).astype(np.uint8), name=name)
        meta = {META_KEY: {"image": name, "digest": labels_digest(lab)}}
        viewer.add_labels(lab, name=f"{name} labels", metadata=meta)
        made[name] = (lab, nm)
    # a ground truth opened from a file is not a segmented image: not summarised
    viewer.add_labels(made["a"][0], name="a ground truth")
    widget = MeasureWidget(viewer)
    for name, (_, nm) in made.items():  # pixel sizes typed once per image
        widget.labels_combo.setCurrentText(f"{name} labels")
        assert widget.set_pixel_size(nm)

    table = widget.summary.run(blocking=True)
    assert list(table["labels"]) == ["a labels", "b labels", "all (2 images)"]
    assert widget.summary.model.rowCount() == 3
    for i, (name, (lab, nm)) in enumerate(made.items()):
        s = measure(lab, pixel_size=nm).summary
        row = table.iloc[i]
        assert row["image"] == name and row["pixel_size_nm"] == nm
        assert row["n_particles"] == len(np.unique(lab)) - 1
        for col, key in (("D10_nm", "d10"), ("D50_nm", "d50"), ("D90_nm", "d90")):
            assert row[col] == pytest.approx(s[f"equivalent_diameter_nm_{key}"])
        assert row["mean_nm"] == pytest.approx(s["equivalent_diameter_nm_mean"])
        assert row["std_nm"] == pytest.approx(s["equivalent_diameter_nm_std"])
        density = row["n_particles"] / (lab.size * nm * nm / 1e6)
        assert row["number_density_per_um2"] == pytest.approx(density)
        assert row["lognormal_median_nm"] == pytest.approx(s["lognormal_median_nm"])
    pooled = table.iloc[2]
    assert pooled["n_particles"] == table.iloc[:2]["n_particles"].sum()
    both = np.concatenate(
        [measure(lab, pixel_size=nm).table["equivalent_diameter_nm"] for lab, nm in made.values()]
    )
    assert pooled["D50_nm"] == pytest.approx(np.percentile(both, 50))
    assert pooled["lognormal_gsd"] == pytest.approx(lognormal_fit(both)[1])
    assert "2 image(s) summarised" in widget.summary.status.text()

    path = widget.summary.export_csv(tmp_path / "summary.csv")
    back = pd.read_csv(path)
    assert list(back["labels"]) == list(table["labels"])
    np.testing.assert_allclose(back["D50_nm"], table["D50_nm"], rtol=1e-5)


@pytest.mark.gui
def test_size_histogram_shows_the_fitted_lognormal(make_napari_viewer):
    pytest.importorskip("matplotlib")
    from napari_sagegan.napari._qt.measure import MeasureWidget

    viewer = make_napari_viewer()
    lab = scattered_discs((160, 160), [3, 4, 5, 6, 7, 5, 4, 6, 5, 5], seed=4)
    viewer.add_labels(lab, name="particles", scale=(1.2, 1.2), units=("nm", "nm"))
    widget = MeasureWidget(viewer)
    result = widget.run(blocking=True)
    median, gsd = result.summary["lognormal_median_nm"], result.summary["lognormal_gsd"]
    ax = widget.figure.axes[0]
    (curve,) = ax.lines
    assert f"median {median:.3g} nm" in curve.get_label() and f"GSD {gsd:.3g}" in (
        curve.get_label()
    )
    heights = [p.get_height() for p in ax.patches]
    widths = [p.get_width() for p in ax.patches]
    assert sum(heights) == result.summary["n_measured"]
    # the curve is the density in particles per bin: its area is about all particles
    x, y = curve.get_data()
    area = np.trapezoid(y, x) / np.mean(widths)
    assert 0.6 * sum(heights) < area <= 1.01 * sum(heights)
    assert x[np.argmax(y)] < median  # a log-normal's mode lies below its median
    assert "log-normal fit: median" in widget.status.text()


def test_summary_keeps_units_apart_when_a_pixel_size_is_unknown():
    from napari_sagegan.io.pixel_size import PixelSize
    from napari_sagegan.napari.summary import POOLED_SOURCE, SummaryItem, summarise
    from napari_sagegan.util.progress import run_to_end

    labs = [scattered_discs((96, 96), [4, 5, 6], seed) for seed in (5, 6, 7)]
    items = [
        SummaryItem("a labels", "a", labs[0], PixelSize(0.5, "given")),
        SummaryItem("b labels", "b", labs[1], PixelSize(1.5, "imagej", "b.tif")),
        SummaryItem("c labels", "c", labs[2], PixelSize(None)),
    ]
    events = []
    table = run_to_end(summarise(items), events.append)
    assert [e.step for e in events] == [1, 2, 3] and events[-1].total == 3
    assert list(table["labels"]) == ["a labels", "b labels", "c labels", "all in nm (2 images)"]
    assert table["pixel_size_source"].tolist() == ["given", "b.tif (imagej metadata)", "none",
                                                   POOLED_SOURCE]  # fmt: skip
    # lengths never without their unit: the uncalibrated image in px, the others in nm
    assert np.isnan(table.loc[2, "D50_nm"]) and table.loc[2, "D50_px"] > 0
    assert table.loc[:1, "D50_px"].isna().all()
    assert table.loc[3, "n_particles"] == table.loc[:1, "n_particles"].sum()
    with pytest.raises(ValueError, match="segment an image first"):
        run_to_end(summarise([]))
