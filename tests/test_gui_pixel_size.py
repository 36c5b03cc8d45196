"""The pixel size in the real viewer: from the file to every layer, Measure, Export and back.

A calibrated ImageJ TIFF is opened by napari's own reader (which drops the calibration);
the docks write it into the layer, Segment carries it to its Labels layer, Export writes it
into the label TIFF and the CSV (nm), Measure measures in nm; an image without one gets it
typed once, in Segment or Measure, for every dock. Measure follows the Labels choice to the
image they were made from, and warns when the image chosen does not belong to them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import tifffile
from skimage.draw import disk

pytest.importorskip("napari")
pytest.importorskip("matplotlib")

from napari_sagegan.napari.layers import META_KEY, labels_digest  # noqa: E402
from napari_sagegan.napari.state import viewer_state  # noqa: E402
from test_tasks import disc_scene, trained_checkpoint  # noqa: E402

pytestmark = pytest.mark.gui

TIMEOUT = 20_000  # ms


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return trained_checkpoint(tmp_path_factory.mktemp("model"))


def discs(shape, centres, radius):
    labels = np.zeros(shape, np.int32)
    for i, c in enumerate(centres, 1):
        rr, cc = disk(c, radius, shape=shape)
        labels[rr, cc] = i
    return labels


def result_metadata(image_name, labels):
    """The metadata Segment gives its Labels layers (source image, fingerprint)."""
    return {META_KEY: {"image": image_name, "model": "test", "digest": labels_digest(labels)}}


def equivalent_diameter_px(labels, label=1):
    return 2.0 * np.sqrt(np.count_nonzero(labels == label) / np.pi)


def imagej_tiff(path, data, nm):
    tifffile.imwrite(path, data, imagej=True, resolution=(1 / nm, 1 / nm), metadata={"unit": "nm"})
    return path


# --------------------------------------------------------------------------- item 1


def test_measure_follows_the_labels_to_their_image(make_napari_viewer):
    """Labels without a scale of their own: the pixel size is their image's, whichever
    image was chosen before (the 38.9 nm instead of 14.6 nm report)."""
    from napari_sagegan.napari._qt.measure import MeasureWidget

    viewer = make_napari_viewer()
    centres = ((20, 20), (20, 60), (60, 40))
    fine = discs((96, 96), centres, 9.5)
    coarse = discs((96, 96), centres, 4.0)
    for name, nm, lab in (("fine", 0.75, fine), ("coarse", 2.0, coarse)):
        image = np.where(lab > 0, 50, 200).astype(np.uint8)
        viewer.add_image(image, name=name, scale=(nm, nm), units=("nm", "nm"))
        # made by Segment from an image whose scale was lost: no scale, linked by metadata
        viewer.add_labels(lab, name=f"{name} labels", metadata=result_metadata(name, lab))
    widget = MeasureWidget(viewer)
    widget.labels_combo.setCurrentText("coarse labels")
    assert widget.image_combo.currentText() == "coarse"
    assert widget.pixel_size.value() == pytest.approx(2.0)
    coarse_d50 = widget.run(blocking=True).summary["equivalent_diameter_nm_d50"]
    assert coarse_d50 == pytest.approx(equivalent_diameter_px(coarse) * 2.0)

    widget.labels_combo.setCurrentText("fine labels")  # the image box follows
    assert widget.image_combo.currentText() == "fine"
    assert widget.pixel_size.value() == pytest.approx(0.75)
    assert widget.warning.isHidden()
    result = widget.run(blocking=True)
    d50 = result.summary["equivalent_diameter_nm_d50"]
    assert d50 == pytest.approx(equivalent_diameter_px(fine) * 0.75)
    assert d50 != pytest.approx(equivalent_diameter_px(fine) * 2.0)  # not the other image's
    assert f"D50 {d50:.3g} nm" in widget.status.text()

    # choosing the other image by hand: warned, in the dock, that it is not theirs
    widget.image_combo.setCurrentText("coarse")
    text = widget.warning.text()
    assert not widget.warning.isHidden()
    assert "made from 'fine'" in text and "not that of 'coarse'" in text
    # an image of another shape: warned, and Measure refuses it
    viewer.add_image(np.zeros((50, 50), np.uint8), name="small")
    widget.image_combo.setCurrentText("small")
    assert "shape (50, 50)" in widget.warning.text()
    assert widget.run(blocking=True) is None and "choose the matching image" in (
        widget.status.text()
    )


# --------------------------------------------------------------------------- item 2


def test_calibrated_tiff_round_trip_segment_export_measure(
    make_napari_viewer, qtbot, tiny_model, tmp_path
):
    from napari_sagegan.io.export import read_labels_scale
    from napari_sagegan.napari._qt.export import ExportWidget
    from napari_sagegan.napari._qt.measure import MeasureWidget
    from napari_sagegan.napari._qt.segment import SegmentWidget
    from napari_sagegan.napari.writer import write_labels

    nm = 0.5
    img, truth = disc_scene()
    path = imagej_tiff(tmp_path / "grid.tif", img, nm)
    viewer = make_napari_viewer()
    segment = SegmentWidget(viewer)
    viewer.window.add_dock_widget(segment)
    assert segment.load_model(str(tiny_model))
    segment.device_combo.setCurrentText("cpu")

    (image,) = viewer.open(str(path))  # napari's own TIFF reader
    assert image.source.reader_plugin == "napari"
    assert tuple(image.scale) == pytest.approx((nm, nm))
    assert image.metadata["pixel_size_nm"] == pytest.approx(nm)
    assert [str(u) for u in image.units] == ["nanometer", "nanometer"]
    assert segment.pixel_size_spin.value() == pytest.approx(nm)

    assert segment.run() is not None
    qtbot.waitUntil(lambda: not segment.is_running, timeout=TIMEOUT)
    labels = viewer.layers["grid labels"]
    n = len(np.unique(labels.data)) - 1
    assert n == 8
    assert tuple(labels.scale) == pytest.approx((nm, nm))
    assert labels.metadata["pixel_size_nm"] == pytest.approx(nm)
    np.testing.assert_allclose(labels.features["area_nm2"], labels.features["area_px"] * nm**2)

    export = ExportWidget(viewer)
    viewer.window.add_dock_widget(export)
    assert export.ticked() == ["grid labels"]
    out = tmp_path / "out"
    out.mkdir()
    assert export.export_all(str(out)) is not None
    qtbot.waitUntil(lambda: not export.is_running, timeout=TIMEOUT)
    tif = out / "grid_labels.tif"
    with tifffile.TiffFile(tif) as f:  # what Fiji reads
        assert f.imagej_metadata["unit"] == "nm"
        xres = f.pages[0].tags["XResolution"].value
        assert xres[0] / xres[1] == pytest.approx(1 / nm)
    assert read_labels_scale(tif) == (pytest.approx((nm, nm)), "nm")
    csv = pd.read_csv(out / "particles.csv")
    assert len(csv) == n and (csv["pixel_size_nm"] == nm).all()
    np.testing.assert_allclose(csv["area_nm2"], csv["area_px"] * nm**2)
    np.testing.assert_allclose(csv["equivalent_diameter_nm"], csv["equivalent_diameter_px"] * nm)
    assert "touches_border" in csv and not csv["touches_border"].any()

    measure = MeasureWidget(viewer)
    measure.labels_combo.setCurrentText("grid labels")
    assert measure.image_combo.currentText() == "grid"
    assert measure.pixel_size.value() == pytest.approx(nm)
    result = measure.run(blocking=True)
    assert result.unit == "nm" and result.pixel_size == pytest.approx(nm)
    np.testing.assert_allclose(
        np.sort(result.table["equivalent_diameter_nm"]), np.sort(csv["equivalent_diameter_nm"])
    )

    # File > Save Selected Layers goes through the plugin's writer: the same pixel size
    data, meta, _ = labels.as_layer_data_tuple()
    (saved,) = write_labels(str(tmp_path / "saved.tif"), data, meta)
    assert read_labels_scale(saved) == (pytest.approx((nm, nm)), "nm")


def test_tiff_opened_before_any_dock_is_calibrated_when_a_dock_opens(make_napari_viewer, tmp_path):
    from napari_sagegan.napari._qt.measure import MeasureWidget

    path = imagej_tiff(tmp_path / "early.tif", disc_scene()[0], 1.25)
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, disc_scene()[0])
    viewer = make_napari_viewer()
    (early,) = viewer.open(str(path))
    (uncalibrated,) = viewer.open(str(plain))
    assert tuple(early.scale) == (1.0, 1.0)  # napari dropped it
    MeasureWidget(viewer)
    assert tuple(early.scale) == pytest.approx((1.25, 1.25))
    assert tuple(uncalibrated.scale) == (1.0, 1.0)  # nothing to read: left alone
    assert "pixel_size_nm" not in uncalibrated.metadata


def test_pixel_size_set_once_for_an_image_is_used_by_every_dock(
    make_napari_viewer, qtbot, tmp_path
):
    from napari_sagegan.napari._qt.export import ExportWidget
    from napari_sagegan.napari._qt.measure import MeasureWidget
    from napari_sagegan.napari._qt.segment import SegmentWidget

    img, lab = disc_scene()
    viewer = make_napari_viewer()
    viewer.add_image(img, name="raw")
    viewer.add_labels(lab, name="raw labels", metadata=result_metadata("raw", lab))
    segment = SegmentWidget(viewer)
    measure = MeasureWidget(viewer)
    export = ExportWidget(viewer)
    assert segment.pixel_size_spin.value() == 0.0 and measure.pixel_size.value() == 0.0
    assert "pixel size unknown" in measure.warning.text()

    assert segment.set_pixel_size(1.5)  # typed once in Segment
    state = viewer_state(viewer)
    assert state.pixel_sizes.get("raw") == 1.5
    for name in ("raw", "raw labels"):  # the image and the labels made from it
        layer = viewer.layers[name]
        assert tuple(layer.scale) == (1.5, 1.5) and layer.metadata["pixel_size_nm"] == 1.5
    assert measure.pixel_size.value() == pytest.approx(1.5)  # shown at once in Measure
    assert measure.warning.isHidden()
    result = measure.run(blocking=True)
    np.testing.assert_allclose(
        result.table["area_nm2"].sum(), np.count_nonzero(lab) * 1.5**2, rtol=1e-9
    )

    assert measure.set_pixel_size(2.5)  # corrected in Measure: kept for the image
    assert state.pixel_sizes.get("raw") == 2.5
    assert segment.pixel_size_spin.value() == pytest.approx(2.5)
    assert tuple(viewer.layers["raw labels"].scale) == (2.5, 2.5)

    assert export.export_all(str(tmp_path)) is not None
    qtbot.waitUntil(lambda: not export.is_running, timeout=TIMEOUT)
    from napari_sagegan.io.export import read_labels_scale

    assert read_labels_scale(tmp_path / "raw_labels.tif") == ((2.5, 2.5), "nm")
    csv = pd.read_csv(tmp_path / "particles.csv")
    np.testing.assert_allclose(csv["area_nm2"], csv["area_px"] * 2.5**2)
